//! Sends APDUs (hex, one per argument) to the card in a PC/SC reader through the
//! reader-drivers PC/SC path and prints each response: `cargo run --example apdu -- READER APDU…`.
use reader_drivers::ReaderDriver;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let reader = args.next().expect("reader name");
    let driver = reader_drivers::pcsc::PcscDriver::new();
    let (mut s, atr) = driver.connect(&reader).await.expect("connect");
    println!("ATR {}", hex::encode_upper(&atr));
    for a in args {
        let apdu = hex::decode(a.replace([':', ' '], "")).expect("hex");
        let r = reader_drivers::transmit_whole(s.as_mut(), &apdu).await;
        println!(
            "{} -> {:?}",
            hex::encode_upper(&apdu),
            r.map(hex::encode_upper)
        );
    }
}

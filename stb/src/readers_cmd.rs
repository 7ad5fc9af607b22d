//! `stbd readers`: lists the readers and each one's card state, like pcsc_scan, through any
//! [`ReaderDriver`] (the PC/SC driver in `stbd`). Formatting is kept here, apart from I/O, so
//! it is tested without a reader.

use reader_drivers::{CardPresence, ReaderDriver, ReaderError, ReaderEvent, ReaderInfo};

/// Hex with spaces, as pcsc_scan prints ATRs: "3B 80 80 01 01".
pub fn hex_spaced(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// One line for a card state.
pub fn describe(card: &CardPresence) -> String {
    match card {
        CardPresence::Absent => "no card".into(),
        CardPresence::Present { .. } => "card present".into(),
        CardPresence::Mute => "card is mute — reinsert it".into(),
        CardPresence::InUse => "card present, in use by another application".into(),
    }
}

/// The listing: one block per reader, numbered as pcsc_scan does.
pub fn format_readers(readers: &[ReaderInfo]) -> String {
    let mut out = String::new();
    for (i, r) in readers.iter().enumerate() {
        out.push_str(&format!("Reader {i}: {}\n", r.name));
        out.push_str(&format!("  Card state: {}\n", describe(&r.card)));
        if let CardPresence::Present { atr } = &r.card {
            if !atr.is_empty() {
                out.push_str(&format!("  ATR: {}\n", hex_spaced(atr)));
            }
        }
    }
    out
}

/// One serial reader's block: the device, its wiring, and what a reset gave (ATR, protocol,
/// speed, and what the ATR parser noted).
pub fn format_serial(
    index: usize,
    device: &str,
    wiring: &str,
    card: &Result<reader_drivers::serial::SerialCardInfo, ReaderError>,
) -> String {
    let mut out = format!("Reader {index}: serial {device} ({wiring})\n");
    match card {
        Ok(info) => {
            out.push_str("  Card state: card present\n");
            out.push_str(&format!("  ATR: {}\n", hex_spaced(&info.atr)));
            out.push_str(&format!(
                "  Protocol: T={}, {} baud, {:?} convention\n",
                info.protocol, info.baud, info.convention
            ));
            for w in &info.warnings {
                out.push_str(&format!("  Note: {w}\n"));
            }
        }
        Err(ReaderError::NoCard { .. }) => out.push_str("  Card state: no card\n"),
        Err(ReaderError::Mute { .. }) => {
            out.push_str("  Card state: card is mute — reinsert it, check profile and clock_hz\n")
        }
        Err(e) => out.push_str(&format!("  Card state: {e}\n")),
    }
    out
}

/// Lists the readers. No reader at all is an error ("no reader attached — plug in a card
/// reader"), so a script sees a non-zero exit.
pub async fn list(driver: &dyn ReaderDriver) -> Result<String, ReaderError> {
    let readers = driver.list().await?;
    if readers.is_empty() {
        return Err(ReaderError::NoReader);
    }
    Ok(format_readers(&readers))
}

/// One line per event, for `stbd readers --watch`.
pub fn format_event(ev: &ReaderEvent) -> String {
    match ev {
        ReaderEvent::ReaderAttached { reader } => format!("{reader}: reader attached"),
        ReaderEvent::ReaderDetached { reader } => format!("{reader}: reader detached"),
        ReaderEvent::CardInserted { reader, atr } if atr.is_empty() => {
            format!("{reader}: card inserted (no ATR — the card may be mute; reinsert it)")
        }
        ReaderEvent::CardInserted { reader, atr } => {
            format!("{reader}: card inserted, ATR: {}", hex_spaced(atr))
        }
        ReaderEvent::CardRemoved { reader } => format!("{reader}: card removed"),
        ReaderEvent::ServiceLost { reason } => format!("reader service lost: {reason}"),
        ReaderEvent::ServiceRestored => "reader service restored".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_like_pcsc_scan() {
        let readers = vec![
            ReaderInfo {
                name: "Virtual PCD 00 00".into(),
                card: CardPresence::Present {
                    atr: vec![0x3B, 0x80, 0x80, 0x01, 0x01],
                },
            },
            ReaderInfo {
                name: "Virtual PCD 00 01".into(),
                card: CardPresence::Absent,
            },
            ReaderInfo {
                name: "Phoenix /dev/ttyUSB0".into(),
                card: CardPresence::Mute,
            },
        ];
        assert_eq!(
            format_readers(&readers),
            "Reader 0: Virtual PCD 00 00\n  Card state: card present\n  ATR: 3B 80 80 01 01\n\
             Reader 1: Virtual PCD 00 01\n  Card state: no card\n\
             Reader 2: Phoenix /dev/ttyUSB0\n  Card state: card is mute — reinsert it\n"
        );
    }

    #[test]
    fn serial_reader_with_its_atr() {
        let info = reader_drivers::serial::SerialCardInfo {
            atr: vec![0x3B, 0x00, 0x90],
            warnings: vec!["1 byte(s) after the end of the ATR; discarded".into()],
            protocol: 0,
            baud: 9600,
            convention: reader_drivers::serial::atr::Convention::Direct,
        };
        assert_eq!(
            format_serial(1, "/dev/ttyUSB0", "RTS high resets", &Ok(info)),
            "Reader 1: serial /dev/ttyUSB0 (RTS high resets)\n  Card state: card present\n  \
             ATR: 3B 00 90\n  Protocol: T=0, 9600 baud, Direct convention\n  \
             Note: 1 byte(s) after the end of the ATR; discarded\n"
        );
    }

    #[test]
    fn events_read_as_sentences() {
        assert_eq!(
            format_event(&ReaderEvent::CardInserted {
                reader: "R".into(),
                atr: vec![0x3B, 0x00]
            }),
            "R: card inserted, ATR: 3B 00"
        );
        assert_eq!(
            format_event(&ReaderEvent::ServiceLost {
                reason: "pcscd is not running".into()
            }),
            "reader service lost: pcscd is not running"
        );
    }
}

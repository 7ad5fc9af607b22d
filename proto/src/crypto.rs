//! The purse's cryptography, on the `des` and `cbc` crates (no home-made primitives):
//!
//! - 2-key triple DES keys (128 bits with odd parity, 001 [0107]);
//! - ISO/IEC 9797-1 MAC algorithm 3 ("retail MAC") with padding method 2 — every signature
//!   in the system (security-card signature, card signature, expected card signature,
//!   S1/S2/S3) is one of these MACs over a labelled, fixed-layout message;
//! - key diversification: per-card keys from issuer master keys by card id, and
//!   per-transaction session keys (EMV-style option A: encrypt the diversifier and its
//!   complement under the master key);
//! - the message layer of 001 FIG. 8 ([0107]–[0116]): the merchant/payment-server shared
//!   key, the derived per-transaction key, the TSK and ETSK, and sealed messages
//!   (CBC encryption then MAC, so a tampered ciphertext is refused, not decrypted).

use cbc::cipher::block_padding::Iso7816;
use cbc::cipher::{
    BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, KeyInit, KeyIvInit,
};
use des::{Des, TdesEde2};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// A MAC (signature) value: the full 8-byte output of MAC algorithm 3.
pub type Mac = [u8; 8];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("sealed message too short or not a whole number of blocks")]
    Malformed,
    #[error("message authentication failed (tampered or wrong key)")]
    BadMac,
    #[error("bad padding after decryption")]
    BadPadding,
    #[error("key must be 16 bytes, got {0}")]
    KeyLength(usize),
}

/// A 2-key triple-DES key: K1 ‖ K2, each with odd parity. Held as a
/// [`crate::secret::Secret`]: its `Debug` is masked and it is wiped from memory on drop;
/// [`DesKey::bytes`] is the one way in.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DesKey(crate::secret::Secret<[u8; 16]>);

impl std::fmt::Debug for DesKey {
    /// Keys never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DesKey(..)")
    }
}

impl DesKey {
    /// Builds a key, forcing odd parity on every byte as DES keys carry it.
    pub fn new(bytes: [u8; 16]) -> Self {
        let mut k = bytes;
        for b in &mut k {
            *b = with_odd_parity(*b);
        }
        let key = Self(crate::secret::Secret::new(k));
        k.zeroize();
        key
    }

    /// The key's 16 bytes (K1 ‖ K2), for the code that must use them (never for logs).
    pub fn bytes(&self) -> &[u8; 16] {
        self.0.expose()
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let arr: [u8; 16] = bytes
            .try_into()
            .map_err(|_| CryptoError::KeyLength(bytes.len()))?;
        Ok(Self::new(arr))
    }

    pub fn random(rng: &mut impl RngCore) -> Self {
        let mut k = [0u8; 16];
        rng.fill_bytes(&mut k);
        Self::new(k)
    }

    pub fn has_odd_parity(&self) -> bool {
        self.bytes().iter().all(|b| b.count_ones() % 2 == 1)
    }

    fn k1(&self) -> Des {
        Des::new_from_slice(&self.bytes()[..8]).expect("8-byte DES key")
    }

    fn k2(&self) -> Des {
        Des::new_from_slice(&self.bytes()[8..]).expect("8-byte DES key")
    }

    fn tdes(&self) -> TdesEde2 {
        TdesEde2::new_from_slice(self.bytes()).expect("16-byte TDES key")
    }

    /// Triple-DES (EDE, K1 K2 K1) encryption of one block.
    pub fn encrypt_block(&self, block: [u8; 8]) -> [u8; 8] {
        let mut b = block.into();
        self.tdes().encrypt_block(&mut b);
        b.into()
    }

    /// Triple-DES decryption of one block.
    pub fn decrypt_block(&self, block: [u8; 8]) -> [u8; 8] {
        let mut b = block.into();
        self.tdes().decrypt_block(&mut b);
        b.into()
    }

    /// Diversifies this (master) key with 8 bytes of diversification data:
    /// left = E(d), right = E(d XOR FF…FF), parity adjusted.
    pub fn diversify(&self, data: [u8; 8]) -> DesKey {
        let left = self.encrypt_block(data);
        let right = self.encrypt_block(data.map(|b| !b));
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&left);
        k[8..].copy_from_slice(&right);
        DesKey::new(k)
    }

    /// Diversifies with a labelled, variable-length input (compressed by MAC first), for
    /// derivations whose inputs are not 8 bytes (merchant id + transaction id, say).
    pub fn derive(&self, label: &[u8], input: &[u8]) -> DesKey {
        let mut msg = Vec::with_capacity(label.len() + 1 + input.len());
        msg.extend_from_slice(label);
        msg.push(0);
        msg.extend_from_slice(input);
        self.diversify(mac3(self, &msg))
    }
}

fn with_odd_parity(b: u8) -> u8 {
    let high = b & 0xFE;
    if high.count_ones() % 2 == 0 {
        high | 1
    } else {
        high
    }
}

/// ISO/IEC 9797-1 padding method 2: append 0x80, then zeros to a whole block.
pub fn pad_method2(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 8);
    out.extend_from_slice(data);
    out.push(0x80);
    while out.len() % 8 != 0 {
        out.push(0);
    }
    out
}

/// ISO/IEC 9797-1 MAC algorithm 3 with DES and padding method 2: single-DES CBC-MAC under
/// K1 over all blocks, then the final output is decrypted under K2 and encrypted under K1.
pub fn mac3(key: &DesKey, data: &[u8]) -> Mac {
    let k1 = key.k1();
    let padded = pad_method2(data);
    let mut h: des::cipher::Block<Des> = [0u8; 8].into();
    for chunk in padded.chunks_exact(8) {
        for (x, y) in h.iter_mut().zip(chunk) {
            *x ^= y;
        }
        k1.encrypt_block(&mut h);
    }
    key.k2().decrypt_block(&mut h);
    k1.encrypt_block(&mut h);
    h.into()
}

/// Compares two MACs without an early exit, so timing does not leak how many bytes matched.
pub fn mac_eq(a: &Mac, b: &Mac) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A labelled signature: MAC algorithm 3 over `label ‖ fields`. Labels keep one kind of
/// signature from ever being accepted as another (an S2 as an S3, say).
pub fn sign(key: &DesKey, label: &[u8; 4], fields: &[u8]) -> Mac {
    let mut msg = Vec::with_capacity(4 + fields.len());
    msg.extend_from_slice(label);
    msg.extend_from_slice(fields);
    mac3(key, &msg)
}

pub fn verify(key: &DesKey, label: &[u8; 4], fields: &[u8], mac: &Mac) -> bool {
    mac_eq(&sign(key, label, fields), mac)
}

/// Seals `plaintext` under `key` for the message layer: a random IV, triple-DES CBC with
/// padding method 2 under an encryption key, then a MAC over IV ‖ ciphertext under a
/// separate MAC key (both derived from `key`).
pub fn seal(key: &DesKey, plaintext: &[u8], rng: &mut impl RngCore) -> Vec<u8> {
    let (enc, mac_key) = (key.derive(b"ENC", &[]), key.derive(b"MAC", &[]));
    let mut iv = [0u8; 8];
    rng.fill_bytes(&mut iv);
    let ct = cbc::Encryptor::<TdesEde2>::new(&(*enc.bytes()).into(), &iv.into())
        .encrypt_padded_vec_mut::<Iso7816>(plaintext);
    let mut out = Vec::with_capacity(8 + ct.len() + 8);
    out.extend_from_slice(&iv);
    out.extend_from_slice(&ct);
    let tag = mac3(&mac_key, &out);
    out.extend_from_slice(&tag);
    out
}

/// Opens a message sealed by [`seal`]; refuses anything tampered before decrypting it.
pub fn open(key: &DesKey, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    if sealed.len() < 24 || sealed.len() % 8 != 0 {
        return Err(CryptoError::Malformed);
    }
    let (enc, mac_key) = (key.derive(b"ENC", &[]), key.derive(b"MAC", &[]));
    let (body, tag) = sealed.split_at(sealed.len() - 8);
    let tag: Mac = tag.try_into().map_err(|_| CryptoError::Malformed)?;
    if !mac_eq(&mac3(&mac_key, body), &tag) {
        return Err(CryptoError::BadMac);
    }
    let (iv, ct) = body.split_at(8);
    let iv: [u8; 8] = iv.try_into().map_err(|_| CryptoError::Malformed)?;
    cbc::Decryptor::<TdesEde2>::new(&(*enc.bytes()).into(), &iv.into())
        .decrypt_padded_vec_mut::<Iso7816>(ct)
        .map_err(|_| CryptoError::BadPadding)
}

/// The message-layer keys of 001 FIG. 8 for one transaction.
///
/// The merchant and the payment server share `shared`; each derives the same per-transaction
/// `derived` key from the merchant id and transaction id ([0109], [0112]). The merchant makes
/// a random TSK, and ETSK = TSK sealed under the derived key ([0110]). The box and gateway get
/// TSK in clear (it protects the draw request / debit command / debit result C on the wire);
/// only the payment server can open ETSK, and only the merchant can open "debit result M",
/// which is sealed under the derived key.
pub struct MessageKeys;

impl MessageKeys {
    pub fn derived(shared: &DesKey, merchant_id: &str, transaction_id: &str) -> DesKey {
        let mut input = Vec::with_capacity(merchant_id.len() + transaction_id.len() + 1);
        input.extend_from_slice(merchant_id.as_bytes());
        input.push(0);
        input.extend_from_slice(transaction_id.as_bytes());
        shared.derive(b"TXN", &input)
    }

    /// Makes a TSK and its ETSK.
    pub fn new_tsk(derived: &DesKey, rng: &mut impl RngCore) -> (DesKey, Vec<u8>) {
        let tsk = DesKey::random(rng);
        let etsk = seal(derived, tsk.bytes(), rng);
        (tsk, etsk)
    }

    /// The payment server recovers the TSK from the ETSK.
    pub fn open_etsk(derived: &DesKey, etsk: &[u8]) -> Result<DesKey, CryptoError> {
        let raw = open(derived, etsk)?;
        DesKey::from_slice(&raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }

    #[test]
    fn a_key_never_prints_its_bytes() {
        let k = DesKey::new([0x5E; 16]);
        let shown = format!("{k:?}");
        assert_eq!(shown, "DesKey(..)");
        assert!(!shown.contains("5E") && !shown.contains("94"), "{shown}");
        // Its bytes are still the key's (odd parity forced), through the one way in.
        assert_eq!(k.bytes()[0], with_odd_parity(0x5E));
    }
    fn h8(s: &str) -> [u8; 8] {
        h(s).try_into().unwrap()
    }

    /// NIST SP 800-20 (TMOVS), Table A.1 variable-plaintext known-answer test: with
    /// K1 = K2 = K3 = 0101010101010101 triple DES reduces to DES, so the 2-key EDE
    /// construction must give the published single-DES answers.
    #[test]
    fn kat_sp800_20_variable_plaintext() {
        let key = DesKey::new([1; 16]);
        for (pt, ct) in [
            ("8000000000000000", "95F8A5E5DD31D900"),
            ("4000000000000000", "DD7F121CA5015619"),
            ("2000000000000000", "2E8653104F3834EA"),
            ("1000000000000000", "4BD388FF6CD81D4F"),
        ] {
            assert_eq!(key.encrypt_block(h8(pt)), h8(ct), "pt {pt}");
            assert_eq!(key.decrypt_block(h8(ct)), h8(pt), "ct {ct}");
        }
    }

    /// NIST SP 800-67 Rev. 2 example (keys K1 = 0123456789ABCDEF, K2 = 23456789ABCDEF01),
    /// checked here on the underlying `des` EDE3 with K3 = K1, which is the 2-key option our
    /// keys use; and our 2-key path must agree with EDE3(K1, K2, K1) on random blocks.
    #[test]
    fn two_key_is_ede3_with_k3_equal_k1() {
        use des::TdesEde3;
        let k = h("0123456789ABCDEF 23456789ABCDEF01");
        let key = DesKey::from_slice(&k).unwrap();
        let mut k3 = k.clone();
        k3.extend_from_slice(&k[..8]);
        let ede3 = TdesEde3::new_from_slice(&k3).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..32 {
            let mut blk = [0u8; 8];
            rng.fill_bytes(&mut blk);
            let mut b = blk.into();
            ede3.encrypt_block(&mut b);
            assert_eq!(key.encrypt_block(blk), <[u8; 8]>::from(b));
        }
    }

    /// The 3-key example from NIST SP 800-67 Rev. 2, Appendix (TDEA with keys
    /// 0123456789ABCDEF / 23456789ABCDEF01 / 456789ABCDEF0123, plaintext "The qufc"),
    /// proving the `des` crate's EDE is the standard one our keys are built on.
    #[test]
    fn kat_sp800_67_ede3() {
        use des::TdesEde3;
        let ede3 =
            TdesEde3::new_from_slice(&h("0123456789ABCDEF 23456789ABCDEF01 456789ABCDEF0123"))
                .unwrap();
        let mut b = (*b"The qufc").into();
        ede3.encrypt_block(&mut b);
        assert_eq!(<[u8; 8]>::from(b), h8("A826FD8CE53B855F"));
    }

    /// ICAO Doc 9303 Part 11, Appendix D (worked example of Basic Access Control): the
    /// retail MAC (ISO/IEC 9797-1 MAC algorithm 3, DES, padding method 2) of E_IFD under
    /// K_MAC is M_IFD = 5F1448EEA8AD90A7.
    #[test]
    fn kat_icao9303_retail_mac() {
        let k = DesKey::from_slice(&h("7962D9ECE03D1ACD4C76089DCE131543")).unwrap();
        let e_ifd = h("72C29C2371CC9BDB65B779B8E8D37B29ECC154AA56A8799FAE2F498F76ED92F2");
        assert_eq!(mac3(&k, &e_ifd), h8("5F1448EEA8AD90A7"));
    }

    #[test]
    fn padding_method_2() {
        assert_eq!(pad_method2(&[]), h("8000000000000000"));
        assert_eq!(
            pad_method2(&h("0001020304050607")),
            h("0001020304050607 8000000000000000")
        );
        assert_eq!(pad_method2(&[0xAA; 7]), h("AAAAAAAAAAAAAA80"));
    }

    #[test]
    fn keys_have_odd_parity_and_diversify_per_card() {
        let master = DesKey::new([0u8; 16]);
        assert!(master.has_odd_parity());
        let a = master.diversify(1u64.to_be_bytes());
        let b = master.diversify(2u64.to_be_bytes());
        assert!(a.has_odd_parity() && b.has_odd_parity());
        assert_ne!(a, b);
        assert_eq!(a, master.diversify(1u64.to_be_bytes()));
    }

    #[test]
    fn signatures_bind_label_and_fields() {
        let k = DesKey::new([0x11; 16]);
        let s = sign(&k, b"S2LD", b"fields");
        assert!(verify(&k, b"S2LD", b"fields", &s));
        assert!(!verify(&k, b"S3LD", b"fields", &s));
        assert!(!verify(&k, b"S2LD", b"fieldz", &s));
        let mut flipped = s;
        flipped[7] ^= 1;
        assert!(!verify(&k, b"S2LD", b"fields", &flipped));
    }

    #[test]
    fn seal_open_and_tamper() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let shared = DesKey::random(&mut rng);
        let derived = MessageKeys::derived(&shared, "M-001", "tx-1");
        assert_ne!(derived, MessageKeys::derived(&shared, "M-001", "tx-2"));
        let (tsk, etsk) = MessageKeys::new_tsk(&derived, &mut rng);
        assert_eq!(MessageKeys::open_etsk(&derived, &etsk).unwrap(), tsk);
        let sealed = seal(&tsk, b"debit result C", &mut rng);
        assert_eq!(open(&tsk, &sealed).unwrap(), b"debit result C");
        for i in 0..sealed.len() {
            let mut t = sealed.clone();
            t[i] ^= 0x01;
            assert_eq!(open(&tsk, &t), Err(CryptoError::BadMac), "byte {i}");
        }
        assert_eq!(open(&derived, &sealed), Err(CryptoError::BadMac));
        assert_eq!(open(&tsk, &sealed[..16]), Err(CryptoError::Malformed));
    }
}

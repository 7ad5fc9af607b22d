//! The file-backed virtual security card: [`proto::psam::Psam`] with its state in a file,
//! persisted like the purse card ([`crate::vcard`]): written to a temporary file (0600: it
//! holds the purchase master keys), fsync'd and renamed before the card answers, so a card
//! killed at any instant has the old state or the new one.
//!
//! File layout: magic `PLSC`, a format version byte, then the postcard-encoded
//! [`PsamState`].

use std::fs;
use std::path::{Path, PathBuf};

use proto::apdu::{CardApplication, Response};
use proto::psam::{Psam, PsamState};
use proto::purse::MasterKeysFile;

use crate::vcard::{SW_MEMORY_FAILURE, VcardError, decode_file, encode_file, write_atomically};

const MAGIC: &[u8; 4] = b"PLSC";
const FORMAT: u8 = 1;

/// A security card whose state lives in `path`.
pub struct VirtualPsam {
    path: PathBuf,
    psam: Psam,
}

impl VirtualPsam {
    /// Personalises security card `id` with the issuer's purchase master keys and writes its
    /// file. Refuses to overwrite an existing card.
    pub fn create(path: &Path, id: u64, keys: MasterKeysFile) -> Result<Self, VcardError> {
        if path.exists() {
            return Err(VcardError::Exists(path.into()));
        }
        let psam = Psam::personalise(id, keys).map_err(|detail| VcardError::Format {
            path: path.into(),
            detail,
        })?;
        write_atomically(path, &encode(&psam.state()))?;
        Ok(Self {
            path: path.into(),
            psam,
        })
    }

    /// Opens an existing security-card file.
    pub fn open(path: &Path) -> Result<Self, VcardError> {
        let bytes = fs::read(path).map_err(|source| VcardError::Io {
            path: path.into(),
            source,
        })?;
        let format = |detail: String| VcardError::Format {
            path: path.into(),
            detail,
        };
        let psam = Psam::new(decode(&bytes).map_err(format)?).map_err(format)?;
        Ok(Self {
            path: path.into(),
            psam,
        })
    }

    pub fn psam(&self) -> &Psam {
        &self.psam
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl CardApplication for VirtualPsam {
    fn atr(&self) -> Vec<u8> {
        self.psam.atr()
    }

    fn reset(&mut self) {
        self.psam.reset();
    }

    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        let before = self.psam.state();
        let out = self.psam.process(apdu);
        if out.state_changed {
            if let Err(e) = write_atomically(&self.path, &encode(&self.psam.state())) {
                tracing::error!(path = %self.path.display(), error = %e, "security card state not persisted; command undone");
                match Psam::new(before) {
                    Ok(p) => self.psam = p,
                    Err(why) => tracing::error!(why, "security card state cannot be restored"),
                }
                return Response::status(SW_MEMORY_FAILURE).to_bytes();
            }
        }
        out.response
    }
}

fn encode(state: &PsamState) -> Vec<u8> {
    encode_file(MAGIC, FORMAT, state)
}

fn decode(bytes: &[u8]) -> Result<PsamState, String> {
    decode_file(bytes, MAGIC, FORMAT, "vcard create-psam")
        .map_err(|e| format!("{e} (not a Purselink security card?)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::psam::{PsamStatus, commands};
    use proto::purse::MasterKeyEntry;

    fn keys() -> MasterKeysFile {
        MasterKeysFile {
            keys: vec![MasterKeyEntry {
                key_version: 1,
                master: "11".repeat(16),
                retired: false,
            }],
        }
    }

    #[test]
    fn create_persist_reopen_and_refuse_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("psam.plsc");
        let mut c = VirtualPsam::create(&p, 0x5A, keys()).unwrap();
        assert!(matches!(
            VirtualPsam::create(&p, 1, keys()),
            Err(VcardError::Exists(_))
        ));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(c.process_apdu(&commands::select()).ends_with(&[0x90, 0]));
        let hot = proto::hotlist::Hotlist {
            version: 9,
            card_ids: [5].into(),
        };
        for b in commands::load_hotlist(&hot) {
            assert!(c.process_apdu(&b).ends_with(&[0x90, 0]));
        }
        let mut again = VirtualPsam::open(&p).unwrap();
        again.process_apdu(&commands::select());
        let r = again.process_apdu(&commands::get_status());
        let s = PsamStatus::decode(&r[..r.len() - 2]).unwrap();
        assert_eq!((s.security_card_id, s.hotlist_version), (0x5A, 9));
        fs::write(&p, b"PLVCnot a psam").unwrap();
        assert!(matches!(
            VirtualPsam::open(&p),
            Err(VcardError::Format { .. })
        ));
    }
}

//! Secrets: a [`Secret`] value that never reaches a log, and the files that hold secrets —
//! keys, PINs, voucher codes, a virtual card's keys — written 0600 in a 0700 directory
//! whatever the umask, and refused when group or others can read them.
//!
//! Files are written atomically: a temporary file created 0600 beside the target, synced,
//! then renamed over it, so an existing file of any mode is replaced, never half-written,
//! and never world-readable for a moment.

use std::fmt;
use std::io::Write;
use std::path::Path;

use zeroize::Zeroize;

/// A secret value (a PIN, a voucher code, a key in text form). `Debug` and `Display` print
/// a mask; the value is wiped from memory on drop. [`Secret::expose`] is the one way in.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret<T: Zeroize>(T);

impl<T: Zeroize> Secret<T> {
    pub fn new(v: T) -> Self {
        Self(v)
    }

    /// The value itself, for the code that must use it (never for logs).
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T: Zeroize> Drop for Secret<T> {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl<T: Zeroize> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl<T: Zeroize> fmt::Display for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

impl From<String> for Secret<String> {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Secret<String> {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// A path from a configuration file that may name a systemd credential: `credential:NAME`
/// is `$CREDENTIALS_DIRECTORY/NAME` (see `LoadCredential=` in systemd.exec(5): the service
/// manager hands the unit its keys there, readable by that unit alone); any other path is
/// returned as it is.
pub fn credential_path(p: &Path) -> std::path::PathBuf {
    match p.to_str().and_then(|s| s.strip_prefix("credential:")) {
        Some(name) => {
            let dir = std::env::var_os("CREDENTIALS_DIRECTORY").unwrap_or_default();
            Path::new(&dir).join(name)
        }
        None => p.to_path_buf(),
    }
}

/// Creates `dir` (and its parents) and makes it 0700.
///
/// # Errors
/// The directory cannot be created or its mode set.
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes a secret file: 0600 whatever the umask, replacing any existing file atomically
/// (an existing 0644 file becomes a new 0600 one). The directory is created 0700 if missing
/// (an existing directory keeps its mode: it may be shared, like `/etc/purselink`).
///
/// # Errors
/// The directory or file cannot be created, written, synced or renamed.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        private_dir(dir)?;
    }
    // tempfile creates the file with mode 0600 (O_EXCL), independent of the umask.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(contents)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Refuses a secret file that group or others can read or write.
///
/// # Errors
/// A readable message naming the file and its mode, or why it cannot be checked.
pub fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "{}: a secret file must be readable by its owner only, but its mode is {:04o}; run chmod 600 on it",
            path.display(),
            mode & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// A value that records being wiped.
    struct Probe(std::sync::Arc<std::sync::atomic::AtomicBool>);

    impl Zeroize for Probe {
        fn zeroize(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_secret_is_wiped_when_dropped() {
        let wiped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = Secret::new(Probe(wiped.clone()));
        assert!(!wiped.load(std::sync::atomic::Ordering::SeqCst));
        drop(s);
        assert!(wiped.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn secrets_print_a_mask() {
        let s = Secret::new("1234".to_string());
        assert_eq!(format!("{s} {s:?}"), "<secret> <secret>");
        assert_eq!(s.expose(), "1234");
    }

    #[test]
    fn an_existing_world_readable_file_is_replaced_by_a_private_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k.key");
        std::fs::write(&p, "old").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(check_private(&p).unwrap_err().contains("0666"));
        write_private(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(mode(&p), 0o600);
        check_private(&p).unwrap();
    }

    #[test]
    fn a_new_directory_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/k.key");
        write_private(&p, b"x").unwrap();
        assert_eq!(mode(&dir.path().join("a/b")), 0o700);
        assert_eq!(mode(&p), 0o600);
    }
}

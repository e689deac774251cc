//! The key store kept in the key file: one writer at a time (an advisory lock beside the
//! file), edits through toml_edit so comments and order survive, and a write that a running
//! gateway can never see half done (temporary file in the same folder, fsync, rename).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use toml_edit::DocumentMut;

use super::{DocumentStore, KeyChange, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {action}: {source}")]
    Io { path: PathBuf, action: &'static str, source: std::io::Error },
    #[error("{path}: not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
}

fn io<'p>(path: &'p Path, action: &'static str) -> impl FnOnce(std::io::Error) -> FileError + 'p {
    move |source| FileError::Io { path: path.to_path_buf(), action, source }
}

/// Reads the key file without a lock: writers replace it by rename, so a reader always sees
/// a whole file, and read-only mounts (a Kubernetes Secret) can still be listed.
pub fn read_document(path: &Path) -> Result<DocumentMut, FileError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io(path, "cannot read")(e)),
    };
    text.parse::<DocumentMut>()
        .map_err(|e| FileError::Syntax { path: path.to_path_buf(), message: e.to_string() })
}

/// The key file, locked against other writers (CLI runs, the `/keys` API) while this lives.
pub struct Locked {
    path: PathBuf,
    // Held for its lock; released when dropped (or when the process ends, however it ends).
    _lock: File,
}

impl Locked {
    /// Waits for the lock on `<folder>/.<name>.lock`. The lock is not on the key file itself:
    /// that file is replaced by rename, and a lock on a replaced inode guards nothing.
    pub fn lock(path: &Path) -> Result<Self, FileError> {
        let name = path.file_name().map_or_else(|| "keys".into(), |n| n.to_string_lossy().into_owned());
        let lock_path = path.with_file_name(format!(".{name}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path, "cannot open the lock file"))?;
        lock.lock().map_err(io(&lock_path, "cannot lock"))?;
        Ok(Self { path: path.to_path_buf(), _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file as an editable document; a missing file is an empty one.
    pub fn read(&self) -> Result<DocumentMut, FileError> {
        read_document(&self.path)
    }

    /// Replaces the file with `text` atomically, keeping its permissions (0600 for a new file).
    pub fn write(&self, text: &str) -> Result<(), FileError> {
        replace(&self.path, text)
    }
}

/// Writes a key file that only its owner may read, by the same exclusive-temporary-file and
/// rename path as every other write.
pub fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    replace(path, text).map_err(|e| match e {
        FileError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })
}

/// The key file as a [`KeyStore`]: what `keygate keys` and the `/keys` API both edit.
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    /// The prefix generated keys get (`[auth] key_prefix`).
    prefix: String,
}

impl FileStore {
    pub fn new(path: PathBuf, prefix: String) -> Self {
        Self { path, prefix }
    }
}

fn unavailable(error: FileError) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

impl DocumentStore for FileStore {
    fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Read without the lock: writers replace the file by rename, so a reader always sees a
    /// whole file, and a read-only mount (a Kubernetes Secret) can still be listed.
    fn read(&self) -> Result<DocumentMut, StoreError> {
        read_document(&self.path).map_err(unavailable)
    }

    /// Locks the key file, applies `change`, checks the result as the gateway would load it, and
    /// only then writes it (atomically). A failure anywhere leaves the file as it was.
    fn edit(
        &self,
        change: &mut dyn FnMut(&mut DocumentMut) -> Result<KeyChange, StoreError>,
    ) -> Result<KeyChange, StoreError> {
        let lock = Locked::lock(&self.path).map_err(unavailable)?;
        let mut doc = lock.read().map_err(unavailable)?;
        let out = change(&mut doc)?;
        let text = doc.to_string();
        crate::config::check_keys(&self.path, &text).map_err(|e| {
            StoreError::Invalid(format!(
                "the change would make the key file invalid, so nothing was written:\n{e}"
            ))
        })?;
        lock.write(&text).map_err(unavailable)?;
        Ok(out)
    }
}

/// Mode of a key file keygate creates: its hashes are no one else's business.
const NEW_FILE_MODE: u32 = 0o600;

/// Replaces `path` with `text`: a temporary file with an unpredictable name, created
/// exclusively (`O_EXCL` never opens an existing file or follows a link planted under that
/// name), written, synced, then renamed over `path`. A rewrite keeps the file's mode.
fn replace(path: &Path, text: &str) -> Result<(), FileError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map_or_else(|| "keys".into(), |n| n.to_string_lossy().into_owned());
    let mode = std::fs::metadata(path).map_or(NEW_FILE_MODE, |meta| meta.permissions().mode() & 0o7777);
    let (temp, mut file) = create_temp(&dir, &name, mode)?;
    let result = (|| {
        // The mode given at creation is masked by the umask; set it exactly.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io(&temp, "cannot set permissions"))?;
        file.write_all(text.as_bytes()).map_err(io(&temp, "cannot write"))?;
        file.sync_all().map_err(io(&temp, "cannot sync"))?;
        std::fs::rename(&temp, path).map_err(io(path, "cannot replace"))?;
        // The rename itself is durable only once the folder is synced.
        if let Ok(folder) = File::open(&dir) {
            let _ = folder.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Creates `<dir>/.<name>.tmp-<16 random hex digits>` exclusively. A leading single dot: not the
/// watched name, and not the `..` of a Kubernetes swap.
fn create_temp(dir: &Path, name: &str, mode: u32) -> Result<(PathBuf, File), FileError> {
    let mut last = None;
    // A name taken (by a planted file or link) is skipped, never opened; a few draws suffice.
    for _ in 0..8 {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random)
            .map_err(|e| io(dir, "cannot draw a temporary name")(std::io::Error::other(e.to_string())))?;
        let suffix: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let temp = dir.join(format!(".{name}.tmp-{suffix}"));
        match OpenOptions::new().write(true).create_new(true).mode(mode).open(&temp) {
            Ok(file) => return Ok((temp, file)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io(&temp, "cannot create")(e)),
        }
    }
    Err(io(dir, "cannot create a temporary file")(
        last.unwrap_or_else(|| std::io::Error::other("every name drawn was taken")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::lifecycle::Grant;
    use time::OffsetDateTime;

    #[test]
    fn write_replaces_atomically_and_keeps_comments_through_a_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "# top comment\n[[keys]] # trailing\nid = \"a\"  # why\n").unwrap();
        let store = Locked::lock(&path).unwrap();
        let doc = store.read().unwrap();
        store.write(&doc.to_string()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# top comment\n[[keys]] # trailing\nid = \"a\"  # why\n"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_new_file_is_private_and_a_rewrite_keeps_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let store = Locked::lock(&path).unwrap();
        store.write("# new\n").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        store.write("# again\n").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
    }

    #[test]
    fn temporary_names_are_unpredictable_and_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = create_temp(dir.path(), "keys.toml", 0o600).unwrap();
        let (b, _) = create_temp(dir.path(), "keys.toml", 0o600).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn the_store_interface_creates_finds_revokes_rotates_and_deletes() {
        use crate::keys::store::{Action, KeyStore, Rotation, StoreError};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, "# team keys\n").unwrap();
        let store = FileStore::new(path.clone(), "kg".into());
        let now = OffsetDateTime::now_utc();
        let grant = Grant { name: "sync".into(), scopes: vec!["read".into()], ..Grant::default() };
        let made = store.create(&grant, now).unwrap();
        let key = made.secret.clone().unwrap();
        assert_eq!(made.action, Action::Create);
        assert!(key.expose().starts_with(&format!("kg_{}_", made.key.id)));
        assert!(!format!("{made:?}").contains(key.expose()), "Debug never shows the key");
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("# team keys\n") && !text.contains(key.expose()), "{text}");
        assert_eq!(store.find("sync", now).unwrap().id, made.key.id);
        assert_eq!(store.find(&made.key.tail, now).unwrap().id, made.key.id);

        let revoked = store.revoke(&made.key.id, now).unwrap();
        assert_eq!((revoked.key.status, revoked.changed), ("revoked", true));
        assert!(!store.revoke(&made.key.id, now).unwrap().changed, "revoking twice changes nothing");

        let rotated = store.rotate("sync", &Rotation::default(), now).unwrap();
        assert_eq!(rotated.replaced.as_ref().map(|v| v.id.as_str()), Some(made.key.id.as_str()));
        assert_eq!(rotated.key.name, "sync");
        assert!(matches!(store.find("sync", now), Err(StoreError::Ambiguous { .. })));

        let deleted = store.delete(&made.key.id, now).unwrap();
        assert_eq!(deleted.key.id, made.key.id);
        assert_eq!(store.find(&made.key.id, now), Err(StoreError::NotFound(made.key.id.clone())));
        assert_eq!(store.list(now).unwrap().len(), 1);
    }

    #[test]
    fn a_missing_file_reads_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = Locked::lock(&dir.path().join("keys.toml")).unwrap();
        assert_eq!(store.read().unwrap().to_string(), "");
    }
}

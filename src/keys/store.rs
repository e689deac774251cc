//! The key store seam: list, find, create, import, revoke, rotate and delete keys, whatever
//! holds them. `keygate keys` and the `/keys` API call these same functions, so a key made
//! either way is checked, locked and written by one code path.

mod cluster;
mod document;
mod file;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use time::OffsetDateTime;

pub use cluster::ClusterStore;
pub use file::{FileError, FileStore, Locked, read_document, write_private};

use super::lifecycle::{self, Grant, KeyView, LifecycleError};
use crate::config::{self, KeySource, Snapshot};

/// Why a store operation did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("no key matches {0:?} (by id, name or tail)")]
    NotFound(String),
    #[error("{selector:?} matches {} keys; use the id:\n{}", candidates.len(), candidates.join("\n"))]
    Ambiguous { selector: String, candidates: Vec<String> },
    #[error("this key is already in the store, as id {0}")]
    AlreadyPresent(String),
    /// The change itself is refused (it would make the store invalid).
    #[error("{0}")]
    Invalid(String),
    /// The store cannot be read or written now (I/O, lock, a file it cannot edit).
    #[error("{0}")]
    Unavailable(String),
}

impl From<LifecycleError> for StoreError {
    fn from(error: LifecycleError) -> Self {
        match error {
            LifecycleError::NotFound(selector) => Self::NotFound(selector),
            LifecycleError::Ambiguous { selector, candidates } => Self::Ambiguous { selector, candidates },
            LifecycleError::AlreadyPresent(id) => Self::AlreadyPresent(id),
            LifecycleError::Layout => Self::Unavailable(error.to_string()),
        }
    }
}

/// What a change did, in the words of the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Create,
    Import,
    Revoke,
    Rotate,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Import => "import",
            Self::Revoke => "revoke",
            Self::Rotate => "rotate",
            Self::Delete => "delete",
        }
    }
}

/// A new key's plaintext, on its way to be shown once. `Debug` never shows it, so a change
/// logged by mistake leaks nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(key: String) -> Self {
        Self(key)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The result of one change, whatever store made it.
#[derive(Debug, Clone)]
pub struct KeyChange {
    pub action: Action,
    /// The key as it is after the change (for a delete: as it was; for a rotate: the new key).
    pub key: KeyView,
    /// The new key itself (create, rotate): shown once, never stored.
    pub secret: Option<Secret>,
    /// A rotate's old key, as it is now (ending after the grace).
    pub replaced: Option<KeyView>,
    /// False when there was nothing to do (revoking a key revoked already).
    pub changed: bool,
    /// With the cluster store: the change number holding this change; a replica that has
    /// applied it serves the change.
    pub cluster_seq: Option<u64>,
}

impl KeyChange {
    pub fn new(action: Action, key: KeyView) -> Self {
        Self { action, key, secret: None, replaced: None, changed: true, cluster_seq: None }
    }

    pub fn with_secret(mut self, secret: Secret) -> Self {
        self.secret = Some(secret);
        self
    }
}

/// How a rotation ends the old key and dates the new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// The old key stays valid this long from now.
    pub grace: Duration,
    /// The new key's expiry (`Some(None)`: never); `None`: the old key's lifetime from now.
    pub expires_at: Option<Option<OffsetDateTime>>,
}

impl Default for Rotation {
    fn default() -> Self {
        Self { grace: lifecycle::DEFAULT_GRACE, expires_at: None }
    }
}

/// Where keys live. Blocking: async callers run it on a blocking thread. Every write is
/// validated as the gateway would load it, and either happens whole or not at all.
pub trait KeyStore: Send + Sync {
    /// Every key, in store order.
    fn list(&self, now: OffsetDateTime) -> Result<Vec<KeyView>, StoreError>;

    /// One key: by id, else name, else tail (SPEC §4); several matches is an error.
    fn find(&self, selector: &str, now: OffsetDateTime) -> Result<KeyView, StoreError> {
        let mut all = self.list(now)?;
        let index = lifecycle::select_in(&all, selector)?;
        Ok(all.swap_remove(index))
    }

    /// Makes a key in keygate's format; the change carries it, to be shown once.
    fn create(&self, grant: &Grant, now: OffsetDateTime) -> Result<KeyChange, StoreError>;

    /// Stores the hash of an existing key.
    fn import(&self, key: &str, grant: &Grant, now: OffsetDateTime) -> Result<KeyChange, StoreError>;

    /// Sets `revoked_at` to now (a key revoked earlier keeps its first time).
    fn revoke(&self, selector: &str, now: OffsetDateTime) -> Result<KeyChange, StoreError>;

    /// A successor with the same grant; the old key ends after the grace.
    fn rotate(
        &self,
        selector: &str,
        rotation: &Rotation,
        now: OffsetDateTime,
    ) -> Result<KeyChange, StoreError>;

    /// Removes the entry.
    fn delete(&self, selector: &str, now: OffsetDateTime) -> Result<KeyChange, StoreError>;
}

/// A store whose keys read and change as one key-file document — the file and Redis both — so
/// each operation is written once (in `document`) and runs through the store's own read and
/// edit.
pub trait DocumentStore: Send + Sync {
    /// The prefix generated keys get (`[auth] key_prefix`).
    fn prefix(&self) -> &str;

    /// Every entry, as a key-file document.
    fn read(&self) -> Result<toml_edit::DocumentMut, StoreError>;

    /// Runs `change` on the current document and stores the result as one change. It may run
    /// `change` more than once: the cluster store does when another writer got in first.
    fn edit(
        &self,
        change: &mut dyn FnMut(&mut toml_edit::DocumentMut) -> Result<KeyChange, StoreError>,
    ) -> Result<KeyChange, StoreError>;
}

impl<S: DocumentStore> KeyStore for S {
    fn list(&self, now: OffsetDateTime) -> Result<Vec<KeyView>, StoreError> {
        Ok(lifecycle::views(&self.read()?, now))
    }

    fn create(&self, grant: &Grant, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
        self.edit(&mut |doc| document::create(doc, self.prefix(), grant, now))
    }

    fn import(&self, key: &str, grant: &Grant, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
        self.edit(&mut |doc| document::import(doc, key, grant, now))
    }

    fn revoke(&self, selector: &str, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
        self.edit(&mut |doc| document::revoke(doc, selector, now))
    }

    fn rotate(
        &self,
        selector: &str,
        rotation: &Rotation,
        now: OffsetDateTime,
    ) -> Result<KeyChange, StoreError> {
        self.edit(&mut |doc| document::rotate(doc, self.prefix(), selector, rotation, now))
    }

    fn delete(&self, selector: &str, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
        self.edit(&mut |doc| document::delete(doc, selector, now))
    }
}

/// The store a running gateway's snapshot names.
pub fn of_snapshot(snapshot: &Snapshot) -> Box<dyn KeyStore> {
    of_source(snapshot.key_source.clone(), snapshot.auth.key_prefix.clone())
}

/// The store `keygate.toml` names, for the command line; neither the key file nor Redis is
/// read yet.
pub fn of_config(config_path: &Path) -> Result<Box<dyn KeyStore>, StoreError> {
    let (source, prefix) =
        config::key_source_of(config_path).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    Ok(of_source(source, prefix))
}

fn of_source(source: KeySource, prefix: String) -> Box<dyn KeyStore> {
    match source {
        KeySource::File(path) => Box::new(FileStore::new(path, prefix)),
        KeySource::Cluster(settings) => Box::new(ClusterStore::new(*settings, prefix)),
    }
}

//! The cluster key store (Redis, `[auth] store = "cluster"`) as a [`KeyStore`]: the same
//! document edits as the key file, run through [`ClusterKeys::edit`].

use time::OffsetDateTime;
use toml_edit::DocumentMut;

use super::{KeyChange, KeyStore, Rotation, StoreError, document};
use crate::counters::ClusterSettings;
use crate::keys::cluster::{ClusterKeys, EditError};
use crate::keys::lifecycle::{self, Grant, KeyView};

/// Opens one connection per operation: changes are rare, and a connection kept open would
/// need its own reconnecting.
#[derive(Debug, Clone)]
pub struct ClusterStore {
    settings: ClusterSettings,
    /// The prefix generated keys get (`[auth] key_prefix`).
    prefix: String,
}

impl From<EditError> for StoreError {
    fn from(error: EditError) -> Self {
        match error {
            EditError::Unavailable(message) => Self::Unavailable(message),
            EditError::Invalid(message) => Self::Invalid(message),
        }
    }
}

impl ClusterStore {
    pub fn new(settings: ClusterSettings, prefix: String) -> Self {
        Self { settings, prefix }
    }

    fn open(&self) -> Result<ClusterKeys, StoreError> {
        ClusterKeys::open(&self.settings).map_err(StoreError::Unavailable)
    }

    /// Runs `change` on the keys in Redis and writes the result as one change; the change
    /// carries its number, for the caller to wait on a replica.
    fn edit(
        &self,
        change: impl FnMut(&mut DocumentMut) -> Result<KeyChange, StoreError>,
    ) -> Result<KeyChange, StoreError> {
        let (mut out, seq) = self.open()?.edit(change)?;
        out.cluster_seq = Some(seq);
        Ok(out)
    }
}

impl KeyStore for ClusterStore {
    fn list(&self, now: OffsetDateTime) -> Result<Vec<KeyView>, StoreError> {
        let doc = self.open()?.document().map_err(StoreError::Unavailable)?;
        Ok(lifecycle::views(&doc, now))
    }

    fn create(&self, grant: &Grant, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
        self.edit(|doc| document::create(doc, &self.prefix, grant, now))
    }

    fn import(&self, key: &str, grant: &Grant, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
        self.edit(|doc| document::import(doc, key, grant, now))
    }

    fn revoke(&self, selector: &str, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
        self.edit(|doc| document::revoke(doc, selector, now))
    }

    fn rotate(
        &self,
        selector: &str,
        rotation: &Rotation,
        now: OffsetDateTime,
    ) -> Result<KeyChange, StoreError> {
        self.edit(|doc| document::rotate(doc, &self.prefix, selector, rotation, now))
    }

    fn delete(&self, selector: &str, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
        self.edit(|doc| document::delete(doc, selector, now))
    }
}

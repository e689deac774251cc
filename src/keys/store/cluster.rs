//! The cluster key store (Redis, `[auth] store = "cluster"`) as a [`KeyStore`]: the same
//! document edits as the key file, run through [`ClusterKeys::edit`].

use toml_edit::DocumentMut;

use super::{DocumentStore, KeyChange, StoreError};
use crate::counters::ClusterSettings;
use crate::keys::cluster::{ClusterKeys, EditError};

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
}

impl DocumentStore for ClusterStore {
    fn prefix(&self) -> &str {
        &self.prefix
    }

    fn read(&self) -> Result<DocumentMut, StoreError> {
        self.open()?.document().map_err(StoreError::Unavailable)
    }

    /// Runs `change` on the keys in Redis and writes the result as one change; the change
    /// carries its number, for the caller to wait on a replica.
    fn edit(
        &self,
        change: &mut dyn FnMut(&mut DocumentMut) -> Result<KeyChange, StoreError>,
    ) -> Result<KeyChange, StoreError> {
        let (mut out, seq) = self.open()?.edit(change)?;
        out.cluster_seq = Some(seq);
        Ok(out)
    }
}

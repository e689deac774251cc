//! The validated runtime form of the configuration: ready types only, never re-parsed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::counters::{ClusterSettings, StoreSettings};
use crate::keys::{KeyState, KeyTable};
use crate::proxy::auth::AuthSettings;
use crate::proxy::route::RouteTable;

/// Everything one request needs, immutable once built; a reload builds a new one. Cloning is
/// cheap (the key table is shared), so a change to the cluster key table makes the next
/// snapshot from this one.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub config_path: PathBuf,
    /// The key file; with `store = "cluster"`, the config file itself (there is no key file
    /// to watch, and watching the config twice is harmless).
    pub keys_path: PathBuf,
    /// Where the keys live: the key file, or Redis (`[auth] store`).
    pub key_source: KeySource,
    pub server: ServerSettings,
    /// The listener's certificate when it speaks HTTPS; reloaded with everything else.
    pub tls: Option<crate::tls::ServerCert>,
    pub admin: Option<AdminSettings>,
    pub auth: AuthSettings,
    pub routes: RouteTable,
    /// Where usage and quota counts are kept; chosen at start, a reload does not change it.
    pub store: StoreSettings,
    pub keys: Arc<KeyTable>,
    pub loaded_at: SystemTime,
}

/// `[auth] store`: where the keys live, chosen at start.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// `store = "file"`: the key file, edited by `keygate keys` and watched for changes.
    File(PathBuf),
    /// `store = "cluster"`: Redis, shared by every replica (`keys::cluster`).
    Cluster(Box<ClusterSettings>),
}

impl KeySource {
    /// `file` or `cluster`, as `/status` shows it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Cluster(_) => "cluster",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub workers: Option<usize>,
    pub request_timeout: Duration,
    pub shutdown_timeout: Duration,
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub allow_encoded_slashes: bool,
    pub idle_timeout: Duration,
    pub h2_max_concurrent_streams: u32,
    pub max_connections: usize,
    /// Open connections per upstream host:port at most.
    pub upstream_max_connections: usize,
    /// Peers whose `X-Forwarded-For` is believed (`proxy::client`).
    pub trusted_proxies: std::sync::Arc<[ipnet::IpNet]>,
}

#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub per_key_metrics: bool,
    /// Host names the admin listener answers besides IP literals and `localhost`: lower case,
    /// no trailing dot.
    pub hosts: Vec<String>,
    /// Who may use `/keys` and `/console`; none: those paths answer 404.
    pub tokens: Vec<AdminToken>,
    /// Where each key change is recorded, one JSON line each.
    pub audit_log: Option<PathBuf>,
}

/// An admin token as configured: its name (for the audit log) and the SHA-256 of the token.
#[derive(Debug, Clone)]
pub struct AdminToken {
    pub name: String,
    pub hash: crate::keys::KeyHash,
}

/// Counts for `keygate check` and `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub routes: usize,
    pub keys: usize,
    pub active: usize,
    pub expired: usize,
    pub revoked: usize,
}

impl Snapshot {
    /// The warning `check` and `serve` give when quotas would be counted in memory only.
    pub fn store_warning(&self) -> Option<String> {
        if self.store.persistent() {
            return None;
        }
        let with_quota = self.keys.entries().filter(|k| k.quota().is_some()).count();
        (with_quota > 0).then(|| {
            format!(
                "{with_quota} key(s) have a quota but neither [state] nor [cluster] is configured: \
                 quota and usage counts are kept in memory and reset when keygate restarts"
            )
        })
    }

    pub fn summary(&self, now: SystemTime) -> Summary {
        let mut summary =
            Summary { routes: self.routes.len(), keys: self.keys.len(), active: 0, expired: 0, revoked: 0 };
        for key in self.keys.entries() {
            match key.state_at(now) {
                KeyState::Active => summary.active += 1,
                KeyState::Expired => summary.expired += 1,
                KeyState::Revoked => summary.revoked += 1,
            }
        }
        summary
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} routes, {} keys ({} active, {} expired, {} revoked)",
            self.routes, self.keys, self.active, self.expired, self.revoked
        )
    }
}

//! Counters: rate-limit tokens, quota counts and key usage behind one interface, with three
//! stores — memory, a local database file (`[state]`), Redis (`[cluster]`) — of which one is
//! chosen at start. The request path calls [`Counters`] and never asks which store it is.

pub mod local;
pub mod memory;
pub mod redis;
mod usage;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use crate::keys::RateLimit;
use crate::quota::{Period, QuotaLimit};
use crate::ratelimit::{Exceeded, Quota};

pub use usage::{Usage, timestamp as usage_timestamp};

/// Whose bucket and quota a request spends: its consumer's when the key names one (so a
/// consumer's keys share them), else the key's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    Key(&'a [u8]),
    Consumer(&'a [u8]),
}

impl Subject<'_> {
    /// The subject as one name; the prefix keeps a key id and a consumer of the same spelling apart.
    pub fn name(&self) -> Box<[u8]> {
        let (tag, name): (&[u8], _) = match self {
            Self::Key(id) => (b"k:", id),
            Self::Consumer(name) => (b"c:", name),
        };
        [tag, name].concat().into_boxed_slice()
    }
}

/// One request's claim on a subject's rate limit and quota.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    pub subject: Subject<'a>,
    pub rate: Option<RateLimit>,
    pub quota: Option<QuotaLimit>,
    /// The wall clock decides the quota's calendar period.
    pub now: SystemTime,
    /// The monotonic clock drips tokens into buckets.
    pub instant: Instant,
}

/// Why a request may not pass. A refused request has spent nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    RateLimited(Exceeded),
    QuotaExceeded { retry_after_secs: u64 },
}

/// Admitted (with the rate-limit headers' values when the key has a rate limit) or refused.
pub type Verdict = Result<Option<Quota>, Refusal>;

/// The answer to [`Counters::admit`]: at once for stores in this process, later for Redis.
pub enum Admission<'a> {
    Decided(Option<Verdict>),
    Asking(Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>),
}

impl Future for Admission<'_> {
    type Output = Verdict;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Verdict> {
        match self.get_mut() {
            // Taken on the first poll; a second poll of a finished future admits, harmlessly.
            Self::Decided(verdict) => Poll::Ready(verdict.take().unwrap_or(Ok(None))),
            Self::Asking(future) => future.as_mut().poll(cx),
        }
    }
}

/// A boxed future, for the interface's slow paths (usage reads, flushing).
pub type Pending<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The state of the shared store, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClusterStatus {
    pub connected: bool,
    pub replicas: u64,
    pub last_error: Option<String>,
}

/// Where counts live and how the store is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// `memory`, `state` or `cluster`.
    pub kind: &'static str,
    pub cluster: Option<ClusterStatus>,
    /// Failed or timed-out Redis calls so far (`keygate_cluster_errors_total`).
    pub cluster_errors: u64,
}

/// The counters interface: take a token and count a request, note a use, read usage.
pub trait Counters: Send + Sync {
    /// Takes a rate-limit token and counts one request against the quota: both or neither.
    /// The rate limit is judged first, so a request over both is `rate_limited`.
    fn admit<'a>(&'a self, ask: Ask<'a>) -> Admission<'a>;

    /// Notes that a key was used now: its last use, and one request in `period`. Off the
    /// request path's slow lane: a store that writes elsewhere batches these.
    fn record(&self, key_id: &[u8], period: Period, now: SystemTime);

    /// The usage of each `(key id, period)`, in order.
    fn usage<'a>(
        &'a self,
        keys: &'a [(String, Period)],
        now: SystemTime,
    ) -> Pending<'a, Result<Vec<Usage>, String>>;

    fn status(&self) -> StoreStatus;

    /// Writes out whatever is still batched: at shutdown.
    fn flush(&self) -> Pending<'_, ()>;
}

/// Which store keeps the counts, as the config chose it.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// Neither `[state]` nor `[cluster]`: counts reset when the process restarts.
    Memory,
    /// `[state] path`: an embedded database file on this machine.
    Local { path: PathBuf },
    /// `[cluster]`: every replica shares one Redis.
    Cluster(Box<ClusterSettings>),
}

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub client: ::redis::Client,
    /// The URL without its password, for messages.
    pub display: String,
    pub namespace: String,
    pub timeout: Duration,
}

impl StoreSettings {
    /// Whether counts survive a restart of this process.
    pub fn persistent(&self) -> bool {
        !matches!(self, Self::Memory)
    }

    /// One line naming the store, for logs (a Redis password never appears).
    pub fn describe(&self) -> String {
        match self {
            Self::Memory => "memory".to_string(),
            Self::Local { path } => format!("state file {}", path.display()),
            Self::Cluster(c) => {
                format!("redis {} namespace {} timeout {:?}", c.display, c.namespace, c.timeout)
            }
        }
    }
}

/// Opens the chosen store. Must run inside the tokio runtime that will serve: the file and
/// Redis stores start their background tasks (flushing, heartbeats, reconnecting) here.
pub async fn open(settings: &StoreSettings) -> Result<Arc<dyn Counters>, String> {
    match settings {
        StoreSettings::Memory => Ok(Arc::new(memory::Memory::default())),
        StoreSettings::Local { path } => local::Local::open(path).map(|l| l as Arc<dyn Counters>),
        StoreSettings::Cluster(cluster) => Ok(redis::Shared::start((**cluster).clone()).await),
    }
}

/// Reads usage without a running gateway (for `keygate keys list`): `None` when counts are
/// kept only in a gateway's memory.
pub async fn read_usage(
    settings: &StoreSettings,
    keys: &[(String, Period)],
    now: SystemTime,
) -> Result<Option<Vec<Usage>>, String> {
    match settings {
        StoreSettings::Memory => Ok(None),
        StoreSettings::Local { path } => local::read_usage(path, keys, now).map(Some),
        StoreSettings::Cluster(cluster) => redis::read_usage(cluster, keys, now).await.map(Some),
    }
}

//! Logging: the tracing subscriber (`RUST_LOG`, `KEYGATE_LOG_FORMAT=json`) and the access event.

use std::time::Duration;

use http::{HeaderValue, Method, StatusCode};
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber on stderr, so stdout stays free for command output
/// (`keygate keys create` prints the key alone there).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("KEYGATE_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    // Colours only for a person at a terminal: log files and journald get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    // A second init (tests, demo) keeps the first subscriber; that is fine.
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}

/// What one request did, filled in as the pipeline goes and emitted once at the end.
/// It holds only what is safe to log: the key's id, never the key.
#[derive(Debug)]
pub struct AccessLog {
    pub method: Method,
    /// Kept here from the start, and moved into the response at the end: a clone would cost
    /// an allocation.
    pub request_id: HeaderValue,
    pub path: Option<String>,
    pub route: Option<crate::metrics::LabelText>,
    pub key_id: Option<HeaderValue>,
    /// The client address (`proxy::client`): the peer, or the one a trusted proxy names.
    pub client: Option<std::net::IpAddr>,
    pub reason: Option<&'static str>,
    pub upstream_duration: Option<Duration>,
    /// The key's rate-limit state, for the `RateLimit-*` response headers.
    pub quota: Option<crate::ratelimit::Quota>,
}

impl AccessLog {
    pub fn new(method: &Method, request_id: HeaderValue) -> Self {
        Self {
            method: method.clone(),
            request_id,
            path: None,
            route: None,
            key_id: None,
            client: None,
            reason: None,
            upstream_duration: None,
            quota: None,
        }
    }

    pub fn emit(&self, status: StatusCode, duration: Duration) {
        tracing::info!(
            target: "keygate::access",
            method = %self.method,
            path = self.path.as_deref().unwrap_or("-"),
            route = self.route.as_ref().map_or("-", |r| &*r.0),
            status = status.as_u16(),
            key_id = self.key_id.as_ref().and_then(|k| k.to_str().ok()).unwrap_or("-"),
            client = self.client.map(tracing::field::display),
            reason = self.reason.unwrap_or("-"),
            duration_us = u64::try_from(duration.as_micros()).unwrap_or(u64::MAX),
            upstream_us = self.upstream_duration.map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            request_id = self.request_id.to_str().unwrap_or("-"),
            "request"
        );
    }
}

//! keygate: an API-key authentication gateway that sits in front of an existing HTTP API.
//!
//! # Layout
//! - [`config`]: the two TOML files → one validated, immutable [`config::Snapshot`]; the only way in.
//! - [`keys`]: the presented key as a secret type, the generated key format, the hashed key table.
//! - [`proxy`]: the request pipeline: route → extract → verify → authorize → rewrite → forward.
//! - [`ratelimit`]: token-bucket arithmetic, shared by every counters store.
//! - [`quota`]: `N/day` and `N/month` quotas and their UTC calendar periods.
//! - [`counters`]: rate limits, quotas and usage behind one interface; memory, local file or Redis.
//! - [`reload`]: file events and SIGHUP → debounce → load → atomic swap; bad files change nothing.
//! - [`error`]: every rejection keygate answers itself, and the one place it becomes HTTP.
//! - [`server`]: accept loop, HTTP/1.1 + HTTP/2 connections, graceful drain.
//! - [`metrics`]: Prometheus counters and histograms, rendered for the admin listener.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`, `/status` on their own listener; with admin
//!   tokens, the key API (`/keys`) and the web console (`/console`).
//! - [`audit`]: one JSON line per key change, never the key.
//! - [`tls`]: the listener's certificate and the trust for `https://` upstreams.
//! - [`telemetry`]: tracing subscriber set-up and the access log event.
//! - [`demo`]: an echo upstream and a gateway with a fresh key, for a first run.
//! - [`cli`]: the command line, parsed into ready commands.
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used, clippy::expect_used)]

pub mod admin;
pub mod audit;
pub mod cli;
pub mod config;
pub mod counters;
pub mod demo;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod proxy;
pub mod quota;
pub mod ratelimit;
pub mod reload;
pub mod server;
pub mod telemetry;
pub mod tls;

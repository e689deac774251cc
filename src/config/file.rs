//! The two TOML files exactly as written: a serde mirror that refuses unknown fields.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;
use toml::value::Datetime;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub server: ServerFile,
    pub admin: Option<AdminFile>,
    pub state: Option<StateFile>,
    pub cluster: Option<ClusterFile>,
    pub auth: AuthFile,
    #[serde(default)]
    pub routes: Vec<Spanned<RouteFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    pub listen: Spanned<String>,
    pub tls_cert: Option<Spanned<String>>,
    pub tls_key: Option<Spanned<String>>,
    pub workers: Option<Spanned<i64>>,
    pub request_timeout: Option<Spanned<String>>,
    pub shutdown_timeout: Option<Spanned<String>>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub max_header_bytes: Option<Spanned<i64>>,
    pub allow_encoded_slashes: Option<bool>,
    pub idle_timeout: Option<Spanned<String>>,
    pub h2_max_concurrent_streams: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub upstream_max_connections: Option<Spanned<i64>>,
    pub trusted_proxies: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    pub listen: Spanned<String>,
    pub per_key_metrics: Option<bool>,
    pub hosts: Option<Vec<Spanned<String>>>,
    pub tokens: Option<Vec<Spanned<AdminTokenFile>>>,
    pub audit_log: Option<Spanned<String>>,
}

/// One `[admin] tokens` entry: a name for the audit log and the token's SHA-256.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenFile {
    pub name: Spanned<String>,
    pub hash: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    pub path: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub redis: Spanned<String>,
    pub namespace: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFile {
    pub keys_file: Spanned<String>,
    pub sources: Option<Spanned<Vec<Spanned<String>>>>,
    pub key_prefix: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub prefix: Spanned<String>,
    pub upstream: Spanned<String>,
    #[serde(default)]
    pub public: bool,
    pub host: Option<Spanned<String>>,
    #[serde(default)]
    pub preserve_host: bool,
    pub ca_file: Option<Spanned<String>>,
    pub protocol: Option<Spanned<String>>,
    pub scopes: Option<Spanned<BTreeMap<String, Spanned<ScopeList>>>>,
    pub cors: Option<Spanned<CorsFile>>,
}

/// `[routes.cors]`: keygate answers the route's CORS preflights itself.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsFile {
    pub allow_origins: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    pub allow_headers: Vec<Spanned<String>>,
    pub max_age: Option<Spanned<String>>,
}

/// A method's required scope: one name, or a list of which any one suffices.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ScopeList {
    One(String),
    Any(Vec<String>),
}

impl ScopeList {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Any(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeysFile {
    #[serde(default)]
    pub keys: Vec<Spanned<KeyFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    pub id: Spanned<String>,
    pub name: Spanned<String>,
    pub hash: Spanned<String>,
    pub tail: Option<Spanned<String>>,
    #[serde(default)]
    pub scopes: Vec<Spanned<String>>,
    pub created_at: Option<Spanned<Datetime>>,
    pub expires_at: Option<Spanned<Datetime>>,
    pub revoked_at: Option<Spanned<Datetime>>,
    pub rate_limit: Option<Spanned<String>>,
    pub meta: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    pub allowed_ips: Option<Spanned<Vec<Spanned<String>>>>,
    pub quota: Option<Spanned<String>>,
    pub consumer: Option<Spanned<String>>,
}

//! Loading configuration: `keygate.toml` and the key file it names, validated completely into
//! one immutable [`Snapshot`]. [`load`] is the only way in; `check`, `serve` and reloads share it.

mod error;
mod file;
mod keyfile;
mod keystream;
mod snapshot;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Method, Uri};
use toml::Spanned;

pub use error::{ConfigError, ConfigErrors};
pub use snapshot::{AdminSettings, AdminToken, KeySource, ServerSettings, Snapshot, Summary};

use crate::counters::{ClusterSettings, StoreSettings};
use crate::quota::QuotaLimit;

use crate::keys::{
    Consumer, Duplicate, Entries, HeaderArena, KeyEntry, KeyExtras, KeyHash, KeyTable, RateLimit, ScopeSet,
};
use crate::proxy::auth::{AuthSettings, Source};
use crate::proxy::path::normalize;
use crate::proxy::route::{Route, RouteTable, ScopeRule, Upstream};
use crate::proxy::transport::{Protocol, Transport, TransportSpec};
use crate::tls;
use error::SourceFile;
use file::{GatewayFile, KeyFile, KeysFile, RouteFile};

/// Where the config file is when no `-c` is given: `$KEYGATE_CONFIG`, else `./keygate.toml`.
pub fn default_path() -> PathBuf {
    std::env::var_os("KEYGATE_CONFIG").map_or_else(|| PathBuf::from("keygate.toml"), PathBuf::from)
}

/// Reads and validates both files. Every problem found is reported, not just the first.
/// With `store = "cluster"` the key table starts empty: the keys come from Redis
/// (`keys::cluster`), and a reload keeps the table the gateway has.
pub fn load(config_path: &Path) -> Result<Snapshot, ConfigErrors> {
    let text = read(config_path)?;
    let mut source = SourceFile::new(config_path, &text);
    let file: GatewayFile = toml::from_str(&text).map_err(|e| source.toml_error(&e))?;
    let base = config_path.parent().unwrap_or(Path::new(""));
    let cluster = file.auth.store.as_ref().is_some_and(|s| s.get_ref() == "cluster");
    let keys_path = file.auth.keys_file.as_ref().filter(|_| !cluster).map(|p| base.join(p.get_ref()));
    let gateway = build_gateway(&mut source, file, base);
    let mut errors = source.errors;

    // The key file is checked even when keygate.toml has problems, so one run shows all.
    let keys = match &keys_path {
        // Straight from the file in blocks when it is valid, the usual case, so its text is
        // never held whole; anything else is read whole again to report it with line numbers.
        Some(keys_path) => match keystream::load(keys_path)
            .map_or_else(|| read(keys_path).and_then(|text| check_keys(keys_path, &text)), Ok)
        {
            Ok(table) => Some(table),
            Err(ConfigErrors(e)) => {
                errors.extend(e);
                None
            }
        },
        None => Some(KeyTable::default()),
    };
    match (gateway, keys) {
        (Some(gateway), Some(keys)) if errors.is_empty() => Ok(Snapshot {
            config_path: config_path.to_path_buf(),
            keys_path: match &gateway.key_source {
                KeySource::File(path) => path.clone(),
                KeySource::Cluster(_) => config_path.to_path_buf(),
            },
            key_source: gateway.key_source,
            server: gateway.server,
            tls: gateway.tls,
            admin: gateway.admin,
            auth: gateway.auth,
            routes: gateway.routes,
            store: gateway.store,
            keys: Arc::new(keys),
            loaded_at: SystemTime::now(),
        }),
        _ => Err(ConfigErrors(errors)),
    }
}

/// Validates a key file's text (as `path`) completely: what `keygate keys` checks before it
/// writes, so it never leaves a file the gateway would refuse.
pub fn check_keys(path: &Path, text: &str) -> Result<KeyTable, ConfigErrors> {
    let mut source = SourceFile::new(path, text);
    match load_keys(&mut source) {
        Some(table) if source.errors.is_empty() => Ok(table),
        _ => Err(ConfigErrors(source.errors)),
    }
}

/// Where the keys live and which prefix generated keys get, from a valid `keygate.toml`;
/// the keys themselves are not read.
pub fn key_source_of(config_path: &Path) -> Result<(KeySource, String), ConfigErrors> {
    let text = read(config_path)?;
    let mut source = SourceFile::new(config_path, &text);
    let file: GatewayFile = toml::from_str(&text).map_err(|e| source.toml_error(&e))?;
    let base = config_path.parent().unwrap_or(Path::new(""));
    match build_gateway(&mut source, file, base) {
        Some(gateway) if source.errors.is_empty() => Ok((gateway.key_source, gateway.auth.key_prefix)),
        _ => Err(ConfigErrors(source.errors)),
    }
}

/// Where usage and quota counts are kept, from a valid `keygate.toml`; the key file is not read.
pub fn store_of(config_path: &Path) -> Result<StoreSettings, ConfigErrors> {
    let text = read(config_path)?;
    let mut source = SourceFile::new(config_path, &text);
    let file: GatewayFile = toml::from_str(&text).map_err(|e| source.toml_error(&e))?;
    let base = config_path.parent().unwrap_or(Path::new(""));
    match build_gateway(&mut source, file, base) {
        Some(gateway) if source.errors.is_empty() => Ok(gateway.store),
        _ => Err(ConfigErrors(source.errors)),
    }
}

/// Every entry of a valid key file as (field, TOML value text) pairs, in file order: what
/// `keys copy` writes into Redis. The file is validated completely first, as a load would.
pub fn key_file_entries(path: &Path) -> Result<Vec<Vec<(String, String)>>, ConfigErrors> {
    let text = read(path)?;
    check_keys(path, &text)?;
    let mut entries = Vec::new();
    let whole = 0..text.len();
    if keyfile::read(&text, whole, |key| entries.push(key_fields(key))).is_err() {
        entries.clear();
        let file: KeysFile =
            toml::from_str(&text).map_err(|e| SourceFile::new(path, &text).toml_error(&e))?;
        entries.extend(file.keys.into_iter().map(|k| key_fields(k.into_inner())));
    }
    Ok(entries)
}

/// One entry's fields as TOML value text, in the order `keys create` writes them.
fn key_fields(key: KeyFile) -> Vec<(String, String)> {
    let text = |s: &str| toml_edit::Value::from(s).to_string().trim().to_string();
    let list = |items: &mut dyn Iterator<Item = String>| {
        let array: toml_edit::Array = items.collect();
        toml_edit::Value::Array(array).to_string().trim().to_string()
    };
    let mut fields = vec![
        ("id".to_string(), text(key.id.get_ref())),
        ("name".to_string(), text(key.name.get_ref())),
        ("hash".to_string(), text(key.hash.get_ref())),
    ];
    if let Some(tail) = &key.tail {
        fields.push(("tail".to_string(), text(tail.get_ref())));
    }
    fields.push(("scopes".to_string(), list(&mut key.scopes.iter().map(|s| s.get_ref().clone()))));
    for (name, at) in
        [("created_at", &key.created_at), ("expires_at", &key.expires_at), ("revoked_at", &key.revoked_at)]
    {
        if let Some(at) = at {
            fields.push((name.to_string(), at.get_ref().to_string()));
        }
    }
    for (name, value) in [("rate_limit", &key.rate_limit), ("quota", &key.quota), ("consumer", &key.consumer)]
    {
        if let Some(value) = value {
            fields.push((name.to_string(), text(value.get_ref())));
        }
    }
    if let Some(meta) = &key.meta {
        let mut inline = toml_edit::InlineTable::new();
        for (name, value) in meta.get_ref() {
            inline.insert(name, value.get_ref().as_str().into());
        }
        fields
            .push(("meta".to_string(), toml_edit::Value::InlineTable(inline).to_string().trim().to_string()));
    }
    if let Some(ips) = &key.allowed_ips {
        fields
            .push(("allowed_ips".to_string(), list(&mut ips.get_ref().iter().map(|s| s.get_ref().clone()))));
    }
    fields
}

/// Parses a duration as the config files write them (`500ms`, `30s`, `90d`).
pub fn parse_duration_text(text: &str) -> Result<Duration, String> {
    parse_duration(&text.to_string())
}

fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path)
        .map_err(|e| SourceFile::whole_file(path, format!("cannot read: {e}")).into())
}

struct Gateway {
    key_source: KeySource,
    tls: Option<tls::ServerCert>,
    server: ServerSettings,
    admin: Option<AdminSettings>,
    auth: AuthSettings,
    routes: RouteTable,
    store: StoreSettings,
}

/// Runs `parse` on a spanned value, recording a located error on failure.
fn check<T, U>(
    source: &mut SourceFile,
    value: &Spanned<T>,
    parse: impl FnOnce(&T) -> Result<U, String>,
) -> Option<U> {
    match parse(value.get_ref()) {
        Ok(v) => Some(v),
        Err(message) => {
            source.push(value.span(), message);
            None
        }
    }
}

fn parse_duration(text: &String) -> Result<Duration, String> {
    match humantime::parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("a duration must be greater than zero".to_string()),
        Err(e) => Err(format!("{text:?} is not a duration like 500ms, 30s, 5m, 24h or 90d: {e}")),
    }
}

fn duration_or(
    source: &mut SourceFile,
    value: &Option<Spanned<String>>,
    default: Duration,
) -> Option<Duration> {
    match value {
        Some(v) => check(source, v, parse_duration),
        None => Some(default),
    }
}

fn in_range(min: i64, max: i64) -> impl Fn(&i64) -> Result<i64, String> {
    move |n| {
        if (min..=max).contains(n) { Ok(*n) } else { Err(format!("must be between {min} and {max}")) }
    }
}

fn parse_addr(text: &String) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| format!("{text:?} is not an IP address and port like 0.0.0.0:8080"))
}

fn build_gateway(source: &mut SourceFile, file: GatewayFile, base: &Path) -> Option<Gateway> {
    let s = &file.server;
    let listen = check(source, &s.listen, parse_addr);
    let tls = match (&s.tls_cert, &s.tls_key) {
        (None, None) => Some(None),
        (Some(cert), Some(key)) => {
            check(source, cert, |c| tls::load_server_cert(&base.join(c), &base.join(key.get_ref()))).map(Some)
        }
        (Some(one), None) | (None, Some(one)) => {
            source.push(one.span(), "tls_cert and tls_key go together: set both or neither");
            None
        }
    };
    let workers = match &s.workers {
        Some(w) => check(source, w, in_range(1, 1024)).map(|n| Some(n as usize)),
        None => Some(None),
    };
    let request_timeout = duration_or(source, &s.request_timeout, Duration::from_secs(30));
    let shutdown_timeout = duration_or(source, &s.shutdown_timeout, Duration::from_secs(30));
    let header_read_timeout = duration_or(source, &s.header_read_timeout, Duration::from_secs(10));
    let idle_timeout = duration_or(source, &s.idle_timeout, Duration::from_secs(60));
    let max_header_bytes = match &s.max_header_bytes {
        Some(n) => check(source, n, in_range(1024, 1 << 20)).map(|n| n as usize),
        None => Some(32 * 1024),
    };
    let h2_streams = match &s.h2_max_concurrent_streams {
        Some(n) => check(source, n, in_range(1, 10_000)).map(|n| n as u32),
        None => Some(100),
    };
    let max_connections = match &s.max_connections {
        Some(n) => check(source, n, in_range(1, 1_000_000)).map(|n| n as usize),
        None => Some(10_000),
    };
    let upstream_max_connections = match &s.upstream_max_connections {
        Some(n) => check(source, n, in_range(1, 100_000)).map(|n| n as usize),
        None => Some(512),
    };
    let admin = match &file.admin {
        Some(a) => {
            let listen = check(source, &a.listen, parse_addr);
            let hosts: Vec<Option<String>> =
                a.hosts.iter().flatten().map(|h| check(source, h, |h| parse_host(h))).collect();
            let hosts: Option<Vec<String>> = hosts.into_iter().collect();
            let tokens = admin_tokens(source, a.tokens.as_deref().unwrap_or_default());
            let audit_log = a.audit_log.as_ref().map(|p| base.join(p.get_ref()));
            match (listen, hosts, tokens) {
                (Some(listen), Some(hosts), Some(tokens)) => Some(Some(AdminSettings {
                    listen,
                    per_key_metrics: a.per_key_metrics.unwrap_or(false),
                    hosts,
                    tokens,
                    audit_log,
                })),
                _ => None,
            }
        }
        None => Some(None),
    };
    let trusted_proxies = networks(source, s.trusted_proxies.as_deref().unwrap_or_default());
    let auth = build_auth(source, &file);
    let store = build_store(source, &file, base);
    let key_source = build_key_source(source, &file, base, store.as_ref());
    let allow_encoded_slashes = s.allow_encoded_slashes.unwrap_or(false);
    let key_headers = auth.as_ref().map(AuthSettings::key_headers).unwrap_or_default();
    let routes =
        build_routes(source, file.routes, base, &key_headers, upstream_max_connections.unwrap_or(512));
    Some(Gateway {
        key_source: key_source?,
        tls: tls?,
        server: ServerSettings {
            listen: listen?,
            workers: workers?,
            request_timeout: request_timeout?,
            shutdown_timeout: shutdown_timeout?,
            header_read_timeout: header_read_timeout?,
            max_header_bytes: max_header_bytes?,
            allow_encoded_slashes,
            idle_timeout: idle_timeout?,
            h2_max_concurrent_streams: h2_streams?,
            max_connections: max_connections?,
            upstream_max_connections: upstream_max_connections?,
            trusted_proxies: trusted_proxies?.into(),
        },
        admin: admin?,
        auth: auth?,
        routes: routes?,
        store: store?,
    })
}

/// An admin token's name goes into audit lines and logs as it is: short and plain.
pub fn valid_admin_token_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:@-".contains(&b))
}

/// `[admin] tokens`: names fit for a log line, well-formed hashes, neither repeated.
fn admin_tokens(source: &mut SourceFile, list: &[Spanned<file::AdminTokenFile>]) -> Option<Vec<AdminToken>> {
    let mut tokens = Vec::with_capacity(list.len());
    let mut ok = true;
    for entry in list {
        let entry = entry.get_ref();
        let name = check(source, &entry.name, |n| {
            if valid_admin_token_name(n) {
                Ok(n.clone())
            } else {
                Err("an admin token name must be 1 to 64 letters, digits, '.', '_', ':', '@' or '-'"
                    .to_string())
            }
        });
        let hash = check(source, &entry.hash, |h| {
            KeyHash::parse(h).ok_or_else(|| {
                "an admin token hash must be sha256: followed by 64 lower-case hex digits (`keygate admin token` prints it)"
                    .to_string()
            })
        });
        match (name, hash) {
            (Some(name), Some(hash)) => {
                if tokens.iter().any(|t: &AdminToken| t.name == name) {
                    source.push(entry.name.span(), "this admin token name is used twice");
                    ok = false;
                } else if tokens.iter().any(|t: &AdminToken| t.hash == hash) {
                    source.push(entry.hash.span(), "this admin token hash is listed twice");
                    ok = false;
                }
                tokens.push(AdminToken { name, hash });
            }
            _ => ok = false,
        }
    }
    ok.then_some(tokens)
}

/// `[admin]` from a valid `keygate.toml` (for the audit log of `keygate keys`); the key file is not read.
pub fn admin_of(config_path: &Path) -> Result<Option<AdminSettings>, ConfigErrors> {
    let text = read(config_path)?;
    let mut source = SourceFile::new(config_path, &text);
    let file: GatewayFile = toml::from_str(&text).map_err(|e| source.toml_error(&e))?;
    let base = config_path.parent().unwrap_or(Path::new(""));
    match build_gateway(&mut source, file, base) {
        Some(gateway) if source.errors.is_empty() => Ok(gateway.admin),
        _ => Err(ConfigErrors(source.errors)),
    }
}

/// `[cluster]` wins over `[state]`: with both, counts live in Redis and the file is unused.
fn build_store(source: &mut SourceFile, file: &GatewayFile, base: &Path) -> Option<StoreSettings> {
    if let Some(cluster) = &file.cluster {
        let client = check(source, &cluster.redis, |url| {
            let scheme_ok = url.starts_with("redis://") || url.starts_with("rediss://");
            if !scheme_ok {
                return Err(format!("redis {url:?} must be a redis:// or rediss:// URL"));
            }
            ::redis::Client::open(url.as_str()).map_err(|e| format!("redis URL is not valid: {e}"))
        });
        let namespace = match &cluster.namespace {
            Some(n) => check(source, n, |n| {
                if !n.is_empty()
                    && n.len() <= 64
                    && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
                {
                    Ok(n.clone())
                } else {
                    Err("namespace must be 1 to 64 letters, digits, '.', '_', ':' or '-'".to_string())
                }
            }),
            None => Some("keygate".to_string()),
        };
        let timeout = duration_or(source, &cluster.timeout, Duration::from_millis(50));
        let display = redacted_url(cluster.redis.get_ref());
        return Some(StoreSettings::Cluster(Box::new(ClusterSettings {
            client: client?,
            display,
            namespace: namespace?,
            timeout: timeout?,
        })));
    }
    match &file.state {
        Some(state) => Some(StoreSettings::Local { path: base.join(state.path.get_ref()) }),
        None => Some(StoreSettings::Memory),
    }
}

/// `[auth] store`: `file` needs `keys_file`; `cluster` needs `[cluster]` (its Redis).
fn build_key_source(
    source: &mut SourceFile,
    file: &GatewayFile,
    base: &Path,
    store: Option<&StoreSettings>,
) -> Option<KeySource> {
    let auth = &file.auth;
    let cluster = matches!(auth.store.as_ref().map(|s| s.get_ref().as_str()), Some("cluster"));
    if let Some(kind) = &auth.store
        && !matches!(kind.get_ref().as_str(), "file" | "cluster")
    {
        source.push(kind.span(), format!("store {:?} must be \"file\" or \"cluster\"", kind.get_ref()));
        return None;
    }
    if cluster {
        return match (store, &auth.store) {
            (Some(StoreSettings::Cluster(settings)), _) => Some(KeySource::Cluster(settings.clone())),
            // A [cluster] section with an error was reported where it is written.
            (None, _) => None,
            (Some(_), Some(kind)) => {
                source.push(kind.span(), "store = \"cluster\" needs a [cluster] section naming the Redis");
                None
            }
            (Some(_), None) => None,
        };
    }
    match &auth.keys_file {
        Some(path) => Some(KeySource::File(base.join(path.get_ref()))),
        None => {
            source.errors.push(SourceFile::whole_file(
                source.path,
                "[auth] keys_file is missing (it may be left out only with store = \"cluster\")".to_string(),
            ));
            None
        }
    }
}

/// A Redis URL fit for a log line: any password replaced.
fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{}", &rest[at + 1..])
        }
        None => url.to_string(),
    }
}

fn build_auth(source: &mut SourceFile, file: &GatewayFile) -> Option<AuthSettings> {
    let sources = match &file.auth.sources {
        None => Some(vec![Source::Header(http::HeaderName::from_static("x-api-key"))]),
        Some(list) if list.get_ref().is_empty() => {
            source.push(list.span(), "sources must name at least one place to find the key");
            None
        }
        Some(list) => {
            let parsed: Vec<Option<Source>> =
                list.get_ref().iter().map(|s| check(source, s, |t| Source::parse(t))).collect();
            parsed.into_iter().collect()
        }
    };
    let key_prefix = match &file.auth.key_prefix {
        Some(p) => check(source, p, |p| {
            if !p.is_empty() && p.len() <= 16 && p.bytes().all(|b| b.is_ascii_alphanumeric()) {
                Ok(p.clone())
            } else {
                Err("key_prefix must be 1 to 16 letters or digits".to_string())
            }
        }),
        None => Some("kg".to_string()),
    };
    Some(AuthSettings { sources: sources?, key_prefix: key_prefix? })
}

/// A list of networks (`trusted_proxies`, `allowed_ips`), each entry checked where it is written.
fn networks(source: &mut SourceFile, list: &[Spanned<String>]) -> Option<Vec<ipnet::IpNet>> {
    let parsed: Vec<Option<ipnet::IpNet>> =
        list.iter().map(|n| check(source, n, |t| crate::proxy::client::parse_network(t))).collect();
    parsed.into_iter().collect()
}

fn build_routes(
    source: &mut SourceFile,
    files: Vec<Spanned<RouteFile>>,
    base: &Path,
    key_headers: &[http::HeaderName],
    max_connections: usize,
) -> Option<RouteTable> {
    let mut seen: HashMap<(Option<String>, String), ()> = HashMap::new();
    let mut routes = Vec::with_capacity(files.len());
    let mut ok = true;
    for spanned in files {
        let span = spanned.span();
        let file = spanned.into_inner();
        match build_route(source, file, base, key_headers, max_connections) {
            Some(route) => {
                if seen.insert((route.host.clone(), route.prefix.clone()), ()).is_some() {
                    source.push(
                        span,
                        format!(
                            "a route for host {:?} and prefix {:?} is already defined",
                            route.host.as_deref().unwrap_or("*"),
                            route.prefix
                        ),
                    );
                    ok = false;
                }
                routes.push(route);
            }
            None => ok = false,
        }
    }
    ok.then(|| RouteTable::new(routes))
}

fn build_route(
    source: &mut SourceFile,
    file: RouteFile,
    base: &Path,
    key_headers: &[http::HeaderName],
    max_connections: usize,
) -> Option<Route> {
    let prefix = check(source, &file.prefix, |p| {
        if !p.starts_with('/') {
            return Err(format!("prefix {p:?} must start with '/'"));
        }
        // A prefix that is not in normal form could never match a normalised path.
        match normalize(p, true) {
            Ok(n) if n == *p => Ok(p.clone()),
            _ => Err(format!(
                "prefix {p:?} is not a normalised path (no '//', '.', '..' or encoded unreserved characters)"
            )),
        }
    });
    let upstream = check(source, &file.upstream, |u| parse_upstream(u));
    let protocol = match &file.protocol {
        Some(p) => check(source, p, |p| match p.as_str() {
            "http1" => Ok(Protocol::Http1),
            "h2" => Ok(Protocol::H2),
            other => Err(format!("protocol {other:?} must be \"http1\" or \"h2\"")),
        }),
        None => Some(Protocol::Http1),
    };
    let private_ca = match &file.ca_file {
        Some(ca_file) => match check(source, ca_file, |path| tls::client_config(Some(&base.join(path)))) {
            Some(_) if upstream.as_ref().is_some_and(|u| u.scheme != Scheme::HTTPS) => {
                source.push(ca_file.span(), "ca_file is for https:// upstreams");
                None
            }
            Some(config) => Some(Some(config)),
            None => None,
        },
        None => Some(None),
    };
    let upstream = match (upstream, protocol, private_ca) {
        (Some(parsed), Some(protocol), Some(private_ca)) => {
            // A limit of the route's own; the gateway swaps in the one it shares per host:port.
            let limit = crate::proxy::limit::ConnectionLimit::new(max_connections, Default::default());
            let spec = TransportSpec {
                scheme: parsed.scheme.clone(),
                authority: parsed.authority.clone(),
                protocol,
                private_ca,
            };
            Some(Upstream {
                scheme: parsed.scheme,
                authority: parsed.authority,
                base_path: parsed.base_path,
                host_header: parsed.host_header,
                transport: Transport::new(spec, limit),
            })
        }
        _ => None,
    };
    let host = match &file.host {
        Some(h) => check(source, h, |h| parse_host(h)).map(Some),
        None => Some(None),
    };
    let scopes = match file.scopes {
        Some(table) => build_scope_rule(source, table).map(Some),
        None => Some(None),
    };
    if file.public && matches!(scopes, Some(Some(_))) {
        source.push(file.prefix.span(), "a public route cannot require scopes");
        return None;
    }
    let cors = match &file.cors {
        Some(cors) => {
            build_cors(source, cors, scopes.as_ref().and_then(Option::as_ref), key_headers).map(Some)
        }
        None => Some(None),
    };
    let (prefix, host) = (prefix?, host?);
    Some(Route {
        label: crate::metrics::LabelText(format!("{}{prefix}", host.as_deref().unwrap_or("")).into()),
        host,
        prefix,
        upstream: upstream?,
        public: file.public,
        preserve_host: file.preserve_host,
        scopes: scopes?,
        cors: cors?,
        metrics: None,
    })
}

fn build_cors(
    source: &mut SourceFile,
    file: &Spanned<file::CorsFile>,
    scopes: Option<&ScopeRule>,
    key_headers: &[http::HeaderName],
) -> Option<crate::proxy::cors::Cors> {
    let cors = file.get_ref();
    let origins: Vec<Option<String>> = cors
        .allow_origins
        .get_ref()
        .iter()
        .map(|o| check(source, o, |t| crate::proxy::cors::parse_origin(t)))
        .collect();
    let headers: Vec<Option<http::HeaderName>> = cors
        .allow_headers
        .iter()
        .map(|h| {
            check(source, h, |t| {
                http::HeaderName::from_bytes(t.trim().as_bytes())
                    .map_err(|_| format!("allow_headers entry {t:?} is not a header name"))
            })
        })
        .collect();
    let max_age = duration_or(source, &cors.max_age, Duration::from_secs(600));
    let (origins, headers, max_age): (Option<Vec<String>>, Option<Vec<http::HeaderName>>, _) =
        (origins.into_iter().collect(), headers.into_iter().collect(), max_age);
    let (origins, headers, max_age) = (origins?, headers?, max_age?);
    match crate::proxy::cors::Cors::new(origins, scopes, key_headers, &headers, max_age) {
        Ok(cors) => Some(cors),
        Err(message) => {
            source.push(cors.allow_origins.span(), message);
            None
        }
    }
}

/// An upstream URL taken apart, before its transport is chosen.
struct ParsedUpstream {
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    host_header: HeaderValue,
}

fn parse_upstream(text: &str) -> Result<ParsedUpstream, String> {
    let bad = |why: &str| format!("upstream {text:?} {why}; expected http(s)://host[:port][/path]");
    let uri: Uri = text.parse().map_err(|_| bad("is not a URL"))?;
    let scheme = match uri.scheme_str() {
        Some("http") => Scheme::HTTP,
        Some("https") => Scheme::HTTPS,
        _ => return Err(bad("must use http:// or https://")),
    };
    let authority: Authority = uri.authority().cloned().ok_or_else(|| bad("has no host"))?;
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(bad("must be host:port without user info"));
    }
    if uri.query().is_some() {
        return Err(bad("must not have a query"));
    }
    let base_path = uri.path().trim_end_matches('/').to_string();
    let host_header = HeaderValue::from_str(authority.as_str()).map_err(|_| bad("has an invalid host"))?;
    Ok(ParsedUpstream { scheme, authority, base_path, host_header })
}

fn parse_host(text: &str) -> Result<String, String> {
    let host = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    let valid = !host.is_empty()
        && (host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            || (host.starts_with('[') && host.ends_with(']')));
    if valid { Ok(host) } else { Err(format!("host {text:?} must be a host name without port")) }
}

/// A scope name: text that survives a comma-separated header intact.
pub fn valid_scope(scope: &str) -> bool {
    !scope.is_empty() && scope.bytes().all(|b| b.is_ascii_graphic() && b != b',' && b != b'"')
}

fn build_scope_rule(
    source: &mut SourceFile,
    table: Spanned<BTreeMap<String, Spanned<file::ScopeList>>>,
) -> Option<ScopeRule> {
    let span = table.span();
    let mut rule = ScopeRule::default();
    let mut ok = true;
    for (method, scopes) in table.into_inner() {
        let scopes_span = scopes.span();
        let list = scopes.into_inner().into_vec();
        if list.is_empty() || !list.iter().all(|s| valid_scope(s)) {
            source.push(
                scopes_span,
                format!("scopes for {method:?} must be one or more scope names without spaces or commas"),
            );
            ok = false;
            continue;
        }
        let list: Box<[Box<str>]> = list.into_iter().map(String::into_boxed_str).collect();
        if method == "*" {
            rule.other = Some(list);
        } else {
            match Method::from_bytes(method.as_bytes()) {
                Ok(m) => rule.by_method.push((m, list)),
                Err(_) => {
                    source.push(span.clone(), format!("{method:?} is not an HTTP method"));
                    ok = false;
                }
            }
        }
    }
    ok.then_some(rule)
}

fn datetime(value: &toml::value::Datetime) -> Result<SystemTime, String> {
    use time::{Date, Month, PrimitiveDateTime, Time, UtcOffset};
    let bad = || format!("{value} must be a full date-time with an offset, like 2027-02-20T10:00:00Z");
    let (Some(d), Some(t), Some(offset)) = (value.date, value.time, value.offset) else { return Err(bad()) };
    let month = Month::try_from(d.month).map_err(|_| bad())?;
    let date = Date::from_calendar_date(i32::from(d.year), month, d.day).map_err(|_| bad())?;
    let clock = Time::from_hms_nano(t.hour, t.minute, t.second.unwrap_or(0), t.nanosecond.unwrap_or(0))
        .map_err(|_| bad())?;
    let offset = match offset {
        toml::value::Offset::Z => UtcOffset::UTC,
        toml::value::Offset::Custom { minutes } => {
            UtcOffset::from_whole_seconds(i32::from(minutes) * 60).map_err(|_| bad())?
        }
    };
    Ok(PrimitiveDateTime::new(date, clock).assume_offset(offset).into())
}

fn optional_datetime(
    source: &mut SourceFile,
    value: &Option<Spanned<toml::value::Datetime>>,
) -> Option<Option<SystemTime>> {
    match value {
        Some(v) => check(source, v, datetime).map(Some),
        None => Some(None),
    }
}

/// Text that can travel as a header value: no control characters (CR and LF least of all).
fn header_text(what: &str) -> impl Fn(&String) -> Result<HeaderValue, String> + '_ {
    move |text| header_text_with(what, text, |t| HeaderValue::from_bytes(t.as_bytes()))
}

/// [`header_text`], the value made by `make` (say, in a [`HeaderArena`]).
fn header_text_with(
    what: &str,
    text: &str,
    make: impl FnOnce(&str) -> Result<HeaderValue, http::header::InvalidHeaderValue>,
) -> Result<HeaderValue, String> {
    if text.is_empty() || text.chars().any(char::is_control) {
        return Err(format!("{what} must be non-empty and free of control characters"));
    }
    make(text).map_err(|_| format!("{what} cannot travel in a header"))
}

/// The longest `meta` value, so identity headers stay well inside any upstream's header limits.
const META_VALUE_MAX: usize = 1024;

/// `meta = { name = "value" }` → `x-keygate-meta-<name>` headers. Names are header names and
/// so case-insensitive: two that differ only in case would be one header, and are refused.
fn build_meta(
    source: &mut SourceFile,
    meta: &Spanned<std::collections::BTreeMap<String, Spanned<String>>>,
) -> Option<Box<[(http::HeaderName, HeaderValue)]>> {
    let mut out: Vec<(http::HeaderName, HeaderValue)> = Vec::with_capacity(meta.get_ref().len());
    let mut ok = true;
    for (name, value) in meta.get_ref() {
        let header = check(source, value, |_| {
            let valid_name = (1..=64).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
            if !valid_name {
                return Err(format!("meta name {name:?} must be 1 to 64 letters, digits or '-'"));
            }
            http::HeaderName::from_bytes(format!("x-keygate-meta-{}", name.to_ascii_lowercase()).as_bytes())
                .map_err(|_| format!("meta name {name:?} cannot be a header name"))
        });
        let text = check(source, value, |text| {
            if text.len() > META_VALUE_MAX {
                return Err(format!("meta value of {name:?} is longer than {META_VALUE_MAX} bytes"));
            }
            if text.chars().any(char::is_control) || text.trim_matches([' ', '\t']) != text.as_str() {
                return Err(format!(
                    "meta value of {name:?} must be free of control characters and of leading or trailing spaces"
                ));
            }
            HeaderValue::from_bytes(text.as_bytes())
                .map_err(|_| format!("meta value of {name:?} cannot travel in a header"))
        });
        match (header, text) {
            (Some(header), Some(text)) => {
                if out.iter().any(|(h, _)| *h == header) {
                    source.push(value.span(), format!("meta name {name:?} is already given in another case"));
                    ok = false;
                }
                out.push((header, text));
            }
            _ => ok = false,
        }
    }
    ok.then(|| out.into_boxed_slice())
}

/// Files above this size are read by several threads, each taking a run of whole entries.
const PARALLEL_ABOVE: usize = 4 << 20;

/// How many threads read a large key file.
fn reader_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

/// Reads the key file: the fast reader for the plain form, else the full TOML parser.
fn load_keys(source: &mut SourceFile) -> Option<KeyTable> {
    let text = source.text;
    let path = source.path;
    let threads = if text.len() > PARALLEL_ABOVE { reader_threads() } else { 1 };
    let parts = split_at_entries(text, threads);
    let read_part = |range: Range<usize>| {
        let mut local = SourceFile::new(path, text);
        let mut validator = KeyValidator::default();
        let expected = text[range.clone()].matches("[[keys]]").count();
        let mut keys = Keys { entries: Entries::default(), spans: Vec::with_capacity(expected) };
        let result = keyfile::read(text, range, |key| keys.push(validator.validate(&mut local, key)));
        (keys, local.errors, result)
    };
    let results: Vec<_> = if parts.len() == 1 {
        parts.into_iter().map(read_part).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> =
                parts.into_iter().map(|range| scope.spawn(move || read_part(range))).collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        })
    };
    let mut entries = Entries::default();
    let mut spans = Vec::new();
    let mut not_plain = None;
    for (part, errors, result) in results {
        if let Err(e) = result {
            not_plain = not_plain.or(Some(e));
        }
        entries.append(part.entries);
        spans.extend(part.spans);
        source.errors.extend(errors);
    }
    match not_plain {
        None => finish_keys(source, entries, &spans),
        Some(not_plain) => {
            drop(entries);
            source.errors.clear();
            load_keys_with_toml(source, not_plain)
        }
    }
}

/// Splits `text` into about `n` ranges that each start at a `[[keys]]` line (or the start).
fn split_at_entries(text: &str, n: usize) -> Vec<Range<usize>> {
    let mut starts = vec![0];
    for i in 1..n {
        let mut guess = text.len() * i / n;
        while !text.is_char_boundary(guess) {
            guess += 1;
        }
        let last = starts.last().copied().unwrap_or(0);
        if let Some(found) = text[guess.max(last)..].find("\n[[keys]]") {
            starts.push(guess.max(last) + found + 1);
        }
    }
    starts.dedup();
    let ends = starts.iter().skip(1).copied().chain([text.len()]);
    starts.iter().copied().zip(ends).map(|(start, end)| start..end).collect()
}

/// The general path, for files outside the plain form.
fn load_keys_with_toml(source: &mut SourceFile, not_plain: keyfile::NotPlain) -> Option<KeyTable> {
    let text = source.text;
    // Most often the entry that left the plain form is simply broken (a half-written file, a
    // typo): parse just that entry to report it, instead of the whole, possibly huge, file.
    // Only an entry that is valid TOML on its own needs the whole file parsed.
    let start = not_plain.entry_start;
    // The entry's own header is not preceded by a newline inside the slice, so this finds the next.
    let end = text[start..].find("\n[[keys]]").map_or(text.len(), |i| start + i + 1);
    let entry = &text[start..end];
    if !entry.contains("\"\"\"")
        && !entry.contains("'''")
        && let Err(error) = toml::from_str::<KeysFile>(entry)
    {
        let located = match error.span() {
            Some(span) => source.error_at(span.start + start..span.end + start, error.message().trim()),
            None => source.toml_error(&error),
        };
        source.errors.push(located);
        return None;
    }
    match toml::from_str::<KeysFile>(text) {
        Ok(file) => {
            let mut validator = KeyValidator::default();
            let mut keys = Keys { entries: Entries::default(), spans: Vec::new() };
            for key in file.keys {
                keys.push(validator.validate(source, key.into_inner()));
            }
            finish_keys(source, keys.entries, &keys.spans)
        }
        Err(error) => {
            let located = source.toml_error(&error);
            source.errors.push(located);
            None
        }
    }
}

/// Indexes validated entries, reporting duplicate ids and hashes where they are written.
fn finish_keys(
    source: &mut SourceFile,
    entries: Entries,
    spans: &[(Range<usize>, Range<usize>)],
) -> Option<KeyTable> {
    if entries.too_many() {
        source.errors.push(SourceFile::whole_file(source.path, "more keys than one table can hold"));
        return None;
    }
    let (table, duplicates) = KeyTable::build(entries);
    for duplicate in duplicates {
        let (later, earlier, what) = match duplicate {
            Duplicate::Id(later, earlier) => (&spans[later].0, &spans[earlier].0, "key id"),
            Duplicate::Hash(later, earlier) => {
                (&spans[later].1, &spans[earlier].1, "hash (the same key twice)")
            }
        };
        let first = source.error_at(earlier.clone(), "").line;
        source.push(later.clone(), format!("duplicate {what}: first at line {first}"));
    }
    source.errors.sort_by_key(|e| (e.line, e.column));
    source.errors.is_empty().then_some(table)
}

/// Validated entries in file order, and where each one's id and hash are written (for
/// duplicate errors), kept apart so the entries can become a key table as they are.
struct Keys {
    entries: Entries,
    spans: Vec<(Range<usize>, Range<usize>)>,
}

impl Keys {
    fn push(&mut self, key: Option<ParsedKey>) {
        if let Some(key) = key {
            self.entries.push(key.entry);
            self.spans.push((key.id_span, key.hash_span));
        }
    }
}

/// One validated entry and where its id and hash are written, for duplicate errors.
struct ParsedKey {
    entry: KeyEntry,
    id_span: Range<usize>,
    hash_span: Range<usize>,
}

/// Validates key entries one by one; keys with the same scopes share one set, which at a
/// million keys is most of them.
#[derive(Default)]
struct KeyValidator {
    scope_sets: HashMap<Vec<String>, Arc<ScopeSet>>,
    networks: HashMap<Vec<ipnet::IpNet>, Arc<[ipnet::IpNet]>>,
    consumers: HashMap<String, Arc<Consumer>>,
    /// Where the ids and names go.
    arena: HeaderArena,
}

impl KeyValidator {
    fn validate(&mut self, source: &mut SourceFile, key: KeyFile) -> Option<ParsedKey> {
        let id = check(source, &key.id, |id| {
            if id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b)) {
                header_text_with("id", id, |t| self.arena.value(t))
            } else {
                Err("id must be 1 to 64 letters, digits, '.', '_', ':' or '-'".to_string())
            }
        });
        let name = check(source, &key.name, |n| header_text_with("name", n, |t| self.arena.value(t)));
        let hash = check(source, &key.hash, |h| {
            KeyHash::parse(h)
                .ok_or_else(|| "hash must be sha256: followed by 64 lower-case hex digits".to_string())
        });
        if let Some(tail) = &key.tail {
            check(source, tail, header_text("tail"));
        }
        let mut scopes = Vec::with_capacity(key.scopes.len());
        for scope in &key.scopes {
            if valid_scope(scope.get_ref()) {
                scopes.push(scope.get_ref().clone());
            } else {
                source.push(
                    scope.span(),
                    "a scope must be a name without spaces, commas or control characters",
                );
            }
        }
        scopes.sort();
        scopes.dedup();
        let created = optional_datetime(source, &key.created_at);
        let expires_at = optional_datetime(source, &key.expires_at);
        let revoked_at = optional_datetime(source, &key.revoked_at);
        let rate_limit = match &key.rate_limit {
            Some(r) => check(source, r, |r| {
                RateLimit::parse(r)
                    .ok_or_else(|| format!("rate_limit {r:?} must be N/s, N/m or N/h with N > 0"))
            })
            .map(Some),
            None => Some(None),
        };
        let meta = match &key.meta {
            Some(meta) => build_meta(source, meta),
            None => Some(Box::default()),
        };
        let allowed_ips = match &key.allowed_ips {
            None => Some(None),
            Some(list) if list.get_ref().is_empty() => {
                source.push(
                    list.span(),
                    "allowed_ips is empty, so no client could use this key; remove it to allow any address",
                );
                None
            }
            Some(list) => networks(source, list.get_ref()).map(|nets| {
                // Keys given the same networks (a team's office, say) share one list.
                let shared = self.networks.entry(nets.clone()).or_insert_with(|| nets.into());
                Some(Arc::clone(shared))
            }),
        };
        let quota = match &key.quota {
            Some(q) => check(source, q, |q| {
                QuotaLimit::parse(q).ok_or_else(|| format!("quota {q:?} must be N/day or N/month with N > 0"))
            })
            .map(Some),
            None => Some(None),
        };
        let consumer = match &key.consumer {
            Some(c) => check(source, c, |c| {
                if c.len() > 128 {
                    return Err("consumer must be at most 128 bytes".to_string());
                }
                header_text("consumer")(c)
            })
            .map(|name| {
                let text = key.consumer.as_ref().map(|c| c.get_ref().clone()).unwrap_or_default();
                Some(Arc::clone(self.consumers.entry(text).or_insert_with(|| Arc::new(Consumer { name }))))
            }),
            None => Some(None),
        };
        let scopes = match self.scope_sets.get(&scopes) {
            Some(set) => Some(Arc::clone(set)),
            None => ScopeSet::new(scopes.clone()).ok().map(|set| {
                let set = Arc::new(set);
                self.scope_sets.insert(scopes, Arc::clone(&set));
                set
            }),
        };
        let extras = KeyExtras {
            revoked_at: revoked_at?,
            rate_limit: rate_limit?,
            meta: meta?,
            allowed_ips: allowed_ips?,
            quota: quota?,
            consumer: consumer?,
        };
        let entry = KeyEntry::new(hash?, id?, name?, scopes?, expires_at?, extras);
        created?;
        Some(ParsedKey { entry, id_span: key.id.span(), hash_span: key.hash.span() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    const GATEWAY: &str = r#"
[server]
listen = "127.0.0.1:0"
[auth]
keys_file = "keys.toml"
[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:3000/base/"
[routes.scopes]
GET = "read"
"*" = ["write", "admin"]
"#;

    fn key(id: &str, hash_of: &str) -> String {
        format!(
            "[[keys]]\nid = \"{id}\"\nname = \"n\"\nhash = \"{}\"\nscopes = [\"read\"]\n",
            crate::keys::hash_key(hash_of)
        )
    }

    fn load_pair(gateway: &str, keys: &str) -> Result<Snapshot, ConfigErrors> {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "keygate.toml", gateway);
        write(dir.path(), "keys.toml", keys);
        load(&path)
    }

    #[test]
    fn a_valid_pair_loads() {
        let snapshot = load_pair(GATEWAY, &(key("a", "k1") + &key("b", "k2"))).unwrap();
        assert_eq!(snapshot.keys.len(), 2);
        let route = snapshot.routes.find(None, "/x").unwrap();
        assert_eq!(route.upstream.base_path, "/base");
        let rule = route.scopes.as_ref().unwrap();
        assert_eq!(rule.required(&Method::DELETE).unwrap().len(), 2);
        assert_eq!(snapshot.server.request_timeout, Duration::from_secs(30));
        assert_eq!(snapshot.server.upstream_max_connections, 512);
        assert_eq!(route.upstream.transport.spec().protocol, crate::proxy::transport::Protocol::Http1);
        let h2 = load_pair(&GATEWAY.replace("upstream = ", "protocol = \"h2\"\nupstream = "), "").unwrap();
        let route = h2.routes.find(None, "/x").unwrap();
        assert_eq!(route.upstream.transport.spec().protocol, crate::proxy::transport::Protocol::H2);
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let errors = load_pair(GATEWAY, &(key("a", "k1") + &key("a", "k2"))).unwrap_err();
        let text = errors.to_string();
        assert!(text.contains("keys.toml:7:6: duplicate key id"), "{text}");

        let errors = load_pair(&GATEWAY.replace("prefix", "prefx"), "").unwrap_err().to_string();
        assert!(errors.contains("keygate.toml:7:1"), "{errors}");
        assert!(errors.contains("prefx"), "{errors}");

        let bad = GATEWAY
            .replace("http://127.0.0.1:3000/base/", "ftp://x")
            .replace("[auth]", "[auth]\nsources = [\"bogus:x\"]");
        let errors = load_pair(&bad, &key("a", "k1").replace("sha256:", "md5:")).unwrap_err();
        assert_eq!(errors.0.len(), 3, "{errors}");
    }

    #[test]
    fn every_rule_is_enforced() {
        let cases = [
            (GATEWAY.to_string(), "[[keys]]\nid=\"a\"\nname=\"n\"\nhash=\"sha256:00\"\n".to_string(), "hash"),
            (GATEWAY.replace("[auth]", "[server2]\n[auth]"), String::new(), "unknown"),
            (
                GATEWAY.replace(
                    "listen = \"127.0.0.1:0\"",
                    "listen = \"127.0.0.1:0\"\nrequest_timeout = \"soon\"",
                ),
                String::new(),
                "duration",
            ),
            (
                format!("{GATEWAY}[[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:1\"\n"),
                String::new(),
                "already defined",
            ),
            (GATEWAY.to_string(), key("a", "k").replace("name = \"n\"", "name = \"a\\r\\nb\""), "control"),
            (GATEWAY.to_string(), key("a", "k") + "expires_at = 2027-01-01T00:00:00\n", "offset"),
            (GATEWAY.to_string(), key("a", "k") + "rate_limit = \"5/d\"\n", "rate_limit"),
            (GATEWAY.to_string(), key("a", "k") + &key("b", "k"), "duplicate hash"),
            (GATEWAY.replace("\"/\"", "\"/a/../\""), String::new(), "normalised"),
            (
                GATEWAY.replace("upstream = ", "protocol = \"h3\"\nupstream = "),
                String::new(),
                "protocol \"h3\" must be",
            ),
            (
                GATEWAY.replace(
                    "listen = \"127.0.0.1:0\"",
                    "listen = \"127.0.0.1:0\"\nupstream_max_connections = 0",
                ),
                String::new(),
                "must be between 1 and 100000",
            ),
        ];
        for (gateway, keys, want) in cases {
            let errors = load_pair(&gateway, &keys).unwrap_err().to_string();
            assert!(errors.contains(want), "want {want:?} in {errors}");
        }
    }

    #[test]
    fn keys_outside_the_plain_form_still_load_through_toml() {
        let escaped = key("a", "k1").replace("name = \"n\"", "name = \"caf\\u00e9\"");
        let snapshot = load_pair(GATEWAY, &(key("z", "k0") + &escaped)).unwrap();
        assert_eq!(snapshot.keys.get(&KeyHash::of("k1")).unwrap().name.as_bytes(), "café".as_bytes());
        let inline = "keys = [{ id = \"a\", name = \"n\", hash = \"".to_string()
            + &crate::keys::hash_key("k")
            + "\" }]\n";
        assert_eq!(load_pair(GATEWAY, &inline).unwrap().keys.len(), 1);
    }

    #[test]
    fn a_half_written_key_file_is_an_error_at_the_cut() {
        let full = key("a", "k1") + &key("b", "k2");
        let cut = &full[..full.len() - 20];
        let errors = load_pair(GATEWAY, cut).unwrap_err().to_string();
        assert!(errors.contains("keys.toml:9:"), "{errors}");
    }

    #[test]
    fn split_parts_start_at_entries_and_cover_the_text() {
        let text = key("a", "1") + &key("b", "2") + &key("c", "3");
        for n in 1..6 {
            let parts = split_at_entries(&text, n);
            assert_eq!(parts.first().map(|r| r.start), Some(0));
            assert_eq!(parts.last().map(|r| r.end), Some(text.len()));
            for pair in parts.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert!(text[pair[1].clone()].starts_with("[[keys]]"));
            }
        }
    }

    #[test]
    fn large_files_are_read_in_parallel_parts_with_duplicates_across_parts_found() {
        let mut text = String::new();
        let mut i = 0;
        while text.len() <= PARALLEL_ABOVE + 1024 {
            text += &key(&format!("id{i}"), &format!("k{i}"));
            i += 1;
        }
        let snapshot = load_pair(GATEWAY, &text).unwrap();
        assert_eq!(snapshot.keys.len(), i);
        assert_eq!(snapshot.keys.entries().count(), i);
        // Every run of the file is found: the first key, one from the middle, the last.
        for n in [0, i / 2, i - 1] {
            let found = snapshot.keys.get(&KeyHash::of(&format!("k{n}")));
            assert_eq!(found.map(|e| e.id.to_str().unwrap().to_string()), Some(format!("id{n}")));
        }
        let with_same_id = text.clone() + &key("id0", "another");
        let errors = load_pair(GATEWAY, &with_same_id).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("duplicate key id: first at line 2"), "{errors:?}");
        let with_same_key = text + &key("another", &format!("k{}", i / 2));
        let errors = load_pair(GATEWAY, &with_same_key).unwrap_err().0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].message.contains("duplicate hash"), "{errors:?}");
    }

    #[test]
    fn meta_allowed_ips_cors_and_trusted_proxies_load_ready() {
        let gateway = GATEWAY.replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]",
        ) + "[routes.cors]\nallow_origins = [\"https://App.test\"]\nallow_headers = [\"X-Client\"]\nmax_age = \"1h\"\n";
        let keys = key("a", "k1")
            + "meta = { tenant = \"acme\", Plan = \"pro plan\" }\nallowed_ips = [\"203.0.113.9/24\", \"2001:db8::/32\"]\n";
        let snapshot = load_pair(&gateway, &keys).unwrap();
        assert_eq!(snapshot.server.trusted_proxies.len(), 2);
        let entry = snapshot.keys.get(&KeyHash::of("k1")).unwrap();
        let meta: Vec<(String, String)> =
            entry.meta().iter().map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string())).collect();
        assert_eq!(
            meta,
            [
                ("x-keygate-meta-plan".to_string(), "pro plan".to_string()),
                ("x-keygate-meta-tenant".to_string(), "acme".to_string())
            ]
        );
        assert!(entry.admits("203.0.113.200".parse().unwrap()));
        assert!(entry.admits("2001:db8::7".parse().unwrap()));
        assert!(!entry.admits("203.0.114.1".parse().unwrap()));
        let route = snapshot.routes.find(None, "/x").unwrap();
        let cors = route.cors.as_ref().unwrap();
        assert!(cors.allow_origin(&HeaderValue::from_static("https://app.test")).is_some());
        let preflight = cors.preflight();
        assert_eq!(preflight.headers()["access-control-max-age"], "3600");
        assert_eq!(preflight.headers()["access-control-allow-headers"], "x-api-key, content-type, x-client");
    }

    #[test]
    fn meta_allowed_ips_cors_and_trusted_proxies_errors_say_where() {
        let with_server = |line: &str| {
            GATEWAY.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:0\"\n{line}"))
        };
        let with_cors = |body: &str| format!("{GATEWAY}[routes.cors]\n{body}");
        let long = "x".repeat(1025);
        let cases = [
            (
                GATEWAY.to_string(),
                "meta = { \"bad name\" = \"x\" }\n".to_string(),
                "keys.toml:6:23: meta name",
            ),
            (
                GATEWAY.to_string(),
                "meta = { tenant = \"a\\tb\" }\n".to_string(),
                "keys.toml:6:19: meta value",
            ),
            (GATEWAY.to_string(), format!("meta = {{ tenant = \"{long}\" }}\n"), "longer than 1024"),
            (GATEWAY.to_string(), "meta = { Tenant = \"a\", tenant = \"b\" }\n".to_string(), "another case"),
            (GATEWAY.to_string(), "meta = { t = \" padded\" }\n".to_string(), "leading or trailing"),
            (
                GATEWAY.to_string(),
                "allowed_ips = [\"10.0.0.0/33\"]\n".to_string(),
                "keys.toml:6:16: \"10.0.0.0/33\" is not",
            ),
            (GATEWAY.to_string(), "allowed_ips = []\n".to_string(), "keys.toml:6:15: allowed_ips is empty"),
            (
                with_server("trusted_proxies = [\"nope\"]"),
                String::new(),
                "keygate.toml:4:20: \"nope\" is not",
            ),
            (
                with_cors("allow_origins = [\"https://a.test/\"]\n"),
                String::new(),
                "keygate.toml:13:18: allow_origins entry",
            ),
            (with_cors("allow_origins = [\"*\", \"https://a.test\"]\n"), String::new(), "list no others"),
            (with_cors("allow_origins = []\n"), String::new(), "at least one origin"),
            (with_cors("allow_origins = [\"*\"]\nmax_age = \"soon\"\n"), String::new(), "duration"),
            (
                with_cors("allow_origins = [\"*\"]\nallow_headers = [\"bad header\"]\n"),
                String::new(),
                "not a header name",
            ),
            (with_cors("allow_origin = [\"*\"]\n"), String::new(), "unknown field"),
        ];
        for (gateway, extra, want) in cases {
            let keys = if extra.is_empty() { String::new() } else { key("a", "k") + &extra };
            let errors = load_pair(&gateway, &keys).unwrap_err().to_string();
            assert!(errors.contains(want), "want {want:?} in {errors}");
        }
    }

    #[test]
    fn meta_and_allowed_ips_read_the_same_through_the_fast_reader_and_toml() {
        let entry = |i: usize, meta: &str| {
            key(&format!("id{i}"), &format!("k{i}"))
                + &format!(
                    "meta = {{ {meta} = \"t{i}\", plan = 'pro' }}\nallowed_ips = [\"10.{}.0.0/16\"]\n",
                    i % 256
                )
        };
        let check_table = |text: &str, n: usize| {
            let snapshot = load_pair(GATEWAY, text).unwrap();
            assert_eq!(snapshot.keys.len(), n);
            for i in [0, n / 2, n - 1] {
                let found = snapshot.keys.get(&KeyHash::of(&format!("k{i}"))).unwrap();
                assert_eq!(found.meta().len(), 2);
                assert_eq!(found.meta()[1].0.as_str(), "x-keygate-meta-tenant");
                assert_eq!(found.meta()[1].1, format!("t{i}").as_str());
                assert!(found.admits(format!("10.{}.3.4", i % 256).parse().unwrap()));
                assert!(!found.admits(format!("10.{}.3.4", (i + 1) % 256).parse().unwrap()));
            }
        };
        // Large enough to be read in parallel parts by the fast reader.
        let mut plain = String::new();
        let mut n = 0;
        while plain.len() <= PARALLEL_ABOVE + 1024 {
            plain += &entry(n, "tenant");
            n += 1;
        }
        check_table(&plain, n);
        // A quoted name leaves the plain form: the whole file goes through the TOML parser.
        let mut mixed = String::new();
        for i in 0..2000 {
            mixed += &entry(i, if i == 1000 { "\"tenant\"" } else { "tenant" });
        }
        check_table(&mixed, 2000);
    }

    #[test]
    fn the_cluster_store_needs_cluster_and_no_key_file() {
        let without_file = GATEWAY.replace("keys_file = \"keys.toml\"\n", "store = \"cluster\"\n");
        let errors = load_pair(&without_file, "").unwrap_err().to_string();
        assert!(errors.contains("needs a [cluster] section"), "{errors}");
        let with_cluster = format!("[cluster]\nredis = \"redis://127.0.0.1:1/0\"\n{without_file}");
        let snapshot = load_pair(&with_cluster, "not even toml").unwrap();
        assert_eq!((snapshot.keys.len(), snapshot.key_source.kind()), (0, "cluster"));
        let bogus =
            GATEWAY.replace("keys_file = \"keys.toml\"\n", "keys_file = \"keys.toml\"\nstore = \"disk\"\n");
        let errors = load_pair(&bogus, "").unwrap_err().to_string();
        assert!(errors.contains("must be \"file\" or \"cluster\""), "{errors}");
        let no_file = GATEWAY.replace("keys_file = \"keys.toml\"\n", "");
        let errors = load_pair(&no_file, "").unwrap_err().to_string();
        assert!(errors.contains("keys_file is missing"), "{errors}");
    }

    #[test]
    fn missing_keys_file_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "keygate.toml", GATEWAY);
        let errors = load(&path).unwrap_err().to_string();
        assert!(errors.contains("keys.toml: cannot read"), "{errors}");
    }
}

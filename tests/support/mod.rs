//! Shared test fixtures: an in-process keygate on 127.0.0.1:0, a recording upstream, and clients.
//!
//! Every network wait here is bounded by [`IO_TIMEOUT`]; nothing sleeps to wait for readiness
//! (a listener handed to `serve` is already bound, so the gateway accepts as soon as it exists).
#![allow(dead_code)] // each test crate uses a different part of this module

pub mod admin;
pub mod browser;
pub mod grpc;
pub mod h2;
pub mod leak;
pub mod pki;
pub mod poll;
pub mod process;
pub mod redis;
pub mod scripted;

use std::error::Error as StdError;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Upper bound for any single network exchange a test makes.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How [`Call::try_send`] and [`raw_exchange`] begin the message of a wait that ran out: the
/// server neither answered nor closed. Tell it apart with [`timed_out`].
const TIMED_OUT: &str = "no complete response";

/// Whether an error from [`Call::try_send`] means the server went silent (timed out), as
/// opposed to closing or resetting the connection: a hung gateway must never pass for one that
/// refused.
pub fn timed_out(error: &str) -> bool {
    error.contains(TIMED_OUT)
}

/// Header the client helpers add to every request so a test can find *its* request upstream.
pub const PROBE_HEADER: &str = "x-test-probe";

static NEXT_PROBE: AtomicU64 = AtomicU64::new(1);

/// `sha256:<hex>`, computed here rather than by the library so the tests pin the file format.
pub fn sha256_ref(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    let mut out = String::from("sha256:");
    for byte in digest.iter() {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

/// `n` bytes of a deterministic, non-repeating-every-power-of-two pattern.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

/// Shows at most `limit` bytes of a body, escaped, with its full length.
pub fn preview(body: &[u8], limit: usize) -> String {
    let shown = &body[..body.len().min(limit)];
    let more = if body.len() > limit { "…" } else { "" };
    format!("{} bytes: \"{}{more}\"", body.len(), shown.escape_ascii())
}

fn write_headers(f: &mut fmt::Formatter<'_>, headers: &HeaderMap) -> fmt::Result {
    for (name, value) in headers {
        writeln!(f, "    {name}: {}", value.as_bytes().escape_ascii())?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Recording upstream
// ---------------------------------------------------------------------------------------------

/// One request as the upstream received it.
#[derive(Clone)]
pub struct Recorded {
    pub method: Method,
    /// The request target as received: origin-form path and query.
    pub uri: String,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The address keygate's upstream connection came from: one per pooled connection.
    pub peer: SocketAddr,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Every value of a (possibly repeated) header.
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect()
    }

    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }
}

impl fmt::Debug for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} {} {:?}", self.method, self.uri, self.version)?;
        write_headers(f, &self.headers)?;
        write!(f, "    body: {}", preview(&self.body, 200))
    }
}

/// A hyper server on 127.0.0.1:0 that records every request and answers 200 with `x-upstream: yes`.
///
/// By default it echoes the request body. Request headers switch behaviour:
/// `x-test-sleep-ms: N` waits N ms before answering; `x-test-response-bytes: N` answers with
/// [`pattern`]`(N)` instead of the echo.
pub struct RecordingUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Recorded>>>,
    conns: Arc<ConnectionCount>,
    load: Arc<InFlight>,
    accept: JoinHandle<()>,
}

/// Requests being answered now, and the most there ever were at once.
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    most: AtomicUsize,
}

/// Connections a test server has accepted: in all, open now, and the most open at once.
#[derive(Default, Debug)]
pub struct ConnectionCount {
    accepted: AtomicU64,
    open: AtomicU64,
    peak: AtomicU64,
}

impl ConnectionCount {
    /// Counts one accepted connection until the returned guard is dropped.
    pub fn opened(self: &Arc<Self>) -> OpenConnection {
        self.accepted.fetch_add(1, Ordering::SeqCst);
        let open = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(open, Ordering::SeqCst);
        OpenConnection(Arc::clone(self))
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> u64 {
        self.open.load(Ordering::SeqCst)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }
}

/// One connection counted as open by a [`ConnectionCount`].
pub struct OpenConnection(Arc<ConnectionCount>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl RecordingUpstream {
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind recording upstream");
        let addr = listener.local_addr().expect("upstream local addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(ConnectionCount::default());
        let load = Arc::new(InFlight::default());
        let accept = tokio::spawn(upstream_accept_loop(
            listener,
            Arc::clone(&log),
            Arc::clone(&conns),
            Arc::clone(&load),
            None,
        ));
        Self { addr, log, conns, load, accept }
    }

    /// The same upstream behind TLS with `config` (its certificate names `localhost`); use
    /// [`https_url`](Self::https_url) for the route.
    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind recording upstream");
        let addr = listener.local_addr().expect("upstream local addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let conns = Arc::new(ConnectionCount::default());
        let load = Arc::new(InFlight::default());
        let tls = Some(tokio_rustls::TlsAcceptor::from(config));
        let accept = tokio::spawn(upstream_accept_loop(
            listener,
            Arc::clone(&log),
            Arc::clone(&conns),
            Arc::clone(&load),
            tls,
        ));
        Self { addr, log, conns, load, accept }
    }

    /// `https://localhost:PORT`, for a route to an upstream made by [`start_tls`](Self::start_tls).
    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The connections keygate has opened to this upstream.
    pub fn connections(&self) -> &ConnectionCount {
        &self.conns
    }

    /// The most requests this upstream was answering at the same time (from the moment a
    /// request's head arrived until its response was handed back).
    pub fn most_in_flight(&self) -> usize {
        self.load.most.load(Ordering::SeqCst)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, for a route's `upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.log.lock().expect("upstream log").clone()
    }

    pub fn count(&self) -> usize {
        self.log.lock().expect("upstream log").len()
    }

    /// The request this exchange caused upstream, found by its probe header.
    pub fn received(&self, exchange: &Exchange) -> Option<Recorded> {
        self.log
            .lock()
            .expect("upstream log")
            .iter()
            .find(|r| r.header(PROBE_HEADER) == Some(exchange.probe.as_str()))
            .cloned()
    }

    /// Like [`received`](Self::received) but fails the test, showing the exchange, if absent.
    #[track_caller]
    pub fn expect_received(&self, exchange: &Exchange) -> Recorded {
        match self.received(exchange) {
            Some(seen) => seen,
            None => panic!(
                "the upstream never saw this request\n{exchange}\nupstream saw {} request(s): {:#?}",
                self.count(),
                self.requests()
            ),
        }
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn upstream_accept_loop(
    listener: TcpListener,
    log: Arc<Mutex<Vec<Recorded>>>,
    conns: Arc<ConnectionCount>,
    load: Arc<InFlight>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) {
    // Ends when the task is aborted (the upstream is dropped) or accept fails.
    while let Ok((stream, peer)) = listener.accept().await {
        let log = Arc::clone(&log);
        let load = Arc::clone(&load);
        let open = conns.opened();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _open = open;
            let service = service_fn(move |req| {
                let (log, load) = (Arc::clone(&log), Arc::clone(&load));
                async move {
                    let now = load.now.fetch_add(1, Ordering::SeqCst) + 1;
                    load.most.fetch_max(now, Ordering::SeqCst);
                    let answer = upstream_answer(req, peer, log).await;
                    load.now.fetch_sub(1, Ordering::SeqCst);
                    answer
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                }
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                    }
                }
            }
        });
    }
}

fn header_number(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

async fn upstream_answer(
    req: Request<Incoming>,
    peer: SocketAddr,
    log: Arc<Mutex<Vec<Recorded>>>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let sleep_ms = header_number(&parts.headers, "x-test-sleep-ms");
    let response_bytes = header_number(&parts.headers, "x-test-response-bytes");
    log.lock().expect("upstream log").push(Recorded {
        method: parts.method,
        // HTTP/2 always carries scheme and authority as pseudo-headers, which hyper puts in
        // the URI; the target itself is the path and query.
        uri: match parts.version {
            Version::HTTP_2 => parts.uri.path_and_query().map_or_else(|| "/".to_owned(), |pq| pq.to_string()),
            _ => parts.uri.to_string(),
        },
        version: parts.version,
        headers: parts.headers,
        body: body.clone(),
        peer,
    });
    if let Some(ms) = sleep_ms {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let payload = match response_bytes {
        Some(n) => Bytes::from(pattern(n as usize)),
        None => body,
    };
    let mut response = Response::new(Full::new(payload));
    response.headers_mut().insert("x-upstream", http::HeaderValue::from_static("yes"));
    Ok(response)
}

// ---------------------------------------------------------------------------------------------
// Config files
// ---------------------------------------------------------------------------------------------

/// A TOML basic string; test values are plain ASCII, for which Rust's escaping agrees with TOML's.
pub fn toml_str(s: &str) -> String {
    format!("{s:?}")
}

fn toml_list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| toml_str(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// One `[[routes]]` entry.
#[derive(Clone, Debug)]
pub struct Route {
    prefix: String,
    upstream: String,
    public: bool,
    host: Option<String>,
    preserve_host: bool,
    scopes: Vec<(String, Vec<String>)>,
    cors: Option<String>,
    /// Further raw TOML lines of the route (`protocol = "h2"`, `ca_file = "ca.pem"`).
    extra: Vec<String>,
}

impl Route {
    pub fn new(prefix: &str, upstream: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            upstream: upstream.to_owned(),
            public: false,
            host: None,
            preserve_host: false,
            scopes: Vec::new(),
            cors: None,
            extra: Vec::new(),
        }
    }

    /// Sets a further route field; `value` is raw TOML (`"\"h2\""`).
    pub fn field(mut self, field: &str, value: &str) -> Self {
        self.extra.push(format!("{field} = {value}"));
        self
    }

    /// A `[routes.cors]` table; `body` is its raw TOML lines (`allow_origins = ["*"]`).
    pub fn cors(mut self, body: &str) -> Self {
        self.cors = Some(body.to_owned());
        self
    }

    pub fn public(mut self) -> Self {
        self.public = true;
        self
    }

    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.to_owned());
        self
    }

    pub fn preserve_host(mut self) -> Self {
        self.preserve_host = true;
        self
    }

    /// `method = scope` (one scope) or `method = [scopes…]` (several) in `[routes.scopes]`.
    pub fn scope(mut self, method: &str, scopes: &[&str]) -> Self {
        self.scopes.push((method.to_owned(), scopes.iter().map(|s| (*s).to_owned()).collect()));
        self
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::from("[[routes]]\n");
        let _ = writeln!(out, "prefix = {}", toml_str(&self.prefix));
        let _ = writeln!(out, "upstream = {}", toml_str(&self.upstream));
        if self.public {
            out.push_str("public = true\n");
        }
        if let Some(host) = &self.host {
            let _ = writeln!(out, "host = {}", toml_str(host));
        }
        if self.preserve_host {
            out.push_str("preserve_host = true\n");
        }
        for line in &self.extra {
            out.push_str(line);
            out.push('\n');
        }
        if !self.scopes.is_empty() {
            out.push_str("[routes.scopes]\n");
            for (method, scopes) in &self.scopes {
                let value = match scopes.as_slice() {
                    [one] => toml_str(one),
                    many => toml_list(many),
                };
                let _ = writeln!(out, "{} = {value}", toml_str(method));
            }
        }
        if let Some(cors) = &self.cors {
            out.push_str("[routes.cors]\n");
            out.push_str(cors);
            out.push('\n');
        }
        out
    }
}

/// One `[[keys]]` entry, made from a plaintext key that the test keeps.
#[derive(Clone, Debug)]
pub struct Key {
    pub id: String,
    pub name: String,
    pub secret: String,
    pub scopes: Vec<String>,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    /// Further raw TOML lines of the entry (`meta = {…}`, `allowed_ips = […]`, `rate_limit`).
    extra: Vec<String>,
}

impl Key {
    pub fn new(id: &str, name: &str, secret: &str, scopes: &[&str]) -> Self {
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            secret: secret.to_owned(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            expires_at: None,
            revoked_at: None,
            extra: Vec::new(),
        }
    }

    /// `meta = { name = "value", … }`.
    pub fn meta(mut self, entries: &[(&str, &str)]) -> Self {
        let pairs: Vec<String> = entries.iter().map(|(n, v)| format!("{n} = {}", toml_str(v))).collect();
        self.extra.push(format!("meta = {{ {} }}", pairs.join(", ")));
        self
    }

    /// `allowed_ips = [networks…]`.
    pub fn allowed_ips(mut self, networks: &[&str]) -> Self {
        let networks: Vec<String> = networks.iter().map(|n| (*n).to_owned()).collect();
        self.extra.push(format!("allowed_ips = {}", toml_list(&networks)));
        self
    }

    /// `rate_limit = "N/s"` and the like.
    pub fn rate_limit(mut self, rate: &str) -> Self {
        self.extra.push(format!("rate_limit = {}", toml_str(rate)));
        self
    }

    /// A key in keygate's own format (`kg_<id>_<secret><checksum>`), made by the library.
    pub fn generated(name: &str, scopes: &[&str]) -> Self {
        let (id, secret) = keygate::keys::generate("kg").expect("OS randomness for a key");
        Self::new(&id, name, &secret, scopes)
    }

    /// A TOML datetime such as `2020-01-01T00:00:00Z`.
    pub fn expires_at(mut self, at: &str) -> Self {
        self.expires_at = Some(at.to_owned());
        self
    }

    /// A TOML datetime such as `2020-01-01T00:00:00Z`.
    pub fn revoked_at(mut self, at: &str) -> Self {
        self.revoked_at = Some(at.to_owned());
        self
    }

    pub fn to_toml(&self) -> String {
        let mut out = String::from("[[keys]]\n");
        let _ = writeln!(out, "id = {}", toml_str(&self.id));
        let _ = writeln!(out, "name = {}", toml_str(&self.name));
        let _ = writeln!(out, "hash = {}", toml_str(&sha256_ref(&self.secret)));
        let _ = writeln!(out, "scopes = {}", toml_list(&self.scopes));
        out.push_str("created_at = 2024-01-01T00:00:00Z\n");
        if let Some(at) = &self.expires_at {
            let _ = writeln!(out, "expires_at = {at}");
        }
        if let Some(at) = &self.revoked_at {
            let _ = writeln!(out, "revoked_at = {at}");
        }
        for line in &self.extra {
            let _ = writeln!(out, "{line}");
        }
        out
    }
}

/// A TOML datetime (UTC, whole seconds) `offset_secs` from now, e.g. `2026-01-31T12:00:02Z`.
pub fn toml_datetime_from_now(offset_secs: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let at = i64::try_from(now).expect("seconds fit i64") + offset_secs;
    let (days, second_of_day) = (at.div_euclid(86_400), at.rem_euclid(86_400));
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        second_of_day / 3_600,
        second_of_day % 3_600 / 60,
        second_of_day % 60
    )
}

/// A keys.toml body holding these keys.
pub fn keys_toml(keys: &[Key]) -> String {
    keys.iter().map(Key::to_toml).collect::<Vec<_>>().join("\n")
}

/// Composes keygate.toml and keys.toml for a test.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    server: Vec<(String, String)>,
    sources: Vec<String>,
    routes: Vec<Route>,
    keys: Vec<Key>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl GatewayConfig {
    /// `listen = "127.0.0.1:0"`, a 5 s request timeout, `sources = ["header:x-api-key"]`.
    pub fn new() -> Self {
        Self {
            server: vec![
                ("listen".into(), toml_str("127.0.0.1:0")),
                ("request_timeout".into(), toml_str("5s")),
            ],
            sources: vec!["header:x-api-key".into()],
            routes: Vec::new(),
            keys: Vec::new(),
        }
    }

    /// Sets a `[server]` field; `value` is raw TOML (`"\"300ms\""`, `"16384"`).
    pub fn server(mut self, field: &str, value: &str) -> Self {
        self.server.retain(|(f, _)| f != field);
        self.server.push((field.to_owned(), value.to_owned()));
        self
    }

    pub fn sources(mut self, sources: &[&str]) -> Self {
        self.sources = sources.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    pub fn route(mut self, route: Route) -> Self {
        self.routes.push(route);
        self
    }

    pub fn key(mut self, key: Key) -> Self {
        self.keys.push(key);
        self
    }

    pub fn gateway_toml(&self) -> String {
        let mut out = String::from("[server]\n");
        for (field, value) in &self.server {
            let _ = writeln!(out, "{field} = {value}");
        }
        out.push_str("\n[auth]\nkeys_file = \"keys.toml\"\n");
        let _ = writeln!(out, "sources = {}", toml_list(&self.sources));
        for route in &self.routes {
            out.push('\n');
            out.push_str(&route.to_toml());
        }
        out
    }

    pub fn keys_toml(&self) -> String {
        keys_toml(&self.keys)
    }

    pub async fn start(&self) -> TestGateway {
        TestGateway::start(&self.gateway_toml(), &self.keys_toml()).await
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway under test
// ---------------------------------------------------------------------------------------------

/// keygate served in-process on 127.0.0.1:0 from config files in its own temp dir.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    pub gateway: Arc<keygate::proxy::Gateway>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl TestGateway {
    /// Writes `keygate.toml` and `keys.toml` into a fresh temp dir, loads them with
    /// `keygate::config::load`, and serves on a listener bound to 127.0.0.1:0 (the `listen`
    /// in the file is not used: the test binds its own, as `main` hands `serve` a bound one).
    pub async fn start(gateway_toml: &str, keys_toml: &str) -> Self {
        Self::start_at(gateway_toml, keys_toml, "127.0.0.1:0").await
    }

    /// [`start`](Self::start) on another loopback address, such as `[::1]:0` for IPv6 clients.
    pub async fn start_at(gateway_toml: &str, keys_toml: &str, bind: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("keygate.toml");
        std::fs::write(&config_path, gateway_toml).expect("write keygate.toml");
        std::fs::write(dir.path().join("keys.toml"), keys_toml).expect("write keys.toml");
        let snapshot = match keygate::config::load(&config_path) {
            Ok(snapshot) => snapshot,
            Err(errors) => panic!(
                "keygate rejected the test config:\n{errors}\n--- keygate.toml ---\n{gateway_toml}\n--- keys.toml ---\n{keys_toml}"
            ),
        };
        let listener = TcpListener::bind(bind).await.expect("bind gateway listener");
        let addr = listener.local_addr().expect("gateway local addr");
        let gateway = Arc::new(keygate::proxy::Gateway::new(snapshot));
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(keygate::server::serve(listener, Arc::clone(&gateway), async move {
            let _ = stop.await;
        }));
        Self { addr, dir, gateway, shutdown: Some(shutdown), task }
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("keygate.toml")
    }

    pub fn get(&self, target: &str) -> Call {
        Call::new(self.addr, Method::GET, target)
    }

    pub fn request(&self, method: Method, target: &str) -> Call {
        Call::new(self.addr, method, target)
    }

    /// Sends raw bytes on a fresh connection and reads the answer; see [`raw_exchange`].
    pub async fn raw(&self, request: &[u8]) -> RawExchange {
        raw_exchange(self.addr, request).await
    }
}

/// `keygate::admin::serve` on 127.0.0.1:0 for an in-process gateway, stopped when dropped.
pub struct AdminListener {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl AdminListener {
    pub async fn start(gateway: Arc<keygate::proxy::Gateway>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin listener");
        let addr = listener.local_addr().expect("admin local addr");
        Self { addr, task: tokio::spawn(keygate::admin::serve(listener, gateway)) }
    }

    pub fn get(&self, path: &str) -> Call {
        Call::new(self.addr, Method::GET, path)
    }
}

impl Drop for AdminListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        // Draining is not under test here; don't let a slow drain outlive the test.
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP clients
// ---------------------------------------------------------------------------------------------

/// A request to be sent on a fresh connection, HTTP/1.1 by default or HTTP/2 prior knowledge.
#[derive(Clone, Debug)]
pub struct Call {
    addr: SocketAddr,
    method: Method,
    target: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    http2: bool,
    /// The address the client socket is bound to (all of 127/8 is loopback on Linux).
    from: Option<std::net::IpAddr>,
}

impl Call {
    pub fn new(addr: SocketAddr, method: Method, target: &str) -> Self {
        Self {
            addr,
            method,
            target: target.to_owned(),
            headers: Vec::new(),
            body: Bytes::new(),
            http2: false,
            from: None,
        }
    }

    /// Connects from `ip` (say `127.0.0.2`) instead of the system's choice, so the gateway
    /// sees another client address.
    pub fn local_ip(mut self, ip: &str) -> Self {
        self.from = Some(ip.parse().expect("a client IP address"));
        self
    }

    /// Appends a header line; calling twice with one name sends it twice.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    pub fn http2(mut self) -> Self {
        self.http2 = true;
        self
    }

    /// Sends and fails the test (showing the request) on a transport error or timeout.
    pub async fn send(self) -> Exchange {
        match self.try_send().await {
            Ok(exchange) => exchange,
            Err(message) => panic!("{message}"),
        }
    }

    pub async fn try_send(self) -> Result<Exchange, String> {
        let probe = NEXT_PROBE.fetch_add(1, Ordering::Relaxed).to_string();
        let has_host = self.headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host"));
        let mut builder = Request::builder().method(self.method.clone());
        builder = if self.http2 {
            builder.version(Version::HTTP_2).uri(format!("http://{}{}", self.addr, self.target))
        } else {
            let builder = builder.version(Version::HTTP_11).uri(self.target.as_str());
            if has_host { builder } else { builder.header("host", self.addr.to_string()) }
        };
        for (name, value) in &self.headers {
            builder = builder.header(name.as_str(), value.as_str());
        }
        builder = builder.header(PROBE_HEADER, probe.as_str());
        let sent = self.describe(&probe, has_host);
        let request = builder
            .body(Full::new(self.body.clone()))
            .map_err(|e| format!("could not build the request: {e}\nsent:\n{sent}"))?;
        match tokio::time::timeout(IO_TIMEOUT, roundtrip(self.addr, self.from, request, self.http2)).await {
            Err(_) => Err(format!(
                "{TIMED_OUT} within {IO_TIMEOUT:?}
sent:
{sent}"
            )),
            Ok(Err(e)) => Err(format!("transport error: {e:?}\nsent:\n{sent}")),
            Ok(Ok(response)) => {
                let (parts, body) = response;
                Ok(Exchange {
                    sent,
                    probe,
                    status: parts.status,
                    version: parts.version,
                    headers: parts.headers,
                    body,
                })
            }
        }
    }

    fn describe(&self, probe: &str, has_host: bool) -> String {
        let version = if self.http2 { "HTTP/2" } else { "HTTP/1.1" };
        let from = self.from.map(|ip| format!(" from {ip}")).unwrap_or_default();
        let mut out = format!("  {} {} {version} (to {}{from})\n", self.method, self.target, self.addr);
        if !self.http2 && !has_host {
            let _ = writeln!(out, "    host: {}", self.addr);
        }
        for (name, value) in &self.headers {
            let _ = writeln!(out, "    {name}: {}", value.escape_debug());
        }
        let _ = writeln!(out, "    {PROBE_HEADER}: {probe}");
        let _ = write!(out, "    body: {}", preview(&self.body, 200));
        out
    }
}

async fn roundtrip(
    addr: SocketAddr,
    from: Option<std::net::IpAddr>,
    request: Request<Full<Bytes>>,
    http2: bool,
) -> Result<(http::response::Parts, Bytes), Box<dyn StdError + Send + Sync>> {
    let stream = match from {
        None => TcpStream::connect(addr).await?,
        Some(ip) => {
            let socket = if ip.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(addr).await?
        }
    };
    let io = TokioIo::new(stream);
    let response = if http2 {
        let (mut sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts, body))
}

/// What a client sent and got. `Display` shows both, for assertion messages.
pub struct Exchange {
    pub sent: String,
    pub probe: String,
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Exchange {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `error` field of a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        self.json()?.get("error")?.as_str().map(str::to_owned)
    }
}

impl fmt::Display for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "sent:\n{}", self.sent)?;
        writeln!(f, "got:\n  {:?} {}", self.version, self.status)?;
        write_headers(f, &self.headers)?;
        write!(f, "    body: {}", preview(&self.body, 600))
    }
}

impl fmt::Debug for Exchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Checks a response keygate itself answered: status, JSON `{"error", "message"}` body with the
/// right content-type, `www-authenticate` on 401, and no trace of the upstream.
#[track_caller]
pub fn assert_error(exchange: &Exchange, status: u16, code: &str) {
    assert_eq!(exchange.status.as_u16(), status, "expected {status} {code}\n{exchange}");
    let content_type = exchange.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "expected content-type application/json\n{exchange}"
    );
    let Some(body) = exchange.json() else {
        panic!("expected a JSON body\n{exchange}");
    };
    assert_eq!(body.get("error").and_then(|v| v.as_str()), Some(code), "wrong error code\n{exchange}");
    assert!(
        body.get("message").and_then(|v| v.as_str()).is_some_and(|m| !m.is_empty()),
        "expected a non-empty message\n{exchange}"
    );
    if status == 401 {
        assert!(
            exchange.header("www-authenticate").is_some(),
            "a 401 must carry www-authenticate\n{exchange}"
        );
    }
    assert!(
        exchange.header("x-upstream").is_none(),
        "an error keygate answers must not come from the upstream\n{exchange}"
    );
}

/// [`assert_error`] plus: the upstream never saw the request.
#[track_caller]
pub fn assert_rejected(exchange: &Exchange, upstream: &RecordingUpstream, status: u16, code: &str) {
    assert_error(exchange, status, code);
    if let Some(seen) = upstream.received(exchange) {
        panic!("a rejected request reached the upstream\n{exchange}\nupstream saw: {seen:?}");
    }
}

/// Context for assertions about what the upstream saw.
pub fn both(exchange: &Exchange, seen: &Recorded) -> String {
    format!("{exchange}\nupstream saw:\n  {seen:?}")
}

// ---------------------------------------------------------------------------------------------
// Raw sockets
// ---------------------------------------------------------------------------------------------

/// Bytes written to a fresh connection and everything read back.
pub struct RawExchange {
    pub sent: Vec<u8>,
    pub received: Vec<u8>,
    /// A write or read error, or a timeout, met on the way (the response may still be whole).
    pub error: Option<String>,
}

impl RawExchange {
    /// The server neither finished a response nor closed within the wait: it went silent.
    pub fn timed_out(&self) -> bool {
        self.error.as_deref().is_some_and(|e| timed_out(e) || e.contains("timed out"))
    }

    fn head_end(&self) -> Option<usize> {
        find(&self.received, b"\r\n\r\n").map(|i| i + 4)
    }

    /// The status code from the status line, if one arrived.
    pub fn status(&self) -> Option<u16> {
        let line_end = find(&self.received, b"\r\n")?;
        let line = std::str::from_utf8(&self.received[..line_end]).ok()?;
        line.split(' ').nth(1)?.parse().ok()
    }

    pub fn head(&self) -> String {
        let end = self.head_end().unwrap_or(self.received.len());
        String::from_utf8_lossy(&self.received[..end]).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head().lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    pub fn body(&self) -> &[u8] {
        match self.head_end() {
            Some(end) => &self.received[end..],
            None => &[],
        }
    }

    /// The `error` field of a JSON error body (content-length framed).
    pub fn error_code(&self) -> Option<String> {
        let value: serde_json::Value = serde_json::from_slice(self.body()).ok()?;
        value.get("error")?.as_str().map(str::to_owned)
    }
}

impl fmt::Display for RawExchange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "sent raw: \"{}\"", preview_raw(&self.sent))?;
        write!(f, "got raw:  \"{}\"", preview_raw(&self.received))?;
        if let Some(error) = &self.error {
            write!(f, "\n(error on the way: {error})")?;
        }
        Ok(())
    }
}

fn preview_raw(bytes: &[u8]) -> String {
    const LIMIT: usize = 1500;
    let shown = &bytes[..bytes.len().min(LIMIT)];
    if bytes.len() > LIMIT {
        format!("{}… ({} bytes)", shown.escape_ascii(), bytes.len())
    } else {
        shown.escape_ascii().to_string()
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// True once `received` holds a whole response framed by content-length or chunked coding.
fn response_complete(received: &[u8]) -> bool {
    let Some(head_end) = find(received, b"\r\n\r\n").map(|i| i + 4) else {
        return false;
    };
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let body = &received[head_end..];
    for line in head.lines().skip(1) {
        if let Some(value) = line.strip_prefix("content-length:") {
            return value.trim().parse::<usize>().is_ok_and(|len| body.len() >= len);
        }
        if line.starts_with("transfer-encoding:") && line.contains("chunked") {
            return body.ends_with(b"0\r\n\r\n");
        }
    }
    false // framed by close: read to EOF
}

/// Writes `request` as-is on a new connection to `addr` and reads one response, for inputs a
/// client library would normalise or refuse. Stops at a complete response, EOF, or after
/// [`IO_TIMEOUT`]. Requests should say `Connection: close`.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawExchange {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut exchange = RawExchange { sent: request.to_vec(), received: Vec::new(), error: None };
    let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => panic!("connect to {addr}: {e}"),
        Err(_) => panic!("connect to {addr}: timed out"),
    };
    // A server may answer and close before reading everything (e.g. 431); keep what it said.
    match tokio::time::timeout_at(deadline, stream.write_all(request)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => exchange.error = Some(format!("write: {e}")),
        Err(_) => exchange.error = Some("write: timed out".into()),
    }
    let mut buf = vec![0u8; 64 * 1024];
    while !response_complete(&exchange.received) {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => exchange.received.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                exchange.error = Some(format!("read: {e}"));
                break;
            }
            Err(_) => {
                exchange.error = Some(format!("read: {TIMED_OUT} in {IO_TIMEOUT:?}"));
                break;
            }
        }
    }
    exchange
}

/// `GET target HTTP/1.1` with `Host` and `Connection: close`, plus `extra` header lines.
pub fn raw_get(target: &str, extra: &[&str]) -> Vec<u8> {
    let mut out = format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for line in extra {
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.into_bytes()
}

// ---------------------------------------------------------------------------------------------
// The gateway under test, with hot reload
// ---------------------------------------------------------------------------------------------

/// keygate served in-process on 127.0.0.1:0 from config files the test laid out itself (plain
/// files, symlinks, a Kubernetes-style volume), with the hot-reload watcher running as in
/// `keygate serve`. The `listen` in the file is not used, as in [`TestGateway`].
pub struct WatchedGateway {
    pub addr: SocketAddr,
    pub gateway: Arc<keygate::proxy::Gateway>,
    reload: Option<keygate::reload::ReloadHandle>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<std::io::Result<()>>,
}

impl WatchedGateway {
    /// Loads `config_path` and serves it. Must run inside a tokio runtime (the watcher needs one).
    /// `reload::spawn` has registered its folder watches by the time it returns, so any file
    /// change the test makes after this is seen.
    pub async fn start(config_path: &std::path::Path) -> Self {
        let snapshot = keygate::config::load(config_path).unwrap_or_else(|errors| {
            panic!("keygate rejected the test config {}:\n{errors}", config_path.display())
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gateway listener");
        let addr = listener.local_addr().expect("gateway local addr");
        let gateway = Arc::new(keygate::proxy::Gateway::new(snapshot));
        let reload = keygate::reload::spawn(Arc::clone(&gateway))
            .unwrap_or_else(|e| panic!("could not start the reload watcher: {e}"));
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(keygate::server::serve(listener, Arc::clone(&gateway), async move {
            let _ = stop.await;
        }));
        Self { addr, gateway, reload: Some(reload), shutdown: Some(shutdown), task }
    }

    /// Generation, successes, failures and last error of the reloads so far.
    pub fn status(&self) -> keygate::reload::StatusView {
        self.gateway.reload_status().view()
    }

    pub fn get(&self, target: &str) -> Call {
        Call::new(self.addr, Method::GET, target)
    }

    pub fn request(&self, method: Method, target: &str) -> Call {
        Call::new(self.addr, method, target)
    }
}

impl Drop for WatchedGateway {
    fn drop(&mut self) {
        // Stop watching first, so a test's clean-up of its files triggers nothing.
        drop(self.reload.take());
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        self.task.abort();
    }
}

/// Removes ANSI escape sequences (`ESC [ … final-byte`), in case colours are on regardless.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('\u{40}'..='\u{7e}').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Writes `text` to a temporary file in the same folder, then renames it over `path`, as
/// `keygate keys …`, `mv` and most editors do: readers see the old file or the new one.
pub fn rename_over(path: &std::path::Path, text: &str) {
    use std::io::Write as _;
    let name = path.file_name().expect("a file name").to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    {
        let mut file =
            std::fs::File::create(&temp).unwrap_or_else(|e| panic!("create {}: {e}", temp.display()));
        file.write_all(text.as_bytes()).unwrap_or_else(|e| panic!("write {}: {e}", temp.display()));
        file.sync_all().unwrap_or_else(|e| panic!("sync {}: {e}", temp.display()));
    }
    let before = path.exists().then(|| inode(path));
    std::fs::rename(&temp, path)
        .unwrap_or_else(|e| panic!("rename {} over {}: {e}", temp.display(), path.display()));
    assert_ne!(before, Some(inode(path)), "a rename over {} must replace its inode", path.display());
}

/// The inode number of `path`: a rename over it changes it, an in-place write does not.
pub fn inode(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display())).ino()
}

/// The path of `program`, found on `PATH`; fails the test with one sentence saying how to
/// install it when it is missing (`scripts/test` installs every program the suite needs).
pub fn require_program(program: &str, install: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .unwrap_or_else(|| {
            panic!("this test needs `{program}`, which is not on PATH: install it with `{install}` (or run scripts/test, which does)")
        })
}

/// `keygate` (the real binary) with a clean environment — no inherited config or log
/// settings — run in `dir`, its output piped and the child killed if dropped.
pub fn keygate_command(dir: &std::path::Path) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
    command
        .current_dir(dir)
        .env_remove("KEYGATE_CONFIG")
        .env_remove("RUST_LOG")
        .env_remove("KEYGATE_LOG_FORMAT")
        .env("NO_COLOR", "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// What a request should get in some state of the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 200 from the upstream.
    Forwarded,
    /// keygate's own error: status and `error` code.
    Rejected(u16, &'static str),
}

impl Outcome {
    pub fn matches(self, exchange: &Exchange) -> bool {
        match self {
            Self::Forwarded => exchange.status == 200 && exchange.header("x-upstream") == Some("yes"),
            Self::Rejected(status, code) => {
                exchange.status.as_u16() == status && exchange.error_code().as_deref() == Some(code)
            }
        }
    }
}

/// Runs the futures concurrently on this task and collects their outputs in order.
pub async fn join_all<T>(futures: Vec<impl std::future::Future<Output = T>>) -> Vec<T> {
    let mut set = Vec::new();
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut done: Vec<Option<T>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (i, future) in pinned.iter_mut().enumerate() {
            if done[i].is_none()
                && let std::task::Poll::Ready(value) = future.as_mut().poll(cx)
            {
                done[i] = Some(value);
            }
        }
        if done.iter().all(Option::is_some) { std::task::Poll::Ready(()) } else { std::task::Poll::Pending }
    })
    .await;
    set.extend(done.into_iter().flatten());
    set
}

/// Reads one HTTP/1.1 response whose body has a `Content-Length` (or none) from `stream`: the
/// whole response, or `Err` with what arrived when the stream ended or failed, or `within`
/// passed, first.
pub async fn read_http1_response(
    stream: &mut tokio::net::TcpStream,
    within: std::time::Duration,
) -> Result<String, String> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|line| {
                    line.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return Ok(text);
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => return Err(text),
        }
    }
}

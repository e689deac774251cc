//! The production surface (SPEC §1 `[server]`/`[admin]`, §5, §6): the HTTPS listener and live
//! certificate rotation, `https://` upstreams with a private CA, the admin endpoints and metrics,
//! connection and time limits, WebSocket relay, and the graceful SIGTERM drain of the real binary.
//!
//! Certificates come from a CA made in the test (rcgen); every server binds 127.0.0.1:0; every
//! wait is a poll with a deadline and a bound on the number of polls; failures print what was
//! sent and what came back.

mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use support::pki::{Leaf, Pki};
use support::poll::{Attempts, DEADLINE, POLL_EVERY, ms};
use support::process::Process;
use support::rename_over;
use support::{
    Call, GatewayConfig, IO_TIMEOUT, Key, PROBE_HEADER, Recorded, RecordingUpstream, Route, WatchedGateway,
    assert_error, assert_rejected, pattern, preview, raw_exchange,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Writes `keygate.toml` (with `extra` TOML appended: `[admin]`, routes the builders lack) and
/// `keys.toml` into `dir`; returns the config path.
fn write_config(dir: &Path, config: &GatewayConfig, extra: &str) -> PathBuf {
    let path = dir.join("keygate.toml");
    std::fs::write(&path, format!("{}\n{extra}", config.gateway_toml())).expect("write keygate.toml");
    std::fs::write(dir.join("keys.toml"), config.keys_toml()).expect("write keys.toml");
    path
}

// ---------------------------------------------------------------------------------------------
// Certificates (support::pki)
// ---------------------------------------------------------------------------------------------

/// Which of `leaves` `der` is, for messages.
fn which_leaf(der: Option<&CertificateDer<'_>>, leaves: &[&Leaf]) -> String {
    match der {
        None => "no certificate".to_owned(),
        Some(der) => leaves
            .iter()
            .find(|l| l.cert_der.as_ref() == der.as_ref())
            .map_or_else(|| format!("an unknown certificate ({} bytes)", der.len()), |l| l.name.clone()),
    }
}

// ---------------------------------------------------------------------------------------------
// TLS clients
// ---------------------------------------------------------------------------------------------

/// A TLS connection to `addr` with SNI `localhost`, bounded by [`IO_TIMEOUT`].
async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, String> {
    let connect = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect {addr}: {e}"))?;
        let name = ServerName::try_from("localhost").expect("server name");
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS handshake with {addr}: {e}"))
    };
    tokio::time::timeout(IO_TIMEOUT, connect)
        .await
        .map_err(|_| format!("TLS connect to {addr}: timed out"))?
}

fn presented_leaf(stream: &TlsStream<TcpStream>) -> Option<CertificateDer<'static>> {
    stream.get_ref().1.peer_certificates().and_then(|chain| chain.first()).cloned()
}

fn negotiated_alpn(stream: &TlsStream<TcpStream>) -> String {
    stream
        .get_ref()
        .1
        .alpn_protocol()
        .map_or("(none)".to_owned(), |p| String::from_utf8_lossy(p).into_owned())
}

/// A GET with the key and a probe header; `uri` is origin-form for HTTP/1.1, absolute for HTTP/2.
fn keyed_get(uri: &str, key: Option<&Key>, probe: &str) -> Request<Full<Bytes>> {
    let mut builder = Request::builder().method(Method::GET).uri(uri).header(PROBE_HEADER, probe);
    if !uri.starts_with("https://") {
        builder = builder.header("host", "localhost");
    }
    if let Some(key) = key {
        builder = builder.header("x-api-key", &key.secret);
    }
    builder.body(Full::new(Bytes::new())).expect("request")
}

/// A response as one test saw it.
struct Got {
    sent: String,
    status: StatusCode,
    version: Version,
    headers: http::HeaderMap,
    body: Bytes,
}

impl std::fmt::Display for Got {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "sent: {}", self.sent)?;
        writeln!(f, "got: {:?} {}", self.version, self.status)?;
        for (name, value) in &self.headers {
            writeln!(f, "    {name}: {}", value.as_bytes().escape_ascii())?;
        }
        write!(f, "    body: {}", preview(&self.body, 400))
    }
}

fn describe(request: &Request<Full<Bytes>>, how: &str) -> String {
    let mut out = format!("{} {} over {how}", request.method(), request.uri());
    for (name, value) in request.headers() {
        let shown = if name == "x-api-key" {
            "<the key>".to_owned()
        } else {
            value.as_bytes().escape_ascii().to_string()
        };
        let _ = write!(out, "\n    {name}: {shown}");
    }
    out
}

async fn collect(
    sent: String,
    response: Result<hyper::Response<hyper::body::Incoming>, hyper::Error>,
) -> Result<Got, String> {
    let response = response.map_err(|e| format!("{sent}\ntransport error: {e:?}"))?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| format!("{sent}\nbody error: {e:?}"))?.to_bytes();
    Ok(Got { sent, status: parts.status, version: parts.version, headers: parts.headers, body })
}

/// Sends on an HTTP/1.1 connection that may already have carried requests (keep-alive).
async fn send_h1(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Got, String> {
    let sent = describe(&request, "HTTP/1.1 + TLS");
    let exchange = async {
        sender.ready().await.map_err(|e| format!("{sent}\nconnection not ready: {e:?}"))?;
        collect(sent.clone(), sender.send_request(request).await).await
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{sent}\nno response within {IO_TIMEOUT:?}"))?
}

async fn send_h2(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Got, String> {
    let sent = describe(&request, "HTTP/2 + TLS");
    let exchange = async {
        sender.ready().await.map_err(|e| format!("{sent}\nconnection not ready: {e:?}"))?;
        collect(sent.clone(), sender.send_request(request).await).await
    };
    tokio::time::timeout(IO_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("{sent}\nno response within {IO_TIMEOUT:?}"))?
}

/// An HTTP/1.1 client on a TLS stream; the connection task ends with the test's runtime.
async fn h1_client(stream: TlsStream<TcpStream>) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

async fn h2_client(stream: TlsStream<TcpStream>) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let handshake = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream));
    let (sender, connection) = tokio::time::timeout(IO_TIMEOUT, handshake)
        .await
        .expect("HTTP/2 handshake timed out")
        .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    sender
}

fn seen_with_probe(upstream: &RecordingUpstream, probe: &str) -> Option<Recorded> {
    upstream.requests().into_iter().find(|r| r.header(PROBE_HEADER) == Some(probe))
}

// ---------------------------------------------------------------------------------------------
// A gateway with an HTTPS listener
// ---------------------------------------------------------------------------------------------

/// A watched gateway whose listener uses `cert.pem`/`key.pem` in its own folder.
struct TlsGateway {
    // Dropped first: stops the watcher before the folder goes.
    gateway: WatchedGateway,
    dir: tempfile::TempDir,
    upstream: RecordingUpstream,
    key: Key,
}

impl TlsGateway {
    async fn start(leaf: &Leaf) -> Self {
        let upstream = RecordingUpstream::start().await;
        let key = Key::generated("tls-client", &["read"]);
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("cert.pem"), &leaf.cert_pem).expect("write cert.pem");
        std::fs::write(dir.path().join("key.pem"), &leaf.key_pem).expect("write key.pem");
        let config = GatewayConfig::new()
            .server("tls_cert", "\"cert.pem\"")
            .server("tls_key", "\"key.pem\"")
            // The keep-alive connection of the rotation test must outlive the test's waits.
            .server("header_read_timeout", "\"60s\"")
            .server("idle_timeout", "\"60s\"")
            .route(Route::new("/", &upstream.url()))
            .key(key.clone());
        let path = write_config(dir.path(), &config, "");
        let gateway = WatchedGateway::start(&path).await;
        Self { gateway, dir, upstream, key }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

// ---------------------------------------------------------------------------------------------
// 1. HTTPS listener
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn https_listener_serves_http2_and_http1_with_forwarded_proto_https() {
    let pki = Pki::new("keygate test CA");
    let leaf = pki.leaf("gateway-a");
    let gw = TlsGateway::start(&leaf).await;
    let addr = gw.gateway.addr;

    // HTTP/2, chosen by ALPN.
    let stream = tls_connect(addr, pki.client(&[b"h2"], false)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(negotiated_alpn(&stream), "h2", "client offered only h2");
    let mut h2 = h2_client(stream).await;
    let uri = format!("https://localhost:{}/h2/path?x=1", addr.port());
    let got =
        send_h2(&mut h2, keyed_get(&uri, Some(&gw.key), "tls-h2")).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.status, StatusCode::OK, "{got}");
    assert_eq!(got.version, Version::HTTP_2, "{got}");
    assert_eq!(got.headers.get("x-upstream").map(|v| v.as_bytes()), Some(&b"yes"[..]), "{got}");
    let seen = seen_with_probe(&gw.upstream, "tls-h2").unwrap_or_else(|| panic!("upstream never saw\n{got}"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{got}\nupstream saw: {seen:?}");
    assert_eq!(seen.path(), "/h2/path", "{got}\nupstream saw: {seen:?}");
    assert!(seen.header("x-api-key").is_none(), "the key went upstream\n{got}\nupstream saw: {seen:?}");

    // A client offering both gets h2, the listener's first choice.
    let stream =
        tls_connect(addr, pki.client(&[b"http/1.1", b"h2"], false)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(negotiated_alpn(&stream), "h2", "client offered http/1.1 and h2");
    drop(stream);

    // HTTP/1.1, chosen by ALPN.
    let stream = tls_connect(addr, pki.client(&[b"http/1.1"], false)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(negotiated_alpn(&stream), "http/1.1");
    let mut h1 = h1_client(stream).await;
    let got = send_h1(&mut h1, keyed_get("/h1/path", Some(&gw.key), "tls-h1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.status, StatusCode::OK, "{got}");
    assert_eq!(got.version, Version::HTTP_11, "{got}");
    let seen = seen_with_probe(&gw.upstream, "tls-h1").unwrap_or_else(|| panic!("upstream never saw\n{got}"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"), "{got}\nupstream saw: {seen:?}");

    // Without a key, over TLS: a JSON 401, and the upstream sees nothing.
    let got =
        send_h1(&mut h1, keyed_get("/h1/path", None, "tls-h1-nokey")).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.status, StatusCode::UNAUTHORIZED, "{got}");
    assert!(
        seen_with_probe(&gw.upstream, "tls-h1-nokey").is_none(),
        "a rejected request went upstream\n{got}"
    );

    // TLS 1.2 is accepted too (SPEC: TLS 1.2 and 1.3).
    let stream = tls_connect(addr, pki.client(&[b"http/1.1"], true)).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(stream.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
    let mut h1 = h1_client(stream).await;
    let got =
        send_h1(&mut h1, keyed_get("/tls12", Some(&gw.key), "tls12")).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.status, StatusCode::OK, "{got}");

    // A plaintext request on the TLS port is not served as HTTP. It carries the key, so a
    // listener that did serve it would answer 200 and the upstream would see it.
    let plaintext = format!(
        "GET /plaintext HTTP/1.1\r\nHost: localhost\r\nx-api-key: {}\r\n{PROBE_HEADER}: tls-plaintext\r\n\
         Connection: close\r\n\r\n",
        gw.key.secret
    );
    let raw = raw_exchange(addr, plaintext.as_bytes()).await;
    assert!(
        !raw.status().is_some_and(|status| (200..300).contains(&status)),
        "plaintext HTTP was served on the TLS port\n{raw}"
    );
    assert!(
        seen_with_probe(&gw.upstream, "tls-plaintext").is_none(),
        "plaintext HTTP reached the upstream\n{raw}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Certificate rotation
// ---------------------------------------------------------------------------------------------

/// Opens new TLS connections until one presents `want`; fails the test after [`DEADLINE`].
async fn wait_for_leaf(
    addr: SocketAddr,
    pki: &Pki,
    want: &Leaf,
    leaves: &[&Leaf],
    gw: &TlsGateway,
) -> Duration {
    let mut poll = Attempts::within(DEADLINE);
    let mut last = String::new();
    while poll.again().await {
        match tls_connect(addr, pki.client(&[b"http/1.1"], false)).await {
            Ok(stream) => {
                let leaf = presented_leaf(&stream);
                if leaf.as_ref().map(|d| d.as_ref()) == Some(want.cert_der.as_ref()) {
                    return poll.start.elapsed();
                }
                last = which_leaf(leaf.as_ref(), leaves);
            }
            Err(e) => last = e,
        }
    }
    panic!(
        "new connections did not get {} ({}); last saw: {last}\nreload status: {:?}",
        want.name,
        poll.report(),
        gw.gateway.status()
    );
}

#[tokio::test]
async fn certificate_rotation_reaches_new_connections_and_spares_open_ones() {
    let pki = Pki::new("keygate rotation CA");
    let (a, b) = (pki.leaf("cert-A"), pki.leaf("cert-B"));
    let gw = TlsGateway::start(&a).await;
    let addr = gw.gateway.addr;
    let leaves = [&a, &b];

    // An open keep-alive connection made with A.
    let stream = tls_connect(addr, pki.client(&[b"http/1.1"], false)).await.unwrap_or_else(|e| panic!("{e}"));
    let first = presented_leaf(&stream);
    assert_eq!(which_leaf(first.as_ref(), &leaves), "cert-A", "before any rotation");
    let mut open = h1_client(stream).await;
    let got = send_h1(&mut open, keyed_get("/before", Some(&gw.key), "rot-1"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.status, StatusCode::OK, "{got}");

    // Rotate: key first, then the certificate, each written beside and renamed over.
    rename_over(&gw.path("key.pem"), &b.key_pem);
    rename_over(&gw.path("cert.pem"), &b.cert_pem);
    let took = wait_for_leaf(addr, &pki, &b, &leaves, &gw).await;
    eprintln!("rotation to cert-B seen by a new connection after {}", ms(took));

    // The connection opened before still serves.
    let got = send_h1(&mut open, keyed_get("/after", Some(&gw.key), "rot-2"))
        .await
        .unwrap_or_else(|e| panic!("the connection opened with cert-A broke after the rotation: {e}"));
    assert_eq!(got.status, StatusCode::OK, "old connection after rotation\n{got}");
    assert!(seen_with_probe(&gw.upstream, "rot-2").is_some(), "upstream never saw\n{got}");

    // Let any reload still queued from the two renames finish before taking the baseline: wait
    // until the reload status has not moved for longer than the watcher's debounce.
    let mut poll = Attempts::within(DEADLINE);
    let (mut settled, mut since) = (gw.gateway.status(), Instant::now());
    while poll.again().await {
        let now = gw.gateway.status();
        if now != settled {
            (settled, since) = (now, Instant::now());
        } else if since.elapsed() >= Duration::from_millis(600) {
            break;
        }
    }

    // A key that does not belong to cert-B: the reload fails and cert-B stays.
    let stranger = pki.leaf("stranger");
    rename_over(&gw.path("key.pem"), &stranger.key_pem);
    let mut poll = Attempts::within(DEADLINE);
    let mut failed = None;
    while poll.again().await {
        let now = gw.gateway.status();
        if now.failures > settled.failures {
            failed = Some(now);
            break;
        }
    }
    let Some(failed) = failed else {
        panic!(
            "replacing key.pem with a key that does not match cert.pem counted no reload failure ({})\n\
             before: {settled:?}\nnow: {:?}",
            poll.report(),
            gw.gateway.status()
        );
    };
    assert!(failed.last_error.is_some(), "a failed reload must leave last_error: {failed:?}");
    assert_eq!(failed.generation, settled.generation, "a failed reload must not swap: {failed:?}");
    for round in 0..3 {
        let stream = tls_connect(addr, pki.client(&[b"http/1.1"], false))
            .await
            .unwrap_or_else(|e| panic!("after the bad key, round {round}: {e}\nstatus: {failed:?}"));
        let leaf = presented_leaf(&stream);
        assert_eq!(which_leaf(leaf.as_ref(), &leaves), "cert-B", "after a bad pair the good one must stay");
        let mut h1 = h1_client(stream).await;
        let got = send_h1(&mut h1, keyed_get("/bad-pair", Some(&gw.key), &format!("rot-bad-{round}")))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(got.status, StatusCode::OK, "{got}");
    }
    let got = send_h1(&mut open, keyed_get("/still", Some(&gw.key), "rot-3"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.status, StatusCode::OK, "{got}");

    // Back to cert-A by writing both files in place (no rename): the next good pair wins.
    std::fs::write(gw.path("key.pem"), &a.key_pem).expect("write key.pem in place");
    std::fs::write(gw.path("cert.pem"), &a.cert_pem).expect("write cert.pem in place");
    let took = wait_for_leaf(addr, &pki, &a, &leaves, &gw).await;
    eprintln!("in-place rotation back to cert-A seen after {}", ms(took));
    let got = send_h1(&mut open, keyed_get("/last", Some(&gw.key), "rot-4"))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(got.status, StatusCode::OK, "the first connection after two rotations\n{got}");
}

// ---------------------------------------------------------------------------------------------
// 3. Admin: metrics, status, health
// ---------------------------------------------------------------------------------------------

/// `keygate::admin::serve` on 127.0.0.1:0 for an in-process gateway, stopped when dropped.
struct Admin {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Admin {
    async fn start(gateway: Arc<keygate::proxy::Gateway>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        let addr = listener.local_addr().expect("admin addr");
        Self { addr, task: tokio::spawn(keygate::admin::serve(listener, gateway)) }
    }

    fn get(&self, path: &str) -> Call {
        Call::new(self.addr, Method::GET, path)
    }
}

impl Drop for Admin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One sample line of the exposition.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// Parses `name{label="value",…} number` lines; comments and `# EOF` are skipped.
fn parse_exposition(text: &str) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let bad = || format!("unparsable exposition line: {line:?}");
        let (series, rest) = if line.contains('{') {
            let close = line.rfind('}').ok_or_else(bad)?;
            (&line[..close + 1], &line[close + 1..])
        } else {
            line.split_once(' ').ok_or_else(bad)?
        };
        let value = rest.split_whitespace().next().ok_or_else(bad)?.parse::<f64>().map_err(|_| bad())?;
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, inner)) => (name, parse_labels(inner.trim_end_matches('}')).ok_or_else(bad)?),
        };
        samples.push(Sample { name: name.to_owned(), labels, value });
    }
    Ok(samples)
}

fn parse_labels(mut inner: &str) -> Option<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    while !inner.is_empty() {
        let (name, rest) = inner.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => value.push(chars.next()?.1),
                (_, c) => value.push(c),
            }
        };
        labels.insert(name.to_owned(), value);
        inner = rest[end + 1..].trim_start_matches(',');
    }
    Some(labels)
}

/// The value of the series with exactly these labels.
fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> =
        labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    samples.iter().find(|s| s.name == name && s.labels == want).map(|s| s.value)
}

/// Sends known traffic (3 × 200, 2 × 401 missing key, 1 × 403) and returns the scrape and keys.
struct Scraped {
    text: String,
    samples: Vec<Sample>,
    reader: Key,
    writer: Key,
    admin: Admin,
    _gateway: WatchedGateway,
    _upstream: RecordingUpstream,
    _dir: tempfile::TempDir,
}

/// A path segment that must never show up as a metric label.
const RAW_PATH_MARK: &str = "zz-raw-path-7301";

async fn scrape_after_known_traffic(per_key_metrics: bool) -> Scraped {
    let upstream = RecordingUpstream::start().await;
    let reader = Key::generated("metrics-reader", &["read"]);
    let writer = Key::generated("metrics-writer", &["write"]);
    let config = GatewayConfig::new()
        .route(Route::new("/", &upstream.url()).scope("GET", &["read"]))
        .key(reader.clone())
        .key(writer.clone());
    let dir = tempfile::tempdir().expect("temp dir");
    let admin_toml = format!("[admin]\nlisten = \"127.0.0.1:0\"\nper_key_metrics = {per_key_metrics}\n");
    let path = write_config(dir.path(), &config, &admin_toml);
    let gateway = WatchedGateway::start(&path).await;
    let admin = Admin::start(Arc::clone(&gateway.gateway)).await;

    let target = format!("/items/{RAW_PATH_MARK}?page=2");
    for _ in 0..3 {
        let got = gateway.get(&target).header("x-api-key", &reader.secret).send().await;
        assert_eq!(got.status, StatusCode::OK, "{got}");
    }
    for _ in 0..2 {
        let got = gateway.get(&target).send().await;
        assert_rejected(&got, &upstream, 401, "missing_api_key");
    }
    let got = gateway.get(&target).header("x-api-key", &writer.secret).send().await;
    assert_rejected(&got, &upstream, 403, "insufficient_scope");

    let scrape = admin.get("/metrics").send().await;
    assert_eq!(scrape.status, StatusCode::OK, "{scrape}");
    let text = String::from_utf8_lossy(&scrape.body).into_owned();
    let samples = parse_exposition(&text).unwrap_or_else(|e| panic!("{e}\n--- exposition ---\n{text}"));
    Scraped { text, samples, reader, writer, admin, _gateway: gateway, _upstream: upstream, _dir: dir }
}

#[track_caller]
fn assert_sample(s: &Scraped, name: &str, labels: &[(&str, &str)], want: f64) {
    let got = sample(&s.samples, name, labels);
    assert_eq!(got, Some(want), "{name}{labels:?}: expected {want}\n--- exposition ---\n{}", s.text);
}

/// What holds whether or not `per_key_metrics` is on.
fn assert_common_metrics(s: &Scraped) {
    assert!(s.text.trim_end().ends_with("# EOF"), "the exposition must end with # EOF\n{}", s.text);
    let rejections = "keygate_auth_rejections_total";
    assert_sample(s, rejections, &[("reason", "missing_api_key")], 2.0);
    assert_sample(s, rejections, &[("reason", "insufficient_scope")], 1.0);
    let total: f64 = s.samples.iter().filter(|x| x.name == "keygate_requests_total").map(|x| x.value).sum();
    assert_eq!(total, 6.0, "keygate_requests_total over all series\n{}", s.text);
    assert_sample(s, "keygate_request_duration_seconds_count", &[("route", "/")], 6.0);
    // Only the three forwarded requests reached the upstream.
    assert_sample(s, "keygate_upstream_duration_seconds_count", &[("route", "/")], 3.0);
    assert_sample(s, "keygate_request_duration_seconds_bucket", &[("route", "/"), ("le", "+Inf")], 6.0);
    assert!(
        sample(&s.samples, "keygate_request_duration_seconds_bucket", &[("route", "/"), ("le", "0.0001")])
            .is_some(),
        "buckets start at 0.0001\n{}",
        s.text
    );
    assert_sample(s, "keygate_config_reloads_total", &[("result", "success")], 0.0);
    assert_sample(s, "keygate_config_reloads_total", &[("result", "failure")], 0.0);
    assert_sample(s, "keygate_keys", &[("state", "active")], 2.0);
    assert_sample(s, "keygate_keys", &[("state", "expired")], 0.0);
    assert_sample(s, "keygate_keys", &[("state", "revoked")], 0.0);

    // No raw path and no piece of a key anywhere in the exposition.
    for key in [&s.reader, &s.writer] {
        let secret_part = key.secret.rsplit('_').next().unwrap_or_default();
        for window in secret_part.as_bytes().windows(8) {
            let piece = String::from_utf8_lossy(window);
            assert!(
                !s.text.contains(piece.as_ref()),
                "a piece of a key ({piece}) is in the metrics\n{}",
                s.text
            );
        }
    }
    for x in &s.samples {
        for (label, value) in &x.labels {
            assert!(
                !value.contains(RAW_PATH_MARK) && !value.contains("/items"),
                "label {label}={value:?} of {} holds a raw path\n{}",
                x.name,
                s.text
            );
        }
    }
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly_without_key_ids_by_default() {
    let s = scrape_after_known_traffic(false).await;
    assert_common_metrics(&s);
    let requests = "keygate_requests_total";
    assert_sample(&s, requests, &[("route", "/"), ("status", "200")], 3.0);
    assert_sample(&s, requests, &[("route", "/"), ("status", "401")], 2.0);
    assert_sample(&s, requests, &[("route", "/"), ("status", "403")], 1.0);
    assert!(
        s.samples.iter().all(|x| !x.labels.contains_key("key_id")),
        "per_key_metrics = false must add no key_id label\n{}",
        s.text
    );
    for id in [&s.reader.id, &s.writer.id] {
        assert!(
            !s.text.contains(id.as_str()),
            "key id {id} in the metrics with per_key_metrics = false\n{}",
            s.text
        );
    }

    // /status, /healthz, /readyz.
    let status = s.admin.get("/status").send().await;
    assert_eq!(status.status, StatusCode::OK, "{status}");
    let json = status.json().unwrap_or_else(|| panic!("/status is not JSON\n{status}"));
    let field =
        |name: &str| json.get(name).cloned().unwrap_or_else(|| panic!("/status lacks {name}\n{status}"));
    assert_eq!(field("generation"), 1, "{status}");
    assert_eq!(field("routes"), 1, "{status}");
    assert_eq!(field("keys"), 2, "{status}");
    assert_eq!(field("last_reload_error"), serde_json::Value::Null, "{status}");
    assert_eq!(field("draining"), false, "{status}");
    assert_eq!(field("keys_by_state")["active"], 2, "{status}");
    let loaded_at = field("loaded_at");
    assert!(
        loaded_at.as_str().is_some_and(|t| t.len() >= 20 && t.contains('T')),
        "loaded_at not RFC 3339\n{status}"
    );
    for path in ["/healthz", "/readyz"] {
        let got = s.admin.get(path).send().await;
        assert_eq!(got.status, StatusCode::OK, "{got}");
    }
    let got = s.admin.get("/nope").send().await;
    assert_eq!(got.status, StatusCode::NOT_FOUND, "{got}");
}

#[tokio::test]
async fn metrics_carry_key_id_with_per_key_metrics() {
    let s = scrape_after_known_traffic(true).await;
    assert_common_metrics(&s);
    let requests = "keygate_requests_total";
    assert_sample(&s, requests, &[("route", "/"), ("status", "200"), ("key_id", &s.reader.id)], 3.0);
    // A 403 comes from a known key, so it is counted against that key.
    assert_sample(&s, requests, &[("route", "/"), ("status", "403"), ("key_id", &s.writer.id)], 1.0);
    // No key was presented, so there is no key_id.
    assert_sample(&s, requests, &[("route", "/"), ("status", "401")], 2.0);
}

// ---------------------------------------------------------------------------------------------
// 4. Slowloris
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn slowloris_head_is_cut_off_at_header_read_timeout_while_others_are_served() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("slowloris-neighbour", &["read"]);
    let gateway = GatewayConfig::new()
        .server("header_read_timeout", "\"1s\"")
        .route(Route::new("/", &upstream.url()))
        .key(key.clone())
        .start()
        .await;

    // A neighbour sending ordinary requests the whole time.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let neighbour = {
        let (stop, addr, secret) = (Arc::clone(&stop), gateway.addr, key.secret.clone());
        tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..200 {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let got =
                    Call::new(addr, Method::GET, "/neighbour").header("x-api-key", &secret).try_send().await;
                results.push(got.map(|g| (g.status, g.to_string())));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            results
        })
    };

    let head =
        b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let started = Instant::now();
    let (mut sent, mut received) = (0usize, Vec::new());
    let mut buf = [0u8; 4096];
    let mut ended = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    while started.elapsed() < 2 * DEADLINE && sent < head.len() {
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) => { ended = Some(("EOF".to_owned(), started.elapsed())); break; }
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) => { ended = Some((format!("read error: {e}"), started.elapsed())); break; }
            },
            _ = tick.tick() => {
                if let Err(e) = stream.write_all(&head[sent..sent + 1]).await {
                    ended = Some((format!("write error: {e}"), started.elapsed()));
                    break;
                }
                sent += 1;
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let context = format!(
        "sent {sent} bytes one per 200 ms of \"{}\"\ngot {}",
        head.escape_ascii(),
        preview(&received, 300)
    );
    let Some((how, at)) = ended else {
        panic!("the trickling client was never disconnected in {}\n{context}", ms(started.elapsed()));
    };
    eprintln!("slowloris client cut off after {} ({how})", ms(at));
    assert!(
        at >= Duration::from_millis(800) && at <= DEADLINE,
        "expected a disconnect 1–{} s after connecting (header_read_timeout = 1s), got {} ({how})\n{context}",
        DEADLINE.as_secs(),
        ms(at)
    );
    assert!(
        !received.starts_with(b"HTTP/1.1 2"),
        "a half-sent head must not be answered with success\n{context}"
    );

    let results =
        tokio::time::timeout(IO_TIMEOUT * 2, neighbour).await.expect("neighbour ends").expect("task");
    assert!(results.len() >= 3, "the neighbour made only {} requests", results.len());
    for result in &results {
        match result {
            Ok((status, _)) if *status == StatusCode::OK => {}
            Ok((_, shown)) => panic!("the neighbour was refused during the slowloris\n{shown}"),
            Err(e) => panic!("the neighbour failed during the slowloris: {e}"),
        }
    }
}

#[tokio::test]
async fn silent_client_is_dropped_at_header_read_timeout() {
    // SPEC §1: "a client that has not sent its headers by then is dropped". A client that
    // connects and sends nothing at all has not sent its headers either; left open, such
    // connections hold max_connections slots until idle_timeout (60 s by default).
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .server("header_read_timeout", "\"1s\"")
        .route(Route::new("/", &upstream.url()))
        .start()
        .await;
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let connected = Instant::now();
    let (received, ended) = read_until_closed(&mut stream, DEADLINE).await;
    let after = connected.elapsed();
    let Some(how) = ended else {
        panic!(
            "sent: nothing (connected to {} and stayed silent)
expected: disconnected about 1 s later \
             (header_read_timeout = 1s)
got: still open after {}, received {}",
            gateway.addr,
            ms(after),
            preview(&received, 200)
        );
    };
    eprintln!("silent client dropped after {} ({how})", ms(after));
    assert!(after >= Duration::from_millis(800), "dropped after only {}", ms(after));
}

// ---------------------------------------------------------------------------------------------
// 5. 431 and 504
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn oversized_head_gets_json_431_and_slow_upstream_json_504() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("limits", &["read"]);
    let gateway = GatewayConfig::new()
        .server("max_header_bytes", "4096")
        .server("request_timeout", "\"300ms\"")
        .route(Route::new("/", &upstream.url()))
        .key(key.clone())
        .start()
        .await;

    let big = "b".repeat(6000);
    let got = gateway.get("/big").header("x-api-key", &key.secret).header("x-big", &big).send().await;
    assert_rejected(&got, &upstream, 431, "headers_too_large");

    // The upstream would answer after 20 s, twice the client's own timeout (IO_TIMEOUT): a 504
    // can only come from keygate giving up at request_timeout, and a gateway that waited for
    // the upstream fails the client's send rather than passing. No upper bound is needed.
    let started = Instant::now();
    let got =
        gateway.get("/slow").header("x-api-key", &key.secret).header("x-test-sleep-ms", "20000").send().await;
    let took = started.elapsed();
    assert_error(&got, 504, "upstream_timeout");
    assert!(
        took >= Duration::from_millis(250),
        "the 504 came after {}, before request_timeout (300 ms)\n{got}",
        ms(took)
    );

    // Just under the limit still goes through.
    let fits = "f".repeat(3000);
    let got = gateway.get("/fits").header("x-api-key", &key.secret).header("x-fits", &fits).send().await;
    assert_eq!(got.status, StatusCode::OK, "{got}");
}

// ---------------------------------------------------------------------------------------------
// 6. idle_timeout
// ---------------------------------------------------------------------------------------------

/// Reads from `stream` until EOF, an error, or `within`; returns what came and how it ended.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (Vec<u8>, Option<String>) {
    let deadline = Instant::now() + within;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..10_000 {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return (received, None),
            Ok(Ok(0)) => return (received, Some("EOF".to_owned())),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (received, Some(format!("read error: {e}"))),
        }
    }
    (received, None)
}

/// Byte length of the first whole response in `received` (content-length framed), if complete.
fn whole_response_len(received: &[u8]) -> Option<usize> {
    let head_end = received.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&received[..head_end]).to_ascii_lowercase();
    let length: usize = head.lines().find_map(|l| l.strip_prefix("content-length:"))?.trim().parse().ok()?;
    (received.len() >= head_end + length).then_some(head_end + length)
}

/// Writes `request` and reads one content-length framed response, leaving the connection open.
async fn exchange_on(stream: &mut TcpStream, request: &[u8]) -> Result<Vec<u8>, String> {
    stream.write_all(request).await.map_err(|e| format!("write: {e}"))?;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    for _ in 0..10_000 {
        if whole_response_len(&received).is_some() {
            return Ok(received);
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                return Err(format!("no whole response in {IO_TIMEOUT:?}; got {}", preview(&received, 300)));
            }
            Ok(Ok(0)) => return Err(format!("EOF before a whole response; got {}", preview(&received, 300))),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(format!("read: {e}; got {}", preview(&received, 300))),
        }
    }
    Err("too many reads".to_owned())
}

fn keep_alive_get(path: &str, key: &Key, probe: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {}\r\n{PROBE_HEADER}: {probe}\r\n\r\n",
        key.secret
    )
    .into_bytes()
}

#[tokio::test]
async fn idle_timeout_closes_idle_keep_alive_and_stalled_bodies() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("idle", &["read", "write"]);
    let gateway = GatewayConfig::new()
        .server("idle_timeout", "\"1s\"")
        .route(Route::new("/", &upstream.url()))
        .key(key.clone())
        .start()
        .await;

    // An idle keep-alive connection.
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let request = keep_alive_get("/idle", &key, "idle-1");
    let response = exchange_on(&mut stream, &request).await.unwrap_or_else(|e| panic!("first request: {e}"));
    assert!(response.starts_with(b"HTTP/1.1 200"), "got {}", preview(&response, 300));
    let idle_since = Instant::now();
    let (extra, ended) = read_until_closed(&mut stream, DEADLINE).await;
    let idle = idle_since.elapsed();
    let Some(how) = ended else {
        panic!(
            "an idle keep-alive connection was still open {} after its response (idle_timeout = 1s)",
            ms(idle)
        );
    };
    eprintln!("idle keep-alive closed after {} ({how})", ms(idle));
    assert!(idle >= Duration::from_millis(500), "closed after only {}: keep-alive not honoured", ms(idle));
    assert!(extra.is_empty(), "unexpected bytes on an idle connection: {}", preview(&extra, 300));

    // A request body that stalls after 10 of 100 bytes.
    let head = format!(
        "POST /stall HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {}\r\n{PROBE_HEADER}: stall-1\r\n\
         Content-Length: 100\r\n\r\n0123456789",
        key.secret
    );
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("write head and 10 bytes");
    let stalled_at = Instant::now();
    let (received, ended) = read_until_closed(&mut stream, DEADLINE).await;
    let after = stalled_at.elapsed();
    let context = format!(
        "sent: {}\ngot: {}",
        head.replace(&key.secret, "<key>").escape_debug(),
        preview(&received, 300)
    );
    let Some(how) = ended else {
        panic!("a body stalled for {} was not closed (idle_timeout = 1s)\n{context}", ms(after));
    };
    eprintln!("stalled body closed after {} ({how})", ms(after));
    assert!(
        !received.starts_with(b"HTTP/1.1 2"),
        "a stalled body must not be answered with success\n{context}"
    );
    // The upstream must never get a complete request: look for a little while after the close.
    let mut poll = Attempts::within(Duration::from_millis(300));
    while poll.again().await {
        if let Some(seen) = seen_with_probe(&upstream, "stall-1") {
            panic!(
                "the upstream got a complete request from a stalled body\n{context}\nupstream saw: {seen:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 7. SIGTERM drain of the real binary
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sigterm_drains_in_flight_request_then_exits_0() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("drain", &["read"]);
    let config = GatewayConfig::new()
        .server("shutdown_timeout", "\"30s\"")
        .server("request_timeout", "\"30s\"")
        .route(Route::new("/", &upstream.url()))
        .key(key.clone());
    let dir = tempfile::tempdir().expect("temp dir");
    write_config(dir.path(), &config, "[admin]\nlisten = \"127.0.0.1:0\"\n");
    let mut server = Process::serve(&dir.path().join("keygate.toml"));
    let addr = server.listening_addr().await;
    let admin = server.admin_addr().await;
    let ready = Call::new(admin, Method::GET, "/readyz").send().await;
    assert_eq!(ready.status, StatusCode::OK, "/readyz before SIGTERM\n{ready}");

    // A request the upstream holds for 5 s: DEADLINE, so /readyz has that long to turn 503
    // while the request is still in flight.
    let in_flight = {
        let call = Call::new(addr, Method::GET, "/slow")
            .header("x-api-key", &key.secret)
            .header("x-test-sleep-ms", &DEADLINE.as_millis().to_string());
        tokio::spawn(call.try_send())
    };
    let mut poll = Attempts::within(IO_TIMEOUT);
    while poll.again().await && upstream.count() == 0 {}
    assert_eq!(
        upstream.count(),
        1,
        "the upstream never got the slow request ({})\n{}",
        poll.report(),
        server.transcript()
    );

    let pid = server.child.id().expect("child pid");
    let signalled_at = Instant::now();
    let status =
        std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status().expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");

    // /readyz turns 503 while the request is still in flight.
    let mut poll = Attempts::within(DEADLINE);
    let mut last = String::from("(no answer)");
    let mut draining = false;
    while poll.again().await {
        match Call::new(admin, Method::GET, "/readyz").try_send().await {
            Ok(got) if got.status == StatusCode::SERVICE_UNAVAILABLE => {
                draining = true;
                break;
            }
            Ok(got) => last = got.to_string(),
            Err(e) => last = e,
        }
    }
    server.stderr.drain();
    assert!(
        draining,
        "/readyz never said 503 after SIGTERM ({}); last: {last}\n{}",
        poll.report(),
        server.transcript()
    );
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before /readyz said 503\n{}",
        server.transcript()
    );

    // New connections are refused once the drain has begun.
    let mut poll = Attempts::within(DEADLINE);
    let mut refused = None;
    while poll.again().await {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = Some(signalled_at.elapsed());
                break;
            }
            Err(e) => panic!("connecting during the drain: unexpected error {e}"),
            Ok(stream) => drop(stream),
        }
    }
    let Some(refused_after) = refused else {
        panic!(
            "new connections were still accepted after SIGTERM ({})\n{}",
            poll.report(),
            server.transcript()
        );
    };
    eprintln!("new connections refused {} after SIGTERM", ms(refused_after));

    let got = tokio::time::timeout(IO_TIMEOUT, in_flight)
        .await
        .expect("in-flight request finishes")
        .expect("task")
        .unwrap_or_else(|e| {
            panic!("the in-flight request failed during the drain: {e}\n{}", server.transcript())
        });
    assert_eq!(got.status, StatusCode::OK, "in-flight request during the drain\n{got}");

    let exit = tokio::time::timeout(Duration::from_secs(30) + IO_TIMEOUT, server.child.wait())
        .await
        .unwrap_or_else(|_| panic!("keygate did not exit after the drain\n{}", server.transcript()))
        .expect("wait for keygate");
    server.stderr.drain();
    eprintln!("keygate exited {} after SIGTERM with {exit}", ms(signalled_at.elapsed()));
    assert_eq!(exit.code(), Some(0), "exit status after SIGTERM\n{}", server.transcript());
    // The drain ends when the request does (about 5 s), far inside shutdown_timeout (30 s).
    assert!(signalled_at.elapsed() < Duration::from_secs(30), "the drain outlasted shutdown_timeout");
}

// ---------------------------------------------------------------------------------------------
// 8. WebSocket
// ---------------------------------------------------------------------------------------------

/// SHA-1 (FIPS 180-4), only for `Sec-WebSocket-Accept`.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x6745_2301, 0xEFCD_AB89, 0x98BA_DCFE, 0x1032_5476, 0xC3D2_E1F0];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (slot, word) in w.iter_mut().zip(block.chunks_exact(4)) {
            *slot = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let next = a.rotate_left(5).wrapping_add(f).wrapping_add(e).wrapping_add(k).wrapping_add(*word);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, next);
        }
        for (total, part) in h.iter_mut().zip([a, b, c, d, e]) {
            *total = total.wrapping_add(part);
        }
    }
    let mut out = [0u8; 20];
    for (chunk, word) in out.chunks_exact_mut(4).zip(h) {
        chunk.copy_from_slice(&word.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// RFC 6455 §4.2.2: base64(SHA-1(key + GUID)).
fn websocket_accept(key: &str) -> String {
    base64(&sha1(format!("{key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11").as_bytes()))
}

#[test]
fn websocket_accept_matches_rfc_6455_example() {
    assert_eq!(websocket_accept("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    assert_eq!(base64(b"ab"), "YWI=");
    assert_eq!(base64(b"a"), "YQ==");
}

fn head_header(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
    })
}

/// Reads up to the end of a head (`\r\n\r\n`); returns the head and any bytes after it.
async fn read_head(stream: &mut TcpStream) -> Result<(String, Vec<u8>), String> {
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while received.len() < 64 * 1024 {
        if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&received[..end + 4]).into_owned();
            return Ok((head, received[end + 4..].to_vec()));
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => {
                return Err(format!("no whole head in {IO_TIMEOUT:?}; got {}", preview(&received, 300)));
            }
            Ok(Ok(0)) => return Err(format!("EOF before a whole head; got {}", preview(&received, 300))),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return Err(format!("read: {e}")),
        }
    }
    Err("head larger than 64 KiB".to_owned())
}

/// A raw WebSocket upstream: answers an upgrade with 101 and the right accept, then echoes.
struct WsUpstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    task: JoinHandle<()>,
}

impl WsUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind ws upstream");
        let addr = listener.local_addr().expect("ws upstream addr");
        let heads = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&heads);
        let task = tokio::spawn(async move {
            // The connections die with this task (the JoinSet aborts them when dropped).
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                connections.spawn(ws_connection(stream, Arc::clone(&log)));
            }
        });
        Self { addr, heads, task }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("heads").clone()
    }
}

impl Drop for WsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn ws_connection(mut stream: TcpStream, log: Arc<Mutex<Vec<String>>>) {
    let Ok((head, early)) = read_head(&mut stream).await else { return };
    log.lock().expect("heads").push(head.clone());
    let upgrade = head_header(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = head_header(&head, "sec-websocket-key").filter(|_| upgrade) else {
        let _ = stream
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            .await;
        return;
    };
    let answer = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        websocket_accept(&key)
    );
    if stream.write_all(answer.as_bytes()).await.is_err() || stream.write_all(&early).await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    for _ in 0..10_000 {
        match tokio::time::timeout(IO_TIMEOUT, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

fn websocket_request(path: &str, ws_key: &str, api_key: Option<&Key>) -> String {
    let mut out = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {ws_key}\r\n"
    );
    if let Some(key) = api_key {
        let _ = write!(out, "x-api-key: {}\r\n", key.secret);
    }
    out.push_str("\r\n");
    out
}

#[tokio::test]
async fn websocket_upgrade_is_relayed_with_identity_and_without_the_key() {
    let ws = WsUpstream::start().await;
    let key = Key::generated("ws-client", &["read"]);
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &format!("http://{}", ws.addr)))
        .key(key.clone())
        .start()
        .await;

    let ws_key = "x3JJHMbDL1EzLkh9GBhXDw==";
    let request = websocket_request("/ws/chat", ws_key, Some(&key));
    let sent = request.replace(&key.secret, "<key>");
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write upgrade");
    let (head, early) = read_head(&mut stream).await.unwrap_or_else(|e| panic!("sent:\n{sent}\n{e}"));
    let context = format!("sent:\n{sent}got:\n{head}");
    assert!(head.starts_with("HTTP/1.1 101"), "expected 101\n{context}");
    assert_eq!(head_header(&head, "sec-websocket-accept"), Some(websocket_accept(ws_key)), "{context}");
    assert!(head_header(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")), "{context}");
    assert!(early.is_empty(), "bytes after the 101 before any were sent: {}", preview(&early, 100));

    // Bytes relayed both ways, unframed and binary-safe.
    for (round, message) in
        [b"hello through keygate".to_vec(), pattern(5000), vec![0, 255, 13, 10, 0]].iter().enumerate()
    {
        stream.write_all(message).await.expect("write to the relay");
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(IO_TIMEOUT, stream.read_exact(&mut echoed))
            .await
            .unwrap_or_else(|_| panic!("round {round}: no echo within {IO_TIMEOUT:?}\n{context}"))
            .unwrap_or_else(|e| panic!("round {round}: {e}\n{context}"));
        assert!(
            echoed == *message,
            "round {round}: sent {} got {}",
            preview(message, 80),
            preview(&echoed, 80)
        );
    }

    let heads = ws.heads();
    assert_eq!(heads.len(), 1, "the upstream saw {} heads: {heads:#?}", heads.len());
    let upstream_head = &heads[0];
    let both = format!("{context}\nupstream saw:\n{upstream_head}");
    assert!(upstream_head.starts_with("GET /ws/chat HTTP/1.1\r\n"), "{both}");
    assert!(head_header(upstream_head, "x-api-key").is_none(), "the key went upstream\n{both}");
    assert!(!upstream_head.contains(&key.secret), "the key went upstream\n{both}");
    assert_eq!(head_header(upstream_head, "x-keygate-key-id").as_deref(), Some(key.id.as_str()), "{both}");
    assert_eq!(head_header(upstream_head, "x-keygate-key-name").as_deref(), Some("ws-client"), "{both}");
    assert_eq!(head_header(upstream_head, "x-keygate-scopes").as_deref(), Some("read"), "{both}");
    assert_eq!(head_header(upstream_head, "sec-websocket-key").as_deref(), Some(ws_key), "{both}");
    assert!(
        head_header(upstream_head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
        "{both}"
    );
    assert!(
        head_header(upstream_head, "connection").is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")),
        "{both}"
    );
    drop(stream);

    // Without a key: 401 and the upstream sees nothing.
    let request = websocket_request("/ws/chat", ws_key, None);
    let raw = raw_exchange(gateway.addr, request.as_bytes()).await;
    assert_eq!(raw.status(), Some(401), "{raw}");
    assert_eq!(raw.error_code().as_deref(), Some("missing_api_key"), "{raw}");
    assert_eq!(
        ws.heads().len(),
        1,
        "an unauthenticated upgrade reached the upstream\n{raw}\n{:#?}",
        ws.heads()
    );
}

#[tokio::test]
async fn h2c_upgrade_is_stripped_and_forwarded_as_a_plain_request() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("h2c-client", &["read"]);
    let gateway = GatewayConfig::new().route(Route::new("/", &upstream.url())).key(key.clone()).start().await;
    let request = format!(
        "GET /h2c HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nx-api-key: {}\r\n{PROBE_HEADER}: h2c-1\r\n\r\n",
        key.secret
    );
    let raw = raw_exchange(gateway.addr, request.as_bytes()).await;
    assert_eq!(raw.status(), Some(200), "an h2c upgrade must be served as a plain request\n{raw}");
    let seen =
        seen_with_probe(&upstream, "h2c-1").unwrap_or_else(|| panic!("the upstream never saw it\n{raw}"));
    let both = format!("{raw}\nupstream saw: {seen:?}");
    assert!(seen.header("upgrade").is_none(), "Upgrade reached the upstream\n{both}");
    assert!(seen.header("http2-settings").is_none(), "HTTP2-Settings reached the upstream\n{both}");
    assert!(
        !seen.header_all("connection").iter().any(|v| v.to_ascii_lowercase().contains("upgrade")),
        "Connection: upgrade reached the upstream\n{both}"
    );
    assert_eq!(seen.version, Version::HTTP_11, "{both}");
}

// ---------------------------------------------------------------------------------------------
// 9. HTTPS upstream with a private CA
// ---------------------------------------------------------------------------------------------

/// An HTTPS server on 127.0.0.1:0 answering 200 `tls upstream`, counting requests.
struct TlsUpstream {
    port: u16,
    seen: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl TlsUpstream {
    async fn start(leaf: &Leaf) -> Self {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der.clone()));
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_no_client_auth()
                .with_single_cert(vec![leaf.cert_der.clone()], key)
                .expect("upstream certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind tls upstream");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            while let Ok((tcp, peer)) = listener.accept().await {
                let (acceptor, log) = (acceptor.clone(), Arc::clone(&log));
                connections.spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await else {
                        return;
                    };
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let log = Arc::clone(&log);
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await?.to_bytes();
                            log.lock().expect("log").push(Recorded {
                                method: parts.method,
                                uri: parts.uri.to_string(),
                                version: parts.version,
                                headers: parts.headers,
                                body,
                                peer,
                            });
                            let mut response =
                                hyper::Response::new(Full::new(Bytes::from_static(b"tls upstream")));
                            response
                                .headers_mut()
                                .insert("x-upstream", http::HeaderValue::from_static("tls"));
                            Ok::<_, hyper::Error>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self { port, seen, task }
    }

    fn count(&self) -> usize {
        self.seen.lock().expect("log").len()
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn https_upstream_is_trusted_through_ca_file_and_not_through_system_roots() {
    let pki = Pki::new("keygate private upstream CA");
    let upstream = TlsUpstream::start(&pki.leaf("upstream")).await;
    let key = Key::generated("https-upstream", &["read"]);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).expect("write ca.pem");
    let url = format!("https://localhost:{}", upstream.port);
    let routes = format!(
        "[[routes]]\nprefix = \"/private-ca/\"\nupstream = \"{url}\"\nca_file = \"ca.pem\"\n\n\
         [[routes]]\nprefix = \"/system-roots/\"\nupstream = \"{url}\"\n"
    );
    let path = write_config(dir.path(), &GatewayConfig::new().key(key.clone()), &routes);
    let gateway = WatchedGateway::start(&path).await;

    let got = gateway.get("/private-ca/thing").header("x-api-key", &key.secret).send().await;
    assert_eq!(got.status, StatusCode::OK, "route with ca_file\n{got}");
    assert_eq!(got.header("x-upstream"), Some("tls"), "{got}");
    assert_eq!(&got.body[..], b"tls upstream", "{got}");
    let seen = upstream
        .seen
        .lock()
        .expect("log")
        .first()
        .cloned()
        .unwrap_or_else(|| panic!("upstream saw nothing\n{got}"));
    assert_eq!(seen.path(), "/private-ca/thing", "{got}\nupstream saw: {seen:?}");
    assert_eq!(seen.header("x-keygate-key-id"), Some(key.id.as_str()), "{got}\nupstream saw: {seen:?}");
    assert!(seen.header("x-api-key").is_none(), "the key went upstream\n{got}\nupstream saw: {seen:?}");

    let got = gateway.get("/system-roots/thing").header("x-api-key", &key.secret).send().await;
    assert_error(&got, 502, "upstream_unavailable");
    assert_eq!(upstream.count(), 1, "a request reached an upstream whose certificate is not trusted\n{got}");
}

// ---------------------------------------------------------------------------------------------
// 10. max_connections
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connections_beyond_max_connections_wait_until_one_closes() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("conn-cap", &["read"]);
    let gateway = GatewayConfig::new()
        .server("max_connections", "2")
        .server("header_read_timeout", "\"60s\"")
        .server("idle_timeout", "\"60s\"")
        .route(Route::new("/", &upstream.url()))
        .key(key.clone())
        .start()
        .await;

    // Two connections, each proven accepted by a served request, then left idle.
    let mut first = TcpStream::connect(gateway.addr).await.expect("connect 1");
    let mut second = TcpStream::connect(gateway.addr).await.expect("connect 2");
    for (n, stream) in [&mut first, &mut second].into_iter().enumerate() {
        let response = exchange_on(stream, &keep_alive_get("/held", &key, &format!("held-{n}")))
            .await
            .unwrap_or_else(|e| panic!("connection {n}: {e}"));
        assert!(response.starts_with(b"HTTP/1.1 200"), "connection {n}: {}", preview(&response, 300));
    }

    // A third waits: no answer while the two are open.
    let mut third = TcpStream::connect(gateway.addr).await.expect("connect 3 (kernel accept queue)");
    third.write_all(&keep_alive_get("/third", &key, "third")).await.expect("write on the third connection");
    let waited = Duration::from_millis(1500);
    let (early, ended) = read_until_closed(&mut third, waited).await;
    assert!(
        early.is_empty() && ended.is_none(),
        "with max_connections = 2 and two open, a third was answered within {}: {} ({ended:?})",
        ms(waited),
        preview(&early, 300)
    );
    assert!(seen_with_probe(&upstream, "third").is_none(), "the third request reached the upstream early");

    // Closing one lets the third in.
    drop(first);
    let closed_at = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let mut poll = Attempts::within(DEADLINE);
    while poll.again().await && whole_response_len(&received).is_none() {
        match tokio::time::timeout(POLL_EVERY, third.read(&mut buf)).await {
            Ok(Ok(0)) => panic!("the third connection was closed unanswered: {}", preview(&received, 300)),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => panic!("the third connection failed: {e}"),
            Err(_) => {}
        }
    }
    assert!(
        received.starts_with(b"HTTP/1.1 200"),
        "the third connection got no 200 within {} of closing one ({}): {}",
        ms(DEADLINE),
        poll.report(),
        preview(&received, 300)
    );
    eprintln!("third connection answered {} after one closed", ms(closed_at.elapsed()));

    // The second, still open, still serves.
    let response =
        exchange_on(&mut second, &keep_alive_get("/again", &key, "held-again")).await.expect("second again");
    assert!(response.starts_with(b"HTTP/1.1 200"), "{}", preview(&response, 300));
}

/// `idle_timeout` is about silence on the wire, not about an upstream taking its time: a
/// request whose body is complete and that waits on a slow upstream is bounded by
/// `request_timeout` alone, so it gets its 200 even when that takes longer than idle_timeout.
#[tokio::test]
async fn a_request_waiting_on_a_slow_upstream_is_not_idle() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("patient", &["read"]);
    let gateway = GatewayConfig::new()
        .server("idle_timeout", "\"1s\"")
        .server("request_timeout", "\"5s\"")
        .route(Route::new("/", &upstream.url()))
        .key(key.clone())
        .start()
        .await;
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let request = format!(
        "GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {}\r\nx-test-sleep-ms: 2000\r\n{PROBE_HEADER}: patient-1\r\n\r\n",
        key.secret
    );
    let started = Instant::now();
    let response = exchange_on(&mut stream, request.as_bytes()).await.unwrap_or_else(|e| {
        panic!("a request waiting {} on its upstream was cut off: {e}", ms(started.elapsed()))
    });
    assert!(
        response.starts_with(b"HTTP/1.1 200"),
        "sent: GET /slow (upstream sleeps 2 s, idle_timeout 1 s, request_timeout 5 s)\ngot: {}",
        preview(&response, 300)
    );
    assert!(started.elapsed() >= Duration::from_millis(1900), "the upstream did not really wait");
}

/// An upgraded WebSocket keeps its connection's place under `max_connections`: with a cap of
/// one and a WebSocket relaying, a second connection waits until the WebSocket closes.
#[tokio::test]
async fn a_relayed_websocket_still_counts_against_max_connections() {
    let ws = WsUpstream::start().await;
    let key = Key::generated("ws-cap", &["read"]);
    let gateway = GatewayConfig::new()
        .server("max_connections", "1")
        .route(Route::new("/", &format!("http://{}", ws.addr)))
        .key(key.clone())
        .start()
        .await;
    let ws_key = "dGhlIHNhbXBsZSBub25jZQ==";
    let mut socket = TcpStream::connect(gateway.addr).await.expect("connect");
    socket.write_all(websocket_request("/ws", ws_key, Some(&key)).as_bytes()).await.expect("write upgrade");
    let (head, _) = read_head(&mut socket).await.unwrap_or_else(|e| panic!("upgrade: {e}"));
    assert!(head.starts_with("HTTP/1.1 101"), "got:\n{head}");

    let mut second = TcpStream::connect(gateway.addr).await.expect("connect (kernel accept queue)");
    second.write_all(websocket_request("/ws", ws_key, Some(&key)).as_bytes()).await.expect("write");
    let waited = Duration::from_millis(1000);
    let (early, ended) = read_until_closed(&mut second, waited).await;
    assert!(
        early.is_empty() && ended.is_none(),
        "with max_connections = 1 and a WebSocket relaying, a second connection was answered within {}: {}",
        ms(waited),
        preview(&early, 200)
    );
    assert_eq!(ws.heads().len(), 1, "the second upgrade reached the upstream early");

    drop(socket);
    let (head, _) =
        read_head(&mut second).await.unwrap_or_else(|e| panic!("second upgrade after close: {e}"));
    assert!(head.starts_with("HTTP/1.1 101"), "after the first WebSocket closed, got:\n{head}");
}

//! HTTP/2 conformance at the frame level: frames built by hand ([`support::h2`]) against a real
//! gateway in front of a recording upstream, over cleartext prior knowledge and over TLS with
//! ALPN h2 — malformed and connection-specific headers, path tricks, rapid reset, CONTINUATION
//! flood, flow control, stream limits, frames on closed streams. Each case checks what the
//! client got; then every test checks what the upstream saw: nothing marked `reject-`, no
//! connection-specific header, no credential, no unauthenticated request on a protected route,
//! no path that was not normalised.
//!
//! A check that fails does not stop the others: each transport's run collects its failures and
//! reports them together, with the frames the server sent.

mod support;

use std::time::Duration;

use support::h2::{
    self, CANCEL, COMPRESSION_ERROR, Conn, DATA, END_STREAM, ENHANCE_YOUR_CALM, Ended, Fields, GOAWAY,
    HEADERS, Outcome, PROTOCOL_ERROR, REFUSED_STREAM, RST_STREAM, SETTINGS_INITIAL_WINDOW_SIZE,
    SETTINGS_MAX_CONCURRENT_STREAMS, STREAM_CLOSED,
};
use support::pki::Pki;
use support::{
    GatewayConfig, IO_TIMEOUT, Key, PROBE_HEADER, Recorded, RecordingUpstream, Route, TestGateway, pattern,
    toml_str,
};
use tokio::time::Instant;

/// The gateway's limits under test.
const MAX_STREAMS: u32 = 4;
const MAX_HEADER_BYTES: usize = 16_384;
/// How long a check that something does *not* happen watches for it.
const QUIET: Duration = Duration::from_millis(1500);

/// Headers that must never reach an upstream: connection-specific ones (RFC 9113 §8.2.2) and
/// the credential. `transfer-encoding` is checked apart: keygate's own upstream connection
/// frames a streamed body with plain `chunked`.
const NEVER_UPSTREAM: [&str; 6] =
    ["connection", "keep-alive", "proxy-connection", "upgrade", "te", "x-api-key"];

fn deadline() -> Instant {
    Instant::now() + IO_TIMEOUT
}

// ---------------------------------------------------------------------------------------------
// The gateway under test
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Cleartext,
    Tls,
}

/// A recording upstream behind keygate: `/public/` is public, everything else needs `key`.
struct Fixture {
    transport: Transport,
    upstream: RecordingUpstream,
    gateway: TestGateway,
    key: Key,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Holds the certificate files for the gateway's lifetime.
    _certs: Option<tempfile::TempDir>,
    failures: Vec<String>,
    log: String,
}

impl Fixture {
    async fn start(transport: Transport) -> Self {
        let upstream = RecordingUpstream::start().await;
        let key = Key::generated("h2-client", &["read", "write"]);
        let mut config = GatewayConfig::new()
            .server("h2_max_concurrent_streams", &MAX_STREAMS.to_string())
            .server("max_header_bytes", &MAX_HEADER_BYTES.to_string())
            .route(Route::new("/public/", &upstream.url()).public())
            .route(Route::new("/", &upstream.url()))
            .key(key.clone());
        let (mut tls, mut certs) = (None, None);
        if transport == Transport::Tls {
            let pki = Pki::new("keygate h2 test CA");
            let dir = tempfile::tempdir().expect("temp dir for certificates");
            let (cert, tls_key) = pki.leaf("localhost").write_pem(dir.path());
            config = config
                .server("tls_cert", &toml_str(&cert.to_string_lossy()))
                .server("tls_key", &toml_str(&tls_key.to_string_lossy()));
            tls = Some(pki.client(&[b"h2"], false));
            certs = Some(dir);
        }
        let gateway = config.start().await;
        Self {
            transport,
            upstream,
            gateway,
            key,
            tls,
            _certs: certs,
            failures: Vec::new(),
            log: String::new(),
        }
    }

    /// A new connection, its SETTINGS exchanged.
    async fn conn(&self) -> Conn {
        self.conn_with(&[]).await
    }

    async fn conn_with(&self, settings: &[(u16, u32)]) -> Conn {
        let mut conn = Conn::connect_with(self.gateway.addr, self.tls.clone(), settings).await;
        conn.handshake().await;
        conn
    }

    /// A well-formed request: the pseudo-headers for this transport, the key if given, a probe,
    /// then `extra`.
    fn fields(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        probe: &str,
        extra: &[(&str, &str)],
    ) -> Fields {
        let mut rest = Vec::new();
        if let Some(key) = key {
            rest.push(("x-api-key", key));
        }
        rest.push((PROBE_HEADER, probe));
        rest.extend_from_slice(extra);
        h2::request_fields(self.scheme(), &self.authority(), method, path, &rest)
    }

    fn get(&self, path: &str, key: Option<&str>, probe: &str) -> Fields {
        self.fields("GET", path, key, probe, &[])
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn authority(&self) -> String {
        let host = if self.tls.is_some() { "localhost" } else { "127.0.0.1" };
        format!("{host}:{}", self.gateway.addr.port())
    }

    fn secret(&self) -> String {
        self.key.secret.clone()
    }

    /// Records one check; a failure is reported at the end with the others.
    fn check(&mut self, ok: bool, message: impl Into<String>) -> bool {
        let message = message.into();
        self.log.push_str(&format!("  {} {message}\n", if ok { "ok  " } else { "FAIL" }));
        if !ok {
            self.failures.push(message);
        }
        ok
    }

    /// Like [`check`](Self::check), with the frames `conn` read shown on failure.
    fn check_on(&mut self, conn: &Conn, ok: bool, message: impl Into<String>) -> bool {
        let message = message.into();
        if ok {
            self.check(true, message)
        } else {
            self.check(false, format!("{message}\n  frames read:\n{}", conn.transcript))
        }
    }

    /// The gateway still serves: a new connection gets a 200 for a keyed request.
    async fn server_answers(&mut self) {
        let mut conn = self.conn().await;
        let fields = self.get("/after-attack", Some(&self.secret()), "after-attack");
        let response = conn.get(&fields, None).await;
        let ok = response.status == Some(200) && response.ended;
        self.check_on(&conn, ok, format!("a fresh connection still gets 200: {response}"));
    }

    /// Fails the test with every failed check, the run's log, and what the upstream saw.
    fn finish(&self, name: &str) {
        assert!(
            self.failures.is_empty(),
            "{name} over {:?}: {} failure(s):\n- {}\n--- log ---\n{}--- the upstream saw {} request(s) ---\n{:#?}",
            self.transport,
            self.failures.len(),
            self.failures.join("\n- "),
            self.log,
            self.upstream.count(),
            self.upstream.requests()
        );
    }

    /// What the upstream saw must be clean, whatever was sent.
    #[track_caller]
    fn assert_upstream_clean(&self) {
        for seen in self.upstream.requests() {
            let context = format!("the upstream saw:\n  {seen:?}\nlog:\n{}", self.log);
            let probe = seen.header(PROBE_HEADER).unwrap_or_default();
            assert!(!probe.is_empty(), "a request without a probe reached the upstream\n{context}");
            assert!(
                !probe.starts_with("reject-"),
                "a request keygate had to refuse reached the upstream\n{context}"
            );
            for name in NEVER_UPSTREAM {
                assert!(seen.headers.get(name).is_none(), "`{name}` reached the upstream\n{context}");
            }
            for value in seen.header_all("transfer-encoding") {
                assert_eq!(value, "chunked", "a client's transfer-encoding reached the upstream\n{context}");
            }
            if !seen.path().starts_with("/public/") {
                assert_eq!(
                    seen.header("x-keygate-key-id"),
                    Some(self.key.id.as_str()),
                    "a request on the protected route reached the upstream without the key's identity\n{context}"
                );
            }
            assert_normalised(seen.path(), &context);
        }
    }

    /// The upstream saw the request with this probe; returns it.
    #[track_caller]
    fn seen(&self, probe: &str) -> Recorded {
        self.upstream.requests().into_iter().find(|r| r.header(PROBE_HEADER) == Some(probe)).unwrap_or_else(
            || {
                panic!(
                    "the upstream never saw probe {probe}\nlog:\n{}\nit saw: {:#?}",
                    self.log,
                    self.upstream.requests()
                )
            },
        )
    }
}

#[track_caller]
fn assert_normalised(path: &str, context: &str) {
    assert!(path.starts_with('/') && !path.contains("//"), "unnormalised path upstream\n{context}");
    assert!(!path.contains('\\'), "a backslash reached the upstream\n{context}");
    let lower = path.to_ascii_lowercase();
    assert!(!lower.contains("%2e") && !lower.contains("%2f"), "an encoded dot or slash upstream\n{context}");
    assert!(
        path.split('/').all(|segment| segment != "." && segment != ".."),
        "a dot-segment reached the upstream\n{context}"
    );
}

/// Runs `case` over cleartext and over TLS, each against a fresh gateway; fails with the case's
/// failed checks, then checks the upstream and hands the fixture to `then`.
async fn conformance<F>(name: &str, case: F, then: impl Fn(&Fixture))
where
    F: AsyncFn(&mut Fixture),
{
    for transport in [Transport::Cleartext, Transport::Tls] {
        let mut fixture = Fixture::start(transport).await;
        case(&mut fixture).await;
        // Shown with --nocapture, or when a later check fails.
        println!("{name} over {transport:?}:\n{}", fixture.log);
        fixture.finish(name);
        fixture.assert_upstream_clean();
        then(&fixture);
    }
}

// ---------------------------------------------------------------------------------------------
// Authentication over HTTP/2
// ---------------------------------------------------------------------------------------------

/// A request without a key gets 401 and its stream ends; a wrong key 401; a valid key 200, also
/// for many requests multiplexed on one connection.
async fn auth(f: &mut Fixture) {
    let mut conn = f.conn().await;
    let missing = conn.get(&f.get("/private/a", None, "reject-auth-missing"), None).await;
    f.check(missing.status == Some(401) && missing.ended, format!("no key → 401, stream ended: {missing}"));
    f.check(
        missing.error_code().as_deref() == Some("missing_api_key"),
        format!("error code missing_api_key: {missing}"),
    );
    f.check(
        missing.header("content-type").is_some_and(|c| c.starts_with("application/json")),
        "JSON content-type",
    );
    f.check(missing.header("www-authenticate").is_some(), "401 carries www-authenticate");
    f.check(missing.header("x-upstream").is_none(), "the 401 did not come from the upstream");

    let wrong = conn.get(&f.get("/private/a", Some("not-a-key"), "reject-auth-wrong"), None).await;
    f.check(
        wrong.status == Some(401) && wrong.error_code().as_deref() == Some("invalid_api_key"),
        format!("wrong key → 401 invalid_api_key: {wrong}"),
    );

    let post = f.fields("POST", "/private/a", Some(&f.secret()), "auth-ok", &[]);
    let ok = conn.get(&post, Some(b"hello over h2")).await;
    f.check(ok.status == Some(200) && ok.ended, format!("valid key → 200: {ok}"));
    f.check(ok.header("x-upstream") == Some("yes"), "the 200 came from the upstream");
    f.check(ok.body == b"hello over h2", format!("the body went through: {ok}"));

    // Ten keyed and ten unkeyed requests interleaved on one connection, as many at once as
    // MAX_CONCURRENT_STREAMS allows: each gets its own answer.
    let secret = f.secret();
    let mut streams = Vec::new();
    for i in 0..10 {
        let path = format!("/private/m{i}");
        streams.push((true, f.get(&path, Some(&secret), &format!("auth-multi-{i}"))));
        streams.push((false, f.get(&path, None, &format!("reject-auth-multi-{i}"))));
    }
    let mut sent = Vec::new();
    for batch in streams.chunks(MAX_STREAMS as usize) {
        let mut ids = Vec::new();
        for (keyed, fields) in batch {
            ids.push((*keyed, conn.request(fields, None).await));
        }
        let waiting: Vec<u32> = ids.iter().map(|(_, id)| *id).collect();
        conn.wait_until(deadline(), |c| waiting.iter().all(|id| c.responses[id].finished())).await;
        sent.extend(ids);
    }
    for (keyed, stream_id) in sent {
        let response = &conn.responses[&stream_id];
        let want = if keyed { 200 } else { 401 };
        let ok = response.status == Some(want) && response.ended;
        let message =
            format!("multiplexed {} request → {want}: {response}", if keyed { "keyed" } else { "unkeyed" });
        f.check(ok, message);
    }
    f.check_on(&conn, conn.goaway.is_none() && !conn.closed, "the connection stayed open throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_streams_get_401_and_keyed_ones_reach_the_upstream() {
    conformance("auth", auth, |f| {
        let seen = f.seen("auth-ok");
        assert_eq!(&seen.body[..], b"hello over h2", "{seen:?}");
        for i in 0..10 {
            f.seen(&format!("auth-multi-{i}"));
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Malformed header blocks
// ---------------------------------------------------------------------------------------------

/// Sends `fields` as the one header block of a new stream on a new connection; returns the
/// outcome and the connection (for its transcript).
async fn one_stream(
    f: &Fixture,
    fields: &[(Vec<u8>, Vec<u8>)],
    end_stream: bool,
    then: &[u8],
) -> (Outcome, Conn) {
    let mut conn = f.conn().await;
    let stream_id = conn.stream_id();
    let mut bytes =
        h2::header_frames(stream_id, &h2::literal_block(fields), end_stream, h2::DEFAULT_MAX_FRAME);
    if !then.is_empty() {
        bytes.extend(h2::frame(DATA, END_STREAM, stream_id, then));
    }
    // The server may refuse the block before the body is written: a failed write is an outcome.
    let _ = conn.try_send(&bytes).await;
    let outcome = conn.outcome(stream_id, deadline()).await;
    (outcome, conn)
}

/// Connection-specific header fields (RFC 9113 §8.2.2) make a request malformed: `connection`,
/// `keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` other than
/// `trailers`. Each must end in a stream or connection error of type PROTOCOL_ERROR, never in a
/// response and never upstream. `te: trailers` is allowed.
async fn connection_headers(f: &mut Fixture) {
    const FORBIDDEN: [(&str, &str); 11] = [
        ("connection", "keep-alive"),
        ("connection", "close"),
        ("connection", "x-keygate-key-id"),
        ("keep-alive", "timeout=5"),
        ("proxy-connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("transfer-encoding", "gzip, chunked"),
        ("upgrade", "websocket"),
        ("upgrade", "h2c"),
        ("te", "gzip"),
        ("te", "trailers, gzip"),
    ];
    let secret = f.secret();
    for (i, (name, value)) in FORBIDDEN.iter().enumerate() {
        let probe = format!("reject-connhdr-{i}-{name}");
        let fields = f.fields("GET", "/private/connhdr", Some(&secret), &probe, &[(name, value)]);
        let (outcome, conn) = one_stream(f, &fields, true, b"").await;
        f.check_on(
            &conn,
            outcome.is_error(&[PROTOCOL_ERROR]),
            format!("{name}: {value} → PROTOCOL_ERROR, got {outcome}"),
        );
    }

    // A body announced by transfer-encoding: the DATA must not smuggle a request.
    let fields = f.fields(
        "POST",
        "/private/connhdr",
        Some(&secret),
        "reject-connhdr-te-body",
        &[("transfer-encoding", "chunked")],
    );
    let smuggled =
        b"0\r\n\r\nGET /private/smuggled HTTP/1.1\r\nhost: x\r\nx-test-probe: reject-smuggled\r\n\r\n";
    let (outcome, conn) = one_stream(f, &fields, false, smuggled).await;
    f.check_on(
        &conn,
        outcome.is_error(&[PROTOCOL_ERROR]),
        format!("transfer-encoding with a body → PROTOCOL_ERROR, got {outcome}"),
    );

    // te: trailers is the one value allowed; keygate drops it as hop-by-hop and answers.
    let fields =
        f.fields("GET", "/private/te-trailers", Some(&secret), "connhdr-te-trailers", &[("te", "trailers")]);
    let (outcome, conn) = one_stream(f, &fields, true, b"").await;
    f.check_on(&conn, outcome == Outcome::Response(200), format!("te: trailers → 200, got {outcome}"));

    f.server_answers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_specific_headers_are_protocol_errors() {
    conformance("connection_headers", connection_headers, |f| {
        // `te: trailers` is legal in HTTP/2; keygate answers it and drops the header (hop-by-hop).
        f.seen("connhdr-te-trailers");
    })
    .await;
}

/// Malformed request header blocks (RFC 9113 §8.3): a missing or duplicated pseudo-header, a
/// pseudo-header after a regular field, an unknown or response pseudo-header, an empty :path,
/// upper-case field names, a space in a name, CR LF in a value, CONNECT with :path and :scheme.
/// Each must end in a stream or connection error, never in a response (the requests carry a
/// valid key, so an accepted one would reach the upstream; their probes start with `reject-`).
async fn pseudo_headers(f: &mut Fixture) {
    let authority = f.authority();
    let secret = f.secret();
    let method = (":method", "GET");
    let sch = (":scheme", f.scheme());
    let auth = (":authority", authority.as_str());
    let path = (":path", "/private/pseudo");
    let api_key = ("x-api-key", secret.as_str());
    let probes: Vec<String> = [
        "no-method",
        "no-scheme",
        "no-path",
        "empty-path",
        "dup-path",
        "dup-method",
        "dup-scheme",
        "dup-authority",
        "late-pseudo",
        "unknown",
        "status",
        "upper-key",
        "upper-other",
        "upper-pseudo",
        "space",
        "crlf",
        "connect",
    ]
    .iter()
    .map(|name| format!("reject-pseudo-{name}"))
    .collect();
    let probe = |i: usize| (PROBE_HEADER, probes[i].as_str());
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("missing :method", vec![sch, auth, path, api_key, probe(0)]),
        ("missing :scheme", vec![method, auth, path, api_key, probe(1)]),
        ("missing :path", vec![method, sch, auth, api_key, probe(2)]),
        ("empty :path", vec![method, sch, auth, (":path", ""), api_key, probe(3)]),
        ("duplicate :path", vec![method, sch, auth, path, (":path", "/public/x"), api_key, probe(4)]),
        ("duplicate :method", vec![method, (":method", "POST"), sch, auth, path, api_key, probe(5)]),
        ("duplicate :scheme", vec![method, sch, sch, auth, path, api_key, probe(6)]),
        (
            "duplicate :authority",
            vec![method, sch, auth, (":authority", "evil.example"), path, api_key, probe(7)],
        ),
        ("pseudo-header after a regular field", vec![method, sch, auth, api_key, path, probe(8)]),
        ("unknown pseudo-header", vec![method, sch, auth, path, (":foo", "bar"), api_key, probe(9)]),
        (
            "response pseudo-header :status",
            vec![method, sch, auth, path, (":status", "200"), api_key, probe(10)],
        ),
        ("upper-case field name", vec![method, sch, auth, path, ("X-Api-Key", secret.as_str()), probe(11)]),
        (
            "upper-case field name (other)",
            vec![method, sch, auth, path, api_key, ("X-Custom", "1"), probe(12)],
        ),
        ("upper-case pseudo-header", vec![(":METHOD", "GET"), sch, auth, path, api_key, probe(13)]),
        ("field name with a space", vec![method, sch, auth, path, api_key, ("x bad", "1"), probe(14)]),
        (
            "field value with CR LF",
            vec![method, sch, auth, path, api_key, ("x-inject", "a\r\nx-api-key: b"), probe(15)],
        ),
        ("CONNECT with :path and :scheme", vec![(":method", "CONNECT"), sch, auth, path, api_key, probe(16)]),
    ];
    for (label, fields) in cases {
        let fields: Fields =
            fields.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
        let (outcome, conn) = one_stream(f, &fields, true, b"").await;
        let ok = outcome.is_error(&[PROTOCOL_ERROR, COMPRESSION_ERROR]);
        f.check_on(&conn, ok, format!("{label} → stream or connection error, got {outcome}"));
    }
    f.server_answers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pseudo_headers_and_upper_case_names_are_refused() {
    conformance("pseudo_headers", pseudo_headers, |_| {}).await;
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// `:path` with dot-segments, plain or percent-encoded, is normalised before routing or
/// refused: `/public/../secret` is routed as `/secret` (protected: 401 without a key), never as
/// the public `/public/` route; paths that climb above the root or hide a slash are 400. With a
/// key, the upstream receives the normalised path.
async fn path_traversal(f: &mut Fixture) {
    // Without a key each resolves outside /public/, or is refused. 200 would mean it was routed
    // on the raw prefix and reached the upstream through the public route.
    const UNKEYED: [&str; 18] = [
        "/public/../secret",
        "/public/%2e%2e/secret",
        "/public/%2E%2e/secret",
        "/public/.%2e/secret",
        "/public/%2e./secret",
        "/public/./../secret",
        "/public//../secret",
        "/public/a/../../secret",
        "/public/..%2fsecret",
        "/public/..%2Fsecret",
        "/public/..%5csecret",
        "/public/..;/secret",
        "/public/%2e%2e;/secret",
        "/public/.;x/../secret",
        "/public/..\\secret",
        "/public/%2e%2e%2fsecret",
        "/../public/x",
        "/public/%00/../secret",
    ];
    // With a key: normalised ones reach the upstream (200), the others are 400.
    const KEYED: [(&str, u16); 9] = [
        ("/x/../y", 200),
        ("/x/%2e%2e/y", 200),
        ("/x/%2E%2E/y/.", 200),
        ("//x//y/./z/..", 200),
        ("/%7euser/%41", 200),
        ("/..", 400),
        ("/%2e%2e/y", 400),
        ("/x/..%2f..%2fetc/passwd", 400),
        ("/x/%5c..%5c", 400),
    ];
    let mut conn = f.conn().await;
    let public = conn.get(&f.get("/public/ok", None, "path-public-ok"), None).await;
    f.check(
        public.status == Some(200),
        format!("/public/ok without a key → 200 (the public route works): {public}"),
    );

    for (i, path) in UNKEYED.iter().enumerate() {
        let response = conn.get(&f.get(path, None, &format!("reject-path-{i}")), None).await;
        f.check(
            matches!(response.status, Some(400 | 401)),
            format!("{path} without a key → 400 or 401: {response}"),
        );
        f.check(response.header("x-upstream").is_none(), format!("{path} did not reach the upstream"));
    }
    let secret = f.secret();
    for (i, (path, want)) in KEYED.iter().enumerate() {
        let probe = if *want == 200 { format!("path-keyed-{i}") } else { format!("reject-path-keyed-{i}") };
        let response = conn.get(&f.get(path, Some(&secret), &probe), None).await;
        f.check(response.status == Some(*want), format!("{path} with a key → {want}: {response}"));
    }
    f.check_on(&conn, conn.goaway.is_none() && !conn.closed, "the connection stayed open throughout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_in_the_path_are_normalised_or_refused() {
    conformance("path_traversal", path_traversal, |f| {
        for (probe, path) in [
            ("path-keyed-0", "/y"),
            ("path-keyed-1", "/y"),
            ("path-keyed-2", "/y/"),
            ("path-keyed-3", "/x/y/"),
            ("path-keyed-4", "/~user/A"),
        ] {
            assert_eq!(f.seen(probe).path(), path, "{probe}: the upstream must get the normalised path");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Floods
// ---------------------------------------------------------------------------------------------

/// Rapid reset (CVE-2023-44487): HEADERS followed at once by RST_STREAM, a thousand times, as
/// fast as the socket takes them. The server must send GOAWAY (ENHANCE_YOUR_CALM) or close the
/// connection rather than keep working for streams nobody waits for, and keep serving new
/// connections afterwards.
async fn rapid_reset(f: &mut Fixture) {
    const STREAMS: usize = 1000;
    // Pairs per write: an attacker packs them, and the server reads them in one go.
    const BATCH: usize = 100;
    let mut conn = f.conn().await;
    let mut sent = 0;
    let mut write_stalled = false;
    while sent < STREAMS && !conn.closed && conn.goaway.is_none() {
        let mut bytes = Vec::new();
        for _ in 0..BATCH {
            let stream_id = conn.stream_id();
            // Unkeyed: a stream the server did accept answers 401 without touching the upstream.
            let fields = f.fields("GET", "/private/rapid", None, "reject-rapid", &[]);
            bytes.extend(h2::header_frames(
                stream_id,
                &h2::literal_block(&fields),
                false,
                h2::DEFAULT_MAX_FRAME,
            ));
            bytes.extend(h2::rst_stream(stream_id, CANCEL));
        }
        match conn.try_send(&bytes).await {
            Ok(()) => sent += BATCH,
            Err(Ended::TimedOut) => write_stalled = true,
            Err(Ended::Closed) => {}
        }
        if write_stalled {
            break;
        }
        // Pick up a GOAWAY as soon as it comes: once the server closes, the data it did not read
        // makes the kernel reset the connection, and a GOAWAY not yet read is lost.
        while conn.next_frame(Instant::now() + Duration::from_millis(1)).await.is_ok() {}
    }
    f.log.push_str(&format!("  sent {sent} HEADERS+RST_STREAM pairs\n"));
    if conn.goaway.is_none() && !conn.closed {
        let _ = conn.wait_for(deadline(), |frame| frame.is(GOAWAY)).await;
    }
    match &conn.goaway {
        Some((_, code, debug)) => {
            f.check(
                *code == ENHANCE_YOUR_CALM,
                format!(
                    "the GOAWAY says ENHANCE_YOUR_CALM (got {}, {:?})",
                    h2::error_name(*code),
                    debug.escape_ascii().to_string()
                ),
            );
        }
        None => {
            // The server closed the connection; its GOAWAY, if any, was lost to the reset.
            let ok = conn.closed;
            f.check_on(&conn, ok, format!("GOAWAY or a closed connection (after {sent} resets it is still open; write stalled: {write_stalled})"));
        }
    }
    f.check(
        sent < STREAMS,
        format!("the server cut the connection off before all {STREAMS} streams (after {sent})"),
    );
    f.server_answers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_the_server_stays_up() {
    conformance("rapid_reset", rapid_reset, |_| {}).await;
}

/// CONTINUATION flood (CVE-2024-27316 and kin): a HEADERS frame without END_HEADERS followed by
/// CONTINUATION frames that never end the block, far beyond max_header_bytes. The server must
/// cut the connection off (GOAWAY or close) after a bounded number of bytes instead of
/// buffering, and keep serving new connections.
async fn continuation_flood(f: &mut Fixture, label: &str, frame_payload: usize) {
    let budget = 64 * MAX_HEADER_BYTES;
    let mut conn = f.conn().await;
    let stream_id = conn.stream_id();
    let first = f.fields("GET", "/private/flood", Some(&f.secret()), "reject-flood", &[]);
    // HEADERS with END_STREAM and without END_HEADERS.
    conn.send(&h2::frame(HEADERS, END_STREAM, stream_id, &h2::literal_block(&first))).await;
    let (mut frames, mut bytes) = (0usize, 0usize);
    let mut stalled = false;
    while bytes < budget && !conn.closed && conn.goaway.is_none() {
        // A literal field without indexing, whole inside its frame.
        let name = format!("x-flood-{frames}");
        let field = h2::literal_block(&[(name.as_bytes(), "a".repeat(frame_payload - 32).as_bytes())]);
        match conn.try_send(&h2::frame(h2::CONTINUATION, 0, stream_id, &field)).await {
            Ok(()) => {}
            Err(Ended::Closed) => break,
            Err(Ended::TimedOut) => {
                stalled = true;
                break;
            }
        }
        frames += 1;
        bytes += field.len();
        // Look for a GOAWAY after each frame: once the server closes, unread data makes the
        // kernel reset the connection and the GOAWAY is lost.
        let _ = conn.next_frame(Instant::now() + Duration::from_millis(2)).await;
    }
    f.log.push_str(&format!(
        "  {label}: sent {frames} CONTINUATION frames ({bytes} bytes){}\n",
        if conn.closed { " until the server closed" } else { "" }
    ));
    let outcome = match conn.goaway {
        Some((_, code, _)) => Outcome::GoAway(code),
        None => conn.outcome(stream_id, deadline()).await,
    };
    let ok = matches!(outcome, Outcome::GoAway(_) | Outcome::Closed);
    f.check_on(&conn, ok, format!("{label}: GOAWAY or close, got {outcome} (write stalled: {stalled})"));
    f.check(
        bytes <= 16 * MAX_HEADER_BYTES,
        format!("{label}: cut off after {bytes} bytes (at most 16 × max_header_bytes)"),
    );
}

/// A complete header block, split over CONTINUATION frames, of 3 × max_header_bytes, must not
/// produce a 200: 431, or a stream or connection error.
async fn oversized_block(f: &mut Fixture) {
    let pad = "b".repeat(1000);
    let names: Vec<String> = (0..3 * MAX_HEADER_BYTES / 1000).map(|i| format!("x-big-{i}")).collect();
    let extra: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), pad.as_str())).collect();
    let fields = f.fields("GET", "/private/big", Some(&f.secret()), "reject-big-block", &extra);
    let (outcome, conn) = one_stream(f, &fields, true, b"").await;
    let ok = outcome.is_error(&[]) || outcome == Outcome::Response(431);
    f.check_on(
        &conn,
        ok,
        format!(
            "a {}-byte header block → 431, RST_STREAM, GOAWAY or close; got {outcome}",
            h2::literal_block(&fields).len()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off_and_the_server_stays_up() {
    conformance(
        "continuation_flood",
        async |f: &mut Fixture| {
            continuation_flood(f, "small frames", 256).await;
            continuation_flood(f, "4 KiB frames", 4096).await;
            continuation_flood(f, "16 KiB frames", 16_384).await;
            oversized_block(f).await;
            f.server_answers().await;
        },
        |_| {},
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// Flow control and stream limits
// ---------------------------------------------------------------------------------------------

/// How many body bytes arrive on `stream_id` while `conn` is read for [`QUIET`].
async fn bytes_while_quiet(conn: &mut Conn, stream_id: u32) -> usize {
    let before = conn.responses[&stream_id].body.len();
    conn.read_until(Instant::now() + QUIET).await;
    conn.responses[&stream_id].body.len() - before
}

/// A response larger than the client's window is sent only as far as the window allows, stalls
/// (the connection staying healthy) while the window is closed, and is delivered whole once the
/// client sends WINDOW_UPDATE. A stream opened with an initial window of zero gets its response
/// headers but no DATA until the window opens.
async fn flow_control(f: &mut Fixture) {
    const BIG: usize = 300_000;
    let secret = f.secret();

    let mut conn = f.conn().await;
    conn.auto_window = false;
    let big = BIG.to_string();
    let fields =
        f.fields("GET", "/private/big", Some(&secret), "flow-default", &[("x-test-response-bytes", &big)]);
    let id = conn.request(&fields, None).await;
    conn.wait_until(deadline(), |c| {
        c.responses[&id].body.len() >= h2::DEFAULT_WINDOW || c.responses[&id].finished()
    })
    .await;
    let response = conn.responses[&id].clone();
    f.check_on(&conn, response.status == Some(200), format!("status 200: {response}"));
    f.check(
        response.body.len() <= h2::DEFAULT_WINDOW,
        format!(
            "no more than the initial window ({}) before WINDOW_UPDATE: {}",
            h2::DEFAULT_WINDOW,
            response.body.len()
        ),
    );
    f.check(!response.ended, "the response is not complete while the window is closed");
    let more = bytes_while_quiet(&mut conn, id).await;
    f.check(more == 0, format!("nothing sent while the window is exhausted (got {more} bytes)"));
    let pong = conn.ping_answered().await;
    f.check_on(&conn, pong, "the connection answers PING while the stream is stalled");

    // Open the windows, the connection's and the stream's, by the whole size.
    let mut open = h2::window_update(0, BIG as u32);
    open.extend(h2::window_update(id, BIG as u32));
    conn.send(&open).await;
    conn.auto_window = true;
    conn.wait_until(deadline(), |c| c.responses[&id].finished()).await;
    let response = &conn.responses[&id];
    let ok = response.ended && response.body.len() == BIG;
    let message =
        format!("the whole response arrives after WINDOW_UPDATE: {} of {BIG} bytes", response.body.len());
    let intact = response.body == pattern(BIG);
    f.check(ok, message);
    f.check(intact, "the body is intact");

    // A stream window of zero from the start.
    let mut conn = f.conn_with(&[(SETTINGS_INITIAL_WINDOW_SIZE, 0)]).await;
    conn.auto_window = false;
    let fields =
        f.fields("GET", "/private/zero", Some(&secret), "flow-zero", &[("x-test-response-bytes", "1000")]);
    let id = conn.request(&fields, None).await;
    conn.wait_until(deadline(), |c| c.responses[&id].status.is_some() || c.responses[&id].finished()).await;
    let response = conn.responses[&id].clone();
    f.check_on(
        &conn,
        response.status == Some(200),
        format!("zero window: response headers still arrive: {response}"),
    );
    let more = bytes_while_quiet(&mut conn, id).await;
    let early = conn.responses[&id].body.len();
    f.check(
        early == 0 && more == 0,
        format!("zero window: no DATA while the stream window is 0 (got {early} bytes)"),
    );
    let pong = conn.ping_answered().await;
    f.check_on(&conn, pong, "zero window: the connection answers PING");
    let second = conn.request(&f.get("/private/other", Some(&secret), "flow-zero-second"), None).await;
    conn.wait_until(deadline(), |c| c.responses[&second].status.is_some() || c.responses[&second].finished())
        .await;
    let other = conn.responses[&second].clone();
    f.check_on(
        &conn,
        other.status == Some(200),
        format!("zero window: other streams' headers still flow: {other}"),
    );

    conn.send(&h2::window_update(id, 1000)).await;
    conn.wait_until(deadline(), |c| c.responses[&id].finished()).await;
    let response = conn.responses[&id].clone();
    f.check_on(
        &conn,
        response.ended && response.body == pattern(1000),
        format!("zero window: DATA arrives once WINDOW_UPDATE opens it: {response}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_windows_are_respected() {
    conformance("flow_control", flow_control, |f| {
        f.seen("flow-default");
        f.seen("flow-zero");
    })
    .await;
}

/// More streams than h2_max_concurrent_streams: the server's SETTINGS advertise the configured
/// MAX_CONCURRENT_STREAMS, and streams opened beyond it (by a client that ignores the setting)
/// are refused with RST_STREAM REFUSED_STREAM, or at most queued: the upstream never sees more
/// than the limit at once. The connection keeps working afterwards.
async fn concurrency(f: &mut Fixture) {
    const SLEEP_MS: u64 = 1500;
    const EXTRA: u32 = 3;
    let mut conn = Conn::connect_with(f.gateway.addr, f.tls.clone(), &[]).await;
    conn.handshake().await;
    let advertised = conn.remote_setting(SETTINGS_MAX_CONCURRENT_STREAMS);
    f.check(
        advertised == Some(MAX_STREAMS),
        format!("SETTINGS_MAX_CONCURRENT_STREAMS = {MAX_STREAMS} (got {advertised:?})"),
    );

    let total = MAX_STREAMS + EXTRA;
    let secret = f.secret();
    let sleep = SLEEP_MS.to_string();
    let mut bytes = Vec::new();
    let mut streams = Vec::new();
    for i in 0..total {
        let stream_id = conn.stream_id();
        streams.push(stream_id);
        let fields = f.fields(
            "GET",
            &format!("/private/slow{i}"),
            Some(&secret),
            &format!("conc-{i}"),
            &[("x-test-sleep-ms", &sleep)],
        );
        bytes.extend(h2::header_frames(stream_id, &h2::literal_block(&fields), true, h2::DEFAULT_MAX_FRAME));
    }
    conn.send(&bytes).await;

    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    // Room for every stream to be served one wave after another, should the server queue them.
    let until = Instant::now() + IO_TIMEOUT + Duration::from_millis(SLEEP_MS) * total;
    let mut unexpected = None;
    while answered.len() + refused.len() < total as usize {
        match conn.next_frame(until).await {
            Err(ended) => {
                unexpected = Some(format!("the connection ended: {ended:?}"));
                break;
            }
            Ok(frame) if frame.is(GOAWAY) => {
                unexpected = Some(format!("GOAWAY {}", h2::error_name(frame.error_code().unwrap_or(0))));
                break;
            }
            Ok(frame) if frame.is(RST_STREAM) && streams.contains(&frame.stream_id) => {
                refused.push((frame.stream_id, frame.error_code().unwrap_or(0)));
            }
            Ok(frame) if frame.fields.is_some() && streams.contains(&frame.stream_id) => {
                if !answered.contains(&frame.stream_id) {
                    answered.push(frame.stream_id);
                }
            }
            Ok(_) => {}
        }
    }
    f.log.push_str(&format!("  answered: {answered:?}; reset: {refused:?}\n"));
    f.check_on(
        &conn,
        unexpected.is_none(),
        format!("no GOAWAY or close while the streams run: {unexpected:?}"),
    );
    f.check(
        answered.len() + refused.len() == total as usize,
        format!("every stream answered or refused ({total})"),
    );
    f.check(refused.iter().all(|(_, code)| *code == REFUSED_STREAM), "resets are REFUSED_STREAM");
    f.check(answered.len() >= MAX_STREAMS as usize, format!("at least {MAX_STREAMS} streams were served"));
    let most = f.upstream.most_in_flight();
    f.check(
        most <= MAX_STREAMS as usize,
        format!("no more than {MAX_STREAMS} served at once (the upstream saw {most})"),
    );
    let last_served = answered.iter().max().copied().unwrap_or(0);
    f.check(
        refused.iter().all(|(id, _)| *id > last_served),
        "the refused streams are the excess ones, not earlier streams",
    );

    // The connection still serves a stream within the limit.
    let fields = f.get("/private/after", Some(&secret), "conc-after");
    let after = conn.get(&fields, None).await;
    f.check_on(&conn, after.status == Some(200), format!("a later stream → 200, got {after}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_max_concurrent_streams_are_refused() {
    conformance("concurrency", concurrency, |f| {
        let served = f
            .upstream
            .requests()
            .iter()
            .filter(|r| r.header(PROBE_HEADER).is_some_and(|p| p.starts_with("conc-") && p != "conc-after"))
            .count();
        assert!(
            served >= MAX_STREAMS as usize,
            "at least {MAX_STREAMS} of the streams must reach the upstream, {served} did"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// Frames on streams that are not open
// ---------------------------------------------------------------------------------------------

/// The server's RST_STREAM for `stream_id`, or its GOAWAY, or its close.
async fn reaction(conn: &mut Conn, stream_id: u32) -> Outcome {
    match conn.wait_for(deadline(), |f| f.is(GOAWAY) || (f.is(RST_STREAM) && f.stream_id == stream_id)).await
    {
        Ok(frame) if frame.is(GOAWAY) => Outcome::GoAway(frame.error_code().unwrap_or(0)),
        Ok(frame) => Outcome::Reset(frame.error_code().unwrap_or(0)),
        Err(Ended::Closed) => Outcome::Closed,
        Err(Ended::TimedOut) => Outcome::TimedOut,
    }
}

/// DATA on a stream that is closed (both sides ended), on a stream the client already
/// half-closed with END_STREAM, and on a stream that was never opened: each is a stream error
/// STREAM_CLOSED or a connection error (RFC 9113 §5.1, §6.1); none of it may be taken as a
/// request body, and the server keeps serving.
async fn closed_stream(f: &mut Fixture) {
    let errors = [STREAM_CLOSED, PROTOCOL_ERROR];
    let secret = f.secret();

    // Closed: a complete exchange, then DATA on it.
    let mut conn = f.conn().await;
    let done = conn.get(&f.get("/private/done", Some(&secret), "closed-done"), None).await;
    f.check_on(
        &conn,
        done.status == Some(200) && done.ended,
        format!("the first exchange → 200, got {done}"),
    );
    let _ = conn.try_send(&h2::frame(DATA, END_STREAM, 1, b"x-test-probe: reject-late-data")).await;
    let got = reaction(&mut conn, 1).await;
    f.check_on(
        &conn,
        got.is_error(&errors),
        format!("DATA on a closed stream → STREAM_CLOSED error, got {got}"),
    );

    // Half-closed (remote): the request ended with END_STREAM, the response is still coming.
    let mut conn = f.conn().await;
    let fields =
        f.fields("GET", "/private/half", Some(&secret), "closed-half", &[("x-test-sleep-ms", "1000")]);
    let id = conn.request(&fields, None).await;
    let _ = conn.try_send(&h2::frame(DATA, END_STREAM, id, b"smuggled body")).await;
    let got = reaction(&mut conn, id).await;
    f.check_on(
        &conn,
        got.is_error(&errors),
        format!("DATA after END_STREAM → STREAM_CLOSED error, got {got}"),
    );

    // Idle: a stream id the client never opened.
    let mut conn = f.conn().await;
    let _ = conn.try_send(&h2::frame(DATA, END_STREAM, 7, b"nobody asked")).await;
    let got = reaction(&mut conn, 7).await;
    f.check_on(&conn, got.is_error(&errors), format!("DATA on an idle stream → connection error, got {got}"));

    f.server_answers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_on_closed_or_idle_streams_is_an_error() {
    conformance("closed_stream", closed_stream, |f| {
        // The body sent after END_STREAM must not have been taken as the request's body (the
        // request itself may or may not have been forwarded before the stream error).
        let half = f.upstream.requests().into_iter().find(|r| r.header(PROBE_HEADER) == Some("closed-half"));
        if let Some(half) = half {
            assert!(half.body.is_empty(), "DATA after END_STREAM reached the upstream\n{half:?}");
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The encoder itself
// ---------------------------------------------------------------------------------------------

/// The literal encoder agrees with RFC 7541's examples and with an independent decoder, so the
/// blocks above say what they claim to.
#[test]
fn hpack_literals_follow_rfc_7541() {
    // C.1.2: 1337 with a 5-bit prefix.
    let mut out = Vec::new();
    h2::hpack_int(&mut out, 0, 5, 1337);
    assert_eq!(out, [0x1f, 0x9a, 0x0a]);
    // C.2.2: literal without indexing, indexed name — ours always uses a new name.
    assert_eq!(h2::literal_block(&[("a", "b")]), [0x00, 0x01, b'a', 0x01, b'b']);
    let fields = [("x-long", "v".repeat(300)), (":path", "/x y\r\n".to_owned())];
    let decoded = loona_hpack::Decoder::new().decode(&h2::literal_block(&fields)).expect("decodes");
    let want: Vec<(Vec<u8>, Vec<u8>)> =
        fields.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())).collect();
    assert_eq!(decoded, want);
}

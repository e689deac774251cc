//! Hardening, round 2: one test per attack class an outside review found (issue 11), each
//! aimed at the class rather than one spelling, each checking what the client got and what the
//! upstream saw. HTTP/1 cases go out as raw bytes ([`RawRequest`]); HTTP/2 ones through a real
//! HTTP/2 client, or frame by frame ([`support::h2::Conn`]) where a client library would refuse
//! to send them.

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::AtomicUsize;

use base64::Engine;
use support::h2::{self, Conn, Outcome};

use super::*;

/// A raw HTTP/1.1 request with `Connection: close`, `Host: host`, a probe header to find it
/// upstream and `extra` lines (and an empty body for POST/PUT/DELETE). Returns the probe too.
fn raw(method: &str, target: &str, host: &str, extra: &[String]) -> (Vec<u8>, String) {
    let mut request = RawRequest::new(method, target);
    request.lines[0] = format!("Host: {host}").into_bytes();
    for line in extra {
        request = request.line(line);
    }
    if method == "POST" || method == "PUT" || method == "DELETE" {
        request = request.line("Content-Length: 0");
    }
    (request.bytes(), request.probe)
}

const WRITER: &str = "writer-Z8pQ3mV6nB1xK4cH";
const ADMIN: &str = "admin-R2tY7uI0oP5aS9dFg";

// =============================================================================================
// 1. Method overrides: judged the way upstream frameworks read them
// =============================================================================================

async fn override_gateway(upstream: &RecordingUpstream) -> TestGateway {
    GatewayConfig::new()
        .route(
            Route::new("/", &upstream.url())
                .scope("GET", &["read"])
                .scope("DELETE", &["admin"])
                .scope("*", &["write"]),
        )
        .key(Key::new("writer01", "writer", WRITER, &["read", "write"]))
        .key(Key::new("admin001", "admin", ADMIN, &["read", "write", "admin"]))
        .start()
        .await
}

/// (extra header lines, query) that ask the upstream to run DELETE, in every spelling the
/// frameworks accept.
fn delete_overrides() -> Vec<(Vec<String>, &'static str)> {
    let mut cases = Vec::new();
    for name in ["X-HTTP-Method-Override", "x-http-method", "X-Method-Override", "x_http_method_override"] {
        for value in ["delete", "Delete", " DELETE ", "dElEtE", "get, delete", "delete\t"] {
            cases.push((vec![format!("{name}: {value}")], ""));
        }
    }
    for query in [
        "?_method=delete",
        "?_method=DELETE",
        "?_METHOD=delete",
        "?%5Fmethod=delete",
        "?_method=%64elete",
        "?a=1&_method=+delete+",
    ] {
        cases.push((Vec::new(), query));
    }
    cases
}

#[tokio::test]
async fn method_override_class_needs_the_scope_of_the_method_frameworks_will_run() {
    let upstream = RecordingUpstream::start().await;
    let gateway = override_gateway(&upstream).await;
    let cases = delete_overrides();
    let mut failures = Vec::new();
    for (lines, query) in &cases {
        for (method, key, want) in [("POST", WRITER, 403), ("GET", WRITER, 403), ("POST", ADMIN, 200)] {
            let mut extra = lines.clone();
            extra.push(format!("x-api-key: {key}"));
            let (request, probe) = raw(method, &format!("/thing{query}"), "127.0.0.1", &extra);
            let got = gateway.raw(&request).await;
            let upstream_saw = seen_probe(&upstream, &probe);
            let ok = match want {
                403 => {
                    got.status() == Some(403)
                        && got.error_code().as_deref() == Some("insufficient_scope")
                        && upstream_saw.is_none()
                }
                _ => got.status() == Some(200) && upstream_saw.is_some(),
            };
            if !ok {
                failures.push(format!(
                    "{method} {lines:?} {query} as {}: expected {want}\n{got}\nupstream saw: {upstream_saw:?}",
                    if key == ADMIN { "admin" } else { "writer" }
                ));
            }
        }
    }
    assert_no_failures("override cases over HTTP/1.1", cases.len() * 3, &failures);

    // HTTP/2: the same judgement through a real HTTP/2 client.
    let mut failures = Vec::new();
    for (lines, query) in &cases {
        let mut call =
            gateway.request(Method::POST, &format!("/thing{query}")).http2().header("x-api-key", WRITER);
        for line in lines {
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            call = call.header(name.trim(), value.trim());
        }
        let got = call.send().await;
        if got.status != 403
            || got.error_code().as_deref() != Some("insufficient_scope")
            || upstream.received(&got).is_some()
        {
            failures.push(format!("{lines:?} {query}: expected 403\n{got}"));
        }
    }
    assert_no_failures("override cases over HTTP/2", cases.len(), &failures);
}

#[tokio::test]
async fn method_override_class_refuses_values_that_are_no_method() {
    let upstream = RecordingUpstream::start().await;
    let gateway = override_gateway(&upstream).await;
    let cases: [(&str, &str); 5] = [
        ("X-HTTP-Method-Override: DE LETE", ""),
        ("X-HTTP-Method-Override: del(ete", ""),
        ("X-Method-Override: \"DELETE\"", ""),
        ("x-other: 1", "?_method=DE%20LETE"),
        ("x-other: 1", "?_method=%28delete%29"),
    ];
    let mut failures = Vec::new();
    for (line, query) in cases {
        let extra = vec![line.to_string(), format!("x-api-key: {ADMIN}")];
        let (request, probe) = raw("POST", &format!("/thing{query}"), "127.0.0.1", &extra);
        let got = gateway.raw(&request).await;
        let upstream_saw = seen_probe(&upstream, &probe);
        if got.status() != Some(400)
            || got.error_code().as_deref() != Some("bad_request")
            || upstream_saw.is_some()
        {
            failures.push(format!(
                "{line} {query}: expected 400 bad_request\n{got}\nupstream saw: {upstream_saw:?}"
            ));
        }
    }
    assert_no_failures("malformed overrides", cases.len(), &failures);
    // An override naming a method the key holds passes, and reaches the upstream as sent.
    let (request, probe) = raw("POST", "/thing?_method=put", "127.0.0.1", &[format!("x-api-key: {WRITER}")]);
    let got = gateway.raw(&request).await;
    assert_eq!(got.status(), Some(200), "{got}");
    assert_eq!(seen_probe(&upstream, &probe).map(|r| r.uri), Some("/thing?_method=put".to_string()));
}

// =============================================================================================
// 2. Host values that parse two ways
// =============================================================================================

/// A protected virtual host `admin.example.com` (upstream base `/adm`) before a public
/// catch-all (`/pub`): a Host read two ways would land on one while meaning the other.
async fn vhost_gateway(upstream: &RecordingUpstream) -> TestGateway {
    GatewayConfig::new()
        .route(
            Route::new("/", &format!("{}/adm", upstream.url()))
                .host("admin.example.com")
                .scope("*", &["admin"]),
        )
        .route(Route::new("/", &format!("{}/pub", upstream.url())).public())
        .key(Key::new("admin001", "admin", ADMIN, &["admin"]))
        .start()
        .await
}

#[tokio::test]
async fn host_values_that_parse_two_ways_are_refused_and_the_parsed_one_travels() {
    let upstream = RecordingUpstream::start().await;
    let gateway = vhost_gateway(&upstream).await;
    let two_way = [
        "admin.example.com:1:2",
        "admin.example.com:80:x",
        "other.example:80:admin.example.com",
        "a.example:@admin.example.com",
        "admin.example.com:@a.example",
        "user:pass@admin.example.com",
        "admin.example.com@a.example",
        "admin.example.com:",
        "admin.example.com:123456",
        "admin.example.com:65536",
        "admin.example.com:-1",
        "admin.example.com:0x50",
        ":80",
        "admin.example.com,a.example",
        "admin.example.com;a.example",
        "admin.example.com/../a.example",
        "admin%2eexample.com",
        "[::1",
        "[::1]junk",
        "[fe80::1%25eth0]",
    ];
    let mut failures = Vec::new();
    for host in two_way {
        // Both in Host and in an absolute-form target, with no key: none may reach any upstream.
        for target in ["/x".to_string(), format!("http://{host}/x")] {
            let (request, probe) = raw("GET", &target, host, &[]);
            let got = gateway.raw(&request).await;
            let upstream_saw = seen_probe(&upstream, &probe);
            // A target that is no URI at all is refused by hyper's parser itself (a bare 400)
            // before keygate sees it; anything else gets keygate's JSON 400.
            let code_ok = got.error_code().as_deref() == Some("bad_request")
                || (target.starts_with("http") && got.body().is_empty());
            if got.status() != Some(400) || !code_ok || upstream_saw.is_some() {
                failures.push(format!(
                    "Host {host:?} target {target}: expected 400\n{got}\nupstream saw: {upstream_saw:?}"
                ));
            }
        }
    }
    assert_no_failures("two-way Host values", two_way.len() * 2, &failures);

    // What travels upstream is the parsed host[:port]; the admin vhost still needs its key.
    let (request, probe) = raw("GET", "/x", "Admin.Example.COM.:8443", &[format!("x-api-key: {ADMIN}")]);
    let got = gateway.raw(&request).await;
    assert_eq!(got.status(), Some(200), "{got}");
    let upstream_saw = seen_probe(&upstream, &probe).expect("forwarded");
    assert!(upstream_saw.uri.starts_with("/adm/"), "{upstream_saw:?}");
    assert_eq!(upstream_saw.header("x-forwarded-host"), Some("Admin.Example.COM.:8443"));
    let (request, _) = raw("GET", "/x", "admin.example.com:8443", &[]);
    assert_eq!(gateway.raw(&request).await.status(), Some(401));
}

/// Sends one HTTP/2 request (literal header fields) on a fresh connection and returns what
/// the server did about it: a response status, a reset, a GOAWAY, a close, or a timeout.
async fn h2_request(addr: SocketAddr, fields: &[(&str, &str)]) -> Outcome {
    let mut conn = Conn::connect(addr).await;
    let stream_id = conn.request(fields, None).await;
    conn.outcome(stream_id, Instant::now() + IO_TIMEOUT).await
}

#[tokio::test]
async fn host_values_that_parse_two_ways_are_refused_over_http2_too() {
    let upstream = RecordingUpstream::start().await;
    let gateway = vhost_gateway(&upstream).await;
    let cases = [
        "admin.example.com:1:2",
        "a.example:@admin.example.com",
        "admin.example.com:",
        "admin.example.com:99999",
        "127.1",
        "[0::1]",
        "other.example",
        "other.example:8080",
    ];
    let mut failures = Vec::new();
    for authority in cases {
        let probe = next_probe();
        for host_header in [None, Some(authority)] {
            let mut fields = vec![
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/x"),
                (":authority", authority),
                ("x-test-probe", probe.as_str()),
            ];
            if let Some(host) = host_header {
                fields.push(("host", host));
            }
            let got = h2_request(gateway.addr, &fields).await;
            let upstream_saw = seen_probe(&upstream, &probe);
            let valid = authority.starts_with("other.example");
            let ok = if valid {
                got == Outcome::Response(200)
                    && upstream_saw.as_ref().is_some_and(|r| r.uri.starts_with("/pub/"))
            } else {
                // A 400, or the stream or connection refused; never silence (a timeout).
                (got == Outcome::Response(400) || got.is_error(&[])) && upstream_saw.is_none()
            };
            if !ok {
                failures.push(format!(
                    "{authority:?} (host header {host_header:?}): got {got:?}, upstream saw {upstream_saw:?}"
                ));
            }
        }
    }
    assert_no_failures("HTTP/2 authorities", cases.len() * 2, &failures);
}

// =============================================================================================
// 3. Connection slots held by chatter
// =============================================================================================

/// Whether the gateway has closed `stream` (EOF or reset), reading and discarding what it
/// sends; false if it is still open after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends a PING every 200 ms (each answered with a PING ACK, so bytes move both ways) until the
/// gateway closes the connection (true) or 100 PINGs have gone out (false).
async fn ping_until_closed(conn: &mut Conn) -> bool {
    for i in 0u64..100 {
        // A write that cannot finish is a server that stopped reading yet holds the slot.
        match conn.try_send(&h2::frame(h2::PING, 0, 0, &i.to_be_bytes())).await {
            Ok(()) => {}
            Err(h2::Ended::Closed) => return true,
            Err(h2::Ended::TimedOut) => return false,
        }
        if conn.read_until(Instant::now() + Duration::from_millis(200)).await == h2::Ended::Closed {
            return true;
        }
    }
    false
}

/// One connection slot and a 1 s idle timeout: whoever holds the slot idly locks everyone out.
async fn one_slot_gateway(upstream: &RecordingUpstream) -> TestGateway {
    GatewayConfig::new()
        .server("idle_timeout", "\"1s\"")
        .server("max_connections", "1")
        .route(Route::new("/", &upstream.url()).public())
        .start()
        .await
}

#[tokio::test]
async fn chatter_class_an_http2_connection_that_only_pings_gives_its_slot_back() {
    let upstream = RecordingUpstream::start().await;
    let gateway = one_slot_gateway(&upstream).await;
    let mut chatter = Conn::connect(gateway.addr).await;
    // A PING every 200 ms keeps bytes moving both ways; no request is ever made. Each write is
    // answered (PING ACK), so this is exactly the chatter of the report.
    // 100 × 200 ms = 20 s of chatter: 20× the idle timeout before the test gives up.
    assert!(
        ping_until_closed(&mut chatter).await,
        "a PING-only HTTP/2 connection was still open after 20 s with idle_timeout = 1s"
    );
    // The one slot is free again: a real request gets through.
    let got = gateway.get("/after").send().await;
    assert_eq!(got.status, 200, "{got}");
}

#[tokio::test]
async fn chatter_class_a_stream_that_never_sends_its_body_does_not_hold_the_slot() {
    let upstream = RecordingUpstream::start().await;
    let gateway = one_slot_gateway(&upstream).await;
    let mut chatter = Conn::connect(gateway.addr).await;
    // HEADERS (END_HEADERS, no END_STREAM) for POST /upload with literal fields: the body is
    // promised and never comes.
    let fields =
        [(":method", "POST"), (":scheme", "http"), (":path", "/upload"), (":authority", "127.0.0.1")];
    let stream_id = chatter.stream_id();
    chatter
        .send(&h2::header_frames(stream_id, &h2::literal_block(&fields), false, h2::DEFAULT_MAX_FRAME))
        .await;
    // 100 × 200 ms = 20 s of chatter: 20× the idle timeout before the test gives up.
    assert!(
        ping_until_closed(&mut chatter).await,
        "a stalled HTTP/2 upload kept alive by PINGs still held its slot after 20 s"
    );
    let got = gateway.get("/after").send().await;
    assert_eq!(got.status, 200, "{got}");
}

/// A WebSocket upstream: answers the handshake properly (or with `accept`, when given), then
/// says nothing. Counts the handshakes it saw.
async fn websocket_upstream(accept: Option<&'static str>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&count);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let text = String::from_utf8_lossy(&head).to_string();
                let key = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("sec-websocket-key:").or_else(|| l.strip_prefix("Sec-WebSocket-Key:"))
                    })
                    .map(str::trim)
                    .unwrap_or("")
                    .to_string();
                let right = {
                    use sha1::Digest;
                    let mut sha = sha1::Sha1::new();
                    sha.update(key.as_bytes());
                    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
                    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
                };
                let accept_line = match accept {
                    Some("") => String::new(),
                    Some(wrong) => format!("Sec-WebSocket-Accept: {wrong}\r\n"),
                    None => format!("Sec-WebSocket-Accept: {right}\r\n"),
                };
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{accept_line}\r\n"
                );
                if stream.write_all(answer.as_bytes()).await.is_ok() {
                    // Silent, but echo whatever comes, until the peer goes.
                    loop {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if stream.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    (addr, count)
}

fn websocket_handshake() -> Vec<u8> {
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".to_vec()
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 1];
    let deadline = Instant::now() + IO_TIMEOUT;
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(1)) => head.push(buf[0]),
            other => panic!("no whole response head: {other:?} after {:?}", String::from_utf8_lossy(&head)),
        }
    }
    String::from_utf8_lossy(&head).to_string()
}

#[tokio::test]
async fn chatter_class_a_silent_websocket_tunnel_gives_its_slot_back() {
    let (ws, _) = websocket_upstream(None).await;
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .server("idle_timeout", "\"1s\"")
        .server("max_connections", "1")
        .route(Route::new("/ws", &format!("http://{ws}")).public())
        .route(Route::new("/", &upstream.url()).public())
        .start()
        .await;
    let mut client = TcpStream::connect(gateway.addr).await.expect("connect");
    client.write_all(&websocket_handshake()).await.expect("handshake");
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The tunnel works: bytes go through and come back.
    client.write_all(b"ping").await.expect("write");
    let mut echo = [0u8; 4];
    tokio::time::timeout(IO_TIMEOUT, client.read_exact(&mut echo))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&echo, b"ping");
    // Then silence: the tunnel must close (20× the idle timeout before the test gives up).
    assert!(closed_within(&mut client, Duration::from_secs(20)).await, "a silent tunnel stayed open");
    let got = gateway.get("/after").send().await;
    assert_eq!(got.status, 200, "the tunnel's slot was not given back: {got}");
}

#[tokio::test]
async fn upgrade_class_a_101_without_the_right_accept_is_never_relayed() {
    for accept in ["", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo", "d3JvbmcgYWNjZXB0IHZhbHVlIQ=="] {
        let (ws, handshakes) = websocket_upstream(Some(accept)).await;
        let gateway =
            GatewayConfig::new().route(Route::new("/", &format!("http://{ws}")).public()).start().await;
        let mut client = TcpStream::connect(gateway.addr).await.expect("connect");
        client.write_all(&websocket_handshake()).await.expect("handshake");
        let head = read_head(&mut client).await;
        assert!(head.starts_with("HTTP/1.1 502"), "accept {accept:?}: {head}");
        assert_eq!(handshakes.load(Ordering::SeqCst), 1, "the upstream saw the handshake once");
    }
    // The right accept is relayed.
    let (ws, _) = websocket_upstream(None).await;
    let gateway = GatewayConfig::new().route(Route::new("/", &format!("http://{ws}")).public()).start().await;
    let mut client = TcpStream::connect(gateway.addr).await.expect("connect");
    client.write_all(&websocket_handshake()).await.expect("handshake");
    let head = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
}

// =============================================================================================
// 7. Look-alike credentials: keygate-format keys travel nowhere
// =============================================================================================

#[tokio::test]
async fn stray_key_class_a_keygate_key_never_reaches_the_upstream_wherever_it_travels() {
    let upstream = RecordingUpstream::start().await;
    let owner = Key::generated("owner", &["read"]);
    let gateway = GatewayConfig::new()
        .route(Route::new("/open/", &upstream.url()).public())
        .route(Route::new("/", &upstream.url()))
        .key(owner.clone())
        .start()
        .await;
    let other = keygate::keys::generate("kg").expect("randomness").1;
    let secret_part = &other[12..40];
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{other}:"));
    let user_basic = base64::engine::general_purpose::STANDARD.encode(format!("user:{other}"));
    let encoded = other.replace('_', "%5F");
    // (extra header lines, query); what must survive is checked below.
    let carriers: Vec<(Vec<String>, String)> = vec![
        (vec![format!("x_api_key: {other}")], String::new()),
        (vec![format!("X-Api-Token: {other}")], String::new()),
        (vec![format!("Authorization: Token {other}")], String::new()),
        (vec![format!("Authorization: Basic {basic}")], String::new()),
        (vec![format!("Authorization: Basic {user_basic}")], String::new()),
        (vec![format!("Cookie: theme=dark; sid={other}; lang=en")], String::new()),
        (vec![format!("Cookie: theme=dark"), format!("Cookie: api_key={encoded}")], String::new()),
        (vec![format!("x-note: see {other} for details")], String::new()),
        (Vec::new(), format!("?x=1;api_key={other}&keep=1")),
        (Vec::new(), format!("?api_key[]={other}&keep=1")),
        (Vec::new(), format!("?keep=1&token={encoded}")),
        (Vec::new(), format!("?keep=1&k%65y={other}")),
    ];
    let mut failures = Vec::new();
    for (lines, query) in &carriers {
        for (path, with_key) in [("/open/x", false), ("/api/x", true)] {
            let mut extra = lines.clone();
            if with_key {
                extra.push(format!("x-api-key: {}", owner.secret));
            }
            let (request, probe) = raw("GET", &format!("{path}{query}"), "127.0.0.1", &extra);
            let got = gateway.raw(&request).await;
            let Some(upstream_saw) = seen_probe(&upstream, &probe) else {
                failures.push(format!("{lines:?} {query} on {path}: not forwarded\n{got}"));
                continue;
            };
            let everything = format!("{} {:?}", upstream_saw.uri, upstream_saw.headers);
            if everything.contains(secret_part)
                || everything.contains(&basic)
                || everything.contains(&user_basic)
            {
                failures.push(format!(
                    "{lines:?} {query} on {path}: the key reached the upstream: {upstream_saw:?}"
                ));
            }
            // Only what carried the key went: the rest of the request is intact.
            if !query.is_empty() && !upstream_saw.uri.contains("keep=1") {
                failures
                    .push(format!("{query} on {path}: an innocent parameter went too: {}", upstream_saw.uri));
            }
            if lines.iter().any(|l| l.contains("theme=dark"))
                && !upstream_saw.header_all("cookie").iter().any(|c| c.contains("theme=dark"))
            {
                failures.push(format!("{lines:?} on {path}: an innocent cookie went too: {upstream_saw:?}"));
            }
        }
    }
    assert_no_failures("stray-key carriers", carriers.len() * 2, &failures);

    // HTTP/2: the same carriers through a real HTTP/2 client.
    let mut failures = Vec::new();
    for (lines, query) in &carriers {
        let mut call = gateway.get(&format!("/api/x{query}")).http2().header("x-api-key", &owner.secret);
        for line in lines {
            let (name, value) = line.split_once(':').unwrap_or((line, ""));
            call = call.header(&name.trim().to_ascii_lowercase(), value.trim());
        }
        let got = call.send().await;
        let Some(upstream_saw) = upstream.received(&got) else {
            failures.push(format!("{lines:?} {query}: not forwarded\n{got}"));
            continue;
        };
        let everything = format!("{} {:?}", upstream_saw.uri, upstream_saw.headers);
        if everything.contains(secret_part) || everything.contains(&basic) || everything.contains(&user_basic)
        {
            failures.push(format!(
                "{lines:?} {query}: the key reached the upstream over HTTP/2: {upstream_saw:?}"
            ));
        }
    }
    assert_no_failures("stray-key carriers over HTTP/2", carriers.len(), &failures);

    // Free of false positives: the same shape with a broken checksum is someone else's data.
    let mut forged = other.clone();
    let last = forged.pop().unwrap_or('0');
    forged.push(if last == '0' { '1' } else { '0' });
    let (request, probe) = raw("GET", "/open/x", "127.0.0.1", &[format!("x-trace: {forged}")]);
    let got = gateway.raw(&request).await;
    assert_eq!(got.status(), Some(200), "{got}");
    assert_eq!(
        seen_probe(&upstream, &probe).and_then(|r| r.header("x-trace").map(str::to_string)),
        Some(forged)
    );
}

// =============================================================================================
// 5–6. Key files: planted links, modes, short imports
// =============================================================================================

/// A workspace for the real `keygate keys` binary.
fn key_workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("keygate.toml"),
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[auth]\nkeys_file = \"keys.toml\"\n\n[[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n",
    )
    .expect("write config");
    dir
}

async fn keygate(dir: &std::path::Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut command = support::keygate_command(dir);
    command.arg("-c").arg(dir.join("keygate.toml")).args(args);
    if stdin.is_some() {
        command.stdin(std::process::Stdio::piped());
    }
    let mut child = command.spawn().expect("run keygate");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).await.expect("stdin");
    }
    tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("keygate finished")
        .expect("keygate output")
}

#[tokio::test]
async fn key_file_class_writes_never_follow_a_planted_link_and_stay_private() {
    let dir = key_workspace();
    let decoy_dir = tempfile::tempdir().expect("decoy dir");
    let decoy = decoy_dir.path().join("stolen.toml");
    std::fs::write(&decoy, "# decoy\n").expect("decoy");
    // The old temporary name was `.keys.toml.tmp-<pid>`: plant a link under each name the next
    // few hundred processes could have (and a few random-looking ones).
    let last_pid: u32 = std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(1);
    for pid in last_pid..last_pid + 400 {
        let _ = std::os::unix::fs::symlink(&decoy, dir.path().join(format!(".keys.toml.tmp-{pid}")));
    }
    let created = keygate(dir.path(), &["keys", "create", "--name", "first", "--scope", "read"], None).await;
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    assert_eq!(std::fs::read_to_string(&decoy).expect("decoy"), "# decoy\n", "a planted link was followed");
    let keys = dir.path().join("keys.toml");
    let meta = std::fs::symlink_metadata(&keys).expect("keys.toml");
    assert!(meta.file_type().is_file(), "keys.toml must be a plain file, not a link");
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "a key file keygate creates is private");

    // A rewrite keeps the mode the operator chose.
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let again = keygate(dir.path(), &["keys", "create", "--name", "second"], None).await;
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert_eq!(std::fs::metadata(&keys).expect("keys.toml").permissions().mode() & 0o777, 0o640);
    assert_eq!(std::fs::read_to_string(&decoy).expect("decoy"), "# decoy\n");
    // No temporary file is left behind (the planted links are ours).
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn short_key_class_imports_never_store_a_guessable_key_or_a_large_part_of_one() {
    let dir = key_workspace();
    for short in ["abc123", "fifteen-chars-x"] {
        let out = keygate(dir.path(), &["keys", "import", "--name", "short"], Some(short)).await;
        assert!(!out.status.success(), "a {}-character key was imported", short.len());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("16"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.path().join("keys.toml")).unwrap_or_default();
        assert!(!text.contains(short) && !text.contains("short"), "{text}");
    }
    // 16 to 23 characters: accepted, but no tail.
    let medium = "medium-key-12345678";
    let out = keygate(dir.path(), &["keys", "import", "--name", "medium"], Some(medium)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(dir.path().join("keys.toml")).expect("keys.toml");
    assert!(!text.contains("tail") && !text.contains("345678"), "{text}");
    // 24 and more: the last six are kept to recognise it.
    let long = "a-long-imported-key-ABCDEF";
    let out = keygate(dir.path(), &["keys", "import", "--name", "long"], Some(long)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(dir.path().join("keys.toml")).expect("keys.toml");
    assert!(text.contains("tail = \"ABCDEF\""), "{text}");
}

// =============================================================================================
// Admin listener: DNS rebinding
// =============================================================================================

#[tokio::test]
async fn rebinding_class_the_admin_listener_answers_only_its_own_hosts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("keygate.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\nhosts = [\"ops.internal\"]\n\n[auth]\nkeys_file = \"keys.toml\"\n\n[[routes]]\nprefix = \"/\"\nupstream = \"http://127.0.0.1:9\"\n",
    )
    .expect("config");
    std::fs::write(dir.path().join("keys.toml"), "").expect("keys");
    let snapshot = keygate::config::load(&config).expect("config loads");
    let gateway = Arc::new(keygate::proxy::Gateway::new(snapshot));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let admin = tokio::spawn(keygate::admin::serve(listener, gateway));
    let port = addr.port();
    let ask = |host: String| {
        let request = format!("GET /status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        async move { support::raw_exchange(addr, request.as_bytes()).await }
    };
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "[::1]".into(),
        "ops.internal".into(),
        "OPS.internal.:9090".into(),
    ] {
        let got: RawExchange = ask(host.clone()).await;
        assert_eq!(got.status(), Some(200), "Host {host}: {got}");
    }
    for host in
        ["evil.example", "127.0.0.1.nip.io", "localhost.evil.example", "ops.internal.evil", "a:@127.0.0.1"]
    {
        let got = ask(host.to_string()).await;
        assert_eq!(got.status(), Some(421), "Host {host}: {got}");
        assert!(!got.body().windows(10).any(|w| w == b"generation"), "Host {host} saw the status: {got}");
    }
    admin.abort();
}

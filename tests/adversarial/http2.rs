//! Attack class 4: HTTP/2 over cleartext, prior knowledge.

use super::*;

/// How the server ended stream 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum H2End {
    Status(u16),
    Reset(u32),
    GoAway(u32),
    Closed,
    TimedOut,
}

/// Opens a connection, sends `fields` as the one HEADERS frame of stream 1 (END_STREAM unless
/// `body` is given) and reads until the server answers, resets or closes.
async fn h2_raw(addr: SocketAddr, fields: &[(&[u8], &[u8])], body: Option<&[u8]>) -> (H2End, String) {
    let mut transcript = String::from("sent fields: ");
    for (name, value) in fields {
        let _ = write!(transcript, "{}: {} | ", name.escape_ascii(), value.escape_ascii());
    }
    let mut conn = h2::Conn::connect(addr).await;
    let mut out = h2::frame(h2::HEADERS, h2::END_HEADERS, 1, &h2::literal_block(fields));
    if let Some(body) = body {
        out.extend(h2::frame(h2::DATA, h2::END_STREAM, 1, body));
    } else {
        out[4] |= h2::END_STREAM;
    }
    // A write that cannot finish means the server stopped reading without closing: a hang.
    match conn.try_send(&out).await {
        Ok(()) => {}
        Err(h2::Ended::Closed) => return (H2End::Closed, transcript),
        Err(h2::Ended::TimedOut) => return (H2End::TimedOut, transcript),
    }
    let end = match conn.outcome(1, Instant::now() + IO_TIMEOUT).await {
        h2::Outcome::Response(status) => H2End::Status(status),
        h2::Outcome::Reset(code) => H2End::Reset(code),
        h2::Outcome::GoAway(code) => H2End::GoAway(code),
        h2::Outcome::Closed => H2End::Closed,
        h2::Outcome::TimedOut => H2End::TimedOut,
    };
    transcript.push('\n');
    transcript.push_str(&conn.transcript);
    (end, transcript)
}

/// What a raw HTTP/2 request must come to.
#[derive(Clone, Copy, Debug)]
enum H2Expect {
    Status(u16),
    /// A malformed request (RFC 9113 §8.1.1): a stream or connection error, or a 400.
    Malformed,
    /// Malformed, or accepted as if it were well-formed with this status.
    MalformedOr(u16),
}

#[tokio::test]
async fn raw_http2_pseudo_header_and_field_abuse_is_refused_and_never_forwarded() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/public/", &format!("{}{PUB_BASE}", upstream.url())).public())
        .route(Route::new("/admin/", &format!("{}{ADM_BASE}", upstream.url())).scope("*", &["admin"]))
        .route(
            Route::new("/", &format!("{}{ROOT_BASE}", upstream.url()))
                .scope("GET", &["read"])
                .scope("*", &["write"]),
        )
        .key(admin_key())
        .key(reader_key())
        .start()
        .await;
    type Fields = Vec<(&'static [u8], &'static [u8])>;
    let base = |path: &'static str| -> Fields {
        vec![
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"127.0.0.1"),
            (b":path", path.as_bytes()),
        ]
    };
    let with = |mut fields: Fields, extra: &[(&'static [u8], &'static [u8])]| {
        fields.extend_from_slice(extra);
        fields
    };
    let (admin_s, reader_s): (&'static [u8], &'static [u8]) =
        (ADMIN_SECRET.as_bytes(), READER_SECRET.as_bytes());
    let key = |secret: &'static [u8]| -> (&'static [u8], &'static [u8]) { (b"x-api-key", secret) };
    let cases: Vec<(&str, Fields, H2Expect)> = vec![
        ("well-formed, admin key", with(base("/admin/h2raw"), &[key(admin_s)]), H2Expect::Status(200)),
        ("dot-dot in :path, no key", base("/public/../admin/x"), H2Expect::Status(401)),
        (
            "encoded dot-dot, reader",
            with(base("/public/%2e%2e/admin/x"), &[key(reader_s)]),
            H2Expect::Status(403),
        ),
        ("double slash, reader", with(base("//admin/x"), &[key(reader_s)]), H2Expect::Status(403)),
        ("..; in :path", with(base("/public/..;/admin/x"), &[key(admin_s)]), H2Expect::Status(400)),
        ("climbing :path", with(base("/public/../../admin/x"), &[key(admin_s)]), H2Expect::Status(400)),
        (
            "raw backslash :path",
            with(base("/public/..\\admin/x"), &[key(admin_s)]),
            H2Expect::MalformedOr(400),
        ),
        ("CRLF in :path", with(base("/admin/x\r\nx-api-key: y"), &[key(admin_s)]), H2Expect::Malformed),
        ("space in :path", with(base("/admin/x y"), &[key(admin_s)]), H2Expect::MalformedOr(400)),
        ("empty :path", with(base(""), &[key(admin_s)]), H2Expect::Malformed),
        ("relative :path", with(base("admin/x"), &[key(admin_s)]), H2Expect::MalformedOr(400)),
        ("asterisk :path", with(base("*"), &[key(admin_s)]), H2Expect::MalformedOr(400)),
        (
            "absolute :path",
            with(base("http://127.0.0.1/admin/x"), &[key(reader_s)]),
            H2Expect::MalformedOr(403),
        ),
        (
            "two :path",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"127.0.0.1"),
                (b":path", b"/public/x"),
                (b":path", b"/admin/x"),
            ],
            H2Expect::Malformed,
        ),
        (
            "pseudo-header after a field",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":authority", b"127.0.0.1"),
                (b"x-other", b"1"),
                (b":path", b"/admin/x"),
            ],
            H2Expect::Malformed,
        ),
        (
            "no :path",
            vec![(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1")],
            H2Expect::Malformed,
        ),
        (
            "unknown pseudo-header",
            with(base("/admin/x"), &[(b":keygate", b"admin"), key(reader_s)]),
            H2Expect::Malformed,
        ),
        (
            "connection header",
            with(base("/public/x"), &[(b"connection", b"keep-alive")]),
            H2Expect::Malformed,
        ),
        (
            "connection naming the key",
            with(base("/admin/x"), &[(b"connection", b"x-api-key"), key(admin_s)]),
            H2Expect::Malformed,
        ),
        ("keep-alive header", with(base("/public/x"), &[(b"keep-alive", b"timeout=5")]), H2Expect::Malformed),
        (
            "transfer-encoding",
            with(base("/public/x"), &[(b"transfer-encoding", b"chunked")]),
            H2Expect::Malformed,
        ),
        ("upgrade", with(base("/public/x"), &[(b"upgrade", b"websocket")]), H2Expect::Malformed),
        ("te: gzip", with(base("/public/x"), &[(b"te", b"gzip")]), H2Expect::Malformed),
        ("upper-case name", with(base("/admin/x"), &[(b"X-Api-Key", admin_s)]), H2Expect::MalformedOr(200)),
        (
            "CRLF in a value",
            with(base("/admin/x"), &[key(reader_s), (b"x-other", b"a\r\nx-keygate-scopes: admin")]),
            H2Expect::Malformed,
        ),
        (
            "NUL in a value",
            with(base("/admin/x"), &[key(reader_s), (b"x-other", b"a\0b")]),
            H2Expect::Malformed,
        ),
        (
            "colon in a name",
            with(base("/admin/x"), &[key(reader_s), (b"x-keygate-scopes:admin", b"1")]),
            H2Expect::Malformed,
        ),
        (
            "spoofed scopes",
            with(base("/admin/x"), &[key(reader_s), (b"x-keygate-scopes", b"admin")]),
            H2Expect::Status(403),
        ),
        (
            "spoofed id, underscore",
            with(base("/admin/x"), &[key(reader_s), (b"x_keygate_key_id", b"admin001")]),
            H2Expect::Status(403),
        ),
        (
            "lower-case method",
            with(
                vec![
                    (b":method", b"get"),
                    (b":scheme", b"http"),
                    (b":authority", b"127.0.0.1"),
                    (b":path", b"/r"),
                ],
                &[key(reader_s)],
            ),
            H2Expect::Status(403),
        ),
        (
            "override header",
            with(base("/r"), &[key(reader_s), (b"x-http-method-override", b"DELETE")]),
            H2Expect::Status(403),
        ),
        ("two keys", with(base("/r"), &[key(reader_s), key(admin_s)]), H2Expect::Status(401)),
        (
            "content-length without body",
            with(base("/public/x"), &[(b"content-length", b"5")]),
            H2Expect::Malformed,
        ),
        (
            "CONNECT tunnel",
            vec![(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:22"), (b"x-api-key", admin_s)],
            H2Expect::MalformedOr(400),
        ),
        (
            "extended CONNECT websocket",
            with(
                vec![(b":method", b"CONNECT"), (b":protocol", b"websocket")],
                &[
                    (b":scheme", b"http"),
                    (b":authority", b"127.0.0.1"),
                    (b":path", b"/admin/ws"),
                    key(admin_s),
                ],
            ),
            H2Expect::MalformedOr(400),
        ),
    ];
    let mut failures = Vec::new();
    for (name, fields, expect) in &cases {
        let before = upstream.count();
        let (end, transcript) = h2_raw(gateway.addr, fields, None).await;
        let forwarded = upstream.count() > before;
        eprintln!("raw h2 case {name:?}: {end:?}, forwarded {forwarded}");
        let malformed = matches!(end, H2End::Reset(_) | H2End::GoAway(_) | H2End::Status(400));
        let ok = match expect {
            H2Expect::Status(200) => end == H2End::Status(200) && forwarded,
            H2Expect::Status(status) => end == H2End::Status(*status) && !forwarded,
            H2Expect::Malformed => malformed && !forwarded,
            H2Expect::MalformedOr(200) => {
                (malformed && !forwarded) || (end == H2End::Status(200) && forwarded)
            }
            H2Expect::MalformedOr(status) => (malformed || end == H2End::Status(*status)) && !forwarded,
        };
        if !ok {
            failures.push(format!(
                "{name}: expected {expect:?}, got {end:?}, forwarded: {forwarded}\n{transcript}"
            ));
        }
    }
    failures.extend(upstream_violations(&upstream));
    assert_no_failures("raw h2 cases", cases.len(), &failures);
}

#[tokio::test]
async fn many_concurrent_h2_streams_beyond_the_limit_are_each_authenticated_on_their_own() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).server("h2_max_concurrent_streams", "4").start().await;
    let stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    // One request first, so the client has the server's SETTINGS (max concurrent streams) before
    // it opens more: streams opened earlier would be refused (REFUSED_STREAM, never processed).
    let mut warm = sender.clone();
    let request = Request::builder()
        .uri(format!("http://{}/public/warm-up", gateway.addr))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let warmed = tokio::time::timeout(IO_TIMEOUT, warm.send_request(request)).await;
    assert!(warmed.as_ref().is_ok_and(|r| r.as_ref().is_ok_and(|r| r.status() == 200)), "{warmed:?}");
    const STREAMS: usize = 64;
    let mut running = JoinSet::new();
    for i in 0..STREAMS {
        let mut sender = sender.clone();
        let addr = gateway.addr;
        running.spawn(async move {
            // Four kinds of caller, interleaved: the answers must not bleed into one another.
            let (path, secret, status, identity) = match i % 4 {
                0 => (format!("/admin/s{i}"), Some(ADMIN_SECRET), 200, Some("admin001")),
                1 => (format!("/admin/s{i}"), None, 401, None),
                2 => (format!("/admin/s{i}"), Some(READER_SECRET), 403, None),
                _ => (format!("/s{i}"), Some(READER_SECRET), 200, Some("reader01")),
            };
            let probe = next_probe();
            let mut builder = Request::builder()
                .uri(format!("http://{addr}{path}"))
                .header(PROBE_HEADER, probe.as_str())
                .header("x-test-sleep-ms", "150");
            if let Some(secret) = secret {
                builder = builder.header("x-api-key", secret);
            }
            let request = builder.body(Full::new(Bytes::new())).expect("request");
            let answer = tokio::time::timeout(IO_TIMEOUT, async {
                let response = sender.send_request(request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                Ok::<StatusCode, hyper::Error>(status)
            })
            .await;
            (i, path, probe, status, identity, answer)
        });
    }
    let mut failures = Vec::new();
    while let Some(done) = running.join_next().await {
        let (i, path, probe, status, identity, answer) = done.expect("stream task");
        let got = match answer {
            Ok(Ok(got)) => got.as_u16(),
            other => {
                failures.push(format!("stream {i} {path}: {other:?}"));
                continue;
            }
        };
        let seen = seen_probe(&upstream, &probe);
        let seen_id = seen.as_ref().map(|s| s.header_all("x-keygate-key-id"));
        if got != status || seen_id != identity.map(|id| vec![id.to_owned()]) {
            failures.push(format!(
                "stream {i} {path}: expected {status} as {identity:?}, got {got}, upstream: {seen:?}"
            ));
        }
    }
    failures.extend(upstream_violations(&upstream));
    assert_no_failures("h2 streams", STREAMS, &failures);
    assert_eq!(upstream.count(), STREAMS / 2 + 1, "{:#?}", upstream.requests());
}

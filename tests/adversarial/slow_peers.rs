//! Attack class 5: slow and stuck peers.

use super::*;

/// Sends `bytes` one at a time, `every` apart, until the server closes the connection; returns
/// how long the server took to close it, or `None` if it was still open after `limit`.
async fn trickle(addr: SocketAddr, bytes: Vec<u8>, every: Duration, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.ok()?;
    let mut buf = [0u8; 4096];
    for byte in bytes.iter().cycle().take(100_000) {
        if started.elapsed() > limit {
            return None;
        }
        if stream.write_all(&[*byte]).await.is_err() {
            return Some(started.elapsed());
        }
        // Pacing, and a look at whether the server has given up on us.
        match tokio::time::timeout(every, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    None
}

#[tokio::test]
async fn slowloris_heads_are_dropped_at_header_read_timeout_while_others_are_served() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream)
        .server("header_read_timeout", "\"1s\"")
        .server("idle_timeout", "\"30s\"")
        .start()
        .await;
    // A keyed request whose head never ends: a trickle of header lines.
    let mut head = RawRequest::get("/admin/slowloris").who(Who::Admin).keep_alive().bytes();
    head.truncate(head.len() - 2);
    for i in 0..200 {
        head.extend_from_slice(format!("X-Pad-{i}: slow\r\n").as_bytes());
    }
    let mut trickles = JoinSet::new();
    for _ in 0..20 {
        let bytes = head.clone();
        let addr = gateway.addr;
        trickles.spawn(trickle(addr, bytes, Duration::from_millis(100), Duration::from_secs(8)));
    }
    // Meanwhile normal clients are served.
    for i in 0..10 {
        let exchange =
            gateway.get(&format!("/admin/normal-{i}")).header("x-api-key", ADMIN_SECRET).send().await;
        assert_eq!(exchange.status, 200, "a normal client during a slowloris\n{exchange}");
    }
    let mut open = Vec::new();
    let mut took = Vec::new();
    while let Some(done) = trickles.join_next().await {
        match done.expect("trickle task") {
            Some(after) => took.push(after),
            None => open.push(()),
        }
    }
    eprintln!("slowloris connections closed after {took:?}");
    assert!(open.is_empty(), "{} of 20 slowloris connections were still open after 8 s", open.len());
    // The bound is what this test is about (the slowloris defence): 6 × header_read_timeout, so a
    // loaded machine cannot fail it, and a gateway without the timeout (trickles last ~8 s) does.
    assert!(took.iter().all(|t| *t < Duration::from_secs(6)), "header_read_timeout = 1s, but: {took:?}");
    assert!(
        !upstream.requests().iter().any(|r| r.uri.contains("slowloris")),
        "a slowloris request reached the upstream"
    );
}

#[tokio::test]
async fn a_stalled_request_body_is_cut_off_at_idle_timeout() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream)
        .server("idle_timeout", "\"1s\"")
        .server("header_read_timeout", "\"5s\"")
        .start()
        .await;
    let stalls = [
        (
            "content-length body",
            RawRequest::new("POST", "/public/stall-cl").keep_alive().body("x".repeat(100)),
            10,
        ),
        (
            "chunked body",
            RawRequest::new("POST", "/public/stall-chunked")
                .keep_alive()
                .line("Transfer-Encoding: chunked")
                .raw_body(format!("64\r\n{}", "y".repeat(100))),
            20,
        ),
    ];
    let mut failures = Vec::new();
    for (name, request, cut) in &stalls {
        let bytes = request.bytes();
        let mut conn = RawConn::open(gateway.addr).await;
        conn.send(&bytes[..bytes.len() - (request.body.len() - cut)]).await;
        let started = Instant::now();
        // 8 × idle_timeout: the test is that the stall is cut at all; a timeout here is a hang.
        let closed = conn.closed_within(Duration::from_secs(8)).await;
        let waited = started.elapsed();
        let answered_ok = parse_all(&conn.received, true).iter().any(|r| r.status == 200);
        if !closed || answered_ok || seen_probe(&upstream, &request.probe).is_some() {
            failures.push(format!(
                "{name}: closed {closed} after {waited:?}, answered 200: {answered_ok}\n{conn}"
            ));
        }
        eprintln!("{name}: stalled connection closed after {waited:?}");
    }
    assert_no_failures("stalled bodies", stalls.len(), &failures);
}

/// An upstream that accepts, reads whatever comes, and never answers.
async fn silent_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind silent upstream");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            held.push(tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            }));
        }
    });
    (addr, task)
}

/// An upstream that answers every request head with `script` and then closes (or, with
/// `hold`, keeps the connection open and silent).
async fn scripted_upstream(script: Vec<u8>, hold: bool) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind scripted upstream");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let script = script.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while find(&head, b"\r\n\r\n").is_none() && head.len() < 65_536 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = stream.write_all(&script).await;
                let _ = stream.flush().await;
                if hold {
                    while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_upstream_that_never_answers_is_504_at_request_timeout() {
    let (silent, _task) = silent_upstream().await;
    let gateway = GatewayConfig::new()
        .server("request_timeout", "\"500ms\"")
        .route(Route::new("/", &format!("http://{silent}")).public())
        .start()
        .await;
    for http2 in [false, true, false] {
        let mut call = gateway.get("/hang");
        if http2 {
            call = call.http2();
        }
        let started = Instant::now();
        let exchange = call.send().await;
        let waited = started.elapsed();
        assert_eq!(exchange.status, 504, "{exchange}");
        // A lower bound only: the 504 must come from request_timeout, not from anything sooner.
        assert!(waited >= Duration::from_millis(500), "504 after {waited:?}, before request_timeout (500ms)");
        assert_eq!(exchange.error_code().as_deref(), Some("upstream_timeout"), "{exchange}");
        assert!(
            exchange.header("content-type").is_some_and(|c| c.starts_with("application/json")),
            "{exchange}"
        );
        eprintln!("504 after {waited:?} (http2: {http2})");
    }
}

#[tokio::test]
async fn an_upstream_that_dies_or_stalls_mid_body_never_yields_a_complete_looking_response() {
    let x100 = "x".repeat(100);
    let scripts: Vec<(&str, String, bool)> = vec![
        (
            "content-length, then close",
            format!("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{x100}"),
            false,
        ),
        (
            "chunked, no last chunk, then close",
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n{x100}\r\n"),
            false,
        ),
        (
            "chunked, mid-chunk, then close",
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n{x100}"),
            false,
        ),
        (
            "content-length, then silence",
            format!("HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n{x100}"),
            true,
        ),
        (
            "chunked, then silence",
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n{x100}\r\n"),
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (name, script, hold) in &scripts {
        let (addr, _task) = scripted_upstream(script.clone().into_bytes(), *hold).await;
        let gateway = GatewayConfig::new()
            .server("idle_timeout", "\"1s\"")
            .server("request_timeout", "\"5s\"")
            .route(Route::new("/", &format!("http://{addr}")).public())
            .start()
            .await;
        // HTTP/1.1, raw: the framing the client got must show the response as cut short.
        let mut conn = RawConn::open(gateway.addr).await;
        conn.send(&RawRequest::get("/dying").keep_alive().bytes()).await;
        // 8 × idle_timeout: a close is demanded, and not reaching one in 8 s is a hang.
        let closed = conn.closed_within(Duration::from_secs(8)).await;
        let complete = matches!(parse_response(&conn.received, false, false), Ok(Parsed::Complete(..)));
        if !closed || complete || !conn.received.starts_with(b"HTTP/1.1 200") {
            failures
                .push(format!("{name} over HTTP/1.1: closed {closed}, looks complete {complete}\n{conn}"));
        }
        // HTTP/2: the stream must end in an error, not END_STREAM.
        // A reset is the answer; a client timeout would mean keygate hung on the stream.
        match gateway.get("/dying-h2").http2().try_send().await {
            Err(e) if timed_out(&e) => failures.push(format!("{name} over HTTP/2: no reset, timed out: {e}")),
            Err(_) => {}
            Ok(exchange) => failures.push(format!("{name} over HTTP/2: ended as if complete\n{exchange}")),
        }
    }
    assert_no_failures("dying upstreams", scripts.len() * 2, &failures);
}

/// How many idle connections the test below holds open.
const IDLE_CONNECTIONS: usize = 2_000;

/// Raises the soft open-file limit so that `needed` descriptors fit, or fails saying how.
fn ensure_open_files(needed: u64) {
    let (soft, hard) =
        rlimit::Resource::NOFILE.get().unwrap_or_else(|e| panic!("read the open-file limit: {e}"));
    if soft >= needed {
        return;
    }
    assert!(
        hard >= needed,
        "this test needs {needed} open files but the hard limit is {hard}: raise it (ulimit -Hn {needed})"
    );
    rlimit::Resource::NOFILE
        .set(needed, hard)
        .unwrap_or_else(|e| panic!("raise the open-file soft limit from {soft} to {needed}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_starve_a_normal_client() {
    // Each connection costs two descriptors here (client and server side share the process),
    // plus what the other tests in this binary hold at the same time.
    ensure_open_files(2 * IDLE_CONNECTIONS as u64 + 1_024);
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream)
        .server("header_read_timeout", "\"60s\"")
        .server("idle_timeout", "\"60s\"")
        .start()
        .await;
    let wanted = IDLE_CONNECTIONS;
    let mut idle = Vec::with_capacity(wanted);
    for batch in 0..wanted.div_ceil(200) {
        let mut opening = JoinSet::new();
        for i in 0..200.min(wanted - batch * 200) {
            let addr = gateway.addr;
            opening.spawn(async move {
                let mut stream =
                    tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr)).await.ok()?.ok()?;
                if i % 10 == 0 {
                    // Some have started a head and stopped.
                    stream.write_all(b"GET /admin/idle HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.ok()?;
                }
                Some(stream)
            });
        }
        while let Some(done) = opening.join_next().await {
            if let Some(stream) = done.expect("connect task") {
                idle.push(stream);
            }
        }
    }
    assert_eq!(idle.len(), wanted, "only {} of {wanted} idle connections opened", idle.len());
    let mut latencies = Vec::new();
    for i in 0..30 {
        let started = Instant::now();
        let exchange =
            gateway.get(&format!("/admin/busy-{i}")).header("x-api-key", ADMIN_SECRET).send().await;
        latencies.push(started.elapsed());
        assert_eq!(exchange.status, 200, "with {} idle connections open\n{exchange}", idle.len());
        upstream.expect_received(&exchange);
    }
    latencies.sort();
    eprintln!("with {} idle connections: median {:?}, max {:?}", idle.len(), latencies[15], latencies[29]);
    assert!(
        !upstream.requests().iter().any(|r| r.uri.contains("/admin/idle")),
        "a half-sent head was forwarded"
    );
}

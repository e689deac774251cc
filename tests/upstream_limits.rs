//! `upstream_max_connections`: a burst of requests, or one HTTP/2 client's many streams, queue
//! for the upstream's connection slots instead of opening a connection each; a request that
//! finds no slot within `request_timeout` gets 503 `upstream_busy`; the gauge
//! `keygate_upstream_connections{upstream}` shows the open connections.

mod support;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `count` GETs at once on one HTTP/2 connection to `gateway`; returns each status.
async fn http2_burst(gateway: std::net::SocketAddr, key: &Key, path: &str, count: usize) -> Vec<StatusCode> {
    let io = TokioIo::new(TcpStream::connect(gateway).await.expect("connect"));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut calls = Vec::new();
    for n in 0..count {
        let mut sender = sender.clone();
        let request = Request::builder()
            .method(Method::GET)
            .uri(format!("http://{gateway}{path}"))
            .header("x-api-key", &key.secret)
            .header("x-test-sleep-ms", "50")
            .header(PROBE_HEADER, format!("burst-{n}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        calls.push(tokio::spawn(async move {
            let response = sender.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, hyper::Error>(status)
        }));
    }
    let mut statuses = Vec::new();
    for call in calls {
        let status = tokio::time::timeout(IO_TIMEOUT * 3, call).await.expect("burst timed out");
        statuses.push(status.expect("task").expect("h2 request"));
    }
    statuses
}

/// A gateway with `upstream_max_connections = limit` and one protected route for `key`.
async fn limited(key: &Key, limit: &str, route: Route) -> support::TestGateway {
    GatewayConfig::new().server("upstream_max_connections", limit).route(route).key(key.clone()).start().await
}

#[tokio::test]
async fn a_burst_against_a_slow_upstream_queues_within_the_limit() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("burst", &["read"]);
    let gateway = limited(&key, "2", Route::new("/", &upstream.url())).await;
    let calls: Vec<_> = (0..12)
        .map(|_| {
            gateway.get("/slow").header("x-api-key", &key.secret).header("x-test-sleep-ms", "100").send()
        })
        .collect();
    let exchanges = join_all(calls).await;
    for exchange in &exchanges {
        assert_eq!(exchange.status, StatusCode::OK, "{exchange}");
        upstream.expect_received(exchange);
    }
    let conns = upstream.connections();
    assert!(conns.peak() <= 2, "the upstream saw {} connections at once (limit 2)", conns.peak());
    assert!(conns.accepted() <= 2, "keygate opened {} connections in all (limit 2)", conns.accepted());
}

#[tokio::test]
async fn one_http2_client_with_many_streams_stays_within_the_limit() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("streams", &["read"]);
    let gateway = limited(&key, "2", Route::new("/", &upstream.url())).await;
    let statuses = http2_burst(gateway.addr, &key, "/streams", 100).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "statuses: {statuses:?}");
    assert_eq!(upstream.count(), 100);
    let conns = upstream.connections();
    assert!(conns.peak() <= 2, "100 streams made {} upstream connections at once (limit 2)", conns.peak());
}

#[tokio::test]
async fn http2_upstream_streams_share_connections_within_the_limit() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("h2-streams", &["read"]);
    let gateway = limited(&key, "2", Route::new("/", &upstream.url()).field("protocol", "\"h2\"")).await;
    let statuses = http2_burst(gateway.addr, &key, "/h2streams", 100).await;
    assert!(statuses.iter().all(|s| *s == StatusCode::OK), "statuses: {statuses:?}");
    let seen = upstream.requests();
    assert_eq!(seen.len(), 100);
    assert!(seen.iter().all(|r| r.version == http::Version::HTTP_2), "not all over HTTP/2: {:?}", seen[0]);
    let conns = upstream.connections();
    assert!(conns.peak() <= 2, "{} upstream connections at once (limit 2)", conns.peak());
}

#[tokio::test]
async fn slots_held_past_request_timeout_answer_503_upstream_busy() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("busy", &["read"]);
    let gateway = GatewayConfig::new()
        .server("upstream_max_connections", "1")
        .server("request_timeout", "\"300ms\"")
        .route(Route::new("/", &upstream.url()))
        .key(key.clone())
        .start()
        .await;

    // The one slot: a large response the client stops reading after its head, so keygate's
    // upstream connection stays busy with it.
    let mut holder = TcpStream::connect(gateway.addr).await.expect("connect");
    let head = format!(
        "GET /held HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {}\r\nx-test-response-bytes: 33554432\r\n\r\n",
        key.secret
    );
    holder.write_all(head.as_bytes()).await.expect("write");
    let mut first = vec![0u8; 1024];
    let n = tokio::time::timeout(IO_TIMEOUT, holder.read(&mut first)).await.expect("head").expect("read");
    assert!(first[..n].starts_with(b"HTTP/1.1 200"), "{}", preview(&first[..n], 200));
    assert_eq!(upstream.connections().open(), 1);

    let got = gateway.get("/queued").header("x-api-key", &key.secret).send().await;
    assert_error(&got, 503, "upstream_busy");
    assert!(upstream.received(&got).is_none(), "the queued request reached the upstream\n{got}");
    assert_eq!(upstream.connections().accepted(), 1, "a second connection was opened\n{got}");

    // Once the slot is free again, requests go through.
    drop(holder);
    let got = poll_until_ok(|| gateway.get("/after").header("x-api-key", &key.secret).send()).await;
    upstream.expect_received(&got);
}

#[tokio::test]
async fn https_upstreams_through_hyper_util_stay_within_the_limit() {
    let ca = pki::Pki::new("limits CA");
    let upstream = RecordingUpstream::start_tls(ca.leaf("upstream").server(&[b"http/1.1"])).await;
    let ca_dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca_dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).expect("write ca.pem");
    let key = Key::generated("https-burst", &["read"]);
    let gateway = limited(
        &key,
        "2",
        Route::new("/", &upstream.https_url()).field("ca_file", &toml_str(&ca_file.to_string_lossy())),
    )
    .await;
    let calls: Vec<_> = (0..12)
        .map(|_| gateway.get("/tls").header("x-api-key", &key.secret).header("x-test-sleep-ms", "100").send())
        .collect();
    for exchange in join_all(calls).await {
        assert_eq!(exchange.status, StatusCode::OK, "{exchange}");
        upstream.expect_received(&exchange);
    }
    let conns = upstream.connections();
    assert!(conns.peak() <= 2, "the upstream saw {} TLS connections at once (limit 2)", conns.peak());
}

#[tokio::test]
async fn the_gauge_shows_open_upstream_connections() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("gauge", &["read"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = GatewayConfig::new()
        .server("upstream_max_connections", "3")
        .route(Route::new("/", &upstream.url()))
        .key(key.clone());
    std::fs::write(dir.path().join("keygate.toml"), config.gateway_toml()).expect("write config");
    std::fs::write(dir.path().join("keys.toml"), config.keys_toml()).expect("write keys");
    let gateway = WatchedGateway::start(&dir.path().join("keygate.toml")).await;
    let calls: Vec<_> = (0..6)
        .map(|_| gateway.get("/g").header("x-api-key", &key.secret).header("x-test-sleep-ms", "100").send())
        .collect();
    for exchange in join_all(calls).await {
        assert_eq!(exchange.status, StatusCode::OK, "{exchange}");
    }
    let open = upstream.connections().open();
    assert!((1..=3).contains(&open), "{open} connections open");
    let current = keygate::metrics::Current::default();
    let text = gateway.gateway.metrics().render(&current).expect("render");
    let line = format!("keygate_upstream_connections{{upstream=\"{}\"}} {open}", upstream.addr());
    assert!(text.contains(&line), "expected `{line}` in\n{text}");
}

/// Retries `call` until it answers 200 (a freed slot is noticed when the connection closes).
async fn poll_until_ok<F, Fut>(call: F) -> Exchange
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Exchange>,
{
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    loop {
        let got = call().await;
        if got.status == StatusCode::OK || tokio::time::Instant::now() > deadline {
            assert_eq!(got.status, StatusCode::OK, "{got}");
            return got;
        }
    }
}

//! The plain-HTTP upstream pool: connections are reused, a connection is reused only after its
//! response was read whole, connections an upstream declared finished are not reused, and a
//! reload keeps the warm connections.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::scripted::{raw_upstream, read_head};
use support::{GatewayConfig, RecordingUpstream, Route, WatchedGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn peers(upstream: &RecordingUpstream) -> Vec<SocketAddr> {
    upstream.requests().iter().map(|r| r.peer).collect()
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new().route(Route::new("/", &upstream.url()).public()).start().await;
    for i in 0..20 {
        let body = format!("request {i}");
        let exchange = gateway.request(http::Method::POST, "/echo").body(body.clone()).send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        assert_eq!(exchange.body, body.as_bytes(), "{exchange}");
    }
    let distinct: HashSet<_> = peers(&upstream).into_iter().collect();
    assert_eq!(upstream.count(), 20);
    assert_eq!(distinct.len(), 1, "20 sequential requests should reuse one connection: {distinct:?}");
}

#[tokio::test]
async fn a_response_the_client_abandons_is_never_reused() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new().route(Route::new("/", &upstream.url()).public()).start().await;

    // A 4 MiB answer whose client reads its head and hangs up: the rest of that response is
    // still on (or coming down) the upstream connection, which therefore must not be reused.
    let mut client = TcpStream::connect(gateway.addr).await.expect("connect");
    let request = format!(
        "GET /big HTTP/1.1\r\nHost: {}\r\nx-test-response-bytes: 4194304\r\nx-test-probe: abandoned\r\n\r\n",
        gateway.addr
    );
    client.write_all(request.as_bytes()).await.expect("send");
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut head))
        .await
        .expect("head within 10 s")
        .expect("read");
    assert!(head[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head[..n]));
    drop(client);
    let abandoned = peers(&upstream)[0];

    for i in 0..10 {
        let body = format!("after the abandoned one, {i}");
        let exchange = gateway.request(http::Method::POST, "/echo").body(body.clone()).send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        assert_eq!(exchange.body, body.as_bytes(), "a later response got other bytes: {exchange}");
        let seen = upstream.expect_received(&exchange);
        assert_ne!(seen.peer, abandoned, "the abandoned connection was reused");
    }
}

/// An upstream that answers one request per connection, saying so with `Connection: close`,
/// and then closes.
async fn close_after_each_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    raw_upstream(|mut stream, _| async move {
        if read_head(&mut stream).await {
            let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nonce";
            let _ = stream.write_all(answer).await;
            let _ = stream.shutdown().await;
        }
    })
    .await
}

#[tokio::test]
async fn a_connection_the_upstream_closes_is_not_reused() {
    let (addr, accepted) = close_after_each_upstream().await;
    let gateway =
        GatewayConfig::new().route(Route::new("/", &format!("http://{addr}")).public()).start().await;
    for _ in 0..5 {
        let exchange = gateway.get("/").send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        assert_eq!(exchange.body, &b"once"[..], "{exchange}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_reload_keeps_the_warm_upstream_connections() {
    let upstream = RecordingUpstream::start().await;
    let config = GatewayConfig::new().route(Route::new("/", &upstream.url()).public());
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("keygate.toml");
    std::fs::write(&path, config.gateway_toml()).expect("write keygate.toml");
    std::fs::write(dir.path().join("keys.toml"), config.keys_toml()).expect("write keys.toml");
    let gateway = WatchedGateway::start(&path).await;

    let first = gateway.get("/before").send().await;
    assert_eq!(first.status, 200, "{first}");
    let snapshot = keygate::config::load(&path).expect("reload the same files");
    gateway.gateway.replace(snapshot);
    let second = gateway.get("/after").send().await;
    assert_eq!(second.status, 200, "{second}");

    let (before, after) = (upstream.expect_received(&first), upstream.expect_received(&second));
    assert_eq!(before.peer, after.peer, "the reload dropped the pooled connection");
}

/// An upstream that answers the first request on each connection (keep-alive, body
/// `conn N`) and then, when a second request arrives on that connection, closes it without a
/// word: what an upstream closing an idle keep-alive connection looks like when keygate's
/// request crosses the close.
async fn closes_under_the_second_request() -> (SocketAddr, Arc<AtomicUsize>) {
    raw_upstream(|mut stream, n| async move {
        if !read_head(&mut stream).await {
            return;
        }
        let body = format!("conn {n}");
        let response = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        if stream.write_all(response.as_bytes()).await.is_ok() {
            // The next request is read and the connection dropped without an answer.
            read_head(&mut stream).await;
        }
    })
    .await
}

#[tokio::test]
async fn a_safe_request_crossing_an_idle_close_is_sent_again_on_a_new_connection() {
    let (addr, accepted) = closes_under_the_second_request().await;
    let gateway =
        GatewayConfig::new().route(Route::new("/", &format!("http://{addr}")).public()).start().await;
    let first = gateway.get("/first").send().await;
    assert_eq!((first.status.as_u16(), &first.body[..]), (200, &b"conn 1"[..]), "{first}");

    // Idle long enough for keygate to keep a copy of the next safe request.
    tokio::time::sleep(keygate::proxy::pool::REPLAY_AFTER_IDLE + Duration::from_millis(200)).await;
    let second = gateway.get("/second").send().await;
    assert_eq!((second.status.as_u16(), &second.body[..]), (200, &b"conn 2"[..]), "{second}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// A gateway in front of [`closes_under_the_second_request`] whose one pooled connection has
/// served a request and then sat idle long enough for keygate to keep a copy of a safe request:
/// the next request crosses the upstream's close.
async fn one_idle_pooled_connection() -> (support::TestGateway, Arc<AtomicUsize>) {
    let (addr, accepted) = closes_under_the_second_request().await;
    let gateway =
        GatewayConfig::new().route(Route::new("/", &format!("http://{addr}")).public()).start().await;
    let first = gateway.get("/first").send().await;
    assert_eq!(first.status, 200, "{first}");
    tokio::time::sleep(keygate::proxy::pool::REPLAY_AFTER_IDLE + Duration::from_millis(200)).await;
    (gateway, accepted)
}

#[tokio::test]
async fn a_request_with_a_body_is_never_sent_twice() {
    let (gateway, accepted) = one_idle_pooled_connection().await;
    let post = gateway.request(http::Method::POST, "/charge").body("amount=10").send().await;
    support::assert_error(&post, 502, "upstream_unavailable");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the POST was sent again");
}

#[tokio::test]
async fn a_safe_request_with_a_method_override_is_never_sent_twice() {
    // A GET that asks the upstream framework to run POST (or DELETE) is as unsafe as a POST.
    for (header, query) in [("x-http-method-override", ""), ("x-other", "?_method=delete")] {
        let (gateway, accepted) = one_idle_pooled_connection().await;
        let overridden = gateway.get(&format!("/charge{query}")).header(header, "POST").send().await;
        support::assert_error(&overridden, 502, "upstream_unavailable");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the overridden GET was sent again ({header} {query})"
        );
    }
}

//! `workers = N`: the real `keygate serve` runs N worker threads on one listening socket, and
//! they behave as one gateway: every connection served, one `max_connections` cap across them
//! all, and a SIGTERM drains what every worker has in flight.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::poll::{Attempts, DEADLINE};
use support::process::Served;
use support::{GatewayConfig, Key, PROBE_HEADER, RecordingUpstream, Route};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Writes the gateway (with an admin listener, which `Served` waits for) and its keys.
fn write_config(dir: &Path, config: &GatewayConfig) -> PathBuf {
    let path = dir.join("keygate.toml");
    let toml = format!("{}\n[admin]\nlisten = \"127.0.0.1:0\"\n", config.gateway_toml());
    std::fs::write(&path, toml).expect("write keygate.toml");
    std::fs::write(dir.join("keys.toml"), config.keys_toml()).expect("write keys.toml");
    path
}

fn two_workers(upstream: &RecordingUpstream, key: &Key) -> GatewayConfig {
    GatewayConfig::new().server("workers", "2").route(Route::new("/", &upstream.url())).key(key.clone())
}

/// The names of the process's threads (Linux: /proc/PID/task/*/comm).
fn thread_names(pid: u32) -> Vec<String> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("read /proc/PID/task");
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect()
}

#[tokio::test]
async fn two_workers_serve_every_connection_as_one_gateway() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("two-workers", &["read"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway = Served::start(&write_config(dir.path(), &two_workers(&upstream, &key))).await;

    // The worker threads start right after "listening on" is logged, and name themselves.
    let workers = |names: &[String]| names.iter().filter(|n| n.starts_with("keygate-worker")).count();
    let mut names = Vec::new();
    let mut poll = Attempts::within(DEADLINE);
    while poll.again().await {
        names = thread_names(gateway.pid());
        if workers(&names) >= 1 {
            break;
        }
    }
    assert_eq!(
        workers(&names),
        1,
        "workers = 2 is the main thread and one keygate-worker thread ({}); threads: {names:?}",
        poll.report()
    );

    // Many connections at once, so both workers accept some.
    let calls: Vec<_> = (0..48).map(|_| tokio::spawn(gateway.get("/spread", &key.secret).send())).collect();
    for call in calls {
        let exchange = &call.await.expect("the request task");
        assert_eq!(exchange.status, 200, "{exchange}");
        let seen =
            upstream.received(exchange).unwrap_or_else(|| panic!("the upstream never saw it\n{exchange}"));
        assert_eq!(seen.header("x-api-key"), None, "the key reached the upstream\n{exchange}");
        assert_eq!(seen.header("x-keygate-key-id"), Some(key.id.as_str()), "{exchange}");
    }
    assert_eq!(upstream.count(), 48);
    gateway.terminate().await;
}

/// One keep-alive GET on `stream`; the whole response head and body as text.
async fn get_on(stream: &mut TcpStream, key: &Key, probe: &str) -> String {
    let request = format!(
        "GET /held HTTP/1.1\r\nhost: gateway\r\nx-api-key: {}\r\n{PROBE_HEADER}: {probe}\r\n\r\n",
        key.secret
    );
    stream.write_all(request.as_bytes()).await.expect("write the request");
    read_response(stream, DEADLINE).await.unwrap_or_else(|| panic!("no whole response for {probe}"))
}

/// Reads one response with a content-length body, or None if none came whole within `within`.
async fn read_response(stream: &mut TcpStream, within: Duration) -> Option<String> {
    support::read_http1_response(stream, within).await.ok()
}

#[tokio::test]
async fn max_connections_is_one_cap_across_workers() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("capped", &["read"]);
    let config = two_workers(&upstream, &key)
        .server("max_connections", "2")
        .server("idle_timeout", "\"60s\"")
        .server("header_read_timeout", "\"60s\"");
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway = Served::start(&write_config(dir.path(), &config)).await;

    // Two connections, each proven accepted by a served request, then held open.
    let mut first = TcpStream::connect(gateway.addr).await.expect("connect 1");
    let mut second = TcpStream::connect(gateway.addr).await.expect("connect 2");
    for (n, stream) in [&mut first, &mut second].into_iter().enumerate() {
        let response = get_on(stream, &key, &format!("held-{n}")).await;
        assert!(response.starts_with("HTTP/1.1 200"), "connection {n}: {response}");
    }

    // Per-worker caps would let a third in on whichever worker holds fewer than two.
    let mut third = TcpStream::connect(gateway.addr).await.expect("connect 3 (kernel accept queue)");
    let request = format!("GET /third HTTP/1.1\r\nhost: gateway\r\nx-api-key: {}\r\n\r\n", key.secret);
    third.write_all(request.as_bytes()).await.expect("write on the third connection");
    let early = read_response(&mut third, Duration::from_millis(1500)).await;
    assert!(early.is_none(), "with max_connections = 2 over two workers, a third was answered: {early:?}");
    assert!(upstream.requests().iter().all(|r| r.uri != "/third"), "the third request reached the upstream");

    drop(first);
    let answered = read_response(&mut third, DEADLINE).await;
    assert!(
        answered.as_deref().is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        "closing one connection did not let the third in: {answered:?}"
    );
    gateway.terminate().await;
}

#[tokio::test]
async fn sigterm_drains_what_every_worker_has_in_flight() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("draining", &["read"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let gateway = Served::start(&write_config(dir.path(), &two_workers(&upstream, &key))).await;

    // Slow requests on many connections, so both workers hold some when the signal comes.
    let in_flight: Vec<_> = (0..16)
        .map(|_| tokio::spawn(gateway.get("/slow", &key.secret).header("x-test-sleep-ms", "1500").send()))
        .collect();
    let mut poll = Attempts::within(DEADLINE);
    while poll.again().await && upstream.count() < 16 {}
    assert_eq!(upstream.count(), 16, "the slow requests did not all reach the upstream ({})", poll.report());

    gateway.terminate().await;
    for request in in_flight {
        let exchange = request.await.expect("the request task");
        assert_eq!(exchange.status, 200, "an in-flight request was cut by the drain\n{exchange}");
    }
}

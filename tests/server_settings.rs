//! Pins the connection-level settings that protect keygate, by behaviour, so that a hyper,
//! hyper-util or h2 upgrade (or a refactor of the builder in src/server.rs) cannot silently
//! loosen them: the HTTP/1 header read timeout (which needs a timer to work at all), the
//! request-head size limit, the HTTP/2 SETTINGS keygate advertises (MAX_CONCURRENT_STREAMS,
//! MAX_HEADER_LIST_SIZE) and enforces, and the idle timeout over HTTP/2.
//!
//! HTTP/2 is spoken here with frames built by hand ([`support::h2`]), so the client never
//! second-guesses the server.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::h2::{
    self, Conn, DATA, END_HEADERS, END_STREAM, Ended, GOAWAY, HEADERS, Outcome, REFUSED_STREAM, RST_STREAM,
    SETTINGS_MAX_CONCURRENT_STREAMS, SETTINGS_MAX_HEADER_LIST_SIZE,
};
use support::{GatewayConfig, IO_TIMEOUT, Key, RecordingUpstream, Route, TestGateway, raw_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A request's header block: the pseudo-headers for `addr` and `path`, then `extra`.
fn request_block(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    h2::literal_block(&h2::request_fields("http", &addr.to_string(), "GET", path, extra))
}

/// Sends a request's header block on `stream_id`, split into HEADERS + CONTINUATION frames of
/// at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE).
async fn send_request(conn: &mut Conn, stream_id: u32, block: &[u8]) {
    conn.send(&h2::header_frames(stream_id, block, true, h2::DEFAULT_MAX_FRAME)).await;
}

// ---------------------------------------------------------------------------------------------
// The gateway
// ---------------------------------------------------------------------------------------------

struct Setup {
    upstream: RecordingUpstream,
    gateway: TestGateway,
    key: Key,
}

/// A protected route `/` in front of a recording upstream, with these `[server]` fields.
async fn setup(server: &[(&str, &str)]) -> Setup {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("settings", &["read"]);
    let mut config = GatewayConfig::new().route(Route::new("/", &upstream.url())).key(key.clone());
    for (field, value) in server {
        config = config.server(field, value);
    }
    let gateway = config.start().await;
    Setup { upstream, gateway, key }
}

// ---------------------------------------------------------------------------------------------
// HTTP/1
// ---------------------------------------------------------------------------------------------

/// A client that trickles its request head (a header line every 100 ms, so bytes keep moving
/// and the idle timeout never fires) is dropped once `header_read_timeout` has passed. This
/// only works if hyper's HTTP/1 connection has a timer: without one the timeout is ignored.
#[tokio::test]
async fn http1_header_read_timeout_drops_a_trickling_client() {
    let setup = setup(&[("header_read_timeout", "\"1s\""), ("idle_timeout", "\"30s\"")]).await;
    let addr = setup.gateway.addr;

    // Control: a head sent at once is answered, so the limit is not simply refusing everything.
    let quick = setup.gateway.raw(&raw_get("/quick", &[&format!("x-api-key: {}", setup.key.secret)])).await;
    assert_eq!(quick.status(), Some(200), "a prompt request must be served\n{quick}");

    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let started = Instant::now();
    stream.write_all(b"GET /slow HTTP/1.1\r\nHost: 127.0.0.1\r\n").await.expect("write request line");
    let mut received = Vec::new();
    let mut sent_lines = 0;
    let closed_after = loop {
        if started.elapsed() > Duration::from_secs(8) {
            panic!(
                "a client trickling its head for {:?} was not dropped (header_read_timeout = 1s); \
                 sent {sent_lines} header lines, got {:?}",
                started.elapsed(),
                String::from_utf8_lossy(&received)
            );
        }
        let line = format!("x-trickle-{sent_lines}: y\r\n");
        if stream.write_all(line.as_bytes()).await.is_err() {
            break started.elapsed();
        }
        sent_lines += 1;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => break started.elapsed(),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    };
    assert!(
        closed_after >= Duration::from_millis(900),
        "dropped after {closed_after:?}, before header_read_timeout (1s) had passed"
    );
    let head = String::from_utf8_lossy(&received);
    assert!(
        received.is_empty() || head.starts_with("HTTP/1.1 408"),
        "a timed-out head gets nothing or a 408, got {head:?}"
    );
    assert_eq!(setup.upstream.count(), 1, "only the control request may reach the upstream");
}

/// Reads one HTTP/1.1 response with a `Content-Length` body from `stream`; its head, or what
/// arrived before the stream ended or `IO_TIMEOUT` passed.
async fn read_one_response(stream: &mut TcpStream) -> String {
    match support::read_http1_response(stream, IO_TIMEOUT).await {
        Ok(whole) => whole.split("\r\n\r\n").next().unwrap_or_default().to_string(),
        Err(partial) => partial,
    }
}

/// On a keep-alive connection the head clock starts again when each exchange ends: requests
/// that each come within `header_read_timeout` of the previous answer are served however long
/// the connection has lived, and a client that then sends nothing is dropped once
/// `header_read_timeout` has passed since its last answer (long before `idle_timeout`).
#[tokio::test]
async fn http1_head_clock_starts_again_after_each_exchange() {
    let setup = setup(&[("header_read_timeout", "\"1s\""), ("idle_timeout", "\"30s\"")]).await;
    let mut stream = TcpStream::connect(setup.gateway.addr).await.expect("connect");
    let request =
        format!("GET /again HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {}\r\n\r\n", setup.key.secret);
    let started = Instant::now();
    // Three requests 600 ms apart: 1.2 s in all, more than header_read_timeout, each wait less.
    for round in 0..3 {
        if round > 0 {
            // The pause is what is tested: a client idle between requests.
            tokio::time::sleep(Duration::from_millis(600)).await;
        }
        stream.write_all(request.as_bytes()).await.expect("write request");
        let head = read_one_response(&mut stream).await;
        assert!(
            head.starts_with("HTTP/1.1 200"),
            "request {round} ({:?} after connecting) got {head:?}",
            started.elapsed()
        );
    }
    let answered = Instant::now();
    let mut buf = [0u8; 64];
    let closed_after = match tokio::time::timeout(Duration::from_secs(8), stream.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => answered.elapsed(),
        Ok(Ok(n)) => {
            panic!("unexpected bytes on an idle connection: {:?}", String::from_utf8_lossy(&buf[..n]))
        }
        Err(_) => panic!(
            "an idle keep-alive connection was still open 8 s after its last answer (header_read_timeout = 1s)"
        ),
    };
    assert!(
        closed_after >= Duration::from_millis(900),
        "dropped {closed_after:?} after the last answer, before header_read_timeout (1s)"
    );
    assert_eq!(setup.upstream.count(), 3);
}

/// A request head over `max_header_bytes` gets 431: keygate's JSON answer up to twice the
/// limit, hyper's own beyond that. Neither reaches the upstream.
#[tokio::test]
async fn http1_oversized_head_gets_431() {
    let setup = setup(&[("max_header_bytes", "4096")]).await;
    let key_line = format!("x-api-key: {}", setup.key.secret);

    let fits = format!("x-pad: {}", "a".repeat(3000));
    let ok = setup.gateway.raw(&raw_get("/fits", &[&key_line, &fits])).await;
    assert_eq!(ok.status(), Some(200), "a head under the limit must be served\n{ok}");

    let over = format!("x-pad: {}", "a".repeat(6000));
    let json = setup.gateway.raw(&raw_get("/over", &[&key_line, &over])).await;
    assert_eq!(json.status(), Some(431), "a head over max_header_bytes → 431\n{json}");
    assert_eq!(json.error_code().as_deref(), Some("headers_too_large"), "{json}");

    let far_over = format!("x-pad: {}", "a".repeat(40_000));
    let hard = setup.gateway.raw(&raw_get("/far-over", &[&key_line, &far_over])).await;
    assert_eq!(
        hard.status(),
        Some(431),
        "a head far over max_header_bytes → 431 (hyper's hard limit)\n{hard}"
    );

    assert_eq!(setup.upstream.count(), 1, "only the request that fits may reach the upstream");
}

// ---------------------------------------------------------------------------------------------
// HTTP/2
// ---------------------------------------------------------------------------------------------

/// keygate's SETTINGS frame advertises the configured MAX_CONCURRENT_STREAMS and a
/// MAX_HEADER_LIST_SIZE between max_header_bytes and twice it (hyper's hard cap, see
/// src/server.rs); without them a client may open unbounded streams or send unbounded heads.
#[tokio::test]
async fn h2_settings_advertise_the_configured_limits() {
    for (streams, header_bytes) in [(7u32, 16_384u32), (100, 32_768)] {
        let setup = setup(&[
            ("h2_max_concurrent_streams", &streams.to_string()),
            ("max_header_bytes", &header_bytes.to_string()),
        ])
        .await;
        let mut h2 = Conn::connect(setup.gateway.addr).await;
        let settings = h2.handshake().await;
        let value = |id| settings.iter().rev().find(|(i, _)| *i == id).map(|(_, v)| *v);
        assert_eq!(
            value(SETTINGS_MAX_CONCURRENT_STREAMS),
            Some(streams),
            "MAX_CONCURRENT_STREAMS must be h2_max_concurrent_streams; SETTINGS were {settings:?}"
        );
        let list = value(SETTINGS_MAX_HEADER_LIST_SIZE)
            .unwrap_or_else(|| panic!("no MAX_HEADER_LIST_SIZE advertised; SETTINGS were {settings:?}"));
        assert!(
            (header_bytes..=2 * header_bytes).contains(&list),
            "MAX_HEADER_LIST_SIZE {list} must lie between max_header_bytes ({header_bytes}) and twice it"
        );
    }
}

/// A client that ignores MAX_CONCURRENT_STREAMS has the excess streams refused
/// (REFUSED_STREAM), while the streams within the limit are served.
#[tokio::test]
async fn h2_streams_beyond_the_limit_are_refused() {
    const LIMIT: u32 = 2;
    let setup = setup(&[("h2_max_concurrent_streams", &LIMIT.to_string())]).await;
    let addr = setup.gateway.addr;
    let mut h2 = Conn::connect(addr).await;
    h2.handshake().await;

    let total = LIMIT + 3;
    let key = setup.key.secret.clone();
    let mut bytes = Vec::new();
    for i in 0..total {
        let block =
            request_block(addr, &format!("/slow{i}"), &[("x-api-key", &key), ("x-test-sleep-ms", "1000")]);
        bytes.extend(h2::frame(HEADERS, END_STREAM | END_HEADERS, 1 + 2 * i, &block));
    }
    h2.send(&bytes).await;

    let deadline = Instant::now() + IO_TIMEOUT;
    let (mut served, mut refused) = (Vec::new(), Vec::new());
    while served.len() + refused.len() < total as usize {
        match h2.next_frame(deadline).await {
            Err(ended) => panic!("connection {ended:?}; served {served:?}, refused {refused:?}"),
            Ok(frame) if frame.kind == RST_STREAM => refused.push((frame.stream_id, frame.error_code())),
            Ok(frame) if frame.fields.is_some() => served.push(frame.stream_id),
            Ok(frame) if frame.kind == GOAWAY => panic!("unexpected GOAWAY {:?}", frame.error_code()),
            Ok(_) => {}
        }
    }
    assert_eq!(
        served.len(),
        LIMIT as usize,
        "exactly {LIMIT} streams served; served {served:?}, refused {refused:?}"
    );
    assert!(
        refused.iter().all(|(_, code)| *code == Some(REFUSED_STREAM)),
        "the excess streams must be refused with REFUSED_STREAM: {refused:?}"
    );
    assert!(setup.upstream.count() <= LIMIT as usize, "refused streams must not reach the upstream");
}

/// An HTTP/2 header list over max_header_bytes gets keygate's JSON 431 (under hyper's cap) or,
/// far over it, h2's own 431 or a refusal; never a 200, never the upstream.
#[tokio::test]
async fn h2_oversized_header_list_is_refused() {
    let setup = setup(&[("max_header_bytes", "8192")]).await;
    let addr = setup.gateway.addr;
    let key = setup.key.secret.clone();

    let mut h2 = Conn::connect(addr).await;
    h2.handshake().await;
    let pad = "a".repeat(10_000);
    send_request(&mut h2, 1, &request_block(addr, "/over", &[("x-api-key", &key), ("x-pad", &pad)])).await;
    let got = h2.outcome(1, Instant::now() + IO_TIMEOUT).await;
    assert_eq!(got, Outcome::Response(431), "a header list over max_header_bytes → 431\n{}", h2.transcript);

    let mut h2 = Conn::connect(addr).await;
    h2.handshake().await;
    let pad = "a".repeat(60_000);
    send_request(&mut h2, 1, &request_block(addr, "/far-over", &[("x-api-key", &key), ("x-pad", &pad)]))
        .await;
    let got = h2.outcome(1, Instant::now() + IO_TIMEOUT).await;
    assert!(
        got == Outcome::Response(431) || got.is_error(&[]),
        "a header list far over the limit → 431 or a refusal, got {got:?}"
    );
    assert_eq!(setup.upstream.count(), 0, "no oversized request may reach the upstream");
}

/// Timeouts work over HTTP/2 too: a connection with no bytes moving, or one whose request
/// body stalls, is closed after `idle_timeout`, although no request head is pending (hyper's
/// header read timeout is HTTP/1 only). request_timeout is long here, so only idle_timeout
/// can end the stalled request.
#[tokio::test]
async fn h2_idle_and_stalled_connections_are_closed() {
    let setup = setup(&[("idle_timeout", "\"1s\""), ("request_timeout", "\"30s\"")]).await;
    let addr = setup.gateway.addr;

    let mut idle = Conn::connect(addr).await;
    idle.handshake().await;
    let mut stalled = Conn::connect(addr).await;
    stalled.handshake().await;
    // HEADERS without END_STREAM and half the announced body, then nothing.
    let block =
        request_block(addr, "/stalled", &[("x-api-key", &setup.key.secret), ("content-length", "10")]);
    stalled.send(&h2::frame(HEADERS, END_HEADERS, 1, &block)).await;
    stalled.send(&h2::frame(DATA, 0, 1, b"12345")).await;

    let started = Instant::now();
    for (what, h2) in
        [("an idle h2 connection", &mut idle), ("an h2 request with a stalled body", &mut stalled)]
    {
        let end = loop {
            match h2.next_frame(started + Duration::from_secs(6)).await {
                Ok(frame) if frame.kind == GOAWAY => break format!("GOAWAY {:?}", frame.error_code()),
                Ok(frame) if frame.kind == RST_STREAM => {
                    break format!("RST_STREAM {:?}", frame.error_code());
                }
                Ok(frame) if frame.fields.is_some() => panic!("{what}: unexpected response {frame:?}"),
                Ok(_) => {}
                Err(Ended::Closed) => break "closed".to_owned(),
                Err(Ended::TimedOut) => panic!("{what} was still open after {:?}", started.elapsed()),
            }
        };
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(900),
            "{what}: ended ({end}) after {after:?}, before idle_timeout"
        );
    }
}

//! Pins the connection-level settings that protect keygate, by behaviour, so that a hyper,
//! hyper-util or h2 upgrade (or a refactor of the builder in src/server.rs) cannot silently
//! loosen them: the HTTP/1 header read timeout (which needs a timer to work at all), the
//! request-head size limit, the HTTP/2 SETTINGS keygate advertises (MAX_CONCURRENT_STREAMS,
//! MAX_HEADER_LIST_SIZE) and enforces, and the idle timeout over HTTP/2.
//!
//! HTTP/2 is spoken here with frames built by hand (RFC 9113 §4.1: a 9-byte header, then the
//! payload; header blocks as HPACK literals), so the client never second-guesses the server.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{GatewayConfig, IO_TIMEOUT, Key, RecordingUpstream, Route, TestGateway, raw_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// A raw HTTP/2 client
// ---------------------------------------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

const REFUSED_STREAM: u32 = 0x7;

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream_id: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM (first 4 bytes) or GOAWAY (after the last stream id).
    fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// SETTINGS parameters: 6-byte (id, value) pairs.
    fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|p| (u16::from_be_bytes([p[0], p[1]]), u32::from_be_bytes([p[2], p[3], p[4], p[5]])))
            .collect()
    }
}

/// Why no frame came.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    Closed,
    Timeout,
}

struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawH2 {
    /// Connects with prior knowledge and sends the preface and an empty SETTINGS frame.
    async fn connect(addr: SocketAddr) -> Self {
        let stream = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect to {addr}: timed out"))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        let mut raw = Self { stream, buf: Vec::new() };
        raw.write(PREFACE).await;
        raw.send(SETTINGS, 0, 0, &[]).await;
        raw
    }

    async fn write(&mut self, bytes: &[u8]) {
        tokio::time::timeout(IO_TIMEOUT, self.stream.write_all(bytes))
            .await
            .unwrap_or_else(|_| panic!("write: timed out"))
            .unwrap_or_else(|e| panic!("write: {e}"));
    }

    async fn send(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        self.write(&frame_bytes(kind, flags, stream_id, payload)).await;
    }

    /// The next frame, reading until `deadline`.
    async fn next_frame(&mut self, deadline: Instant) -> Result<Frame, Ended> {
        loop {
            if self.buf.len() >= 9 {
                let len =
                    usize::from(self.buf[0]) << 16 | usize::from(self.buf[1]) << 8 | usize::from(self.buf[2]);
                if self.buf.len() >= 9 + len {
                    let head: Vec<u8> = self.buf.drain(..9).collect();
                    let payload: Vec<u8> = self.buf.drain(..len).collect();
                    let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    return Ok(Frame { kind: head[3], flags: head[4], stream_id, payload });
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(Ended::Timeout),
                Ok(Ok(0) | Err(_)) => return Err(Ended::Closed),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads the server's SETTINGS (its first frame, RFC 9113 §3.4), acknowledges it, and waits
    /// for the server's acknowledgement of ours, after which its limits surely apply.
    async fn handshake(&mut self) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let first =
            self.next_frame(deadline).await.unwrap_or_else(|e| panic!("no SETTINGS from the server: {e:?}"));
        assert!(
            first.kind == SETTINGS && first.flags & ACK == 0,
            "the server's first frame must be SETTINGS: {first:?}"
        );
        self.send(SETTINGS, ACK, 0, &[]).await;
        loop {
            let frame = self.next_frame(deadline).await.unwrap_or_else(|e| panic!("no SETTINGS ACK: {e:?}"));
            if frame.kind == SETTINGS && frame.flags & ACK != 0 {
                return first.settings();
            }
        }
    }
}

fn frame_bytes(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream_id.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer with an `prefix`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, prefix: u32, mut n: usize) {
    let max = (1usize << prefix) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// A header block of literal fields without indexing, new names, no Huffman (RFC 7541 §6.2.2).
fn hpack_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name.as_bytes());
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// The `:status` of a response header block, when it is the block's first field as h2 sends
/// it: indexed from the static table, or a literal with the `:status` name index, its value
/// raw or Huffman-coded (digits only).
fn hpack_status(block: &[u8]) -> Option<u16> {
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let first = *block.first()?;
    if first & 0x80 != 0 {
        let index = usize::from(first & 0x7f);
        return (8..=14).contains(&index).then(|| STATIC[index - 8]);
    }
    let index = if first & 0x40 != 0 { first & 0x3f } else { first & 0x0f };
    if !(8..=14).contains(&index) {
        return None;
    }
    let value_head = *block.get(1)?;
    let len = usize::from(value_head & 0x7f);
    let value = block.get(2..2 + len)?;
    let text =
        if value_head & 0x80 == 0 { String::from_utf8(value.to_vec()).ok()? } else { huffman_digits(value)? };
    text.parse().ok()
}

/// Decodes a Huffman string of digits (RFC 7541 Appendix B: '0'–'2' are 5 bits, '3'–'9' 6).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes.iter().flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1)).collect();
    let mut out = String::new();
    let mut i = 0;
    while i < bits.len() {
        let rest = &bits[i..];
        if rest.iter().all(|&b| b == 1) && rest.len() < 8 {
            break; // EOS padding
        }
        let code = |n: usize| rest.get(..n).map(|c| c.iter().fold(0u8, |acc, &b| acc << 1 | b));
        match code(5)? {
            c @ 0..=2 => {
                out.push(char::from(b'0' + c));
                i += 5;
            }
            _ => {
                let c = code(6)?;
                if !(0x19..=0x1f).contains(&c) {
                    return None;
                }
                out.push(char::from(b'0' + 3 + (c - 0x19)));
                i += 6;
            }
        }
    }
    Some(out)
}

fn request_block(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let authority = addr.to_string();
    let mut fields =
        vec![(":method", "GET"), (":scheme", "http"), (":authority", authority.as_str()), (":path", path)];
    fields.extend_from_slice(extra);
    hpack_block(&fields)
}

/// Sends a request's header block on `stream_id`, split into HEADERS + CONTINUATION frames of
/// at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE).
async fn send_request(h2: &mut RawH2, stream_id: u32, block: &[u8]) {
    let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    let mut bytes = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let mut flags = if i == 0 { END_STREAM } else { 0 };
        if i + 1 == chunks.len() {
            flags |= END_HEADERS;
        }
        bytes.extend(frame_bytes(kind, flags, stream_id, chunk));
    }
    h2.write(&bytes).await;
}

/// What the server did with one stream.
#[derive(Debug, PartialEq, Eq)]
enum StreamOutcome {
    Status(Option<u16>),
    Reset(u32),
    GoAway(u32),
    Ended(Ended),
}

async fn outcome(h2: &mut RawH2, stream_id: u32, deadline: Instant) -> StreamOutcome {
    loop {
        match h2.next_frame(deadline).await {
            Err(ended) => return StreamOutcome::Ended(ended),
            Ok(frame) if frame.kind == GOAWAY => {
                return StreamOutcome::GoAway(frame.error_code().unwrap_or(0));
            }
            Ok(frame) if frame.stream_id != stream_id => {}
            Ok(frame) if frame.kind == RST_STREAM => {
                return StreamOutcome::Reset(frame.error_code().unwrap_or(0));
            }
            Ok(frame) if frame.kind == HEADERS => return StreamOutcome::Status(hpack_status(&frame.payload)),
            Ok(_) => {}
        }
    }
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
        let mut h2 = RawH2::connect(setup.gateway.addr).await;
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
    let mut h2 = RawH2::connect(addr).await;
    h2.handshake().await;

    let total = LIMIT + 3;
    let key = setup.key.secret.clone();
    let mut bytes = Vec::new();
    for i in 0..total {
        let block =
            request_block(addr, &format!("/slow{i}"), &[("x-api-key", &key), ("x-test-sleep-ms", "1000")]);
        bytes.extend(frame_bytes(HEADERS, END_STREAM | END_HEADERS, 1 + 2 * i, &block));
    }
    h2.write(&bytes).await;

    let deadline = Instant::now() + IO_TIMEOUT;
    let (mut served, mut refused) = (Vec::new(), Vec::new());
    while served.len() + refused.len() < total as usize {
        match h2.next_frame(deadline).await {
            Err(ended) => panic!("connection {ended:?}; served {served:?}, refused {refused:?}"),
            Ok(frame) if frame.kind == RST_STREAM => refused.push((frame.stream_id, frame.error_code())),
            Ok(frame) if frame.kind == HEADERS => served.push(frame.stream_id),
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

    let mut h2 = RawH2::connect(addr).await;
    h2.handshake().await;
    let pad = "a".repeat(10_000);
    send_request(&mut h2, 1, &request_block(addr, "/over", &[("x-api-key", &key), ("x-pad", &pad)])).await;
    let got = outcome(&mut h2, 1, Instant::now() + IO_TIMEOUT).await;
    assert_eq!(got, StreamOutcome::Status(Some(431)), "a header list over max_header_bytes → 431");

    let mut h2 = RawH2::connect(addr).await;
    h2.handshake().await;
    let pad = "a".repeat(60_000);
    send_request(&mut h2, 1, &request_block(addr, "/far-over", &[("x-api-key", &key), ("x-pad", &pad)]))
        .await;
    let got = outcome(&mut h2, 1, Instant::now() + IO_TIMEOUT).await;
    assert!(
        matches!(got, StreamOutcome::Status(Some(431)) | StreamOutcome::Reset(_) | StreamOutcome::GoAway(_))
            || got == StreamOutcome::Ended(Ended::Closed),
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

    let mut idle = RawH2::connect(addr).await;
    idle.handshake().await;
    let mut stalled = RawH2::connect(addr).await;
    stalled.handshake().await;
    // HEADERS without END_STREAM and half the announced body, then nothing.
    let block =
        request_block(addr, "/stalled", &[("x-api-key", &setup.key.secret), ("content-length", "10")]);
    stalled.send(HEADERS, END_HEADERS, 1, &block).await;
    stalled.send(DATA, 0, 1, b"12345").await;

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
                Ok(frame) if frame.kind == HEADERS => {
                    panic!("{what}: unexpected response {:?}", hpack_status(&frame.payload))
                }
                Ok(_) => {}
                Err(Ended::Closed) => break "closed".to_owned(),
                Err(Ended::Timeout) => panic!("{what} was still open after {:?}", started.elapsed()),
            }
        };
        let after = started.elapsed();
        assert!(
            after >= Duration::from_millis(900),
            "{what}: ended ({end}) after {after:?}, before idle_timeout"
        );
    }
}

/// The HPACK helpers agree with RFC 7541's examples, so the tests above read what h2 sent.
#[test]
fn hpack_helpers_follow_rfc_7541() {
    // C.1.2: 1337 with a 5-bit prefix.
    let mut out = Vec::new();
    hpack_int(&mut out, 0, 5, 1337);
    assert_eq!(out, [0x1f, 0x9a, 0x0a]);
    // C.6.1: ":status: 302" Huffman-coded is 0x64 0x02 after the name index 8 literal (0x48).
    assert_eq!(hpack_status(&[0x48, 0x82, 0x64, 0x02]), Some(302));
    assert_eq!(hpack_status(&[0x88]), Some(200));
    assert_eq!(hpack_status(&[0x08, 0x03, b'4', b'3', b'1']), Some(431));
}

//! keygate's own HTTP/1.1 server path (src/server/h1.rs), and its hand-over to hyper for the
//! rest of a connection: raw bytes on real connections to a gateway on 127.0.0.1:0, in front
//! of real upstreams, asserting on the bytes the client got and what the upstream saw.

mod support;

use support::scripted::{Scripted, raw_upstream, read_head};
use support::{GatewayConfig, IO_TIMEOUT, Key, RecordingUpstream, Route, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "h1-server-path-secret-0123456789";

async fn gateway_for(upstream: &str) -> TestGateway {
    GatewayConfig::new()
        .server("max_header_bytes", "8192")
        .route(Route::new("/", upstream))
        .key(Key::new("h1test01", "h1", SECRET, &["*"]))
        .start()
        .await
}

fn get(version: &str, extra: &str) -> String {
    format!("GET /thing HTTP/{version}\r\nHost: 127.0.0.1\r\nx-api-key: {SECRET}\r\n{extra}\r\n")
}

/// One response as the client read it, its chunked body decoded.
#[derive(Debug)]
struct Answer {
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> &str {
        self.head.split(' ').nth(1).unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// A raw client connection.
struct Client {
    stream: TcpStream,
    read: Vec<u8>,
    closed: bool,
}

impl Client {
    async fn connect(gateway: &TestGateway) -> Self {
        let stream = TcpStream::connect(gateway.addr).await.expect("connect to the gateway");
        Self { stream, read: Vec::new(), closed: false }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write to the gateway");
    }

    /// Reads more; false once the gateway has closed (or after [`IO_TIMEOUT`]).
    async fn fill(&mut self) -> bool {
        if self.closed {
            return false;
        }
        let mut buf = [0u8; 16 * 1024];
        match tokio::time::timeout(IO_TIMEOUT, self.stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                self.read.extend_from_slice(&buf[..n]);
                true
            }
            Ok(_) => {
                self.closed = true;
                false
            }
            Err(_) => {
                panic!("the gateway went silent; read so far: {:?}", String::from_utf8_lossy(&self.read))
            }
        }
    }

    /// The next whole response (framed by length, chunks, or the end of the connection).
    async fn answer(&mut self, head_request: bool) -> Answer {
        let head_end = loop {
            if let Some(at) = self.read.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(
                self.fill().await,
                "closed before a response head: {:?}",
                String::from_utf8_lossy(&self.read)
            );
        };
        let head = String::from_utf8_lossy(&self.read[..head_end]).into_owned();
        self.read.drain(..head_end);
        let mut answer = Answer { head, body: Vec::new() };
        let status: u16 = answer.status().parse().unwrap_or(0);
        if head_request || status == 204 || status == 304 {
            return answer;
        }
        if let Some(len) = answer.header("content-length") {
            let len: usize = len.parse().expect("a numeric content-length");
            while self.read.len() < len {
                assert!(self.fill().await, "closed inside a body of {len} bytes");
            }
            answer.body = self.read.drain(..len).collect();
        } else if answer.header("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
            loop {
                let line_end = loop {
                    if let Some(at) = self.read.windows(2).position(|w| w == b"\r\n") {
                        break at;
                    }
                    assert!(self.fill().await, "closed inside a chunked body");
                };
                let size =
                    usize::from_str_radix(std::str::from_utf8(&self.read[..line_end]).expect("hex"), 16)
                        .expect("a chunk size");
                while self.read.len() < line_end + 2 + size + 2 {
                    assert!(self.fill().await, "closed inside a chunk");
                }
                answer.body.extend_from_slice(&self.read[line_end + 2..line_end + 2 + size]);
                self.read.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        } else {
            while self.fill().await {}
            answer.body = std::mem::take(&mut self.read);
        }
        answer
    }

    /// Whether the gateway closes the connection (without sending anything more).
    async fn closes(&mut self) -> bool {
        while self.fill().await {}
        self.read.is_empty()
    }
}

#[tokio::test]
async fn pipelined_http11_requests_are_answered_in_order_on_a_connection_that_stays_open() {
    let upstream = RecordingUpstream::start().await;
    let gateway = gateway_for(&upstream.url()).await;
    let mut client = Client::connect(&gateway).await;
    let two =
        format!("{}{}", get("1.1", ""), get("1.1", "x-api-key-extra: 1\r\n").replace("/thing", "/other"));
    client.send(two.as_bytes()).await;
    let (first, second) = (client.answer(false).await, client.answer(false).await);
    assert_eq!((first.status(), second.status()), ("200", "200"), "{first:?}\n{second:?}");
    assert!(first.head.starts_with("HTTP/1.1 200 OK\r\n"), "{first:?}");
    assert!(first.header("date").is_some() && first.header("x-request-id").is_some(), "{first:?}");
    assert_eq!(first.header("connection"), None, "{first:?}");
    // And the connection serves a third.
    client.send(get("1.1", "").as_bytes()).await;
    assert_eq!(client.answer(false).await.status(), "200");
    let paths: Vec<String> = upstream.requests().iter().map(|r| r.path().to_owned()).collect();
    assert_eq!(paths, ["/thing", "/other", "/thing"]);
    assert!(
        upstream.requests().iter().all(|r| r.header("x-api-key").is_none()),
        "the key travelled upstream"
    );
}

#[tokio::test]
async fn connection_close_and_http10_end_the_connection_and_http10_keep_alive_keeps_it() {
    let upstream = RecordingUpstream::start().await;
    let gateway = gateway_for(&upstream.url()).await;

    let mut client = Client::connect(&gateway).await;
    client.send(get("1.1", "Connection: close\r\n").as_bytes()).await;
    let answer = client.answer(false).await;
    assert_eq!(answer.header("connection").as_deref(), Some("close"), "{answer:?}");
    assert!(client.closes().await, "the connection stayed open after Connection: close");

    let mut client = Client::connect(&gateway).await;
    client.send(get("1.0", "").as_bytes()).await;
    let answer = client.answer(false).await;
    assert!(answer.head.starts_with("HTTP/1.0 200 OK\r\n"), "{answer:?}");
    assert_eq!(answer.header("connection"), None, "{answer:?}");
    assert!(client.closes().await, "an HTTP/1.0 connection stayed open");

    let mut client = Client::connect(&gateway).await;
    client.send(get("1.0", "Connection: keep-alive\r\n").as_bytes()).await;
    let answer = client.answer(false).await;
    assert_eq!(answer.header("connection").as_deref(), Some("keep-alive"), "{answer:?}");
    client.send(get("1.0", "Connection: keep-alive\r\n").as_bytes()).await;
    assert_eq!(client.answer(false).await.status(), "200");
    assert_eq!(upstream.count(), 4);
}

#[tokio::test]
async fn a_body_of_unknown_length_is_chunked_for_http11_and_ends_with_the_connection_for_http10() {
    // The upstream frames its body by closing the connection.
    let upstream = Scripted::answering(|_, _| {
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nhello, world".to_vec(), true)
    })
    .await;
    let gateway = gateway_for(&upstream.url()).await;

    let mut client = Client::connect(&gateway).await;
    client.send(get("1.1", "").as_bytes()).await;
    let answer = client.answer(false).await;
    assert_eq!(answer.header("transfer-encoding").as_deref(), Some("chunked"), "{answer:?}");
    assert_eq!(answer.body, b"hello, world");
    // The client's connection is not the upstream's: it carries another request.
    client.send(get("1.1", "").as_bytes()).await;
    assert_eq!(client.answer(false).await.body, b"hello, world");

    let mut client = Client::connect(&gateway).await;
    client.send(get("1.0", "Connection: keep-alive\r\n").as_bytes()).await;
    let answer = client.answer(false).await;
    assert!(answer.head.starts_with("HTTP/1.0 200"), "{answer:?}");
    assert_eq!(answer.header("transfer-encoding"), None, "{answer:?}");
    assert_eq!(answer.header("connection"), None, "{answer:?}");
    assert_eq!(answer.body, b"hello, world", "an HTTP/1.0 body ends with its connection");
}

#[tokio::test]
async fn head_and_204_answers_carry_no_body_and_leave_the_connection_usable() {
    let upstream = Scripted::answering(|n, _| {
        let answer: &[u8] = match n {
            1 => b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n",
            2 => b"HTTP/1.1 204 No Content\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
        };
        (answer.to_vec(), false)
    })
    .await;
    let gateway = gateway_for(&upstream.url()).await;
    let mut client = Client::connect(&gateway).await;
    client.send(get("1.1", "").replace("GET", "HEAD").as_bytes()).await;
    let head = client.answer(true).await;
    assert_eq!(
        head.header("content-length").as_deref(),
        Some("11"),
        "HEAD keeps the length it was given: {head:?}"
    );
    client.send(get("1.1", "").as_bytes()).await;
    let empty = client.answer(false).await;
    assert_eq!(empty.status(), "204", "{empty:?}");
    assert_eq!(
        (empty.header("content-length"), empty.header("transfer-encoding")),
        (None, None),
        "{empty:?}"
    );
    // No stray body bytes came before this answer.
    client.send(get("1.1", "").as_bytes()).await;
    let after = client.answer(false).await;
    assert_eq!((after.status(), after.body.as_slice()), ("200", &b"ok"[..]), "{after:?}");
}

#[tokio::test]
async fn a_connection_that_turns_to_a_body_or_an_odd_request_is_served_whole_by_the_other_path() {
    let upstream = RecordingUpstream::start().await;
    let gateway = gateway_for(&upstream.url()).await;
    let mut client = Client::connect(&gateway).await;
    let post = format!(
        "POST /thing HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {SECRET}\r\ncontent-length: 5\r\n\r\nhello"
    );
    // A plain GET, a POST with a body, and another GET, all pipelined in one write.
    client.send(format!("{}{post}{}", get("1.1", ""), get("1.1", "")).as_bytes()).await;
    let answers = [client.answer(false).await, client.answer(false).await, client.answer(false).await];
    assert!(answers.iter().all(|a| a.status() == "200"), "{answers:?}");
    assert_eq!(answers[1].body, b"hello", "the upstream echoes the body it got");
    let seen = upstream.requests();
    assert_eq!(seen.iter().map(|r| r.method.as_str()).collect::<Vec<_>>(), ["GET", "POST", "GET"]);
    assert_eq!(seen[1].body.as_ref(), b"hello");
    // A refusal is still keygate's JSON after the hand-over, with the same fields as one
    // keygate's own loop writes (which holds its fixed fields apart from the header map).
    let refusal = get("1.1", "").replace(SECRET, "not-a-key-at-all-0000");
    client.send(refusal.as_bytes()).await;
    let refused = client.answer(false).await;
    let mut fresh = Client::connect(&gateway).await;
    fresh.send(refusal.as_bytes()).await;
    let refused_here = fresh.answer(false).await;
    for answer in [&refused, &refused_here] {
        assert_eq!(answer.status(), "401", "{answer:?}");
        assert!(answer.body.starts_with(b"{\"error\":\"invalid_api_key\""), "{answer:?}");
        assert_eq!(answer.header("content-type").as_deref(), Some("application/json"), "{answer:?}");
        assert_eq!(answer.header("cache-control").as_deref(), Some("no-store"), "{answer:?}");
        assert_eq!(
            answer.header("www-authenticate").as_deref(),
            Some("ApiKey realm=\"keygate\""),
            "{answer:?}"
        );
        let id = answer.header("x-request-id").unwrap_or_default();
        assert!(id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()), "{answer:?}");
        assert_eq!(answer.head.matches("\r\n").count(), 8, "status line, six fields, blank line: {answer:?}");
    }
}

#[tokio::test]
async fn heads_that_cannot_be_read_or_are_too_large_get_keygates_json_answer() {
    let upstream = RecordingUpstream::start().await;
    let gateway = gateway_for(&upstream.url()).await;
    let filler = |n: usize| format!("X-Filler: {}\r\n", "f".repeat(n));
    let many: String = (0..150).map(|i| format!("X-Many-{i}: v\r\n")).collect();
    // The last field: whether the connection must close (a head that could not be read whole
    // leaves nothing to trust after it; a whole one that is too large does).
    let cases: Vec<(&str, String, &str, &str, bool)> = vec![
        ("a space before a colon", get("1.1", "x-bad : value\r\n"), "400", "bad_request", true),
        ("no version", format!("GET /thing\r\nx-api-key: {SECRET}\r\n\r\n"), "400", "bad_request", true),
        ("HTTP/2.0 in an HTTP/1 request line", get("2.0", ""), "400", "bad_request", true),
        // max_header_bytes = 8192: the pipeline's own check answers up to twice that...
        ("a 9 kB header", get("1.1", &filler(9_000)), "431", "headers_too_large", false),
        // ...and this path past it, where hyper answered a bare 431.
        ("a 40 kB header", get("1.1", &filler(40_000)), "431", "headers_too_large", true),
        ("150 headers", get("1.1", &many), "431", "headers_too_large", true),
    ];
    for (name, request, status, code, closes) in cases {
        let mut client = Client::connect(&gateway).await;
        client.send(request.as_bytes()).await;
        let answer = client.answer(false).await;
        assert_eq!(answer.status(), status, "{name}: {answer:?}");
        assert_eq!(answer.header("content-type").as_deref(), Some("application/json"), "{name}: {answer:?}");
        let body: serde_json::Value = serde_json::from_slice(&answer.body).expect("a JSON body");
        assert_eq!(body["error"], code, "{name}: {answer:?}");
        assert!(!String::from_utf8_lossy(&answer.body).contains(SECRET), "{name}: the key was echoed");
        if closes {
            assert!(client.closes().await, "{name}: the connection stayed open after a refused head");
        } else {
            client.send(get("1.1", "").as_bytes()).await;
            assert_eq!(client.answer(false).await.status(), "200", "{name}: the connection was not reusable");
        }
    }
    // A head that never ends: refused once it passes the cap, without waiting for its end.
    let mut client = Client::connect(&gateway).await;
    let mut endless =
        format!("GET /thing HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {SECRET}\r\n").into_bytes();
    endless.extend((0..2_000).flat_map(|i| format!("X-Endless-{i}: {}\r\n", "e".repeat(40)).into_bytes()));
    client.send(&endless).await;
    let answer = client.answer(false).await;
    assert_eq!(answer.status(), "431", "{answer:?}");
    // Only the one request sent after the 9 kB refusal, to show its connection still served.
    let paths: Vec<String> = upstream.requests().iter().map(|r| r.path().to_owned()).collect();
    assert_eq!(paths, ["/thing"], "a refused head reached the upstream");
    assert!(upstream.requests()[0].header("x-filler").is_none());
}

#[tokio::test]
async fn a_client_that_hangs_up_while_its_request_waits_on_the_upstream_cancels_it_there() {
    let (heard, mut heard_rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    // Reads a request head, answers nothing, and reports when keygate lets go of the connection.
    let (addr, _) = raw_upstream(move |mut stream, _| {
        let heard = heard.clone();
        async move {
            if read_head(&mut stream).await {
                let _ = heard.send("request");
                let mut rest = [0u8; 1024];
                while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
                let _ = heard.send("released");
            }
        }
    })
    .await;
    // request_timeout far beyond the wait below: only the hang-up can release the upstream.
    let gateway = GatewayConfig::new()
        .server("request_timeout", "\"120s\"")
        .route(Route::new("/", &format!("http://{addr}")))
        .key(Key::new("h1test01", "h1", SECRET, &["*"]))
        .start()
        .await;
    let mut client = Client::connect(&gateway).await;
    client.send(get("1.1", "").as_bytes()).await;
    assert_eq!(within(&mut heard_rx).await, Some("request"));
    drop(client);
    assert_eq!(within(&mut heard_rx).await, Some("released"), "the upstream still holds the request");
}

async fn within(rx: &mut tokio::sync::mpsc::UnboundedReceiver<&'static str>) -> Option<&'static str> {
    tokio::time::timeout(IO_TIMEOUT, rx.recv()).await.ok().flatten()
}

#[tokio::test]
async fn large_answers_arrive_whole_framed_by_length_or_chunks() {
    let upstream = RecordingUpstream::start().await;
    let gateway = gateway_for(&upstream.url()).await;
    let mut client = Client::connect(&gateway).await;
    // 1 MiB with a length: written in pieces, some straight from the upstream's buffers.
    client.send(get("1.1", "x-test-response-bytes: 1048576\r\n").as_bytes()).await;
    let big = client.answer(false).await;
    assert_eq!(big.header("content-length").as_deref(), Some("1048576"), "{}", big.head);
    assert!(big.body == support::pattern(1_048_576), "the 1 MiB body arrived changed");
    client.send(get("1.1", "").as_bytes()).await;
    assert_eq!(client.answer(false).await.status(), "200", "the connection did not serve on");

    // 300 kB of unknown length: chunked to the client.
    let body = support::pattern(300_000);
    let script = [b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n".as_slice(), &body].concat();
    let upstream = Scripted::answering(move |_, _| (script.clone(), true)).await;
    let gateway = gateway_for(&upstream.url()).await;
    let mut client = Client::connect(&gateway).await;
    client.send(get("1.1", "").as_bytes()).await;
    let chunked = client.answer(false).await;
    assert_eq!(chunked.header("transfer-encoding").as_deref(), Some("chunked"), "{}", chunked.head);
    assert!(chunked.body == body, "the chunked body arrived changed ({} bytes)", chunked.body.len());
    client.send(get("1.1", "").as_bytes()).await;
    assert_eq!(client.answer(false).await.body.len(), 300_000);
}

//! keygate's own HTTP/1.1 client against a raw upstream that answers oddly or with hostility:
//! what the client gets, what the upstream saw, and whether a connection is used again (the
//! upstream counts its accepts; a connection keygate must not reuse is left open by it, so
//! only a new accept proves keygate let go).

mod support;

use std::sync::Arc;

use support::scripted::Scripted;
use support::{GatewayConfig, Route, TestGateway, assert_error, raw_get};
use tokio::io::AsyncWriteExt;

async fn gateway_for(upstream: &Scripted) -> TestGateway {
    GatewayConfig::new().route(Route::new("/", &upstream.url()).public()).start().await
}

fn keep_open(bytes: &str) -> (Vec<u8>, bool) {
    (bytes.as_bytes().to_vec(), false)
}

#[tokio::test]
async fn a_response_with_both_transfer_encoding_and_content_length_is_read_as_chunked_and_its_connection_dropped()
 {
    let upstream = Scripted::answering(|_, _| {
        keep_open("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    })
    .await;
    let gateway = gateway_for(&upstream).await;
    for _ in 0..2 {
        let exchange = gateway.get("/both").send().await;
        assert_eq!((exchange.status.as_u16(), &exchange.body[..]), (200, &b"hello"[..]), "{exchange}");
        assert_ne!(
            exchange.header("content-length"),
            Some("3"),
            "the losing length reached the client: {exchange}"
        );
    }
    assert_eq!(upstream.accepted(), 2, "a connection framed two ways was reused");
}

#[tokio::test]
async fn invalid_content_lengths_are_502_and_never_reused() {
    const CASES: [&str; 5] = [
        "content-length: abc",
        "content-length: 5\r\ncontent-length: 6",
        "content-length: 5, 6",
        "content-length: -1",
        "content-length: 99999999999999999999999",
    ];
    let upstream =
        Scripted::answering(|n, _| keep_open(&format!("HTTP/1.1 200 OK\r\n{}\r\n\r\nhello", CASES[n - 1])))
            .await;
    let gateway = gateway_for(&upstream).await;
    for case in CASES {
        let exchange = gateway.get("/length").send().await;
        assert_error(&exchange, 502, "upstream_unavailable");
        assert!(!exchange.body.windows(5).any(|w| w == b"hello"), "{case}: {exchange}");
    }
    assert_eq!(upstream.accepted(), CASES.len());
}

#[tokio::test]
async fn malformed_chunked_bodies_never_reach_the_client_whole_and_close_the_connection() {
    const CASES: [&str; 5] = [
        "zz\r\nhello\r\n0\r\n\r\n",
        "10000000000000000\r\nhello\r\n0\r\n\r\n",
        "5\r\nhelloXX0\r\n\r\n",
        "5\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
    ];
    let upstream = Scripted::answering(|n, _| {
        keep_open(&format!("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{}", CASES[n - 1]))
    })
    .await;
    let gateway = gateway_for(&upstream).await;
    for case in CASES {
        let exchange = gateway.raw(&raw_get("/chunks", &[])).await;
        assert!(!exchange.timed_out(), "{case:?}: {exchange}");
        let whole = exchange.status() == Some(200) && exchange.received.ends_with(b"0\r\n\r\n");
        assert!(!whole, "{case:?} reached the client as a complete response: {exchange}");
    }
    assert_eq!(upstream.accepted(), CASES.len());
    assert_eq!(upstream.seen().len(), CASES.len());
}

#[tokio::test]
async fn chunked_responses_with_trailers_are_read_whole_and_their_connection_reused() {
    let upstream = Scripted::answering(|_, _| {
        keep_open(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
             5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-checksum: 42\r\n\r\n",
        )
    })
    .await;
    let gateway = gateway_for(&upstream).await;
    // A client that takes trailers (`TE: trailers`) gets the fields `Trailer` announces.
    let exchange = gateway.raw(&raw_get("/trailers", &["TE: trailers"])).await;
    assert_eq!(exchange.status(), Some(200), "{exchange}");
    let received = String::from_utf8_lossy(&exchange.received).to_ascii_lowercase();
    assert!(received.contains("hello") && received.contains(", world"), "{exchange}");
    assert!(received.contains("\r\ntrailer: x-checksum\r\n"), "{exchange}");
    assert!(received.ends_with("\r\n0\r\nx-checksum: 42\r\n\r\n"), "{exchange}");
    // One that does not gets the body alone.
    let plain = gateway.raw(&raw_get("/trailers", &[])).await;
    assert_eq!(plain.status(), Some(200), "{plain}");
    assert!(plain.received.ends_with(b"\r\n0\r\n\r\n"), "{plain}");
    let again = gateway.get("/again").send().await;
    assert_eq!((again.status.as_u16(), &again.body[..]), (200, &b"hello, world"[..]), "{again}");
    assert_eq!(upstream.accepted(), 1, "a chunked response read whole should leave its connection pooled");
}

#[tokio::test]
async fn interim_100_and_103_responses_are_skipped_for_the_final_one() {
    let upstream = Scripted::answering(|_, _| {
        keep_open(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n\
             HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-final: yes\r\n\r\nok",
        )
    })
    .await;
    let gateway = gateway_for(&upstream).await;
    for _ in 0..2 {
        let exchange = gateway.request(http::Method::POST, "/upload").body("data").send().await;
        assert_eq!((exchange.status.as_u16(), &exchange.body[..]), (200, &b"ok"[..]), "{exchange}");
        assert_eq!(exchange.header("x-final"), Some("yes"), "{exchange}");
    }
    assert_eq!(upstream.accepted(), 1);
    assert!(upstream.seen().iter().all(|seen| seen.body == b"data"), "{:?}", upstream.seen());
}

#[tokio::test]
async fn a_body_delimited_by_close_arrives_whole_on_a_connection_used_once() {
    let upstream = Scripted::answering(|_, _| {
        let mut answer = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        answer.extend_from_slice(&support::pattern(300_000));
        (answer, true)
    })
    .await;
    let gateway = gateway_for(&upstream).await;
    for _ in 0..2 {
        let exchange = gateway.get("/stream").send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        assert!(exchange.body == support::pattern(300_000), "got {} bytes", exchange.body.len());
    }
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn connection_close_and_http10_answers_end_their_connection_but_http10_keep_alive_does_not() {
    for (answer, accepts) in [
        ("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok", 3),
        ("HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\ncontent-length: 2\r\n\r\nok", 3),
        ("HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", 3),
        ("HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok", 1),
    ] {
        let upstream = Scripted::answering(move |_, _| keep_open(answer)).await;
        let gateway = gateway_for(&upstream).await;
        for _ in 0..3 {
            let exchange = gateway.get("/").send().await;
            assert_eq!(
                (exchange.status.as_u16(), &exchange.body[..]),
                (200, &b"ok"[..]),
                "{answer:?}: {exchange}"
            );
        }
        assert_eq!(upstream.accepted(), accepts, "{answer:?}");
    }
}

#[tokio::test]
async fn response_heads_past_the_limits_are_502() {
    let upstream = Scripted::answering(|n, _| {
        let fields = if n == 1 {
            format!("x-big: {}\r\n", "a".repeat(keygate::proxy::h1::MAX_HEAD))
        } else {
            (0..=keygate::proxy::h1::MAX_HEADERS).map(|i| format!("x-field-{i}: {i}\r\n")).collect()
        };
        keep_open(&format!("HTTP/1.1 200 OK\r\n{fields}content-length: 2\r\n\r\nok"))
    })
    .await;
    let gateway = gateway_for(&upstream).await;
    for _ in 0..2 {
        let exchange = gateway.get("/big-head").send().await;
        assert_error(&exchange, 502, "upstream_unavailable");
    }
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn an_upstream_refusing_an_upload_early_is_answered_and_the_upload_stops() {
    const UPLOAD: usize = 64 * 1024 * 1024;
    let (drained_tx, mut drained_rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Scripted::start(move |mut conn| {
        let drained_tx = drained_tx.clone();
        async move {
            if conn.head().await.is_none() {
                return;
            }
            let refusal =
                b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!";
            if !conn.send(refusal).await {
                return;
            }
            // Close politely: stop sending, keep reading until keygate lets go.
            let _ = conn.stream.shutdown().await;
            let _ = drained_tx.send(conn.drain().await);
        }
    })
    .await;
    let gateway = gateway_for(&upstream).await;

    let mut client = tokio::net::TcpStream::connect(gateway.addr).await.expect("connect");
    let head = format!("POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-length: {UPLOAD}\r\n\r\n");
    client.write_all(head.as_bytes()).await.expect("send head");
    let (mut reader, mut writer) = client.into_split();
    let upload = tokio::spawn(async move {
        let block = vec![b'u'; 64 * 1024];
        for _ in 0..UPLOAD / block.len() {
            if writer.write_all(&block).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(8).any(|w| w == b"too big!") {
        use tokio::io::AsyncReadExt;
        match tokio::time::timeout(support::IO_TIMEOUT, reader.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!("no 413 came back ({other:?}): {}", String::from_utf8_lossy(&got)),
        }
    }
    assert!(got.starts_with(b"HTTP/1.1 413"), "{}", String::from_utf8_lossy(&got));
    let drained = tokio::time::timeout(support::IO_TIMEOUT, drained_rx.recv())
        .await
        .expect("keygate never closed the refused upload's connection")
        .expect("drained");
    assert!(drained < UPLOAD, "keygate sent the whole refused upload ({drained} bytes)");
    upload.abort();
    assert_eq!(upstream.accepted(), 1);
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_is_not_used_for_the_next_request() {
    let closed = Arc::new(tokio::sync::Notify::new());
    let told = Arc::clone(&closed);
    let upstream = Scripted::start(move |mut conn| {
        let told = Arc::clone(&told);
        async move {
            if conn.request().await.is_some() {
                let body = format!("conn {}", conn.n);
                let answer = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                let _ = conn.send(answer.as_bytes()).await;
                // Keep-alive was offered, and then the upstream closes the idle connection.
                drop(conn);
                told.notify_one();
            }
        }
    })
    .await;
    let gateway = gateway_for(&upstream).await;
    let first = gateway.get("/first").send().await;
    assert_eq!((first.status.as_u16(), &first.body[..]), (200, &b"conn 1"[..]), "{first}");
    tokio::time::timeout(support::IO_TIMEOUT, closed.notified()).await.expect("the upstream closed");
    let second = gateway.get("/second").send().await;
    assert_eq!((second.status.as_u16(), &second.body[..]), (200, &b"conn 2"[..]), "{second}");
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn bytes_after_the_end_of_a_response_are_never_read_as_the_next_one() {
    let upstream = Scripted::answering(|_, conn| {
        keep_open(&format!(
            "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nconn {conn}HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled"
        ))
    })
    .await;
    let gateway = gateway_for(&upstream).await;
    for expected in ["conn 1", "conn 2"] {
        let exchange = gateway.get("/").send().await;
        assert_eq!((exchange.status.as_u16(), &exchange.body[..]), (200, expected.as_bytes()), "{exchange}");
    }
    assert_eq!(upstream.accepted(), 2);
}

#[tokio::test]
async fn request_bodies_are_framed_as_the_client_sent_them() {
    let upstream = Scripted::answering(|_, _| keep_open("HTTP/1.1 204 No Content\r\n\r\n")).await;
    let gateway = gateway_for(&upstream).await;
    let get = gateway.get("/get").send().await;
    assert_eq!(get.status, 204, "{get}");
    let post = gateway.request(http::Method::POST, "/post").body(vec![b'p'; 100_000]).send().await;
    assert_eq!(post.status, 204, "{post}");
    let empty = gateway.request(http::Method::PUT, "/empty").header("content-length", "0").send().await;
    assert_eq!(empty.status, 204, "{empty}");
    let chunked = gateway
        .raw(b"POST /chunked HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        .await;
    assert_eq!(chunked.status(), Some(204), "{chunked}");

    let seen = upstream.seen();
    assert_eq!(seen.len(), 4, "{seen:?}");
    let framing = |i: usize| (seen[i].header("content-length"), seen[i].header("transfer-encoding"));
    assert_eq!(framing(0), (None, None), "{:?}", seen[0]);
    assert_eq!(framing(1), (Some("100000".into()), None), "{:?}", seen[1]);
    assert_eq!(seen[1].body, vec![b'p'; 100_000]);
    assert_eq!(framing(2), (Some("0".into()), None), "{:?}", seen[2]);
    assert_eq!(framing(3).1.as_deref(), Some("chunked"), "{:?}", seen[3]);
    let body = String::from_utf8_lossy(&seen[3].body);
    let decoded: String = body.split("\r\n").skip(1).step_by(2).collect();
    assert_eq!(decoded, "abcde", "{body:?}");
    assert_eq!(upstream.accepted(), 1, "every exchange here ended cleanly");
}

#[tokio::test]
async fn a_request_body_that_fails_midway_is_400_and_its_upstream_connection_closed() {
    let (drained_tx, mut drained_rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Scripted::start(move |mut conn| {
        let drained_tx = drained_tx.clone();
        async move {
            // Whether or not the head got here before the body broke, the connection must end.
            let drained = if conn.head().await.is_some() { conn.drain().await } else { 0 };
            let _ = drained_tx.send(drained);
        }
    })
    .await;
    let gateway = gateway_for(&upstream).await;
    let mut client = tokio::net::TcpStream::connect(gateway.addr).await.expect("connect");
    client
        .write_all(
            b"POST /broken HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await
        .expect("send");
    client.write_all(b"zz\r\n").await.expect("send the bad chunk");
    let response = support::read_http1_response(&mut client, support::IO_TIMEOUT).await;
    let response = response.unwrap_or_else(|partial| panic!("no whole answer: {partial}"));
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    let drained = tokio::time::timeout(support::IO_TIMEOUT, drained_rx.recv())
        .await
        .expect("keygate kept the upstream connection of a failed body open")
        .expect("drained");
    assert!(drained <= "5\r\nhello\r\n".len(), "{drained}");
}

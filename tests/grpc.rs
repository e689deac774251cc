//! HTTP/2 and gRPC upstreams (`protocol = "h2"`, SPEC §8): a real tonic service behind
//! keygate, called by a tonic client over h2c and over TLS; keygate's own answers in gRPC's
//! form (§2.5); trailers both ways; streaming, cancels and resets; plain HTTP/2 to an h2
//! upstream.

mod support;

use std::convert::Infallible;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::grpc::{ECHO, GrpcClient, GrpcUpstream, HOLD, Note};
use support::pki::Pki;
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

const PREFIX: &str = "/keygate.test.Notes/";

fn h2_route(upstream: &str) -> Route {
    Route::new(PREFIX, upstream).field("protocol", "\"h2\"")
}

#[track_caller]
fn assert_status(result: Result<Note, tonic::Status>, code: Code, message: &str) {
    match result {
        Ok(note) => panic!("expected {code:?} {message}, the call succeeded: {note:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{status:?}");
            assert_eq!(status.message(), message, "{status:?}");
        }
    }
}

/// No header value the upstream saw holds the key, or any 8-character piece of its secret part.
#[track_caller]
fn assert_no_key(headers: &HeaderMap, key: &Key) {
    let secret = key.secret.as_bytes();
    for (name, value) in headers {
        for piece in secret.windows(8).step_by(4) {
            assert!(
                !value.as_bytes().windows(8).any(|w| w == piece),
                "part of the key travelled upstream in {name}: {value:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_valid_key_reaches_the_grpc_server_as_identity_metadata_without_the_key() {
    let upstream = GrpcUpstream::start(None).await;
    let key = Key::generated("grpc-ok", &["call"]);
    let gateway = GatewayConfig::new()
        .sources(&["header:x-api-key", "authorization:Bearer"])
        .route(h2_route(&upstream.url()).scope("POST", &["call"]))
        .key(key.clone())
        .start()
        .await;
    for (name, value) in
        [("x-api-key", key.secret.clone()), ("authorization", format!("Bearer {}", key.secret))]
    {
        let mut client = GrpcClient::h2c(gateway.addr).with(name, &value);
        let note = client.echo("hello").await.unwrap_or_else(|status| panic!("key in {name}: {status:?}"));
        assert_eq!(note, Note { text: "echo:hello".into(), seq: 7 });
    }
    let calls = upstream.seen.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for (path, headers) in &calls {
        assert_eq!(path, ECHO);
        assert_eq!(
            headers.get("x-keygate-key-id").map(|v| v.as_bytes()),
            Some(key.id.as_bytes()),
            "{headers:?}"
        );
        assert_eq!(headers.get("x-keygate-scopes").map(|v| v.as_bytes()), Some(&b"call"[..]), "{headers:?}");
        assert_eq!(headers.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]), "{headers:?}");
        assert!(headers.get("x-api-key").is_none() && headers.get("authorization").is_none(), "{headers:?}");
        assert_no_key(headers, &key);
    }
    // Streams of both calls shared one upstream connection.
    assert_eq!(upstream.conns.accepted(), 1);
}

#[tokio::test]
async fn rejections_reach_grpc_clients_as_grpc_statuses_and_never_the_server() {
    let upstream = GrpcUpstream::start(None).await;
    let reader = Key::generated("reader", &["read"]);
    let caller = Key::generated("caller", &["call"]);
    let limited = Key::generated("limited", &["call"]);
    let config = GatewayConfig::new().route(h2_route(&upstream.url()).scope("POST", &["call"]));
    let keys = format!(
        "{}\n{}rate_limit = \"1/h\"\n",
        keys_toml(&[reader.clone(), caller.clone()]),
        limited.to_toml()
    );
    let gateway = TestGateway::start(&config.gateway_toml(), &keys).await;
    let client = GrpcClient::h2c(gateway.addr);

    assert_status(client.clone().echo("x").await, Code::Unauthenticated, "missing_api_key");
    // The last character changed (so the checksum fails): never the key itself.
    let (body, last) = caller.secret.split_at(caller.secret.len() - 1);
    let bogus = format!("{body}{}", if last == "x" { "y" } else { "x" });
    assert_status(
        client.clone().with("x-api-key", &bogus).echo("x").await,
        Code::Unauthenticated,
        "invalid_api_key",
    );
    assert_status(
        client.clone().with("x-api-key", &reader.secret).echo("x").await,
        Code::PermissionDenied,
        "insufficient_scope",
    );
    let mut limited_client = client.clone().with("x-api-key", &limited.secret);
    limited_client.echo("first").await.expect("the first call of a 1/h key");
    assert_status(limited_client.echo("second").await, Code::ResourceExhausted, "rate_limited");
    let elsewhere =
        client.clone().with("x-api-key", &caller.secret).unary("/other.Service/Do", Note::default()).await;
    assert_status(elsewhere, Code::Unimplemented, "no_route");

    let calls = upstream.seen.calls();
    assert_eq!(calls.len(), 1, "only the admitted call may reach the server: {calls:?}");
}

#[tokio::test]
async fn ten_thousand_message_streams_arrive_whole_both_ways() {
    let upstream = GrpcUpstream::start(None).await;
    let key = Key::generated("streams", &["call"]);
    let gateway = GatewayConfig::new().route(h2_route(&upstream.url())).key(key.clone()).start().await;
    let mut client = GrpcClient::h2c(gateway.addr).with("x-api-key", &key.secret);

    let notes = client.count(10_000).await.expect("server streaming");
    assert_eq!(notes.len(), 10_000);
    assert!(notes.iter().enumerate().all(|(i, n)| n.seq as usize == i), "out of order or missing");

    let echoes = client.chat(10_000).await.expect("bidirectional streaming");
    assert_eq!(echoes.len(), 10_000);
    for (i, note) in echoes.iter().enumerate() {
        assert_eq!((note.seq as usize, note.text.as_str()), (i, format!("echo:line {i}").as_str()));
    }
}

#[tokio::test]
async fn a_cancelled_call_is_cancelled_at_the_server() {
    let upstream = GrpcUpstream::start(None).await;
    let key = Key::generated("cancel", &["call"]);
    let gateway = GatewayConfig::new().route(h2_route(&upstream.url())).key(key.clone()).start().await;
    let mut client = GrpcClient::h2c(gateway.addr).with("x-api-key", &key.secret);
    let call = tokio::spawn(async move { client.unary(HOLD, Note::default()).await });
    upstream.seen.wait_for("the held call", |seen| seen.held.load(Ordering::SeqCst) == 1).await;
    call.abort();
    upstream.seen.wait_for("the cancel", |seen| seen.cancelled.load(Ordering::SeqCst) == 1).await;

    // A cancelled stream of a long-lived response is reset upstream as well.
    let mut client = GrpcClient::h2c(gateway.addr).with("x-api-key", &key.secret);
    let stream = client.trickle().await.expect("trickle call");
    drop(stream);
    drop(client);
    // The connection stays: the reset ended only that stream.
    let mut client = GrpcClient::h2c(gateway.addr).with("x-api-key", &key.secret);
    client.echo("after").await.expect("a call after the cancels");
    assert_eq!(upstream.conns.accepted(), 1, "a cancel closed the shared upstream connection");
}

#[tokio::test]
async fn grpc_over_tls_to_keygate_and_from_keygate_to_the_server() {
    let ca = Pki::new("grpc CA");
    let upstream = GrpcUpstream::start_tls(ca.leaf("grpc upstream").server(&[b"h2"])).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let listener = ca.leaf("keygate");
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    std::fs::write(path("ca.pem"), &ca.ca_pem).expect("write ca.pem");
    std::fs::write(path("cert.pem"), &listener.cert_pem).expect("write cert.pem");
    std::fs::write(path("key.pem"), &listener.key_pem).expect("write key.pem");
    let key = Key::generated("tls", &["call"]);
    let gateway = GatewayConfig::new()
        .server("tls_cert", &toml_str(&path("cert.pem")))
        .server("tls_key", &toml_str(&path("key.pem")))
        .route(h2_route(&upstream.https_url()).field("ca_file", &toml_str(&path("ca.pem"))))
        .key(key.clone())
        .start()
        .await;
    let client = GrpcClient::tls(gateway.addr, ca.client(&[b"h2"], false));
    let mut keyed = client.clone().with("x-api-key", &key.secret);
    assert_eq!(keyed.echo("over tls").await.expect("unary over TLS").text, "echo:over tls");
    assert_eq!(keyed.count(2_000).await.expect("streaming over TLS").len(), 2_000);
    assert_status(client.clone().echo("no key").await, Code::Unauthenticated, "missing_api_key");
    let calls = upstream.seen.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    for (_, headers) in &calls {
        assert_eq!(headers.get("x-forwarded-proto").map(|v| v.as_bytes()), Some(&b"https"[..]));
        assert_no_key(headers, &key);
    }
}

#[tokio::test]
async fn an_https_upstream_that_does_not_choose_h2_is_a_502() {
    let ca = Pki::new("alpn CA");
    let upstream = RecordingUpstream::start_tls(ca.leaf("http1 only").server(&[b"http/1.1"])).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.ca_pem).expect("write ca.pem");
    let key = Key::generated("alpn", &["call"]);
    let gateway = GatewayConfig::new()
        .route(
            Route::new("/", &upstream.https_url())
                .field("protocol", "\"h2\"")
                .field("ca_file", &toml_str(&ca_file.to_string_lossy())),
        )
        .key(key.clone())
        .start()
        .await;
    let got = gateway.get("/plain").header("x-api-key", &key.secret).send().await;
    assert_error(&got, 502, "upstream_unavailable");
    let mut client = GrpcClient::h2c(gateway.addr).with("x-api-key", &key.secret);
    assert_status(client.echo("x").await, Code::Unavailable, "upstream_unavailable");
    assert_eq!(upstream.count(), 0, "an HTTP/1.1-only upstream got a request");
}

#[tokio::test]
async fn upstream_failures_reach_grpc_clients_as_unavailable_or_deadline_exceeded() {
    let upstream = GrpcUpstream::start(Some(1)).await;
    let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let closed_url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let key = Key::generated("failures", &["call"]);
    let gateway = GatewayConfig::new()
        .server("request_timeout", "\"1s\"")
        .server("upstream_max_connections", "1")
        .route(h2_route(&upstream.url()))
        .route(Route::new("/gone.Service/", &closed_url).field("protocol", "\"h2\""))
        .key(key.clone())
        .start()
        .await;
    let client = GrpcClient::h2c(gateway.addr).with("x-api-key", &key.secret);

    let gone = client.clone().unary("/gone.Service/Do", Note::default()).await;
    assert_status(gone, Code::Unavailable, "upstream_unavailable");
    assert_status(
        client.clone().unary(HOLD, Note::default()).await,
        Code::DeadlineExceeded,
        "upstream_timeout",
    );

    // The server allows one stream and keygate one connection: while a long-lived stream holds
    // it, another call waits for it and, within request_timeout, gets none.
    let held = client.clone().trickle().await.expect("trickle call");
    assert_status(client.clone().echo("queued").await, Code::Unavailable, "upstream_busy");
    drop(held);
}

#[tokio::test]
async fn streams_beyond_the_peers_limit_open_another_connection() {
    let upstream = GrpcUpstream::start(Some(2)).await;
    let key = Key::generated("peer-limit", &["call"]);
    let gateway = GatewayConfig::new().route(h2_route(&upstream.url())).key(key.clone()).start().await;
    let client = GrpcClient::h2c(gateway.addr).with("x-api-key", &key.secret);
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move { client.unary(HOLD, Note::default()).await })
        })
        .collect();
    upstream.seen.wait_for("six held calls", |seen| seen.held.load(Ordering::SeqCst) == 6).await;
    assert_eq!(upstream.conns.accepted(), 3, "6 streams at 2 per connection");
    for call in calls {
        call.abort();
    }
    upstream.seen.wait_for("six cancels", |seen| seen.cancelled.load(Ordering::SeqCst) == 6).await;
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP/2 to an h2 upstream
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn plain_requests_reach_an_h2_upstream_over_http2() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("plain-h2", &["read", "write"]);
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &upstream.url()).field("protocol", "\"h2\""))
        .key(key.clone())
        .start()
        .await;
    let body = pattern(300_000);
    let got = gateway
        .request(http::Method::POST, "/upload?x=1")
        .header("x-api-key", &key.secret)
        .header("te", "trailers")
        .body(body.clone())
        .send()
        .await;
    assert_eq!(got.status, StatusCode::OK, "{got}");
    assert_eq!(&got.body[..], &body[..], "the echo came back changed\n{got}");
    let seen = upstream.expect_received(&got);
    assert_eq!(seen.version, Version::HTTP_2, "{}", both(&got, &seen));
    assert_eq!(seen.uri, "/upload?x=1", "{}", both(&got, &seen));
    assert_eq!(seen.header("x-keygate-key-id"), Some(key.id.as_str()), "{}", both(&got, &seen));
    assert_eq!(seen.header("te"), Some("trailers"), "{}", both(&got, &seen));
    assert!(seen.header("x-api-key").is_none(), "{}", both(&got, &seen));
    assert_eq!(&seen.body[..], &body[..]);

    let got = gateway.get("/over-h2").header("x-api-key", &key.secret).http2().send().await;
    assert_eq!(got.status, StatusCode::OK, "{got}");
    let seen = upstream.expect_received(&got);
    assert_eq!(seen.version, Version::HTTP_2, "{}", both(&got, &seen));
    assert!(
        seen.header("te").is_none(),
        "te went upstream though the client sent none\n{}",
        both(&got, &seen)
    );
    assert_eq!(upstream.connections().accepted(), 1);
}

/// An h2c upstream that answers each request with its body, and with response trailers
/// `x-echo-<name>` for each request trailer.
async fn trailer_echo_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let collected = req.into_body().collect().await?;
                    let mut echoed = HeaderMap::new();
                    for (name, value) in collected.trailers().into_iter().flatten() {
                        let name =
                            http::HeaderName::from_bytes(format!("x-echo-{name}").as_bytes()).expect("name");
                        echoed.insert(name, value.clone());
                    }
                    let frames = vec![
                        Ok::<_, Infallible>(Frame::data(collected.to_bytes())),
                        Ok(Frame::trailers(echoed)),
                    ];
                    Ok::<_, hyper::Error>(Response::new(StreamBody::new(tokio_stream::iter(frames))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn trailers_pass_both_ways() {
    let (upstream, task) = trailer_echo_upstream().await;
    let key = Key::generated("trailers", &["write"]);
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &format!("http://{upstream}")).field("protocol", "\"h2\""))
        .key(key.clone())
        .start()
        .await;
    let io = TokioIo::new(TcpStream::connect(gateway.addr).await.expect("connect"));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2");
    tokio::spawn(conn);
    let mut trailers = HeaderMap::new();
    trailers.insert("checksum", "abc123".parse().expect("value"));
    let frames =
        vec![Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"payload"))), Ok(Frame::trailers(trailers))];
    let request = Request::post(format!("http://{}/t", gateway.addr))
        .header("x-api-key", &key.secret)
        .header("te", "trailers")
        .body(StreamBody::new(tokio_stream::iter(frames)))
        .expect("request");
    let response = tokio::time::timeout(IO_TIMEOUT, sender.send_request(request))
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    let collected = tokio::time::timeout(IO_TIMEOUT, response.into_body().collect())
        .await
        .expect("in time")
        .expect("body");
    let got_trailers = collected.trailers().cloned();
    assert_eq!(&collected.to_bytes()[..], b"payload");
    let got_trailers = got_trailers.expect("the response trailers were lost");
    assert_eq!(
        got_trailers.get("x-echo-checksum").map(|v| v.as_bytes()),
        Some(&b"abc123"[..]),
        "{got_trailers:?}"
    );
    task.abort();
}

type Feed = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::io::Error>>;

/// An h2c upstream whose response bodies the test writes: each request hands the test a
/// sender for its body; an `Err` sent into it makes the upstream reset the stream.
async fn fed_upstream()
-> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Feed>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (feeds, fed) = tokio::sync::mpsc::unbounded_channel::<Feed>();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let feeds = feeds.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: Request<Incoming>| {
                    let (feed, body) = tokio::sync::mpsc::channel(4);
                    let _ = feeds.send(feed);
                    let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(body));
                    async move { Ok::<_, Infallible>(Response::new(body)) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, fed, task)
}

#[tokio::test]
async fn an_upstream_reset_mid_body_reaches_the_client_as_a_reset() {
    let (upstream, mut fed, task) = fed_upstream().await;
    let key = Key::generated("reset", &["read"]);
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &format!("http://{upstream}")).field("protocol", "\"h2\""))
        .key(key.clone())
        .start()
        .await;

    // HTTP/1.1 client: the chunked response must never get its last chunk.
    let mut client = TcpStream::connect(gateway.addr).await.expect("connect");
    let head = format!("GET /reset HTTP/1.1\r\nHost: x\r\nx-api-key: {}\r\n\r\n", key.secret);
    tokio::io::AsyncWriteExt::write_all(&mut client, head.as_bytes()).await.expect("write");
    let feed = tokio::time::timeout(IO_TIMEOUT, fed.recv()).await.expect("request upstream").expect("feed");
    feed.send(Ok(Frame::data(Bytes::from_static(b"partial")))).await.expect("feed data");
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !received.windows(7).any(|w| w == b"partial") {
        let n = tokio::time::timeout(IO_TIMEOUT, tokio::io::AsyncReadExt::read(&mut client, &mut buf))
            .await
            .expect("data in time")
            .expect("read");
        assert!(n > 0, "closed before the data: {}", preview(&received, 400));
        received.extend_from_slice(&buf[..n]);
    }
    feed.send(Err(std::io::Error::other("the upstream gives up"))).await.expect("feed reset");
    loop {
        match tokio::time::timeout(IO_TIMEOUT, tokio::io::AsyncReadExt::read(&mut client, &mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => {
                panic!("the connection stayed open after the upstream reset: {}", preview(&received, 400))
            }
        }
    }
    assert!(
        !received.ends_with(b"0\r\n\r\n"),
        "the response ended as if complete: {}",
        preview(&received, 400)
    );

    // HTTP/2 client: the stream is reset, its body fails.
    let io = TokioIo::new(TcpStream::connect(gateway.addr).await.expect("connect"));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2");
    tokio::spawn(conn);
    let request = Request::get(format!("http://{}/reset", gateway.addr))
        .header("x-api-key", &key.secret)
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let sent = tokio::spawn(sender.send_request(request));
    let feed = tokio::time::timeout(IO_TIMEOUT, fed.recv()).await.expect("request upstream").expect("feed");
    feed.send(Ok(Frame::data(Bytes::from_static(b"partial")))).await.expect("feed data");
    let response =
        tokio::time::timeout(IO_TIMEOUT, sent).await.expect("head in time").expect("task").expect("head");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = tokio::time::timeout(IO_TIMEOUT, body.frame()).await.expect("data in time");
    assert!(
        matches!(first, Some(Ok(ref f)) if f.data_ref().is_some_and(|d| &d[..] == b"partial")),
        "{first:?}"
    );
    feed.send(Err(std::io::Error::other("the upstream gives up"))).await.expect("feed reset");
    let next = tokio::time::timeout(IO_TIMEOUT, body.frame()).await.expect("reset in time");
    assert!(matches!(next, Some(Err(_))), "the client's stream was not reset: {next:?}");
    task.abort();
}

/// An h2c upstream that answers one request per connection and then closes it gracefully
/// (GOAWAY), as nginx does after `keepalive_requests`; streams it will not serve it refuses.
async fn one_request_per_connection_upstream() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = ::h2::server::handshake(stream).await else { return };
                if let Some(Ok((_request, mut respond))) = conn.accept().await {
                    if let Ok(mut body) = respond.send_response(Response::new(()), false) {
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    }
                    conn.graceful_shutdown();
                }
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    respond.send_reset(::h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn an_upstream_closing_connections_gracefully_loses_no_request() {
    let (upstream, task) = one_request_per_connection_upstream().await;
    let key = Key::generated("goaway", &["read"]);
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &format!("http://{upstream}")).field("protocol", "\"h2\""))
        .key(key.clone())
        .start()
        .await;
    for n in 0..5 {
        let got = gateway.get("/one").header("x-api-key", &key.secret).send().await;
        assert_eq!(got.status, StatusCode::OK, "request {n}\n{got}");
    }
    // At once: each connection serves one and refuses the others, which keygate sends again
    // on the next connection (a pathological upstream: six requests need up to six tries).
    let calls: Vec<_> =
        (0..6).map(|_| tokio::spawn(gateway.get("/many").header("x-api-key", &key.secret).send())).collect();
    for call in calls {
        let got = call.await.expect("call");
        assert_eq!(got.status, StatusCode::OK, "{got}");
        assert_eq!(&got.body[..], b"ok", "{got}");
    }
    task.abort();
}

#[tokio::test]
async fn an_h2_upstream_connection_is_kept_across_reloads() {
    let upstream = GrpcUpstream::start(None).await;
    let key = Key::generated("reload", &["call"]);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = GatewayConfig::new().route(h2_route(&upstream.url())).key(key.clone());
    let config_path = dir.path().join("keygate.toml");
    std::fs::write(&config_path, config.gateway_toml()).expect("write config");
    std::fs::write(dir.path().join("keys.toml"), config.keys_toml()).expect("write keys");
    let gateway = WatchedGateway::start(&config_path).await;
    let mut client = GrpcClient::h2c(gateway.addr).with("x-api-key", &key.secret);
    client.echo("before").await.expect("before the reload");
    let generation = gateway.status().generation;
    let reloaded = GatewayConfig::new()
        .route(h2_route(&upstream.url()))
        .route(Route::new("/other/", &upstream.url()))
        .key(key.clone());
    std::fs::write(&config_path, reloaded.gateway_toml()).expect("rewrite config");
    let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
    while gateway.status().generation == generation {
        assert!(tokio::time::Instant::now() < deadline, "the reload never happened");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    client.echo("after").await.expect("after the reload");
    assert_eq!(upstream.conns.accepted(), 1, "the reload dropped the pooled h2 connection");
}

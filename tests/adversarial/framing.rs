//! Attack class 3: framing and smuggling.

use super::*;

/// A request whose framing is in doubt, with a key-less request hidden where a parser that
/// frames it differently would find a second request.
struct Smuggle {
    name: &'static str,
    bytes: Vec<u8>,
    probe: String,
    /// The body the first request must reach the upstream with, if keygate forwards it at all.
    forwarded_body: Option<Vec<u8>>,
    /// First-response statuses that count as a refusal (0: closed without an answer).
    refusals: &'static [u16],
}

const REFUSE: &[u16] = &[400, 501];
const REFUSE_400: &[u16] = &[400];
/// A broken chunked body is found while streaming: keygate may answer 400 or 502, or close.
const REFUSE_MID_BODY: &[u16] = &[400, 502, 0];

/// The hidden request: no key, so it may never reach the upstream, whoever parses it.
fn smuggled_request(i: usize) -> String {
    format!("GET /admin/smuggled-{i} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Smuggled: yes\r\n\r\n")
}

fn smuggle_cases() -> Vec<Smuggle> {
    let chunked_hello = "5\r\nhello\r\n0\r\n\r\n";
    // (name, request line version, header lines, body after the head, forwarded body, refusals)
    type Row = (&'static str, &'static str, Vec<String>, String, Option<String>, &'static [u16]);
    let rows = |i: usize| -> Vec<Row> {
        let smug = smuggled_request(i);
        let cl_te_body = format!("0\r\n\r\n{smug}");
        let te_cl_body = format!("{:x}\r\n{smug}\r\n0\r\n\r\n", smug.len());
        let hello_then = format!("{chunked_hello}{smug}");
        let plain_then = format!("hello{smug}");
        let te = "Transfer-Encoding: chunked".to_owned();
        let cl = |n: usize| format!("Content-Length: {n}");
        let h11 = "HTTP/1.1";
        vec![
            (
                "CL.TE, CL first",
                h11,
                vec![cl(cl_te_body.len()), te.clone()],
                cl_te_body.clone(),
                Some("".into()),
                REFUSE,
            ),
            (
                "CL.TE, TE first",
                h11,
                vec![te.clone(), cl(cl_te_body.len())],
                cl_te_body.clone(),
                Some("".into()),
                REFUSE,
            ),
            ("TE.CL, TE first", h11, vec![te.clone(), cl(4)], te_cl_body.clone(), Some(smug.clone()), REFUSE),
            ("TE.CL, CL first", h11, vec![cl(4), te.clone()], te_cl_body.clone(), Some(smug.clone()), REFUSE),
            (
                "TE chunked, identity",
                h11,
                vec!["Transfer-Encoding: chunked, identity".into(), cl(hello_then.len())],
                hello_then.clone(),
                None,
                REFUSE,
            ),
            (
                "TE identity, chunked",
                h11,
                vec!["Transfer-Encoding: identity, chunked".into()],
                hello_then.clone(),
                None,
                REFUSE,
            ),
            (
                "space before TE colon",
                h11,
                vec!["Transfer-Encoding : chunked".into()],
                hello_then.clone(),
                None,
                REFUSE_400,
            ),
            (
                "TE xchunked",
                h11,
                vec!["Transfer-Encoding: xchunked".into(), cl(hello_then.len())],
                hello_then.clone(),
                None,
                REFUSE,
            ),
            ("TE twice", h11, vec![te.clone(), te.clone()], hello_then.clone(), None, REFUSE),
            (
                "TE chunked then identity",
                h11,
                vec![te.clone(), "Transfer-Encoding: identity".into()],
                hello_then.clone(),
                None,
                REFUSE,
            ),
            (
                "TE identity",
                h11,
                vec!["Transfer-Encoding: identity".into(), cl(5)],
                plain_then.clone(),
                None,
                REFUSE,
            ),
            (
                "TE quoted",
                h11,
                vec!["Transfer-Encoding: \"chunked\"".into()],
                hello_then.clone(),
                None,
                REFUSE,
            ),
            (
                "TE with parameter",
                h11,
                vec!["Transfer-Encoding: chunked;x=1".into()],
                hello_then.clone(),
                None,
                REFUSE,
            ),
            (
                "TE obs-fold",
                h11,
                vec!["Transfer-Encoding:\r\n chunked".into()],
                hello_then.clone(),
                None,
                REFUSE_400,
            ),
            (
                "TE upper case",
                h11,
                vec!["Transfer-Encoding: CHUNKED".into()],
                hello_then.clone(),
                Some("hello".into()),
                REFUSE,
            ),
            (
                "TE after a tab",
                h11,
                vec!["Transfer-Encoding:\tchunked".into()],
                hello_then.clone(),
                Some("hello".into()),
                REFUSE,
            ),
            ("TE in HTTP/1.0", "HTTP/1.0", vec![te.clone()], hello_then.clone(), None, REFUSE_400),
            ("two different CL", h11, vec![cl(5), cl(6)], plain_then.clone(), None, REFUSE_400),
            ("CL +5", h11, vec!["Content-Length: +5".into()], plain_then.clone(), None, REFUSE_400),
            ("CL 5, 6", h11, vec!["Content-Length: 5, 6".into()], plain_then.clone(), None, REFUSE_400),
            (
                "CL 5, 5",
                h11,
                vec!["Content-Length: 5, 5".into()],
                plain_then.clone(),
                Some("hello".into()),
                REFUSE_400,
            ),
            ("CL -5", h11, vec!["Content-Length: -5".into()], plain_then.clone(), None, REFUSE_400),
            (
                "CL huge",
                h11,
                vec!["Content-Length: 99999999999999999999999".into()],
                plain_then.clone(),
                None,
                REFUSE_400,
            ),
            ("CL 0x5", h11, vec!["Content-Length: 0x5".into()], plain_then.clone(), None, REFUSE_400),
            ("CL '5 5'", h11, vec!["Content-Length: 5 5".into()], plain_then.clone(), None, REFUSE_400),
            (
                "space before CL colon",
                h11,
                vec!["Content-Length : 5".into()],
                plain_then.clone(),
                None,
                REFUSE_400,
            ),
            (
                "CL twice, equal",
                h11,
                vec![cl(5), cl(5)],
                plain_then.clone(),
                Some("hello".into()),
                REFUSE_400,
            ),
            (
                "CL 005",
                h11,
                vec!["Content-Length: 005".into()],
                plain_then.clone(),
                Some("hello".into()),
                REFUSE_400,
            ),
            ("CL then a second request", h11, vec![cl(5)], plain_then.clone(), Some("hello".into()), &[]),
            (
                "chunk extension",
                h11,
                vec![te.clone()],
                format!("5;ext=1\r\nhello\r\n0\r\n\r\n{smug}"),
                Some("hello".into()),
                REFUSE_MID_BODY,
            ),
            (
                "quoted chunk extension",
                h11,
                vec![te.clone()],
                format!("5;a=\"b;c\"\r\nhello\r\n0\r\n\r\n{smug}"),
                Some("hello".into()),
                REFUSE_MID_BODY,
            ),
            (
                "chunk size 0x5",
                h11,
                vec![te.clone()],
                format!("0x5\r\nhello\r\n0\r\n\r\n{smug}"),
                None,
                REFUSE_MID_BODY,
            ),
            (
                "chunk size overflow",
                h11,
                vec![te.clone()],
                format!("fffffffffffffffffff1\r\nhello\r\n0\r\n\r\n{smug}"),
                None,
                REFUSE_MID_BODY,
            ),
            (
                "chunk size -5",
                h11,
                vec![te.clone()],
                format!("-5\r\nhello\r\n0\r\n\r\n{smug}"),
                None,
                REFUSE_MID_BODY,
            ),
            (
                "no CRLF after chunk data",
                h11,
                vec![te.clone()],
                format!("5\r\nhelloXX0\r\n\r\n{smug}"),
                None,
                REFUSE_MID_BODY,
            ),
            (
                "bare LF chunks",
                h11,
                vec![te.clone()],
                format!("5\nhello\n0\n\n{smug}"),
                Some("hello".into()),
                REFUSE_MID_BODY,
            ),
            (
                "chunk size after a space",
                h11,
                vec![te.clone()],
                format!(" 5\r\nhello\r\n0\r\n\r\n{smug}"),
                Some("hello".into()),
                REFUSE_MID_BODY,
            ),
            (
                "chunk size before spaces",
                h11,
                vec![te.clone()],
                format!("5  \r\nhello\r\n0\r\n\r\n{smug}"),
                Some("hello".into()),
                REFUSE_MID_BODY,
            ),
            (
                "chunk shorter than its size",
                h11,
                vec![te.clone()],
                format!("a\r\nhello\r\n0\r\n\r\n{smug}"),
                None,
                REFUSE_MID_BODY,
            ),
            (
                "chunk longer than its size",
                h11,
                vec![te.clone()],
                format!("3\r\nhello\r\n0\r\n\r\n{smug}"),
                None,
                REFUSE_MID_BODY,
            ),
            ("no last chunk", h11, vec![te.clone()], format!("5\r\nhello\r\n{smug}"), None, REFUSE_MID_BODY),
        ]
    };
    let count = rows(0).len();
    (0..count)
        .map(|i| {
            let (name, version, lines, body, forwarded, refusals) = rows(i).swap_remove(i);
            let probe = next_probe();
            let mut bytes =
                format!("POST /public/first-{i} {version}\r\nHost: 127.0.0.1\r\n{PROBE_HEADER}: {probe}\r\n");
            for line in lines {
                bytes.push_str(&line);
                bytes.push_str("\r\n");
            }
            bytes.push_str("\r\n");
            bytes.push_str(&body);
            Smuggle {
                name,
                bytes: bytes.into_bytes(),
                probe,
                forwarded_body: forwarded.map(String::into_bytes),
                refusals,
            }
        })
        .collect()
}

/// What the upstream's framing of one forwarded request says is wrong with it, if anything.
fn framing_problems(seen: &Recorded, body: &[u8]) -> Vec<String> {
    let mut problems = Vec::new();
    if seen.body[..] != body[..] {
        problems.push(format!(
            "the upstream got body {} instead of {}",
            preview(&seen.body, 200),
            preview(body, 200)
        ));
    }
    let lengths = seen.header_all("content-length");
    if lengths.len() > 1
        || lengths.first().is_some_and(|l| l.trim().parse::<usize>().ok() != Some(seen.body.len()))
    {
        problems.push(format!("the upstream got Content-Length {lengths:?} for {} bytes", seen.body.len()));
    }
    if !lengths.is_empty() && seen.headers.contains_key("transfer-encoding") {
        problems.push("the upstream got both Content-Length and Transfer-Encoding".into());
    }
    problems
}

#[tokio::test]
async fn ambiguous_framing_is_refused_or_forwarded_as_one_clean_request_and_never_smuggles() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).start().await;
    let cases = smuggle_cases();
    let mut running = JoinSet::new();
    for (index, case) in cases.iter().enumerate() {
        let (addr, bytes) = (gateway.addr, case.bytes.clone());
        running.spawn(async move {
            // A key-less sentinel with `Connection: close` ends the pipeline: the server closes
            // after answering it (half-closing instead would make hyper drop a pending answer).
            let sentinel = format!(
                "GET /admin/sentinel-{index} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
            );
            let mut conn = RawConn::open(addr).await;
            conn.send(&bytes).await;
            conn.send(sentinel.as_bytes()).await;
            let closed = conn.closed_within(IO_TIMEOUT).await;
            (index, parse_all(&conn.received, conn.eof), closed, conn.to_string())
        });
    }
    let mut results = Vec::new();
    while let Some(done) = running.join_next().await {
        results.push(done.expect("a smuggling case panicked"));
    }
    results.sort_by_key(|r| r.0);
    let mut failures = Vec::new();
    for (index, responses, closed, transcript) in results {
        let case = &cases[index];
        let seen = seen_probe(&upstream, &case.probe);
        let first = responses.first().map(|r| r.status);
        let mut problems = Vec::new();
        match (&seen, &case.forwarded_body) {
            (Some(seen), Some(body)) => {
                problems.extend(framing_problems(seen, body));
                if first != Some(200) {
                    problems.push(format!("forwarded, but the client got {first:?}"));
                }
            }
            (Some(seen), None) => problems.push(format!("an ambiguous request was forwarded: {seen:?}")),
            (None, _) => {
                let refused = first.map_or(case.refusals.contains(&0), |s| case.refusals.contains(&s));
                if !refused {
                    problems.push(format!("not forwarded, and {first:?} is not one of {:?}", case.refusals));
                }
            }
        }
        eprintln!(
            "framing case {:?}: first answer {first:?}, forwarded {}, {} answers",
            case.name,
            seen.is_some(),
            responses.len()
        );
        if let Some(later) = responses.iter().skip(1).find(|r| r.status < 300) {
            problems.push(format!("a later request on the connection was answered {}", later.status));
        }
        if !closed {
            problems.push("the connection stayed open after a `Connection: close` request".into());
        }
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {}\n{transcript}\nupstream saw: {seen:?}",
                case.name,
                problems.join("; ")
            ));
        }
    }
    for seen in upstream.requests() {
        if seen.uri.contains("smuggled") || seen.header("x-smuggled").is_some() {
            failures.push(format!("A SMUGGLED REQUEST REACHED THE UPSTREAM: {seen:?}"));
        }
    }
    assert_no_failures("framing cases", cases.len(), &failures);
    let after = gateway.raw(&RawRequest::get("/admin/still-up").who(Who::Admin).bytes()).await;
    assert_eq!(after.status(), Some(200), "{after}");
}

#[tokio::test]
async fn pipelined_requests_are_each_judged_on_their_own_credentials() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).start().await;
    let hidden = "GET /public/hidden-in-body HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let requests: Vec<(RawRequest, u16, Option<&str>)> = vec![
        (RawRequest::get("/admin/p1").who(Who::Admin).keep_alive(), 200, Some("admin001")),
        (RawRequest::get("/admin/p2").keep_alive(), 401, None),
        (RawRequest::get("/admin/p3").who(Who::Reader).keep_alive(), 403, None),
        (RawRequest::get("/p4").key(UNKNOWN_SECRET).keep_alive(), 401, None),
        (RawRequest::get("/p5").key(REVOKED_SECRET).keep_alive(), 401, None),
        (RawRequest::get("/p6").who(Who::Reader).keep_alive(), 200, Some("reader01")),
        (RawRequest::new("POST", "/public/p7").body(hidden).keep_alive(), 200, None),
        (RawRequest::get("/p8").key(EXPIRED_SECRET).keep_alive(), 401, None),
        (RawRequest::get("/admin/p9"), 401, None),
    ];
    let mut conn = RawConn::open(gateway.addr).await;
    let all: Vec<u8> = requests.iter().flat_map(|(r, _, _)| r.bytes()).collect();
    conn.send(&all).await;
    let mut failures = Vec::new();
    for (request, status, identity) in &requests {
        let target = String::from_utf8_lossy(&request.target).into_owned();
        let Some(response) = conn.response().await else {
            failures.push(format!("{target}: no response"));
            break;
        };
        let seen = seen_probe(&upstream, &request.probe);
        let ok = response.status == *status
            && match (identity, &seen) {
                (Some(id), Some(seen)) => seen.header_all("x-keygate-key-id") == [*id],
                (None, Some(seen)) => *status == 200 && seen.header("x-keygate-key-id").is_none(),
                (_, None) => *status != 200,
            };
        if !ok {
            failures.push(format!(
                "{target}: expected {status} as {identity:?}, got {response}\nupstream saw: {seen:?}"
            ));
        }
    }
    if upstream.requests().iter().any(|r| r.uri.contains("hidden-in-body")) {
        failures.push("a request inside a body was parsed as a request".into());
    }
    failures.extend(upstream_violations(&upstream));
    if !failures.is_empty() {
        failures.push(format!("connection transcript:\n{conn}"));
    }
    assert_no_failures("pipelined requests", requests.len(), &failures);
    assert_eq!(upstream.count(), 3, "{:#?}", upstream.requests());
}

#[tokio::test]
async fn keep_alive_requests_with_different_keys_each_carry_their_own_identity() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).start().await;
    let steps: Vec<(RawRequest, u16, Option<&str>)> = vec![
        (RawRequest::get("/admin/k1").who(Who::Admin).keep_alive(), 200, Some("admin001")),
        (RawRequest::get("/k2").who(Who::Reader).keep_alive(), 200, Some("reader01")),
        (RawRequest::get("/admin/k3").who(Who::Reader).keep_alive(), 403, None),
        (RawRequest::get("/k4").keep_alive(), 401, None),
        (RawRequest::get("/k5").key(UNKNOWN_SECRET).keep_alive(), 401, None),
        (RawRequest::get("/admin/k6").who(Who::Admin).keep_alive(), 200, Some("admin001")),
        (RawRequest::get("/k7").who(Who::Reader).keep_alive(), 200, Some("reader01")),
        (RawRequest::get("/admin/k8").keep_alive(), 401, None),
    ];
    let mut conn = RawConn::open(gateway.addr).await;
    for (request, status, identity) in &steps {
        let target = String::from_utf8_lossy(&request.target).into_owned();
        conn.send(&request.bytes()).await;
        let response = conn.response().await.unwrap_or_else(|| panic!("{target}: no response\n{conn}"));
        let seen = seen_probe(&upstream, &request.probe);
        let got_identity = seen.as_ref().map(|s| s.header_all("x-keygate-key-id"));
        assert!(
            response.status == *status && got_identity == identity.map(|id| vec![id.to_owned()]),
            "{target}: expected {status} with identity {identity:?}, got {response}\nupstream saw: {seen:?}\n{conn}"
        );
    }
    assert!(upstream_violations(&upstream).is_empty(), "{:#?}", upstream_violations(&upstream));
}

#[tokio::test]
async fn http10_and_connection_close_end_the_connection_before_a_pipelined_request() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).start().await;
    let behind = || RawRequest::get("/admin/behind").who(Who::Admin).keep_alive();
    // (first request, its status, whether a keep-alive second request may be answered)
    let cases: Vec<(RawRequest, u16, bool)> = vec![
        (RawRequest::get("/admin/h10").who(Who::Admin).version("HTTP/1.0").keep_alive(), 200, false),
        (RawRequest::get("/admin/h10").version("HTTP/1.0").keep_alive(), 401, false),
        (RawRequest::get("/admin/close").who(Who::Admin), 200, false),
        (RawRequest::get("/admin/close"), 401, false),
        (RawRequest::get("/public/close").line("Connection: keep-alive, close").keep_alive(), 200, false),
        (
            RawRequest::get("/admin/h10ka").version("HTTP/1.0").line("Connection: keep-alive").keep_alive(),
            401,
            true,
        ),
    ];
    let mut failures = Vec::new();
    for (first, status, second_allowed) in &cases {
        let second = behind();
        let mut conn = RawConn::open(gateway.addr).await;
        let mut bytes = first.bytes();
        bytes.extend_from_slice(&second.bytes());
        bytes.extend_from_slice(&RawRequest::get("/admin/sentinel").bytes());
        conn.send(&bytes).await;
        let closed = conn.closed_within(IO_TIMEOUT).await;
        let responses = parse_all(&conn.received, conn.eof);
        let second_seen = seen_probe(&upstream, &second.probe).is_some();
        let first_seen = seen_probe(&upstream, &first.probe).is_some();
        let ok = closed
            && responses.first().map(|r| r.status) == Some(*status)
            && first_seen == (*status == 200)
            && (*second_allowed || (responses.len() == 1 && !second_seen))
            && (!second_seen || responses.get(1).is_some_and(|r| r.status == 200))
            && responses.iter().skip(2).all(|r| r.status == 401);
        if !ok {
            failures.push(format!(
                "expected {status} then {}; second reached upstream: {second_seen}\n{conn}",
                if *second_allowed { "anything" } else { "the end of the connection" }
            ));
        }
    }
    assert_no_failures("connection-end cases", cases.len(), &failures);
}

#[tokio::test]
async fn a_refused_expect_continue_body_is_never_read_as_a_request() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).start().await;
    let hidden = "GET /public/from-refused-body HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let request = RawRequest::new("POST", "/admin/expect")
        .line("Expect: 100-continue")
        .line(format!("Content-Length: {}", hidden.len()))
        .keep_alive();
    let mut conn = RawConn::open(gateway.addr).await;
    conn.send(&request.bytes()).await;
    let response = conn.response().await.unwrap_or_else(|| panic!("no answer to the head\n{conn}"));
    assert_eq!(response.status, 401, "{conn}");
    // A client that sends the body anyway, then a legitimate request.
    conn.send(hidden.as_bytes()).await;
    let after = RawRequest::get("/public/after-expect");
    conn.send(&after.bytes()).await;
    conn.closed_within(IO_TIMEOUT).await;
    let from_body = upstream.requests().iter().any(|r| r.uri.contains("from-refused-body"));
    assert!(
        !from_body,
        "the refused request's body was parsed as a request\n{conn}\n{:#?}",
        upstream.requests()
    );
    assert!(seen_probe(&upstream, &request.probe).is_none(), "{conn}");
}

/// Headers, trailers and body of one request.
type WithTrailers = (http::HeaderMap, Option<http::HeaderMap>, Bytes);

/// An upstream that records trailers as well as headers.
struct TrailerUpstream {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<WithTrailers>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TrailerUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind trailer upstream");
        let addr = listener.local_addr().expect("addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let task_log = Arc::clone(&log);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let log = Arc::clone(&task_log);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let log = Arc::clone(&log);
                        async move {
                            let (parts, body) = req.into_parts();
                            let collected = body.collect().await?;
                            let trailers = collected.trailers().cloned();
                            log.lock().expect("log").push((parts.headers, trailers, collected.to_bytes()));
                            Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, log, task }
    }
}

impl Drop for TrailerUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test]
async fn chunked_trailers_cannot_carry_identity_or_keys_upstream() {
    let upstream = TrailerUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &format!("http://{}", upstream.addr)))
        .key(reader_key())
        .key(admin_key())
        .start()
        .await;
    let body = format!(
        "5\r\nhello\r\n0\r\nx-keygate-key-id: admin001\r\nx-keygate-scopes: admin\r\nx-api-key: {ADMIN_SECRET}\r\n\
         X-Trailer-Ok: fine\r\n\r\n"
    );
    let request = RawRequest::new("POST", "/trailers")
        .who(Who::Reader)
        .line("TE: trailers")
        .line("Trailer: x-keygate-key-id, x-keygate-scopes, x-api-key, x-trailer-ok")
        .line("Transfer-Encoding: chunked")
        .raw_body(&body);
    let raw = raw_exchange(gateway.addr, &request.bytes()).await;
    assert_eq!(raw.status(), Some(200), "{raw}");
    let log = upstream.log.lock().expect("log").clone();
    assert_eq!(log.len(), 1, "{raw}");
    let (headers, trailers, got) = &log[0];
    let ctx = format!("{raw}\nupstream headers: {headers:?}\ntrailers: {trailers:?}");
    assert_eq!(&got[..], b"hello", "{ctx}");
    assert_eq!(headers.get("x-keygate-key-id").map(|v| v.as_bytes()), Some(&b"reader01"[..]), "{ctx}");
    if let Some(trailers) = trailers {
        for (name, value) in trailers {
            let folded = name.as_str().replace('_', "-");
            assert!(
                !folded.starts_with("x-keygate-") && name != "x-api-key",
                "{name} came as a trailer\n{ctx}"
            );
            assert!(
                leaked_piece(&String::from_utf8_lossy(value.as_bytes()), ADMIN_SECRET).is_none(),
                "{ctx}"
            );
        }
    }
}

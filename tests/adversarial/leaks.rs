//! Attack class 6: leaks and oracles.

use super::*;

/// Where a request carries its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Header,
    Bearer,
    Query,
}

impl Source {
    const ALL: [Source; 3] = [Source::Header, Source::Bearer, Source::Query];

    /// A raw GET of `target` presenting `key` this way.
    fn request(self, target: &str, key: &str) -> RawRequest {
        match self {
            Source::Header => RawRequest::get(target).key(key),
            Source::Bearer => RawRequest::get(target).line(format!("Authorization: Bearer {key}")),
            Source::Query => {
                let glue = if target.contains('?') { '&' } else { '?' };
                RawRequest::get(format!("{target}{glue}api_key={key}"))
            }
        }
    }
}

/// Everything wrong with an error keygate answered itself, checked against one shape.
fn error_shape_problems(raw: &RawExchange, status: u16, code: &str, presented: Option<&str>) -> Vec<String> {
    let mut problems = Vec::new();
    if raw.status() != Some(status) {
        problems.push(format!("status {:?}, expected {status}", raw.status()));
    }
    if !raw.header("content-type").is_some_and(|c| c.starts_with("application/json")) {
        problems.push("content-type is not application/json".into());
    }
    match serde_json::from_slice::<serde_json::Value>(raw.body()) {
        Ok(serde_json::Value::Object(map)) => {
            let keys: Vec<&str> = map.keys().map(String::as_str).collect();
            if keys != ["error", "message"] {
                problems.push(format!("JSON fields {keys:?}, expected exactly error and message"));
            }
            if map.get("error").and_then(|v| v.as_str()) != Some(code) {
                problems.push(format!("error {:?}, expected {code}", map.get("error")));
            }
            if map.get("message").and_then(|v| v.as_str()).is_none_or(str::is_empty) {
                problems.push("no message".into());
            }
        }
        _ => problems.push("the body is not a JSON object".into()),
    }
    let head = raw.head().to_ascii_lowercase();
    if head.lines().any(|l| l.replace('_', "-").starts_with("x-keygate-")) {
        problems.push("an x-keygate-* header on an error".into());
    }
    if raw.header("x-upstream").is_some() {
        problems.push("the upstream answered, not keygate".into());
    }
    if raw.header("x-request-id").is_none_or(|id| id.is_empty()) {
        problems.push("no x-request-id".into());
    }
    if raw.header("cache-control").as_deref() != Some("no-store") {
        problems.push("cache-control is not no-store".into());
    }
    if status == 401 && raw.header("www-authenticate").is_none() {
        problems.push("a 401 without www-authenticate".into());
    }
    if let Some(key) = presented
        && let Some(piece) = leaked_piece(&String::from_utf8_lossy(&raw.received), key)
    {
        problems.push(format!("the answer contains {piece:?}, a piece of the presented key"));
    }
    problems
}

#[tokio::test]
async fn every_rejection_has_one_json_shape_and_never_echoes_the_key() {
    let upstream = RecordingUpstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let generated = Key::generated("gen", &["read"]);
    let (_, unknown_generated) = keygate::keys::generate("kg").expect("randomness");
    let limited = Key::new("limited1", "limited", "lim-R4tE7lImIt9xZ2qW", &["read"]);
    let config = GatewayConfig::new()
        .server("max_header_bytes", "8192")
        .server("request_timeout", "\"700ms\"")
        .sources(&["header:x-api-key", "authorization:Bearer", "query:api_key"])
        .route(Route::new("/public/", &upstream.url()).public())
        .route(Route::new("/admin/", &upstream.url()).scope("*", &["admin"]))
        .route(Route::new("/api/", &upstream.url()))
        .route(Route::new("/dead/", &format!("http://{dead}")));
    let keys = [reader_key(), admin_key(), revoked_key(), expired_key(), generated.clone()];
    let keys_text = format!("{}\n{}rate_limit = \"1/h\"\n", keys_toml(&keys), limited.to_toml());
    let gateway = TestGateway::start(&config.gateway_toml(), &keys_text).await;

    let filler = format!("X-Filler: {}", "f".repeat(9_000));
    let bad_checksum = tampered(&generated.secret);
    // (name, key, target, extra lines, status, code, reaches the upstream)
    type Case<'a> = (&'a str, &'a str, &'a str, Vec<&'a str>, u16, &'a str, bool);
    let cases: Vec<Case> = vec![
        ("unknown key", UNKNOWN_SECRET, "/api/x", vec![], 401, "invalid_api_key", false),
        ("bad checksum", &bad_checksum, "/api/x", vec![], 401, "invalid_api_key", false),
        ("unknown generated key", &unknown_generated, "/api/x", vec![], 401, "invalid_api_key", false),
        ("revoked", REVOKED_SECRET, "/api/x", vec![], 401, "revoked_api_key", false),
        ("expired", EXPIRED_SECRET, "/api/x", vec![], 401, "expired_api_key", false),
        ("insufficient scope", READER_SECRET, "/admin/x", vec![], 403, "insufficient_scope", false),
        (
            "insufficient scope, generated",
            &generated.secret,
            "/admin/x",
            vec![],
            403,
            "insufficient_scope",
            false,
        ),
        ("no route", READER_SECRET, "/nowhere", vec![], 404, "no_route", false),
        ("bad path", READER_SECRET, "/api/%2e%2e/%2e%2e/x", vec![], 400, "bad_request", false),
        (
            "bad override",
            ADMIN_SECRET,
            "/admin/x",
            vec!["X-HTTP-Method-Override: DE LETE"],
            400,
            "bad_request",
            false,
        ),
        ("head too large", READER_SECRET, "/api/x", vec![filler.as_str()], 431, "headers_too_large", false),
        (
            "transfer coding",
            READER_SECRET,
            "/api/x",
            vec!["Transfer-Encoding: gzip, chunked"],
            501,
            "unsupported_transfer_encoding",
            false,
        ),
        ("dead upstream", READER_SECRET, "/dead/x", vec![], 502, "upstream_unavailable", false),
        (
            "slow upstream",
            READER_SECRET,
            "/api/slow",
            vec!["x-test-sleep-ms: 3000"],
            504,
            "upstream_timeout",
            true,
        ),
    ];
    let mut failures = Vec::new();
    let mut invalid_answers = Vec::new();
    let mut tried = 0;
    for source in Source::ALL {
        for (name, key, target, lines, status, code, reaches) in &cases {
            tried += 1;
            let mut request = lines.iter().fold(source.request(target, key), |r, l| r.line(l));
            if *status == 501 {
                request = request.raw_body("5\r\nhello\r\n0\r\n\r\n");
            }
            let raw = gateway.raw(&request.bytes()).await;
            let mut problems = error_shape_problems(&raw, *status, code, Some(key));
            if !reaches && seen_probe(&upstream, &request.probe).is_some() {
                problems.push("a rejected request reached the upstream".into());
            }
            if !problems.is_empty() {
                failures.push(format!("{name} via {source:?}: {}\n{raw}", problems.join("; ")));
            }
            if *code == "invalid_api_key" {
                invalid_answers.push((format!("{name} via {source:?}"), raw));
            }
        }
        // Two values in one source, and no key at all.
        tried += 2;
        let twice = match source {
            Source::Header => RawRequest::get("/api/x").key(READER_SECRET).key(READER_SECRET),
            Source::Bearer => Source::Bearer
                .request("/api/x", READER_SECRET)
                .line(format!("Authorization: Bearer {READER_SECRET}")),
            Source::Query => {
                RawRequest::get(format!("/api/x?api_key={READER_SECRET}&api_key={READER_SECRET}"))
            }
        };
        let raw = gateway.raw(&twice.bytes()).await;
        let problems = error_shape_problems(&raw, 401, "invalid_api_key", Some(READER_SECRET));
        if !problems.is_empty() {
            failures.push(format!("two keys via {source:?}: {}\n{raw}", problems.join("; ")));
        }
        invalid_answers.push((format!("two keys via {source:?}"), raw));
        // The rate limit: one request an hour, so the second is refused.
        let first = gateway.raw(&source.request("/api/limited", &limited.secret).bytes()).await;
        let second = gateway.raw(&source.request("/api/limited", &limited.secret).bytes()).await;
        let expect_first = if source == Source::Header { Some(200) } else { Some(429) };
        let mut problems = error_shape_problems(&second, 429, "rate_limited", Some(&limited.secret));
        if first.status() != expect_first {
            problems.push(format!("the first limited request got {:?}", first.status()));
        }
        if second.header("retry-after").is_none() {
            problems.push("429 without retry-after".into());
        }
        if !problems.is_empty() {
            failures.push(format!("rate limit via {source:?}: {}\n{second}", problems.join("; ")));
        }
    }
    let missing = gateway.raw(&RawRequest::get("/api/x").bytes()).await;
    let problems = error_shape_problems(&missing, 401, "missing_api_key", None);
    if !problems.is_empty() {
        failures.push(format!("missing key: {}\n{missing}", problems.join("; ")));
    }
    // No oracle: every kind of invalid key gets the same bytes (bar the request id).
    let normalise = |raw: &RawExchange| {
        let head: Vec<String> = raw
            .head()
            .lines()
            .filter(|l| {
                !l.to_ascii_lowercase().starts_with("x-request-id")
                    && !l.to_ascii_lowercase().starts_with("date")
            })
            .map(str::to_owned)
            .collect();
        (head, raw.body().to_vec())
    };
    if let Some((first_name, first)) = invalid_answers.first() {
        for (name, raw) in &invalid_answers[1..] {
            if normalise(raw) != normalise(first) {
                failures
                    .push(format!("{name} is distinguishable from {first_name}\n{raw}\n--- vs ---\n{first}"));
            }
        }
    }
    assert_no_failures("rejections", tried + 1, &failures);
}

/// Runs the real binary with `env`, presents valid, invalid and forged keys through every source
/// (and over HTTP/2), then checks every log line, the metrics and `/status` for pieces of them.
async fn binary_never_logs_keys(env: &[(&str, &str)], json: bool) {
    let upstream = RecordingUpstream::start().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr");
    let random = || keygate::keys::generate("zz").expect("randomness").1[12..].to_owned();
    let generated = Key::generated("gen", &["read"]);
    let custom = Key::new("custom01", "custom", &random(), &["read", "admin"]);
    let revoked = Key::new("revoked2", "revoked", &random(), &["read"]).revoked_at("2020-01-01T00:00:00Z");
    let expired = Key::new("expired2", "expired", &random(), &["read"]).expires_at("2020-01-01T00:00:00Z");
    let presented: Vec<String> = vec![
        generated.secret.clone(),
        custom.secret.clone(),
        revoked.secret.clone(),
        expired.secret.clone(),
        random(),
        tampered(&generated.secret),
        keygate::keys::generate("kg").expect("randomness").1,
    ];
    let config = GatewayConfig::new()
        .server("workers", "1")
        .sources(&["header:x-api-key", "authorization:Bearer", "query:api_key"])
        .route(Route::new("/public/", &upstream.url()).public())
        .route(Route::new("/admin/", &upstream.url()).scope("*", &["admin"]))
        .route(Route::new("/dead/", &format!("http://{dead}")))
        .route(Route::new("/", &upstream.url()))
        .key(generated)
        .key(custom)
        .key(revoked)
        .key(expired);
    let dir = tempfile::tempdir().expect("temp dir");
    let config_path = dir.path().join("keygate.toml");
    let gateway_toml = format!("{}\n[admin]\nlisten = \"127.0.0.1:0\"\n", config.gateway_toml());
    std::fs::write(&config_path, gateway_toml).expect("write keygate.toml");
    std::fs::write(dir.path().join("keys.toml"), config.keys_toml()).expect("write keys.toml");

    let mut command = support::keygate_command(dir.path());
    command.arg("serve").arg("-c").arg(&config_path).stdout(Stdio::null());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut served = Process::spawn(command);
    let addr = served.listening_addr().await;
    let admin = served.admin_addr().await;

    let mut failures = Vec::new();
    let mut sent = 0;
    for key in &presented {
        for source in Source::ALL {
            for target in ["/r/leak", "/admin/leak", "/public/leak", "/dead/leak", "/%2e%2e/leak"] {
                let raw = raw_exchange(addr, &source.request(target, key).bytes()).await;
                sent += 1;
                if raw.status().is_none() {
                    failures.push(format!("no answer\n{raw}"));
                }
                if let Some(piece) = leaked_piece(&String::from_utf8_lossy(&raw.received), key) {
                    failures.push(format!("a response carries {piece:?}\n{raw}"));
                }
            }
        }
        let exchange =
            Call::new(addr, Method::GET, "/r/leak-h2").header("x-api-key", key).http2().send().await;
        sent += 1;
        let answered = format!("{:?}{}", exchange.headers, String::from_utf8_lossy(&exchange.body));
        if let Some(piece) = leaked_piece(&answered, key) {
            failures.push(format!("an h2 response carries {piece:?}\n{exchange}"));
        }
    }
    let metrics = Call::new(admin, Method::GET, "/metrics").send().await;
    let status = Call::new(admin, Method::GET, "/status").send().await;
    assert_eq!(metrics.status, 200, "{metrics}");
    assert_eq!(status.status, 200, "{status}");
    assert!(status.json().is_some(), "/status is not JSON\n{status}");
    let metrics_text = String::from_utf8_lossy(&metrics.body).into_owned();
    let status_text = String::from_utf8_lossy(&status.body).into_owned();
    served.kill_and_collect().await;
    let lines = served.stderr.seen.clone();

    let access = lines.iter().filter(|l| l.contains("keygate::access")).count();
    assert!(access >= sent, "only {access} access events for {sent} requests: the log check proves little");
    for key in &presented {
        if let Some(piece) = leaked_piece(&metrics_text, key) {
            failures.push(format!("/metrics contains {piece:?}"));
        }
        if let Some(piece) = leaked_piece(&status_text, key) {
            failures.push(format!("/status contains {piece:?}: {status_text}"));
        }
        for line in &lines {
            if let Some(piece) = leaked_piece(line, key) {
                failures.push(format!("a log line contains {piece:?} of a presented key:\n{line}"));
            }
        }
    }
    if json {
        for line in lines.iter().filter(|l| !l.trim().is_empty()) {
            if !serde_json::from_str::<serde_json::Value>(line).is_ok_and(|v| v.is_object()) {
                failures.push(format!("not a JSON object line: {line}"));
                break;
            }
        }
    }
    eprintln!("{} log lines, {access} access events, {sent} requests", lines.len());
    assert_no_failures("leak checks", presented.len() * 3 + lines.len(), &failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_no_piece_of_any_key_at_trace_level() {
    binary_never_logs_keys(&[("RUST_LOG", "trace")], false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_logs_no_piece_of_any_key_in_json_format() {
    binary_never_logs_keys(&[("RUST_LOG", "trace"), ("KEYGATE_LOG_FORMAT", "json")], true).await;
}

//! What the upstream and the browser need (SPEC §1 `meta`, `allowed_ips`, `trusted_proxies`,
//! `cookie:`, `[routes.cors]`; §2.2–§2.4, §2.6; §5 process metrics), with raw requests against
//! an in-process gateway in front of a recording upstream. The browser itself is in browser.rs.

mod support;

use http::Method;
use support::{
    AdminListener, Exchange, GatewayConfig, Key, RecordingUpstream, Route, TestGateway, assert_error,
    assert_rejected, both,
};

const SECRET: &str = "edge-secret-4j8k2m7q1w";
const OTHER: &str = "edge-other-9z8x7c6v5b";

// ---------------------------------------------------------------------------------------------
// meta
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn meta_is_forwarded_as_identity_headers_and_client_copies_are_dropped() {
    let upstream = RecordingUpstream::start().await;
    let key =
        Key::new("meta0001", "meta", SECRET, &["read"]).meta(&[("tenant", "acme"), ("Plan", "pro plan")]);
    let gateway = GatewayConfig::new().route(Route::new("/", &upstream.url())).key(key).start().await;
    let exchange = gateway
        .get("/x")
        .header("x-api-key", SECRET)
        .header("x-keygate-meta-tenant", "evil")
        .header("x_keygate_meta_region", "spoofed")
        .header("X-Keygate-Meta-Plan", "free")
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.header_all("x-keygate-meta-tenant"), ["acme"], "{ctx}");
    assert_eq!(seen.header_all("x-keygate-meta-plan"), ["pro plan"], "{ctx}");
    assert!(
        seen.header("x_keygate_meta_region").is_none() && seen.header("x-keygate-meta-region").is_none(),
        "{ctx}"
    );
    assert_eq!(seen.header("x-keygate-key-id"), Some("meta0001"), "{ctx}");
}

#[tokio::test]
async fn bad_meta_is_a_config_error_with_a_location() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = GatewayConfig::new()
        .route(Route::new("/", "http://127.0.0.1:9"))
        .key(Key::new("a", "a", SECRET, &[]).meta(&[("ok", "fine")]))
        .key(Key::new("b", "b", OTHER, &[]).meta(&[("bad_name", "x")]));
    std::fs::write(dir.path().join("keygate.toml"), config.gateway_toml()).expect("write keygate.toml");
    std::fs::write(dir.path().join("keys.toml"), config.keys_toml()).expect("write keys.toml");
    let output = support::keygate_command(dir.path())
        .args(["check", "-c", "keygate.toml"])
        .output()
        .await
        .expect("run keygate check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    // Line 15 is the second key's meta line; column 21 is where the offending value starts.
    assert!(stderr.contains("keys.toml:15:21: meta name \"bad_name\""), "stdout: {stdout}\nstderr: {stderr}");
}

// ---------------------------------------------------------------------------------------------
// allowed_ips and the client address
// ---------------------------------------------------------------------------------------------

fn office_key() -> Key {
    Key::new("office01", "office", SECRET, &["read"]).allowed_ips(&["127.0.0.2/32", "2001:db8::/32"])
}

#[tokio::test]
async fn allowed_ips_admit_listed_addresses_and_refuse_others_with_403() {
    let upstream = RecordingUpstream::start().await;
    let gateway =
        GatewayConfig::new().route(Route::new("/", &upstream.url())).key(office_key()).start().await;

    let allowed = gateway.get("/x").header("x-api-key", SECRET).local_ip("127.0.0.2").send().await;
    assert_eq!(allowed.status, 200, "{allowed}");
    let seen = upstream.expect_received(&allowed);
    assert_eq!(seen.header_all("x-real-ip"), ["127.0.0.2"], "{}", both(&allowed, &seen));
    assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.2"], "{}", both(&allowed, &seen));

    let refused = gateway.get("/x").header("x-api-key", SECRET).local_ip("127.0.0.1").send().await;
    assert_rejected(&refused, &upstream, 403, "ip_not_allowed");
    // A client's own X-Forwarded-For claims nothing when no proxy is trusted.
    let claimed = gateway
        .get("/x")
        .header("x-api-key", SECRET)
        .header("x-forwarded-for", "127.0.0.2")
        .local_ip("127.0.0.1")
        .send()
        .await;
    assert_rejected(&claimed, &upstream, 403, "ip_not_allowed");
}

#[tokio::test]
async fn allowed_ips_take_ipv6_networks() {
    let upstream = RecordingUpstream::start().await;
    let config = GatewayConfig::new()
        .route(Route::new("/", &upstream.url()))
        .key(Key::new("v6loop01", "loopback", SECRET, &[]).allowed_ips(&["::1/128"]))
        .key(
            Key::new("v6docs01", "documentation", OTHER, &[]).allowed_ips(&["2001:db8::/32", "127.0.0.0/8"]),
        );
    let gateway = TestGateway::start_at(&config.gateway_toml(), &config.keys_toml(), "[::1]:0").await;
    let allowed = gateway.get("/x").header("x-api-key", SECRET).send().await;
    assert_eq!(allowed.status, 200, "{allowed}");
    let seen = upstream.expect_received(&allowed);
    assert_eq!(seen.header_all("x-real-ip"), ["::1"], "{}", both(&allowed, &seen));
    let refused = gateway.get("/x").header("x-api-key", OTHER).send().await;
    assert_rejected(&refused, &upstream, 403, "ip_not_allowed");
}

#[tokio::test]
async fn allowed_ips_is_judged_after_expiry_and_before_scope() {
    let upstream = RecordingUpstream::start().await;
    let revoked = Key::new("revoked1", "r", OTHER, &["read"])
        .allowed_ips(&["10.0.0.0/8"])
        .revoked_at("2020-01-01T00:00:00Z");
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &upstream.url()).scope("GET", &["admin"]))
        .key(office_key())
        .key(revoked)
        .start()
        .await;
    // A dead key says so wherever it is used from.
    let dead = gateway.get("/x").header("x-api-key", OTHER).send().await;
    assert_rejected(&dead, &upstream, 401, "revoked_api_key");
    // From the wrong address the scope is never looked at.
    let elsewhere = gateway.get("/x").header("x-api-key", SECRET).local_ip("127.0.0.1").send().await;
    assert_rejected(&elsewhere, &upstream, 403, "ip_not_allowed");
    let at_office = gateway.get("/x").header("x-api-key", SECRET).local_ip("127.0.0.2").send().await;
    assert_rejected(&at_office, &upstream, 403, "insufficient_scope");
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_rightmost_untrusted_forwarded_for_entry_is_the_client() {
    let upstream = RecordingUpstream::start().await;
    let lan_key = Key::new("lan00001", "lan", SECRET, &["read"]).allowed_ips(&["203.0.113.0/24"]);
    let open_key = Key::new("open0001", "open", OTHER, &["read"]);
    let gateway = GatewayConfig::new()
        .server("trusted_proxies", "[\"127.0.0.1\", \"10.0.0.0/8\"]")
        .route(Route::new("/", &upstream.url()))
        .key(lan_key)
        .key(open_key)
        .start()
        .await;

    // The load balancer (127.0.0.1) says the client is 203.0.113.7, behind an inner hop 10.1.1.1.
    let proxied = gateway
        .get("/x")
        .header("x-api-key", SECRET)
        .header("x-forwarded-for", "203.0.113.7, 10.1.1.1")
        .local_ip("127.0.0.1")
        .send()
        .await;
    assert_eq!(proxied.status, 200, "{proxied}");
    let seen = upstream.expect_received(&proxied);
    let ctx = both(&proxied, &seen);
    assert_eq!(seen.header_all("x-real-ip"), ["203.0.113.7"], "{ctx}");
    assert_eq!(seen.header_all("x-forwarded-for"), ["203.0.113.7"], "{ctx}");

    // A spoofed chain: the client wrote 203.0.113.7 itself; the balancer appended its real
    // address, 198.51.100.9, which is what counts.
    let spoofed = gateway
        .get("/x")
        .header("x-api-key", SECRET)
        .header("x-forwarded-for", "203.0.113.7, 198.51.100.9")
        .local_ip("127.0.0.1")
        .send()
        .await;
    assert_rejected(&spoofed, &upstream, 403, "ip_not_allowed");
    let spoofed_open = gateway
        .get("/x")
        .header("x-api-key", OTHER)
        .header("x-forwarded-for", "203.0.113.7, 198.51.100.9, 10.2.2.2")
        .local_ip("127.0.0.1")
        .send()
        .await;
    let seen = upstream.expect_received(&spoofed_open);
    let ctx = both(&spoofed_open, &seen);
    assert_eq!(seen.header_all("x-real-ip"), ["198.51.100.9"], "{ctx}");
    // What the client wrote stays (it proves nothing either way); the rightmost is the client.
    assert_eq!(seen.header_all("x-forwarded-for"), ["203.0.113.7, 198.51.100.9"], "{ctx}");

    // A peer that is not a trusted proxy cannot name a client at all.
    let untrusted = gateway
        .get("/x")
        .header("x-api-key", SECRET)
        .header("x-forwarded-for", "203.0.113.7")
        .local_ip("127.0.0.2")
        .send()
        .await;
    assert_rejected(&untrusted, &upstream, 403, "ip_not_allowed");
    let untrusted_open = gateway
        .get("/x")
        .header("x-api-key", OTHER)
        .header("x-forwarded-for", "203.0.113.7")
        .local_ip("127.0.0.2")
        .send()
        .await;
    let seen = upstream.expect_received(&untrusted_open);
    let ctx = both(&untrusted_open, &seen);
    assert_eq!(seen.header_all("x-real-ip"), ["127.0.0.2"], "{ctx}");
    assert_eq!(seen.header_all("x-forwarded-for"), ["203.0.113.7, 127.0.0.2"], "{ctx}");
}

/// Every log line of this test process, as `KEYGATE_LOG_FORMAT=json` writes them.
fn captured_logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<&'static std::sync::Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs: &'static std::sync::Mutex<Vec<u8>> = Box::leak(Box::default());
        struct Sink(&'static std::sync::Mutex<Vec<u8>>);
        impl std::io::Write for Sink {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("log buffer").extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter("keygate::access=info")
            .with_writer(move || Sink(logs))
            .try_init()
            .expect("the only subscriber of this test binary");
        logs
    })
}

#[tokio::test]
async fn the_access_log_names_the_client_address_and_never_the_key() {
    let logs = captured_logs();
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .server("trusted_proxies", "[\"127.0.0.1\"]")
        .route(Route::new("/", &upstream.url()))
        .key(Key::new("logged01", "logged", SECRET, &["read"]))
        .start()
        .await;
    let exchange = gateway
        .get("/x")
        .header("x-api-key", SECRET)
        .header("x-forwarded-for", "203.0.113.77")
        .local_ip("127.0.0.1")
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let request_id = exchange.header("x-request-id").expect("a request id").to_string();
    let text = String::from_utf8_lossy(&logs.lock().expect("log buffer")).into_owned();
    let event: serde_json::Value = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|event| event["request_id"] == request_id.as_str())
        .unwrap_or_else(|| panic!("no access event for request {request_id} in:\n{text}"));
    assert_eq!(event["client"], "203.0.113.77", "{event}");
    assert_eq!(event["key_id"], "logged01", "{event}");
    assert!(!text.contains(SECRET), "the key is in the log:\n{text}");
}

/// Sends `call()` until `done` holds for what it gets (a reload is in effect), within 10 s.
async fn poll_until(call: impl Fn() -> support::Call, done: impl Fn(&Exchange) -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = call().send().await;
        if done(&got) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not in effect after 10 s; last answer:\n{got}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn allowed_ips_and_trusted_proxies_follow_a_reload() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let open = GatewayConfig::new().route(Route::new("/", &upstream.url())).key(Key::new(
        "reload01",
        "r",
        SECRET,
        &[],
    ));
    std::fs::write(dir.path().join("keygate.toml"), open.gateway_toml()).expect("write keygate.toml");
    std::fs::write(dir.path().join("keys.toml"), open.keys_toml()).expect("write keys.toml");
    let gateway = support::WatchedGateway::start(&dir.path().join("keygate.toml")).await;
    let keyed = || {
        gateway
            .get("/x")
            .header("x-api-key", SECRET)
            .header("x-forwarded-for", "203.0.113.5")
            .local_ip("127.0.0.1")
    };
    let first = keyed().send().await;
    assert_eq!(first.status, 200, "{first}");

    let fenced = Key::new("reload01", "r", SECRET, &[]).allowed_ips(&["203.0.113.0/24"]);
    std::fs::write(dir.path().join("keys.toml"), support::keys_toml(&[fenced])).expect("rewrite keys.toml");
    poll_until(
        keyed,
        |got| got.error_code().as_deref() == Some("ip_not_allowed"),
        "allowed_ips added to the key",
    )
    .await;

    let behind_proxy = open.clone().server("trusted_proxies", "[\"127.0.0.1\"]");
    std::fs::write(dir.path().join("keygate.toml"), behind_proxy.gateway_toml())
        .expect("rewrite keygate.toml");
    poll_until(keyed, |got| got.status == 200, "127.0.0.1 trusted as a proxy").await;
    let seen = upstream.requests().pop().expect("the last request reached the upstream");
    assert_eq!(seen.header("x-real-ip"), Some("203.0.113.5"), "{seen:?}");
}

// ---------------------------------------------------------------------------------------------
// cookie: source
// ---------------------------------------------------------------------------------------------

async fn cookie_gateway(upstream: &RecordingUpstream) -> TestGateway {
    GatewayConfig::new()
        .sources(&["cookie:kg_session", "header:x-api-key"])
        .route(Route::new("/public/", &upstream.url()).public())
        .route(Route::new("/", &upstream.url()))
        .key(Key::new("cookie01", "cookie", SECRET, &["read"]))
        .start()
        .await
}

#[track_caller]
fn assert_no_secret(exchange: &Exchange, seen: &support::Recorded) {
    for (name, value) in &seen.headers {
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains(SECRET),
            "the key reached the upstream in {name}\n{}",
            both(exchange, seen)
        );
    }
}

#[tokio::test]
async fn cookie_source_authenticates_and_only_that_cookie_is_removed() {
    let upstream = RecordingUpstream::start().await;
    let gateway = cookie_gateway(&upstream).await;
    let one_header =
        gateway.get("/x").header("cookie", &format!("theme=dark; kg_session={SECRET}; lang=en")).send().await;
    assert_eq!(one_header.status, 200, "{one_header}");
    let seen = upstream.expect_received(&one_header);
    assert_eq!(seen.header_all("cookie"), ["theme=dark; lang=en"], "{}", both(&one_header, &seen));
    assert_eq!(seen.header("x-keygate-key-id"), Some("cookie01"), "{}", both(&one_header, &seen));
    assert_no_secret(&one_header, &seen);

    // Several Cookie headers (HTTP/2 sends each cookie on its own): the rest keep their order.
    for http2 in [false, true] {
        let mut call = gateway
            .get("/x")
            .header("cookie", "a=1")
            .header("cookie", &format!("kg_session=\"{SECRET}\""))
            .header("cookie", "b=2; c=3");
        if http2 {
            call = call.http2();
        }
        let split = call.send().await;
        assert_eq!(split.status, 200, "{split}");
        let seen = upstream.expect_received(&split);
        assert_eq!(seen.header_all("cookie"), ["a=1; b=2; c=3"], "{}", both(&split, &seen));
        assert_no_secret(&split, &seen);
    }

    // Only the cookie: the header goes too.
    let alone = gateway.get("/x").header("cookie", &format!("kg_session={SECRET}")).send().await;
    let seen = upstream.expect_received(&alone);
    assert!(seen.header("cookie").is_none(), "{}", both(&alone, &seen));

    // Stripped on a public route as well, whichever source supplied the key.
    let public = gateway
        .get("/public/p")
        .header("x-api-key", SECRET)
        .header("cookie", &format!("kg_session={SECRET}; z=9"))
        .send()
        .await;
    let seen = upstream.expect_received(&public);
    assert_eq!(seen.header_all("cookie"), ["z=9"], "{}", both(&public, &seen));
    assert_no_secret(&public, &seen);
}

#[tokio::test]
async fn two_source_cookies_are_401_invalid_api_key() {
    let upstream = RecordingUpstream::start().await;
    let gateway = cookie_gateway(&upstream).await;
    let twice_in_one =
        gateway.get("/x").header("cookie", &format!("kg_session={SECRET}; kg_session={SECRET}")).send().await;
    assert_rejected(&twice_in_one, &upstream, 401, "invalid_api_key");
    let across = gateway
        .get("/x")
        .header("cookie", &format!("kg_session={SECRET}"))
        .header("cookie", "kg_session=other")
        .send()
        .await;
    assert_rejected(&across, &upstream, 401, "invalid_api_key");
    // Cookie names are case-sensitive: KG_SESSION is another cookie, and no key.
    let other_case = gateway.get("/x").header("cookie", &format!("KG_SESSION={SECRET}")).send().await;
    assert_rejected(&other_case, &upstream, 401, "missing_api_key");
}

// ---------------------------------------------------------------------------------------------
// CORS
// ---------------------------------------------------------------------------------------------

const APP: &str = "https://app.example";

fn preflight(gateway: &TestGateway, path: &str, origin: &str) -> support::Call {
    gateway
        .request(Method::OPTIONS, path)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "x-api-key, content-type")
}

async fn cors_gateway(upstream: &RecordingUpstream) -> TestGateway {
    GatewayConfig::new()
        .sources(&["header:x-api-key", "authorization:Bearer"])
        .route(Route::new("/plain/", &upstream.url()))
        .route(Route::new("/api/", &upstream.url()).scope("GET", &["read"]).scope("POST", &["write"]).cors(
            &format!("allow_origins = [\"{APP}\"]\nallow_headers = [\"X-Client-Version\"]\nmax_age = \"2m\""),
        ))
        .route(Route::new("/open/", &upstream.url()).cors("allow_origins = [\"*\"]"))
        .key(Key::new("cors0001", "cors", SECRET, &["read"]).rate_limit("1/h"))
        .start()
        .await
}

#[track_caller]
fn assert_cors(exchange: &Exchange, origin: &str) {
    assert_eq!(exchange.header("access-control-allow-origin"), Some(origin), "{exchange}");
    let vary: Vec<&str> = exchange.headers.get_all("vary").iter().filter_map(|v| v.to_str().ok()).collect();
    assert!(
        vary.iter().any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("origin"))),
        "Vary: Origin\n{exchange}"
    );
    let exposed = exchange.header("access-control-expose-headers").unwrap_or_default();
    for name in ["x-request-id", "retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"] {
        assert!(exposed.contains(name), "{name} must be exposed\n{exchange}");
    }
}

#[tokio::test]
async fn preflight_on_a_route_without_cors_goes_upstream_without_key_or_identity() {
    let upstream = RecordingUpstream::start().await;
    let gateway = cors_gateway(&upstream).await;
    // Browsers send no key with a preflight; one sent anyway is stripped like any credential.
    let exchange = preflight(&gateway, "/plain/items", APP).header("x-api-key", SECRET).send().await;
    assert_eq!(exchange.status, 200, "answered by the upstream\n{exchange}");
    assert_eq!(exchange.header("x-upstream"), Some("yes"), "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.method, Method::OPTIONS, "{ctx}");
    assert_eq!(seen.header("origin"), Some(APP), "{ctx}");
    assert!(seen.header("x-api-key").is_none(), "{ctx}");
    assert!(seen.header("x-keygate-key-id").is_none(), "{ctx}");
    let bare = preflight(&gateway, "/plain/items", APP).send().await;
    assert_eq!(bare.status, 200, "a preflight needs no key\n{bare}");
    // An OPTIONS that is not a preflight still needs one.
    let options = gateway.request(Method::OPTIONS, "/plain/items").send().await;
    assert_rejected(&options, &upstream, 401, "missing_api_key");
}

#[tokio::test]
async fn a_forged_preflight_with_an_override_a_body_or_an_upgrade_needs_a_key() {
    let upstream = RecordingUpstream::start().await;
    let gateway = cors_gateway(&upstream).await;
    let forged = [
        preflight(&gateway, "/plain/items", APP).header("x-http-method-override", "DELETE"),
        preflight(&gateway, "/plain/items", APP).header("X_Method_Override", "DELETE"),
        preflight(&gateway, "/plain/items?_method=DELETE", APP),
        preflight(&gateway, "/plain/items", APP).body("{\"drop\": true}"),
        preflight(&gateway, "/plain/items", APP).body("{\"drop\": true}").http2(),
        preflight(&gateway, "/plain/items", APP)
            .header("connection", "upgrade")
            .header("upgrade", "websocket"),
    ];
    for call in forged {
        let exchange = call.send().await;
        assert_rejected(&exchange, &upstream, 401, "missing_api_key");
    }
    // The same over HTTP/2 without a body is a preflight like any other.
    let h2 = preflight(&gateway, "/plain/items", APP).http2().send().await;
    assert_eq!(h2.status, 200, "{h2}");
    upstream.expect_received(&h2);
}

#[tokio::test]
async fn preflight_on_a_cors_route_is_answered_by_keygate() {
    let upstream = RecordingUpstream::start().await;
    let gateway = cors_gateway(&upstream).await;
    let exchange = preflight(&gateway, "/api/items", APP).send().await;
    assert_eq!(exchange.status, 204, "{exchange}");
    assert!(upstream.received(&exchange).is_none(), "keygate answers it\n{exchange}");
    assert_cors(&exchange, APP);
    assert_eq!(exchange.header("access-control-allow-methods"), Some("GET, POST"), "{exchange}");
    assert_eq!(
        exchange.header("access-control-allow-headers"),
        Some("x-api-key, authorization, content-type, x-client-version"),
        "{exchange}"
    );
    assert_eq!(exchange.header("access-control-max-age"), Some("120"), "{exchange}");
    assert!(exchange.header("x-request-id").is_some(), "{exchange}");

    let evil = preflight(&gateway, "/api/items", "https://evil.example").send().await;
    assert_rejected(&evil, &upstream, 403, "origin_not_allowed");
    assert!(evil.header("access-control-allow-origin").is_none(), "{evil}");

    let any = preflight(&gateway, "/open/x", "http://localhost:3000").send().await;
    assert_eq!(any.status, 204, "{any}");
    assert_cors(&any, "*");
    assert_eq!(
        any.header("access-control-allow-methods"),
        Some("GET, HEAD, POST, PUT, PATCH, DELETE"),
        "{any}"
    );
}

#[tokio::test]
async fn every_answer_to_an_allowed_origin_carries_cors_headers_keygates_errors_too() {
    let upstream = RecordingUpstream::start().await;
    let gateway = cors_gateway(&upstream).await;

    let missing = gateway.get("/api/items").header("origin", APP).send().await;
    assert_rejected(&missing, &upstream, 401, "missing_api_key");
    assert_cors(&missing, APP);

    let forbidden = gateway
        .request(Method::POST, "/api/items")
        .header("origin", APP)
        .header("x-api-key", SECRET)
        .send()
        .await;
    assert_rejected(&forbidden, &upstream, 403, "insufficient_scope");
    assert_cors(&forbidden, APP);

    let ok = gateway.get("/api/items").header("origin", APP).header("x-api-key", SECRET).send().await;
    assert_eq!(ok.status, 200, "{ok}");
    assert_cors(&ok, APP);
    let seen = upstream.expect_received(&ok);
    assert_eq!(seen.header("origin"), Some(APP), "the upstream still sees the Origin\n{}", both(&ok, &seen));

    // The key allows one request an hour: the second is a 429 the app can read.
    let limited = gateway.get("/api/items").header("origin", APP).header("x-api-key", SECRET).send().await;
    assert_rejected(&limited, &upstream, 429, "rate_limited");
    assert_cors(&limited, APP);
    assert!(limited.header("retry-after").is_some(), "{limited}");

    // Another origin gets no CORS headers (the browser then hides the answer from it).
    let evil = gateway.get("/api/items").header("origin", "https://evil.example").send().await;
    assert_error(&evil, 401, "missing_api_key");
    assert!(evil.header("access-control-allow-origin").is_none(), "{evil}");
    // A route without a policy leaves CORS to the upstream.
    let plain = gateway.get("/plain/x").header("origin", APP).send().await;
    assert_error(&plain, 401, "missing_api_key");
    assert!(plain.header("access-control-allow-origin").is_none(), "{plain}");
}

// ---------------------------------------------------------------------------------------------
// Process metrics
// ---------------------------------------------------------------------------------------------

/// The value of the sample `name` (no labels) in an exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn metrics_include_the_standard_process_metrics_and_ip_rejections() {
    let upstream = RecordingUpstream::start().await;
    let gateway =
        GatewayConfig::new().route(Route::new("/", &upstream.url())).key(office_key()).start().await;
    let admin = AdminListener::start(std::sync::Arc::clone(&gateway.gateway)).await;
    let refused = gateway.get("/x").header("x-api-key", SECRET).local_ip("127.0.0.1").send().await;
    assert_rejected(&refused, &upstream, 403, "ip_not_allowed");
    let scrape = admin.get("/metrics").send().await;
    assert_eq!(scrape.status, 200, "{scrape}");
    let text = String::from_utf8_lossy(&scrape.body).into_owned();
    for (family, kind) in [
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_virtual_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert!(text.contains(&format!("\n# TYPE {family} {kind}\n")), "missing TYPE of {family}\n{text}");
    }
    let value = |name: &str| sample(&text, name).unwrap_or_else(|| panic!("no sample {name}\n{text}"));
    // A refusal by address counts as an auth rejection, under its own reason.
    assert_eq!(value("keygate_auth_rejections_total{reason=\"ip_not_allowed\"}"), 1.0, "{text}");
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs_f64();
    assert!(value("process_cpu_seconds_total") >= 0.0, "{text}");
    let rss = value("process_resident_memory_bytes");
    assert!(rss > 1_048_576.0, "a running gateway holds more than 1 MiB\n{text}");
    assert!(value("process_virtual_memory_bytes") >= rss, "{text}");
    let fds = value("process_open_fds");
    // At least stdio and the two listeners.
    assert!(fds >= 5.0 && fds <= value("process_max_fds"), "{text}");
    let started = value("process_start_time_seconds");
    assert!(started <= now + 1.0 && started > now - 86_400.0, "the test process started today\n{text}");
}

// ---------------------------------------------------------------------------------------------
// keys rotate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn keys_rotate_keeps_meta_and_allowed_ips() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = GatewayConfig::new()
        .route(Route::new("/", "http://127.0.0.1:9"))
        .key(office_key().meta(&[("tenant", "acme")]));
    std::fs::write(dir.path().join("keygate.toml"), config.gateway_toml()).expect("write keygate.toml");
    std::fs::write(dir.path().join("keys.toml"), config.keys_toml()).expect("write keys.toml");
    let output = support::keygate_command(dir.path())
        .args(["-c", "keygate.toml", "keys", "rotate", "office01"])
        .output()
        .await
        .expect("run keygate keys rotate");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let new_key = String::from_utf8_lossy(&output.stdout).trim().to_string();
    let snapshot = keygate::config::load(&dir.path().join("keygate.toml")).expect("the rotated file loads");
    let entry =
        snapshot.keys.get(&keygate::keys::KeyHash::of(&new_key)).expect("the new key is in the table");
    assert_ne!(entry.id, "office01");
    let meta: Vec<String> =
        entry.meta().iter().map(|(n, v)| format!("{n}={}", v.to_str().unwrap_or("?"))).collect();
    assert_eq!(
        meta,
        ["x-keygate-meta-tenant=acme"],
        "{}",
        std::fs::read_to_string(dir.path().join("keys.toml")).unwrap_or_default()
    );
    assert!(
        entry.admits("127.0.0.2".parse().expect("ip")) && !entry.admits("127.0.0.1".parse().expect("ip"))
    );
    assert!(entry.admits("2001:db8::1".parse().expect("ip")));
}

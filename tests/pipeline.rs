//! The request pipeline end to end: an in-process gateway in front of a recording upstream.
//!
//! Each test checks what the client got and what the upstream saw (for a rejection: nothing).

mod support;

use std::time::Duration;

use http::{Method, Version};
use support::{
    GatewayConfig, Key, RecordingUpstream, Route, TestGateway, assert_error, assert_rejected, both, pattern,
    raw_get, toml_datetime_from_now,
};

const ALICE: &str = "alice-secret-7f3k2m9qz";
const EXPIRED: &str = "expired-secret-q8w7e6r5";
const REVOKED: &str = "revoked-secret-z1x2c3v4";
const UNKNOWN: &str = "nobody-has-this-secret-000";

/// Scopes deliberately out of order: the identity header must sort them.
fn alice() -> Key {
    Key::new("alice001", "alice", ALICE, &["write", "read", "admin"])
}

fn expired() -> Key {
    Key::new("expired1", "old-timer", EXPIRED, &["read"]).expires_at("2020-01-01T00:00:00Z")
}

fn revoked() -> Key {
    Key::new("revoked1", "leaked", REVOKED, &["read"]).revoked_at("2020-01-01T00:00:00Z")
}

/// `/public/` open to all, `/private/` for any valid key; alice, an expired and a revoked key.
fn basic(upstream: &RecordingUpstream) -> GatewayConfig {
    GatewayConfig::new()
        .route(Route::new("/public/", &upstream.url()).public())
        .route(Route::new("/private/", &upstream.url()))
        .key(alice())
        .key(expired())
        .key(revoked())
}

async fn basic_gateway() -> (RecordingUpstream, TestGateway) {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream).start().await;
    (upstream, gateway)
}

// ---------------------------------------------------------------------------------------------
// §2.3 check outcomes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn missing_key_is_401_missing_api_key() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway.get("/private/items").send().await;
    assert_rejected(&exchange, &upstream, 401, "missing_api_key");
}

#[tokio::test]
async fn unknown_key_is_401_invalid_api_key() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway.get("/private/items").header("x-api-key", UNKNOWN).send().await;
    assert_rejected(&exchange, &upstream, 401, "invalid_api_key");
    let answered = format!("{:?}{}", exchange.headers, String::from_utf8_lossy(&exchange.body));
    assert!(!answered.contains(UNKNOWN), "the error echoes the key\n{exchange}");
}

#[tokio::test]
async fn prefixed_key_with_bad_shape_or_checksum_is_invalid_even_if_its_hash_is_listed() {
    let upstream = RecordingUpstream::start().await;
    // A real key with one character of its checksum changed, and a key too short to be one.
    let real = Key::generated("real", &["read"]);
    let tampered = support::leak::tampered(&real.secret);
    let gateway = basic(&upstream)
        .key(real.clone())
        // Their hashes are in the table: only the shape check can reject them.
        .key(Key::new("tamper01", "tampered", &tampered, &["read"]))
        .key(Key::new("short001", "short", "kg_short", &["read"]))
        .start()
        .await;

    let ok = gateway.get("/private/x").header("x-api-key", &real.secret).send().await;
    assert_eq!(ok.status, 200, "a generated key must be accepted\n{ok}");

    for bad in [tampered.as_str(), "kg_short"] {
        let exchange = gateway.get("/private/x").header("x-api-key", bad).send().await;
        assert_rejected(&exchange, &upstream, 401, "invalid_api_key");
    }
}

#[tokio::test]
async fn revoked_key_is_401_revoked_api_key() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway.get("/private/items").header("x-api-key", REVOKED).send().await;
    assert_rejected(&exchange, &upstream, 401, "revoked_api_key");
}

#[tokio::test]
async fn expired_key_is_401_expired_api_key() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway.get("/private/items").header("x-api-key", EXPIRED).send().await;
    assert_rejected(&exchange, &upstream, 401, "expired_api_key");
}

#[tokio::test]
async fn future_expiry_and_revocation_are_not_yet_in_effect() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &upstream.url()))
        .key(
            Key::new("later001", "later", "later-secret-55aa", &["read"])
                .expires_at("2999-01-01T00:00:00Z")
                .revoked_at("2999-01-01T00:00:00Z"),
        )
        .start()
        .await;
    let exchange = gateway.get("/x").header("x-api-key", "later-secret-55aa").send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    upstream.expect_received(&exchange);
}

#[tokio::test]
async fn expiry_and_revocation_are_judged_at_each_request() {
    let upstream = RecordingUpstream::start().await;
    // Whole-second datetimes: these take effect between 1 and 2 seconds from now.
    let soon = toml_datetime_from_now(2);
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &upstream.url()))
        .key(Key::new("expsoon1", "expiring", "expiring-secret", &["read"]).expires_at(&soon))
        .key(Key::new("revsoon1", "revoking", "revoking-secret", &["read"]).revoked_at(&soon))
        .start()
        .await;

    let keys = [("expiring-secret", "expired_api_key"), ("revoking-secret", "revoked_api_key")];
    for (secret, _) in keys {
        let before = gateway.get("/x").header("x-api-key", secret).send().await;
        assert_eq!(before.status, 200, "before {soon}: {before}");
    }
    for (secret, code) in keys {
        // Nothing reloads here: only the clock can turn the same snapshot's answer into a 401.
        let mut rejected = None;
        for _ in 0..50 {
            let exchange = gateway.get("/x").header("x-api-key", secret).send().await;
            if exchange.status == 401 {
                rejected = Some(exchange);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(after) = rejected else {
            panic!("{secret} was still accepted 5 s after {soon}");
        };
        assert_rejected(&after, &upstream, 401, code);
    }
}

#[tokio::test]
async fn key_without_the_route_scope_is_403_insufficient_scope() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &upstream.url()).scope("GET", &["read"]))
        .key(Key::new("writer01", "writer", "writer-secret-1", &["write"]))
        .start()
        .await;
    let exchange = gateway.get("/items").header("x-api-key", "writer-secret-1").send().await;
    assert_rejected(&exchange, &upstream, 403, "insufficient_scope");
}

#[tokio::test]
async fn valid_key_is_forwarded_with_identity_headers_and_without_the_key() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway
        .request(Method::POST, "/private/items?page=2")
        .header("x-api-key", ALICE)
        .body("hello upstream")
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    assert_eq!(exchange.header("x-upstream"), Some("yes"), "{exchange}");
    assert_eq!(&exchange.body[..], b"hello upstream", "{exchange}");

    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.method, Method::POST, "{ctx}");
    assert_eq!(seen.uri, "/private/items?page=2", "{ctx}");
    assert_eq!(&seen.body[..], b"hello upstream", "{ctx}");
    assert_eq!(seen.header_all("x-keygate-key-id"), ["alice001"], "{ctx}");
    assert_eq!(seen.header_all("x-keygate-key-name"), ["alice"], "{ctx}");
    assert_eq!(seen.header_all("x-keygate-scopes"), ["admin,read,write"], "{ctx}");
    assert_eq!(seen.header("x-api-key"), None, "the key went upstream\n{ctx}");
}

#[tokio::test]
async fn route_without_scopes_admits_a_key_with_no_scopes() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &upstream.url()))
        .key(Key::new("bare0001", "bare", "bare-secret-1", &[]))
        .start()
        .await;
    let exchange =
        gateway.request(Method::DELETE, "/anything").header("x-api-key", "bare-secret-1").send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    assert_eq!(seen.header("x-keygate-key-id"), Some("bare0001"), "{}", both(&exchange, &seen));
}

// ---------------------------------------------------------------------------------------------
// §2.2 key sources
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn header_source_matches_any_case_and_is_stripped() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway.get("/private/a").header("X-API-Key", &format!("  {ALICE}  ")).send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.header("x-keygate-key-id"), Some("alice001"), "{ctx}");
    assert_eq!(seen.header("x-api-key"), None, "{ctx}");
}

#[tokio::test]
async fn bearer_source_is_used_and_stripped() {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream).sources(&["authorization:Bearer"]).start().await;
    // Surrounding whitespace is trimmed.
    let exchange =
        gateway.get("/private/a").header("authorization", &format!("Bearer   {ALICE}  ")).send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.header("x-keygate-key-id"), Some("alice001"), "{ctx}");
    assert_eq!(seen.header("authorization"), None, "{ctx}");
}

#[tokio::test]
async fn api_key_scheme_matches_case_insensitively_and_is_stripped() {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream).sources(&["authorization:Api-Key"]).start().await;
    for scheme in ["Api-Key", "api-key", "API-KEY"] {
        let exchange =
            gateway.get("/private/a").header("authorization", &format!("{scheme} {ALICE}")).send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        let seen = upstream.expect_received(&exchange);
        let ctx = both(&exchange, &seen);
        assert_eq!(seen.header("x-keygate-key-id"), Some("alice001"), "{ctx}");
        assert_eq!(seen.header("authorization"), None, "{ctx}");
    }
}

#[tokio::test]
async fn query_source_is_removed_and_other_parameters_survive() {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream).sources(&["query:api_key"]).start().await;
    let exchange = gateway.get(&format!("/private/items?a=1&api_key={ALICE}&b=two%20words")).send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.header("x-keygate-key-id"), Some("alice001"), "{ctx}");
    assert_eq!(seen.uri, "/private/items?a=1&b=two%20words", "{ctx}");

    // The only parameter gone: no dangling `?` either way is acceptable, but no key.
    let alone = gateway.get(&format!("/private/items?api_key={ALICE}")).send().await;
    assert_eq!(alone.status, 200, "{alone}");
    let seen = upstream.expect_received(&alone);
    assert!(seen.uri == "/private/items" || seen.uri == "/private/items?", "{}", both(&alone, &seen));
}

#[tokio::test]
async fn authorization_with_an_unclaimed_scheme_passes_through_untouched() {
    let upstream = RecordingUpstream::start().await;
    let basic_auth = "Basic dXNlcjpwYXNzd29yZA==";

    // Authorization is a source for Bearer only: Basic belongs to the upstream.
    let gateway = basic(&upstream).sources(&["header:x-api-key", "authorization:Bearer"]).start().await;
    let exchange =
        gateway.get("/private/a").header("x-api-key", ALICE).header("authorization", basic_auth).send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    assert_eq!(seen.header_all("authorization"), [basic_auth], "{}", both(&exchange, &seen));

    // No authorization source at all: even a Bearer token belongs to the upstream.
    let gateway = basic(&upstream).start().await;
    let exchange = gateway
        .get("/private/a")
        .header("x-api-key", ALICE)
        .header("authorization", "Bearer upstream-token")
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    assert_eq!(seen.header_all("authorization"), ["Bearer upstream-token"], "{}", both(&exchange, &seen));
}

#[tokio::test]
async fn sources_are_tried_in_order_and_every_credential_is_stripped() {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream)
        .sources(&["header:x-api-key", "authorization:Bearer", "query:api_key"])
        .start()
        .await;

    // The first source present wins, even though a later one holds a bad key…
    let exchange = gateway
        .get(&format!("/private/a?api_key={UNKNOWN}&keep=1"))
        .header("x-api-key", ALICE)
        .header("authorization", &format!("Bearer {UNKNOWN}"))
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.header("x-keygate-key-id"), Some("alice001"), "{ctx}");
    // …and the credentials of the sources that lost are removed as well.
    assert_eq!(seen.header("x-api-key"), None, "{ctx}");
    assert_eq!(seen.header("authorization"), None, "{ctx}");
    assert_eq!(seen.uri, "/private/a?keep=1", "{ctx}");

    // A bad key in the first source is not rescued by a good one later.
    let exchange = gateway
        .get("/private/a")
        .header("x-api-key", UNKNOWN)
        .header("authorization", &format!("Bearer {ALICE}"))
        .send()
        .await;
    assert_rejected(&exchange, &upstream, 401, "invalid_api_key");

    // Absent first source: the next one is used.
    let exchange = gateway.get("/private/a").header("authorization", &format!("Bearer {ALICE}")).send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
}

#[tokio::test]
async fn two_values_for_one_source_are_401_invalid_api_key() {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream).sources(&["header:x-api-key", "query:api_key"]).start().await;

    let headers =
        gateway.get("/private/a").header("x-api-key", ALICE).header("x-api-key", ALICE).send().await;
    assert_rejected(&headers, &upstream, 401, "invalid_api_key");

    let query = gateway.get(&format!("/private/a?api_key={ALICE}&api_key={ALICE}")).send().await;
    assert_rejected(&query, &upstream, 401, "invalid_api_key");

    let gateway = basic(&upstream).sources(&["authorization:Bearer"]).start().await;
    let bearer = format!("Bearer {ALICE}");
    let authorization = gateway
        .get("/private/a")
        .header("authorization", &bearer)
        .header("authorization", &bearer)
        .send()
        .await;
    assert_rejected(&authorization, &upstream, 401, "invalid_api_key");
}

#[tokio::test]
async fn credentials_are_stripped_on_public_routes_too() {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream)
        .sources(&["header:x-api-key", "authorization:Bearer", "query:api_key"])
        .start()
        .await;
    for key in [ALICE, UNKNOWN] {
        let exchange = gateway
            .get(&format!("/public/page?api_key={key}&keep=1"))
            .header("x-api-key", key)
            .header("authorization", &format!("Bearer {key}"))
            .send()
            .await;
        assert_eq!(exchange.status, 200, "{exchange}");
        let seen = upstream.expect_received(&exchange);
        let ctx = both(&exchange, &seen);
        assert_eq!(seen.uri, "/public/page?keep=1", "{ctx}");
        assert_eq!(seen.header("x-api-key"), None, "{ctx}");
        assert_eq!(seen.header("authorization"), None, "{ctx}");
    }
}

// ---------------------------------------------------------------------------------------------
// §2.4 forwarded headers
// ---------------------------------------------------------------------------------------------

const SPOOFED: [(&str, &str); 5] = [
    ("x-keygate-key-id", "admin0001"),
    ("X-Keygate-Scopes", "*"),
    ("x_keygate_key_id", "admin0002"),
    ("X-KEYGATE-KEY-NAME", "root"),
    ("x-keygate-anything", "1"),
];

#[tokio::test]
async fn spoofed_identity_headers_are_stripped_on_public_routes() {
    let (upstream, gateway) = basic_gateway().await;
    let mut call = gateway.get("/public/page");
    for (name, value) in SPOOFED {
        call = call.header(name, value);
    }
    let exchange = call.send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let leaked: Vec<_> = seen
        .headers
        .keys()
        .filter(|name| name.as_str().replace('_', "-").starts_with("x-keygate-"))
        .collect();
    assert!(leaked.is_empty(), "spoofed {leaked:?} reached the upstream\n{}", both(&exchange, &seen));
}

#[tokio::test]
async fn spoofed_identity_headers_are_replaced_on_private_routes() {
    let (upstream, gateway) = basic_gateway().await;
    let mut call = gateway.get("/private/page").header("x-api-key", ALICE);
    for (name, value) in SPOOFED {
        call = call.header(name, value);
    }
    let exchange = call.send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.header_all("x-keygate-key-id"), ["alice001"], "{ctx}");
    assert_eq!(seen.header_all("x-keygate-key-name"), ["alice"], "{ctx}");
    assert_eq!(seen.header_all("x-keygate-scopes"), ["admin,read,write"], "{ctx}");
    for name in ["x_keygate_key_id", "x-keygate-anything"] {
        assert_eq!(seen.header(name), None, "{name} reached upstream\n{ctx}");
    }
}

#[tokio::test]
async fn connection_header_cannot_remove_identity_headers() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway
        .get("/private/page")
        .header("x-api-key", ALICE)
        .header("connection", "x-keygate-key-id, x-keygate-key-name, x-keygate-scopes, x-request-id")
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.header_all("x-keygate-key-id"), ["alice001"], "{ctx}");
    assert_eq!(seen.header_all("x-keygate-key-name"), ["alice"], "{ctx}");
    assert_eq!(seen.header_all("x-keygate-scopes"), ["admin,read,write"], "{ctx}");
}

#[tokio::test]
async fn hop_by_hop_headers_and_those_connection_names_are_removed() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway
        .get("/public/page")
        .header("connection", "keep-alive, x-custom-hop")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("te", "trailers")
        .header("x-custom-hop", "must not pass")
        .header("x-end-to-end", "must pass")
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    for name in ["keep-alive", "proxy-connection", "te", "x-custom-hop"] {
        assert_eq!(seen.header(name), None, "{name} reached upstream\n{ctx}");
    }
    assert!(
        !seen.header_all("connection").iter().any(|v| v.contains("x-custom-hop")),
        "the client's Connection header reached upstream\n{ctx}"
    );
    assert_eq!(seen.header("x-end-to-end"), Some("must pass"), "{ctx}");
}

#[tokio::test]
async fn forwarding_headers_are_appended_or_replaced() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway
        .get("/public/page")
        .header("host", "api.test:8080")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-forwarded-proto", "https")
        .header("x-forwarded-host", "evil.example")
        .header("x-real-ip", "10.9.9.9")
        .header("forwarded", "for=198.51.100.1;proto=https")
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);

    let xff = seen.header_all("x-forwarded-for");
    assert_eq!(xff.len(), 1, "x-forwarded-for must be one line\n{ctx}");
    let hops: Vec<&str> = xff[0].split(',').map(str::trim).collect();
    assert_eq!(hops, ["203.0.113.7", "127.0.0.1"], "{ctx}");
    assert_eq!(seen.header_all("x-forwarded-proto"), ["http"], "{ctx}");
    let forwarded_host = seen.header_all("x-forwarded-host");
    assert!(
        forwarded_host == ["api.test:8080"] || forwarded_host == ["api.test"],
        "x-forwarded-host must come from Host\n{ctx}"
    );
    assert_eq!(seen.header_all("x-real-ip"), ["127.0.0.1"], "{ctx}");
    assert_eq!(seen.header("forwarded"), None, "{ctx}");
    // preserve_host defaults to false: the upstream sees its own authority.
    assert_eq!(seen.header_all("host"), [upstream.addr().to_string()], "{ctx}");

    // With nothing sent, x-forwarded-for is just the client.
    let plain = gateway.get("/public/page").send().await;
    let seen = upstream.expect_received(&plain);
    assert_eq!(seen.header_all("x-forwarded-for"), ["127.0.0.1"], "{}", both(&plain, &seen));
}

#[tokio::test]
async fn preserve_host_sends_the_clients_host() {
    let upstream = RecordingUpstream::start().await;
    let gateway =
        GatewayConfig::new().route(Route::new("/", &upstream.url()).public().preserve_host()).start().await;
    let exchange = gateway.get("/x").header("host", "api.example.com:8443").send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    assert_eq!(seen.header_all("host"), ["api.example.com:8443"], "{}", both(&exchange, &seen));
}

#[tokio::test]
async fn request_id_is_kept_when_sent() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway
        .get("/private/page")
        .header("x-api-key", ALICE)
        .header("x-request-id", "test-req-4242")
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    assert_eq!(exchange.header("x-request-id"), Some("test-req-4242"), "{exchange}");
    let seen = upstream.expect_received(&exchange);
    assert_eq!(seen.header_all("x-request-id"), ["test-req-4242"], "{}", both(&exchange, &seen));
}

#[tokio::test]
async fn request_id_is_generated_when_absent_and_returned() {
    let (upstream, gateway) = basic_gateway().await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let exchange = gateway.get("/public/page").send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        let seen = upstream.expect_received(&exchange);
        let ctx = both(&exchange, &seen);
        let upstream_id = seen.header("x-request-id").map(str::to_owned);
        assert!(upstream_id.as_deref().is_some_and(|id| !id.is_empty()), "no x-request-id generated\n{ctx}");
        assert_eq!(
            exchange.header("x-request-id"),
            upstream_id.as_deref(),
            "the response must carry the id sent upstream\n{ctx}"
        );
        ids.push(upstream_id);
    }
    assert_ne!(ids[0], ids[1], "two requests got the same generated id");
}

// ---------------------------------------------------------------------------------------------
// Method scopes
// ---------------------------------------------------------------------------------------------

fn scoped_route(upstream: &RecordingUpstream) -> Route {
    Route::new("/", &upstream.url())
        .scope("GET", &["read"])
        .scope("HEAD", &["read"])
        .scope("DELETE", &["admin", "owner"])
        .scope("*", &["write"])
}

#[tokio::test]
async fn method_scopes_are_enforced_per_method() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(scoped_route(&upstream))
        .key(Key::new("reader01", "reader", "reader-secret", &["read"]))
        .key(Key::new("writer01", "writer", "writer-secret", &["write"]))
        .key(Key::new("owner001", "owner", "owner-secret", &["owner"]))
        .key(Key::new("star0001", "star", "star-secret", &["*"]))
        .start()
        .await;

    let cases: &[(&str, Method, u16)] = &[
        ("reader-secret", Method::GET, 200),
        ("reader-secret", Method::HEAD, 200),
        ("reader-secret", Method::POST, 403),
        ("reader-secret", Method::DELETE, 403),
        ("writer-secret", Method::POST, 200), // via "*"
        ("writer-secret", Method::PUT, 200),  // via "*"
        ("writer-secret", Method::GET, 403),
        ("writer-secret", Method::DELETE, 403), // DELETE has its own entry; "*" does not apply
        ("owner-secret", Method::DELETE, 200),  // one scope of a list suffices
        ("owner-secret", Method::GET, 403),
        ("star-secret", Method::GET, 200), // a "*" key holds every scope
        ("star-secret", Method::POST, 200),
        ("star-secret", Method::DELETE, 200),
    ];
    for (secret, method, status) in cases {
        let exchange = gateway.request(method.clone(), "/resource").header("x-api-key", secret).send().await;
        if *status == 403 {
            assert_rejected(&exchange, &upstream, 403, "insufficient_scope");
        } else {
            assert_eq!(exchange.status.as_u16(), *status, "{exchange}");
            upstream.expect_received(&exchange);
        }
    }
}

#[tokio::test]
async fn method_without_an_entry_and_no_star_is_denied() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &upstream.url()).scope("GET", &["read"]))
        .key(Key::new("rw000001", "rw", "rw-secret", &["read", "write"]))
        .start()
        .await;
    let get = gateway.get("/r").header("x-api-key", "rw-secret").send().await;
    assert_eq!(get.status, 200, "{get}");
    let post = gateway.request(Method::POST, "/r").header("x-api-key", "rw-secret").send().await;
    assert_rejected(&post, &upstream, 403, "insufficient_scope");
}

#[tokio::test]
async fn method_override_headers_need_the_scope_of_the_overriding_method_too() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(scoped_route(&upstream))
        .key(Key::new("reader01", "reader", "reader-secret", &["read"]))
        .key(Key::new("radmin01", "read-admin", "read-admin-secret", &["read", "admin"]))
        .start()
        .await;
    for header in ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"] {
        let denied = gateway
            .get("/resource")
            .header("x-api-key", "reader-secret")
            .header(header, "DELETE")
            .send()
            .await;
        assert_rejected(&denied, &upstream, 403, "insufficient_scope");

        let allowed = gateway
            .get("/resource")
            .header("x-api-key", "read-admin-secret")
            .header(header, "DELETE")
            .send()
            .await;
        assert_eq!(allowed.status, 200, "{allowed}");
    }
}

#[tokio::test]
async fn methods_are_case_sensitive() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(scoped_route(&upstream))
        .key(Key::new("reader01", "reader", "reader-secret", &["read"]))
        .start()
        .await;
    // `get` is not `GET`: it falls under "*", which needs write.
    let method = Method::from_bytes(b"get").expect("extension method");
    let exchange = gateway.request(method, "/resource").header("x-api-key", "reader-secret").send().await;
    assert_rejected(&exchange, &upstream, 403, "insufficient_scope");
}

// ---------------------------------------------------------------------------------------------
// §2.1 routes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn public_route_needs_no_key_and_gets_no_identity() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway.get("/public/page?x=1").send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    assert_eq!(exchange.header("x-upstream"), Some("yes"), "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.uri, "/public/page?x=1", "{ctx}");
    assert_eq!(seen.header("x-keygate-key-id"), None, "{ctx}");
}

#[tokio::test]
async fn longest_prefix_wins() {
    let root = RecordingUpstream::start().await;
    let api = RecordingUpstream::start().await;
    let admin = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &root.url()))
        .route(Route::new("/api/admin/", &admin.url()))
        .route(Route::new("/api/", &api.url()).public())
        .key(alice())
        .start()
        .await;

    let open = gateway.get("/api/users").send().await;
    assert_eq!(open.status, 200, "{open}");
    api.expect_received(&open);

    let locked = gateway.get("/api/admin/users").send().await;
    assert_rejected(&locked, &admin, 401, "missing_api_key");
    assert_eq!(api.received(&locked).map(|r| r.uri), None, "{locked}");

    let admin_call = gateway.get("/api/admin/users").header("x-api-key", ALICE).send().await;
    assert_eq!(admin_call.status, 200, "{admin_call}");
    admin.expect_received(&admin_call);

    let elsewhere = gateway.get("/other").send().await;
    assert_rejected(&elsewhere, &root, 401, "missing_api_key");
}

#[tokio::test]
async fn host_routes_match_case_insensitively_ignoring_port_and_trailing_dot() {
    let hosted = RecordingUpstream::start().await;
    let fallback = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/", &hosted.url()).host("api.example.com").public())
        .route(Route::new("/", &fallback.url()).public())
        .start()
        .await;

    for host in [
        "api.example.com",
        "API.Example.COM",
        "api.example.com:8443",
        "api.example.com.",
        "Api.Example.Com.:80",
    ] {
        let exchange = gateway.get("/x").header("host", host).send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        hosted.expect_received(&exchange);
    }
    for host in ["other.example.com", "127.0.0.1", "api.example.com.evil"] {
        let exchange = gateway.get("/x").header("host", host).send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        fallback.expect_received(&exchange);
    }
}

#[tokio::test]
async fn host_route_wins_over_a_hostless_route() {
    let hosted = RecordingUpstream::start().await;
    let hostless = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/x/", &hostless.url()).public())
        .route(Route::new("/", &hosted.url()).host("api.example.com").public())
        .start()
        .await;
    let exchange = gateway.get("/x/1").header("host", "api.example.com").send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    hosted.expect_received(&exchange);

    let other = gateway.get("/x/1").header("host", "else.example").send().await;
    assert_eq!(other.status, 200, "{other}");
    hostless.expect_received(&other);
}

#[tokio::test]
async fn no_matching_route_is_404_no_route() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/api/", &upstream.url()).public())
        .route(Route::new("/only-here/", &upstream.url()).host("api.example.com").public())
        .start()
        .await;
    for (target, host) in [
        ("/elsewhere", "127.0.0.1"),
        ("/API/x", "127.0.0.1"), // prefixes are case-sensitive
        ("/only-here/x", "other.example.com"),
    ] {
        let exchange = gateway.get(target).header("host", host).send().await;
        assert_rejected(&exchange, &upstream, 404, "no_route");
    }
}

/// What a path trick must come to, per SPEC §2.1.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    /// Normalised onto `/private/…`: needs a key like any request there.
    Private,
    /// Refused outright.
    BadRequest,
}

#[tokio::test]
async fn path_tricks_never_reach_a_private_route_without_a_key() {
    let (upstream, gateway) = basic_gateway().await;
    let absolute = format!("http://{}/public/../private/secret", gateway.addr);
    let cases: Vec<(&str, Outcome)> = vec![
        ("/public/../private/secret", Outcome::Private),
        ("/public/./../private/secret", Outcome::Private),
        ("/public//../private/secret", Outcome::Private),
        ("/public/%2e%2e/private/secret", Outcome::Private),
        ("/public/%2E%2E/private/secret", Outcome::Private),
        ("/public/.%2e/private/secret", Outcome::Private),
        ("/%70ublic/../private/secret", Outcome::Private),
        (absolute.as_str(), Outcome::Private),
        ("/public/..%2Fprivate/secret", Outcome::BadRequest),
        ("/public/..%2fprivate/secret", Outcome::BadRequest),
        ("/public/%2e%2e%2fprivate/secret", Outcome::BadRequest),
        ("/public/..%5Cprivate/secret", Outcome::BadRequest),
        ("/public/..\\private/secret", Outcome::BadRequest),
        ("/public\\..\\private/secret", Outcome::BadRequest),
        ("/public/..;/private/secret", Outcome::BadRequest),
        ("/public/..;x=1/private/secret", Outcome::BadRequest),
        ("/public/%2e%2e;/private/secret", Outcome::BadRequest),
        ("/public/.;x/../private/secret", Outcome::BadRequest),
        ("/public/../../private/secret", Outcome::BadRequest),
        ("/../private/secret", Outcome::BadRequest),
        ("/public/%00/../private/secret", Outcome::BadRequest),
        ("/public/%zz/../private/secret", Outcome::BadRequest),
        ("/public/%2/../private/secret", Outcome::BadRequest),
    ];

    let mut failures = Vec::new();
    for (target, outcome) in &cases {
        let exchange = gateway.raw(&raw_get(target, &[])).await;
        let got = (exchange.status(), exchange.error_code());
        let expected = match outcome {
            Outcome::Private => (Some(401), Some("missing_api_key".to_owned())),
            Outcome::BadRequest => (Some(400), Some("bad_request".to_owned())),
        };
        if got != expected {
            failures.push(format!("{target:?}: expected {outcome:?} {expected:?}, got {got:?}\n{exchange}"));
        }
    }
    assert!(upstream.count() == 0, "path tricks reached the upstream: {:#?}", upstream.requests());
    assert!(
        failures.is_empty(),
        "{} of {} path tricks were mishandled:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[tokio::test]
async fn path_tricks_over_http2_are_normalised_too() {
    let (upstream, gateway) = basic_gateway().await;
    for (target, status, code) in [
        ("/public/../private/secret", 401, "missing_api_key"),
        ("/public/%2e%2e/private/secret", 401, "missing_api_key"),
        ("/public/..%2Fprivate/secret", 400, "bad_request"),
        ("/public/..;/private/secret", 400, "bad_request"),
    ] {
        let exchange = gateway.get(target).http2().send().await;
        assert_rejected(&exchange, &upstream, status, code);
    }
}

#[tokio::test]
async fn allow_encoded_slashes_forwards_them_still_encoded() {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream).server("allow_encoded_slashes", "true").start().await;
    let exchange = gateway.get("/public/a%2Fb").send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    // Still encoded: a decoded slash would make a different path from the one routed.
    assert!(seen.uri.eq_ignore_ascii_case("/public/a%2Fb"), "{}", both(&exchange, &seen));
}

#[tokio::test]
async fn upstream_receives_the_normalised_path() {
    let (upstream, gateway) = basic_gateway().await;
    let cases = [
        ("/public//a/./b/../c", "/public/a/c"),
        ("/public/%7euser", "/public/~user"),
        ("/public/%7Euser", "/public/~user"),
        ("/public/%41%2d%5f%2E", "/public/A-_."),
        ("/%70ublic/x", "/public/x"),
        ("/public/%252e%252e/x", "/public/%252e%252e/x"),
        ("/public/a%20b", "/public/a%20b"),
        ("/public/./x?q=%7e&r=../y", "/public/x?q=%7e&r=../y"),
    ];
    for (sent, expected) in cases {
        let exchange = gateway.get(sent).send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        let seen = upstream.expect_received(&exchange);
        assert_eq!(seen.uri, expected, "{}", both(&exchange, &seen));
    }

    // Through a raw socket too, where nothing in between could have tidied the path.
    let raw = gateway.raw(&raw_get("/public/a/../b", &[])).await;
    assert_eq!(raw.status(), Some(200), "{raw}");
    let seen = upstream.requests();
    assert_eq!(seen.last().map(|r| r.uri.as_str()), Some("/public/b"), "{raw}\nupstream saw: {seen:#?}");
}

#[tokio::test]
async fn absolute_form_target_is_forwarded_in_origin_form() {
    let (upstream, gateway) = basic_gateway().await;
    let target = format!("http://{}/public/abs?q=1", gateway.addr);
    let raw = gateway.raw(&raw_get(&target, &[])).await;
    assert_eq!(raw.status(), Some(200), "{raw}");
    let seen = upstream.requests();
    assert_eq!(
        seen.last().map(|r| r.uri.as_str()),
        Some("/public/abs?q=1"),
        "{raw}\nupstream saw: {seen:#?}"
    );
}

#[tokio::test]
async fn upstream_base_path_is_prepended() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/svc/", &format!("{}/base", upstream.url())).public())
        .start()
        .await;
    let exchange = gateway.get("/svc/items?x=1").send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    assert_eq!(seen.uri, "/base/svc/items?x=1", "{}", both(&exchange, &seen));
}

// ---------------------------------------------------------------------------------------------
// Bodies, upstream failures, protocol edges
// ---------------------------------------------------------------------------------------------

const THREE_MB: usize = 3 * 1024 * 1024;

#[tokio::test]
async fn three_megabyte_request_body_arrives_intact() {
    let (upstream, gateway) = basic_gateway().await;
    let body = pattern(THREE_MB);
    let exchange = gateway
        .request(Method::PUT, "/private/upload")
        .header("x-api-key", ALICE)
        .body(body.clone())
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    let seen = upstream.expect_received(&exchange);
    assert!(
        seen.body[..] == body[..],
        "upstream got {} bytes, not the {} sent (or different ones)\n{}",
        seen.body.len(),
        body.len(),
        both(&exchange, &seen)
    );
    // The upstream echoes it: the same bytes come back through the gateway.
    assert!(
        exchange.body[..] == body[..],
        "echo came back as {} bytes, expected {}\n{exchange}",
        exchange.body.len(),
        body.len()
    );
}

#[tokio::test]
async fn three_megabyte_response_body_arrives_intact() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway
        .get("/private/download")
        .header("x-api-key", ALICE)
        .header("x-test-response-bytes", &THREE_MB.to_string())
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    upstream.expect_received(&exchange);
    assert!(
        exchange.body[..] == pattern(THREE_MB)[..],
        "got {} bytes, expected the {THREE_MB}-byte pattern\n{exchange}",
        exchange.body.len()
    );
}

#[tokio::test]
async fn unreachable_upstream_is_502_upstream_unavailable() {
    // A port that was just free: bound, then released, so nothing listens there.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let gateway =
        GatewayConfig::new().route(Route::new("/", &format!("http://{dead}")).public()).start().await;
    let exchange = gateway.get("/x").send().await;
    assert_error(&exchange, 502, "upstream_unavailable");
}

#[tokio::test]
async fn slow_upstream_is_504_upstream_timeout() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .server("request_timeout", "\"300ms\"")
        .route(Route::new("/", &upstream.url()).public())
        .start()
        .await;
    // The upstream would answer 200 after 20 s, twice the client's own timeout: only the 300 ms
    // request_timeout can make this a 504, and a gateway that waited fails the send instead.
    let exchange = gateway.get("/slow").header("x-test-sleep-ms", "20000").send().await;
    assert_error(&exchange, 504, "upstream_timeout");
    upstream.expect_received(&exchange);

    let quick = gateway.get("/quick").send().await;
    assert_eq!(quick.status, 200, "{quick}");
}

/// Accepts one connection, reads the request head, promises 1000 body bytes, sends 100 and
/// closes: an upstream that dies mid-body.
async fn upstream_dying_mid_body() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let Ok((mut stream, _)) = listener.accept().await else { return };
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        // Bounded: a request head is far below 64 KiB, and the test's client times out anyway.
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 65_536 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n").await;
        let _ = stream.write_all(&[b'x'; 100]).await;
        // Dropping the stream closes it 900 bytes short.
    });
    addr
}

#[tokio::test]
async fn upstream_dying_mid_body_is_not_passed_off_as_complete() {
    let dying = upstream_dying_mid_body().await;
    let gateway =
        GatewayConfig::new().route(Route::new("/", &format!("http://{dying}")).public()).start().await;
    match gateway.get("/truncated").try_send().await {
        // The client saw its response cut off: what the spec asks for. A client that timed out
        // saw nothing at all: a gateway that hangs must not pass for one that resets.
        Err(error) if !support::timed_out(&error) => {}
        Err(error) => panic!("the client got no answer and no reset, it timed out:\n{error}"),
        Ok(exchange) => panic!(
            "a truncated upstream body reached the client as a complete response \
             ({} of 1000 bytes)\n{exchange}",
            exchange.body.len()
        ),
    }
}

#[tokio::test]
async fn client_that_never_finishes_its_headers_is_dropped() {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream).server("header_read_timeout", "\"1s\"").start().await;
    let started = tokio::time::Instant::now();
    let raw = gateway.raw(b"GET /public/slow HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Partial: ").await;
    let waited = started.elapsed();
    // Closed, not timed out; and not before header_read_timeout. The upper bound is 5× the
    // timeout: a dropped client is the point of the test, and raw() itself waits 10 s.
    assert!(
        waited < Duration::from_secs(5) && !raw.timed_out(),
        "connection still open after {waited:?} with header_read_timeout = 1s\n{raw}"
    );
    assert!(
        waited >= Duration::from_millis(900),
        "dropped after {waited:?}, before header_read_timeout (1s)\n{raw}"
    );
    assert_eq!(upstream.count(), 0, "{raw}");
}

#[tokio::test]
async fn transfer_coding_other_than_chunked_is_501() {
    let (upstream, gateway) = basic_gateway().await;
    let request = b"POST /public/upload HTTP/1.1\r\n\
Host: 127.0.0.1\r\n\
Connection: close\r\n\
Transfer-Encoding: gzip, chunked\r\n\
\r\n\
5\r\nhello\r\n0\r\n\r\n";
    let raw = gateway.raw(request).await;
    assert_eq!(raw.status(), Some(501), "{raw}");
    assert_eq!(raw.error_code().as_deref(), Some("unsupported_transfer_encoding"), "{raw}");
    assert_eq!(upstream.count(), 0, "{raw}\nupstream saw: {:#?}", upstream.requests());
}

#[tokio::test]
async fn oversized_request_head_is_431() {
    let upstream = RecordingUpstream::start().await;
    let gateway = basic(&upstream).server("max_header_bytes", "16384").start().await;

    // Under the configured limit: fine.
    let fits = format!("X-Filler: {}", "a".repeat(8_000));
    let raw = gateway.raw(&raw_get("/public/ok", &[&fits])).await;
    assert_eq!(raw.status(), Some(200), "{raw}");
    let before = upstream.count();

    let too_big = format!("X-Filler: {}", "a".repeat(20_000));
    let raw = gateway.raw(&raw_get("/public/big", &[&too_big])).await;
    assert_eq!(raw.status(), Some(431), "{raw}");
    assert_eq!(raw.error_code().as_deref(), Some("headers_too_large"), "{raw}");
    assert_eq!(upstream.count(), before, "{raw}\nupstream saw: {:#?}", upstream.requests());
}

#[tokio::test]
async fn http2_prior_knowledge_works_end_to_end() {
    let (upstream, gateway) = basic_gateway().await;
    let exchange = gateway
        .request(Method::POST, "/private/h2?x=1")
        .header("x-api-key", ALICE)
        .body("over h2")
        .http2()
        .send()
        .await;
    assert_eq!(exchange.status, 200, "{exchange}");
    assert_eq!(exchange.version, Version::HTTP_2, "{exchange}");
    assert_eq!(&exchange.body[..], b"over h2", "{exchange}");
    let seen = upstream.expect_received(&exchange);
    let ctx = both(&exchange, &seen);
    assert_eq!(seen.uri, "/private/h2?x=1", "{ctx}");
    assert_eq!(seen.header("x-keygate-key-id"), Some("alice001"), "{ctx}");
    assert_eq!(seen.header("x-api-key"), None, "{ctx}");
    assert_eq!(&seen.body[..], b"over h2", "{ctx}");

    let rejected = gateway.get("/private/h2").http2().send().await;
    assert_rejected(&rejected, &upstream, 401, "missing_api_key");
}

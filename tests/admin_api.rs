//! The key API on the admin listener (SPEC §10), against the real `keygate serve` with a
//! recording upstream: every endpoint, what the gateway then does with the keys, the admin
//! token gate, the Host guard, body limits, validation, the audit log, and CLI and API
//! writing the same key file at once.

mod support;

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;

use http::Method;
use serde_json::{Value, json};
use support::admin::{AdminGateway, SEED_ID, SEED_SECRET};
use support::{
    AdminListener, Call, Exchange, GatewayConfig, Key, Route, assert_error, join_all, keygate_command,
};

/// The fields of one key in every answer (SPEC §10, plus allowed_ips).
const KEY_FIELDS: [&str; 15] = [
    "id",
    "name",
    "tail",
    "scopes",
    "consumer",
    "meta",
    "allowed_ips",
    "created_at",
    "expires_at",
    "revoked_at",
    "status",
    "rate_limit",
    "quota",
    "last_used_at",
    "used",
];

#[track_caller]
fn assert_key_fields(key: &Value, extra: &[&str], context: &Exchange) {
    let got: HashSet<&str> =
        key.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
    let want: HashSet<&str> = KEY_FIELDS.iter().chain(extra).copied().collect();
    assert_eq!(got, want, "a key's fields\n{context}");
}

/// The gateway answered 200 from the upstream, which saw the key's identity and not the key.
#[track_caller]
fn assert_forwarded(gate: &AdminGateway, exchange: &Exchange, key: &str, id: &str) {
    assert_eq!(exchange.status, 200, "the key works on the gateway\n{exchange}");
    let seen = gate.upstream.expect_received(exchange);
    assert_eq!(seen.header("x-keygate-key-id"), Some(id), "{exchange}");
    for (name, value) in seen.headers.iter() {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(!value.contains(key), "the upstream saw the key in {name}\n{exchange}");
    }
}

#[tokio::test]
async fn every_endpoint_answers_as_the_spec_says_and_the_gateway_follows() {
    let mut gate = AdminGateway::start().await;

    let listed = gate.api(Method::GET, "/keys").send().await;
    assert_eq!(listed.status, 200, "{listed}");
    assert_eq!(listed.header("content-type"), Some("application/json"), "{listed}");
    let keys = listed.json().expect("JSON")["keys"].as_array().cloned().expect("a keys array");
    assert_eq!(keys.len(), 1, "{listed}");
    assert_key_fields(&keys[0], &[], &listed);
    assert_eq!(keys[0]["id"], SEED_ID);
    assert_eq!(keys[0]["status"], "active");

    // Create: shown once, in keygate's format, in force before the answer comes back.
    let (key, created) = gate
        .create(json!({
            "name": "billing-sync",
            "scopes": ["read", "write"],
            "expires": "30d",
            "rate_limit": "100/s",
            "quota": "1000/day",
            "consumer": "acme",
            "meta": { "tenant": "acme", "plan": "pro" },
            "allowed_ips": ["127.0.0.0/8", "::1/128"],
        }))
        .await;
    let id = created["id"].as_str().expect("an id").to_string();
    assert!(key.starts_with(&format!("kg_{id}_")), "{key} / {created}");
    assert_eq!(created["tail"].as_str(), Some(&key[key.len() - 6..]));
    assert_eq!(created["scopes"], json!(["read", "write"]));
    assert_eq!(created["status"], "active");
    assert_eq!(created["consumer"], "acme");
    assert_eq!(created["meta"], json!({ "tenant": "acme", "plan": "pro" }));
    assert_eq!(created["rate_limit"], "100/s");
    assert_eq!(created["quota"], "1000/day");
    assert!(created["expires_at"].as_str().is_some(), "{created}");
    assert!(!std::fs::read_to_string(gate.keys_path()).unwrap().contains(&key), "only the hash is stored");

    let used = gate.use_key(&key).await;
    assert_forwarded(&gate, &used, &key, &id);
    let seen = gate.upstream.expect_received(&used);
    assert_eq!(seen.header("x-keygate-consumer"), Some("acme"));
    assert_eq!(seen.header("x-keygate-meta-tenant"), Some("acme"));

    // One key, by id, by name and by tail.
    for selector in [id.clone(), "billing-sync".to_string(), key[key.len() - 6..].to_string()] {
        let one = gate.api(Method::GET, &format!("/keys/{selector}")).send().await;
        assert_eq!(one.status, 200, "{one}");
        let body = one.json().expect("JSON");
        assert_key_fields(&body, &[], &one);
        assert_eq!(body["id"], id.as_str(), "{one}");
        assert!(
            !one.body.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key is shown only once\n{one}"
        );
    }

    // Rotate with no grace: the old key ends now, the new one works.
    let rotated = AdminGateway::json_call(
        gate.api(Method::POST, &format!("/keys/{id}/rotate")),
        &json!({"grace": "0s"}),
    )
    .send()
    .await;
    assert_eq!(rotated.status, 201, "{rotated}");
    let body = rotated.json().expect("JSON");
    assert_key_fields(&body, &["key", "replaced"], &rotated);
    let new_key = body["key"].as_str().expect("the new key").to_string();
    let new_id = body["id"].as_str().expect("the new id").to_string();
    assert_ne!(new_id, id);
    assert_eq!(body["replaced"]["id"], id.as_str());
    assert_eq!(body["name"], "billing-sync");
    assert_eq!(body["consumer"], "acme", "rotation keeps the grant");
    assert_error(&gate.use_key(&key).await, 401, "expired_api_key");
    assert_forwarded(&gate, &gate.use_key(&new_key).await, &new_key, &new_id);

    // Revoke.
    let revoked = gate.api(Method::POST, &format!("/keys/{new_id}/revoke")).send().await;
    assert_eq!(revoked.status, 200, "{revoked}");
    let body = revoked.json().expect("JSON");
    assert_eq!(body["status"], "revoked", "{revoked}");
    assert!(body["revoked_at"].as_str().is_some(), "{revoked}");
    assert_error(&gate.use_key(&new_key).await, 401, "revoked_api_key");

    // Delete.
    let deleted = gate.api(Method::DELETE, &format!("/keys/{new_id}")).send().await;
    assert_eq!(deleted.status, 204, "{deleted}");
    assert!(deleted.body.is_empty(), "{deleted}");
    assert_error(&gate.api(Method::GET, &format!("/keys/{new_id}")).send().await, 404, "key_not_found");
    assert_error(&gate.use_key(&new_key).await, 401, "invalid_api_key");

    // Two keys with one name: the name no longer picks one.
    gate.create(json!({"name": "twin", "scopes": ["read"]})).await;
    gate.create(json!({"name": "twin", "scopes": ["read"]})).await;
    let ambiguous = gate.api(Method::POST, "/keys/twin/revoke").send().await;
    assert_error(&ambiguous, 409, "ambiguous_selector");

    // The seed key never moved, and its use shows as usage.
    assert_eq!(gate.use_key(SEED_SECRET).await.status, 200);

    // One audit line per change, by the token's name, never a key.
    let lines = gate.audit_lines();
    let actions: Vec<&str> = lines.iter().map(|l| l["action"].as_str().unwrap_or("")).collect();
    assert_eq!(actions, ["create", "rotate", "revoke", "delete", "create", "create"], "{lines:#?}");
    for line in &lines {
        assert_eq!(line["token"], "ops", "{line}");
        assert!(line["time"].as_str().is_some() && line["key_id"].as_str().is_some(), "{line}");
        assert!(line["key_name"].as_str().is_some(), "{line}");
    }
    let audit = std::fs::read_to_string(gate.audit_path()).unwrap();
    let log = gate.served.log();
    for secret in [&key, &new_key] {
        assert!(!audit.contains(secret.as_str()), "the audit log holds a key:\n{audit}");
        assert!(!log.contains(secret.as_str()), "the log holds a key:\n{log}");
    }
    assert_eq!(std::fs::metadata(gate.audit_path()).unwrap().permissions().mode() & 0o777, 0o600);
    let on_target = gate.served.count("keygate::audit");
    assert!(on_target >= lines.len(), "each change is on the keygate::audit target too:\n{log}");
}

/// Every request the key API takes, against a selector that exists and one that does not.
fn every_request(gate: &AdminGateway, selector: &str) -> Vec<Call> {
    let body = json!({"name": "x", "scopes": ["read"]}).to_string();
    vec![
        gate.anonymous(Method::GET, "/keys"),
        gate.anonymous(Method::POST, "/keys").body(body.clone()),
        gate.anonymous(Method::POST, "/keys").body("{not json"),
        gate.anonymous(Method::GET, &format!("/keys/{selector}")),
        gate.anonymous(Method::POST, &format!("/keys/{selector}/revoke")),
        gate.anonymous(Method::POST, &format!("/keys/{selector}/rotate")).body("{\"grace\":\"1h\"}"),
        gate.anonymous(Method::DELETE, &format!("/keys/{selector}")),
        gate.anonymous(Method::PUT, &format!("/keys/{selector}")),
        gate.anonymous(Method::GET, &format!("/keys/{selector}/nothing")),
    ]
}

#[tokio::test]
async fn without_a_valid_token_nothing_is_answered_and_nothing_changes() {
    let gate = AdminGateway::start().await;
    let before = std::fs::read(gate.keys_path()).unwrap();
    let token = gate.token("ops").to_string();
    let presented: [Option<String>; 6] = [
        None,
        Some("Bearer kga_not-a-token".into()),
        Some(format!("Basic {token}")),
        Some(token.clone()),
        Some(format!("Bearer {}", &token[..token.len() - 1])),
        Some("Bearer ".into()),
    ];
    for authorization in &presented {
        let mut answers = Vec::new();
        for selector in [SEED_ID, "no-such-key"] {
            for call in every_request(&gate, selector) {
                let call = match authorization {
                    Some(value) => call.header("authorization", value),
                    None => call,
                };
                let exchange = call.send().await;
                assert_error(&exchange, 401, "admin_token_required");
                assert!(
                    exchange.header("www-authenticate").is_some_and(|v| v.starts_with("Bearer")),
                    "{exchange}"
                );
                answers.push(exchange.body.clone());
            }
        }
        // Whether a selector exists, or a body parses, changes nothing in the answer.
        assert!(answers.windows(2).all(|w| w[0] == w[1]), "401 bodies differ: {answers:?}");
    }
    assert_eq!(std::fs::read(gate.keys_path()).unwrap(), before, "the key file is untouched");
    assert!(gate.audit_lines().is_empty(), "no change, no audit line");
    assert_eq!(gate.use_key(SEED_SECRET).await.status, 200);
}

#[tokio::test]
async fn a_token_removed_from_the_config_is_refused_after_the_reload() {
    let gate = AdminGateway::with_tokens(&["ops", "ci"]).await;
    let ci = gate.token("ci").to_string();
    let as_ci = || gate.anonymous(Method::GET, "/keys").header("authorization", &format!("Bearer {ci}"));
    assert_eq!(as_ci().send().await.status, 200, "ci's token works while configured");

    let ops_line = gate.lines.iter().find(|(n, _)| n == "ops").map(|(_, l)| l.clone()).unwrap();
    std::fs::write(gate.config_path(), AdminGateway::gateway_toml(&gate.upstream, &[&ops_line])).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let exchange = as_ci().send().await;
        if exchange.status == 401 {
            assert_error(&exchange, 401, "admin_token_required");
            break;
        }
        assert_eq!(exchange.status, 200, "before the reload ci still gets the list\n{exchange}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "ci's token still works after the reload\n{exchange}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(gate.api(Method::GET, "/keys").send().await.status, 200, "ops's token still works");
    let create = AdminGateway::json_call(
        gate.anonymous(Method::POST, "/keys").header("authorization", &format!("Bearer {ci}")),
        &json!({"name": "from-ci"}),
    );
    assert_error(&create.send().await, 401, "admin_token_required");
    assert!(!std::fs::read_to_string(gate.keys_path()).unwrap().contains("from-ci"));
}

#[tokio::test]
async fn forged_hosts_big_bodies_unknown_fields_and_bad_values_are_refused() {
    let gate = AdminGateway::start().await;
    let before = std::fs::read(gate.keys_path()).unwrap();

    for host in ["evil.example", "evil.example:80", "keygate.internal"] {
        let exchange = gate.api(Method::GET, "/keys").header("host", host).send().await;
        assert_error(&exchange, 421, "misdirected_request");
        let exchange = gate.anonymous(Method::GET, "/console").header("host", host).send().await;
        assert_error(&exchange, 421, "misdirected_request");
    }
    let port = gate.served.admin.port();
    let local = gate.api(Method::GET, "/keys").header("host", &format!("localhost:{port}")).send().await;
    assert_eq!(local.status, 200, "{local}");

    let big = json!({"name": "big", "meta": {"pad": "x".repeat(70 * 1024)}});
    let exchange = AdminGateway::json_call(gate.api(Method::POST, "/keys"), &big).send().await;
    assert_error(&exchange, 413, "invalid_request");

    let refused: Vec<(Method, &str, Value)> = vec![
        (Method::POST, "/keys", json!({"name": "x", "scope": ["read"]})),
        (Method::POST, "/keys", json!({"name": "x", "admin": true})),
        (Method::POST, "/keys", json!({"scopes": ["read"]})),
        (Method::POST, "/keys", json!({"name": ""})),
        (Method::POST, "/keys", json!({"name": "x", "scopes": ["a b"]})),
        (Method::POST, "/keys", json!({"name": "x", "scopes": "read"})),
        (Method::POST, "/keys", json!({"name": "x", "expires": "soon"})),
        (Method::POST, "/keys", json!({"name": "x", "rate_limit": "fast"})),
        (Method::POST, "/keys", json!({"name": "x", "quota": "10/week"})),
        (Method::POST, "/keys", json!({"name": "x", "consumer": ""})),
        (Method::POST, "/keys", json!({"name": "x", "meta": {"bad name": "v"}})),
        (Method::POST, "/keys", json!({"name": "x", "meta": {"ok": "line\nbreak"}})),
        (Method::POST, "/keys", json!({"name": "x", "allowed_ips": ["not-an-ip"]})),
        (Method::POST, "/keys", json!({"name": "line\nbreak"})),
        (Method::POST, "/keys", json!(["x"])),
        (Method::POST, &format!("/keys/{SEED_ID}/rotate"), json!({"grace": "soon"})),
        (Method::POST, &format!("/keys/{SEED_ID}/rotate"), json!({"grace": "1h", "name": "x"})),
        (Method::POST, &format!("/keys/{SEED_ID}/revoke"), json!({"reason": "x"})),
    ]
    .into_iter()
    .map(|(m, p, b)| (m, p.to_string().leak() as &str, b))
    .collect();
    for (method, path, body) in refused {
        let exchange = AdminGateway::json_call(gate.api(method, path), &body).send().await;
        assert_error(&exchange, 400, "invalid_request");
    }
    for raw in ["{not json", "", "null"] {
        let exchange = gate.api(Method::POST, "/keys").body(raw).send().await;
        assert_error(&exchange, 400, "invalid_request");
    }
    assert_error(&gate.api(Method::PUT, "/keys").send().await, 405, "method_not_allowed");
    assert_error(
        &gate.api(Method::GET, &format!("/keys/{SEED_ID}/rotate")).send().await,
        405,
        "method_not_allowed",
    );
    assert_error(&gate.api(Method::GET, "/keys/%zz").send().await, 400, "invalid_request");

    assert_eq!(std::fs::read(gate.keys_path()).unwrap(), before, "nothing refused was written");
    assert!(gate.audit_lines().is_empty());
    assert_eq!(gate.api(Method::GET, "/keys").send().await.status, 200, "the listener still answers");
}

#[tokio::test]
async fn without_admin_tokens_there_is_no_key_api_and_no_console() {
    let config = GatewayConfig::new().route(Route::new("/", "http://127.0.0.1:9")).key(Key::new(
        "k1",
        "one",
        "secret-one-0123456789",
        &["read"],
    ));
    let gateway = config.start().await;
    let admin = AdminListener::start(std::sync::Arc::clone(&gateway.gateway)).await;
    for path in ["/keys", "/keys/k1", "/console", "/console/app.js"] {
        assert_error(&admin.get(path).send().await, 404, "not_found");
    }
    assert_eq!(admin.get("/healthz").send().await.status, 200);
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy_and_no_token() {
    let gate = AdminGateway::start().await;
    for (path, kind) in [
        ("/console", "text/html"),
        ("/console/app.js", "text/javascript"),
        ("/console/style.css", "text/css"),
    ] {
        let exchange = gate.anonymous(Method::GET, path).send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        assert!(exchange.header("content-type").is_some_and(|t| t.starts_with(kind)), "{exchange}");
        let csp = exchange.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"), "{exchange}");
        assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{exchange}");
        assert_eq!(exchange.header("x-frame-options"), Some("DENY"), "{exchange}");
    }
    let page = gate.anonymous(Method::GET, "/console").send().await;
    let html = String::from_utf8_lossy(&page.body);
    assert!(
        !html.contains("<script>") && html.contains("src=\"/console/app.js\""),
        "no inline script\n{html}"
    );
    assert!(!html.contains("http://") && !html.contains("https://"), "no outside assets\n{html}");
}

#[tokio::test]
async fn cli_and_api_changes_made_at_once_all_land() {
    let gate = AdminGateway::start().await;
    const EACH: usize = 6;
    let config = gate.config_path();
    let cli = (0..EACH).map(|i| {
        let config = config.clone();
        let dir = gate.dir.path().to_path_buf();
        async move {
            let name = format!("cli-{i}");
            let output = keygate_command(&dir)
                .args(["keys", "create", "--name", &name, "--scope", "read", "-c"])
                .arg(&config)
                .output()
                .await
                .expect("run keygate keys create");
            assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
            (name, String::from_utf8_lossy(&output.stdout).trim().to_string())
        }
    });
    let gate_ref = &gate;
    let api = (0..EACH).map(|i| async move {
        let name = format!("api-{i}");
        let (key, _) = gate_ref.create(json!({"name": name, "scopes": ["read"]})).await;
        (name, key)
    });
    let (from_cli, from_api) = tokio::join!(join_all(cli.collect()), join_all(api.collect()));

    let listed = gate.api(Method::GET, "/keys").send().await;
    let names: HashSet<String> = listed.json().expect("JSON")["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter_map(|k| k["name"].as_str().map(str::to_string))
        .collect();
    for (name, key) in from_cli.iter().chain(&from_api) {
        assert!(names.contains(name), "{name} was lost\n{listed}");
        // CLI changes reach the gateway through the file watcher: poll (bounded) until then.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let exchange = gate.use_key(key).await;
            if exchange.status == 200 {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name}'s key never worked\n{exchange}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    let tokens: Vec<String> =
        gate.audit_lines().iter().map(|l| l["token"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(tokens.iter().filter(|t| *t == "cli").count(), EACH, "{tokens:?}");
    assert_eq!(tokens.iter().filter(|t| *t == "ops").count(), EACH, "{tokens:?}");
}

#[tokio::test]
async fn admin_token_refuses_a_name_the_config_would_refuse_and_chunked_bodies_are_limited_too() {
    let gate = AdminGateway::start().await;
    let output = keygate_command(gate.dir.path())
        .args(["admin", "token", "--name", "two words"])
        .output()
        .await
        .expect("run keygate admin token");
    assert!(!output.status.success(), "a name with a space is refused");
    assert!(output.stdout.is_empty(), "no token printed for a refused name");

    // No Content-Length: the limit holds while the body streams in.
    let token = gate.token("ops");
    let chunk = format!("{:x}\r\n{}\r\n", 16 * 1024, "x".repeat(16 * 1024));
    let mut request = format!(
        "POST /keys HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..5 {
        request.extend_from_slice(chunk.as_bytes());
    }
    request.extend_from_slice(b"0\r\n\r\n");
    let raw = support::raw_exchange(gate.served.admin, &request).await;
    assert_eq!(raw.status(), Some(413), "{}", raw.head());
    assert_eq!(raw.error_code().as_deref(), Some("invalid_request"), "{}", raw.head());
    assert!(gate.audit_lines().is_empty());
}

/// A key change through the API is in force before its answer, and counts as one reload (the
/// watcher's, of the file the API wrote), as any other edit of the key file does; a SIGHUP
/// after it is one more.
#[tokio::test]
async fn a_key_change_through_the_api_counts_one_reload() {
    let gate = AdminGateway::start().await;
    let before = gate.served.status().await;
    let (generation, successes) = (before["generation"].as_u64(), before["reloads"]["success"].as_u64());
    let (generation, successes) = (generation.expect("generation"), successes.expect("reloads.success"));
    let (key, _) = gate.create(json!({"name": "counted", "scopes": ["read"]})).await;
    assert_eq!(gate.use_key(&key).await.status, 200, "in force before the answer");
    gate.served
        .wait_status("the watcher's reload of the written file", |s| s["reloads"]["success"] == successes + 1)
        .await;
    gate.served.signal("HUP");
    let after =
        gate.served.wait_status("the SIGHUP's reload", |s| s["reloads"]["success"] != successes + 1).await;
    assert_eq!(after["reloads"]["success"], successes + 2, "{after:#}");
    assert_eq!(after["generation"], generation + 2, "{after:#}");
}

//! `[auth] store = "cluster"`: keys in a real `redis-server`, shared by real `keygate serve`
//! replicas; `keygate keys …` and `keys copy` writing there. Every key's fate is checked on
//! every replica, and what was allowed through is checked at the upstream.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use http::Method;
use support::admin::admin_token;
use support::poll::{Attempts, DEADLINE};
use support::process::Served;
use support::redis::RedisServer;
use support::{Call, Exchange, GatewayConfig, Key, RecordingUpstream, Route, keygate_command};
use tokio::io::AsyncWriteExt;

/// Writes keygate.toml with the cluster store (and an admin listener) into `dir`; keys.toml
/// holds `file_keys`, which the gateway must ignore.
fn write_config(dir: &Path, upstream: &RecordingUpstream, redis: &RedisServer, file_keys: &[Key]) -> PathBuf {
    let gateway = GatewayConfig::new().route(Route::new("/", &upstream.url())).gateway_toml();
    let gateway =
        gateway.replace("keys_file = \"keys.toml\"\n", "keys_file = \"keys.toml\"\nstore = \"cluster\"\n");
    assert!(gateway.contains("store = \"cluster\""), "the config helper's [auth] changed:\n{gateway}");
    let gateway = format!(
        "{gateway}\n[admin]\nlisten = \"127.0.0.1:0\"\n[cluster]\nredis = {:?}\nnamespace = \"test\"\ntimeout = \"200ms\"\n",
        redis.url()
    );
    let path = dir.join("keygate.toml");
    std::fs::write(&path, gateway).expect("write keygate.toml");
    let keys: String = file_keys.iter().map(Key::to_toml).collect();
    std::fs::write(dir.join("keys.toml"), keys).expect("write keys.toml");
    path
}

/// The output of one `keygate keys …` run (stdin written when given); fails showing stderr
/// when it did not end as `succeed` says.
async fn keys(config: &Path, args: &[&str], stdin: Option<&str>, succeed: bool) -> (String, String) {
    let mut command = keygate_command(config.parent().expect("folder"));
    command.arg("keys").args(args).arg("-c").arg(config);
    command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = command.spawn().expect("keygate keys ran");
    let mut input = child.stdin.take().expect("stdin");
    input.write_all(stdin.unwrap_or("").as_bytes()).await.expect("write stdin");
    drop(input);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("keygate keys finished")
        .expect("keygate keys output");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert_eq!(
        out.status.success(),
        succeed,
        "keygate keys {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// `keys create` on the cluster store; the new key.
async fn create(config: &Path, name: &str) -> String {
    let (stdout, _) = keys(config, &["create", "--name", name, "--scope", "read"], None, true).await;
    stdout.trim().to_string()
}

/// Polls until `replica` answers `key` with `status` (200 through to the upstream, or the
/// error code given), within `within`; fails showing the last answer.
async fn until_answers(replica: &mut Served, key: &str, status: u16, code: Option<&str>, within: Duration) {
    let mut poll = Attempts::within(within);
    let mut last = None;
    while poll.again().await {
        let exchange = replica.get("/x", key).send().await;
        if exchange.status.as_u16() == status && exchange.error_code().as_deref() == code {
            return;
        }
        last = Some(exchange);
    }
    let addr = replica.addr;
    panic!(
        "replica {addr} never answered {status} {code:?} ({}); last:\n{}\n{}",
        poll.report(),
        last.map(|e| e.to_string()).unwrap_or_default(),
        replica.log()
    );
}

/// Waits until `/readyz` answers 200: the replica has every key.
async fn until_ready(replica: &mut Served, within: Duration) {
    let mut poll = Attempts::within(within);
    while poll.again().await {
        if replica.admin_get("/readyz").await.status.as_u16() == 200 {
            return;
        }
    }
    let addr = replica.addr;
    panic!("replica {addr} never became ready ({})\n{}", poll.report(), replica.log());
}

async fn replicas(config: &Path, n: usize) -> Vec<Served> {
    let mut all = Vec::new();
    for _ in 0..n {
        let mut replica = Served::start(config).await;
        until_ready(&mut replica, DEADLINE).await;
        all.push(replica);
    }
    all
}

#[tokio::test]
async fn a_key_created_through_the_cli_works_on_every_replica_and_a_revoke_is_refused_by_all() {
    let redis = RedisServer::start().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // A key in keys.toml is not a key of the cluster store.
    let in_file = Key::generated("in-file", &["read"]);
    let config = write_config(dir.path(), &upstream, &redis, std::slice::from_ref(&in_file));
    let mut fleet = replicas(&config, 3).await;
    for replica in &mut fleet {
        let status = replica.status().await;
        assert_eq!(status["store"], "cluster", "{status:#}");
        until_answers(replica, &in_file.secret, 401, Some("invalid_api_key"), DEADLINE).await;
    }

    let key = create(&config, "fresh").await;
    for replica in &mut fleet {
        until_answers(replica, &key, 200, None, DEADLINE).await;
    }
    let seen = upstream.count();
    assert!(seen >= 3, "the upstream saw {seen} requests, fewer than one per replica");

    let (_, stderr) = keys(&config, &["revoke", "fresh"], None, true).await;
    assert!(stderr.contains("revoked key"), "{stderr}");
    for replica in &mut fleet {
        until_answers(replica, &key, 401, Some("revoked_api_key"), DEADLINE).await;
    }
    let seen_after = upstream.count();
    // Every replica refuses it now: nothing more reaches the upstream.
    for replica in &mut fleet {
        let refused = replica.get("/x", &key).send().await;
        assert_eq!(refused.status.as_u16(), 401, "{refused}");
    }
    assert_eq!(upstream.count(), seen_after);

    let (listed, _) = keys(&config, &["list", "--json"], None, true).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("keys list --json");
    assert_eq!(listed[0]["name"], "fresh", "{listed:#}");
    assert_eq!(listed[0]["status"], "revoked", "{listed:#}");
    // The key itself is nowhere in Redis, only its hash.
    let dump = redis
        .command(&["HGETALL", &format!("test:keys:entry:{}", listed[0]["id"].as_str().expect("id"))])
        .await;
    let dump = dump.expect("HGETALL answered");
    assert!(dump.contains("sha256:") && !dump.contains(&key), "{dump}");
}

#[tokio::test]
async fn with_redis_gone_replicas_keep_serving_and_changes_made_after_arrive_in_order() {
    let mut redis = RedisServer::start().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &upstream, &redis, &[]);
    let first = create(&config, "first").await;
    let mut fleet = replicas(&config, 2).await;
    for replica in &mut fleet {
        until_answers(replica, &first, 200, None, DEADLINE).await;
    }

    redis.save_and_kill().await;
    for replica in &mut fleet {
        // Several requests, spread over the outage being noticed: none refused for it.
        for _ in 0..5 {
            let exchange = replica.get("/x", &first).send().await;
            assert_eq!(exchange.status.as_u16(), 200, "{exchange}");
        }
        assert_eq!(replica.admin_get("/readyz").await.status.as_u16(), 200);
    }
    let before = upstream.count();
    // The CLI cannot write meanwhile, and says so.
    let (_, stderr) = keys(&config, &["create", "--name", "nope"], None, false).await;
    assert!(stderr.contains("Redis"), "{stderr}");

    redis.start_again().await;
    // Changes whose order matters: a key created then deleted must end up refused; one
    // created after stays; the first one is revoked.
    let gone = create(&config, "gone").await;
    // Drop every client connection: the replicas must resume from the change they last applied.
    let killed = redis.command(&["CLIENT", "KILL", "TYPE", "normal"]).await;
    assert!(killed.is_some(), "CLIENT KILL answered");
    keys(&config, &["delete", "gone"], None, true).await;
    let last = create(&config, "last").await;
    keys(&config, &["revoke", "first"], None, true).await;
    for replica in &mut fleet {
        until_answers(replica, &last, 200, None, DEADLINE).await;
        until_answers(replica, &first, 401, Some("revoked_api_key"), DEADLINE).await;
        until_answers(replica, &gone, 401, Some("invalid_api_key"), DEADLINE).await;
        let warnings = replica.count("Redis is out of reach");
        assert!(warnings > 0, "no warning about the outage\n{}", replica.log());
        assert!(replica.count("loading every key again") == 0, "resumed, not reloaded\n{}", replica.log());
    }
    assert_eq!(upstream.count(), before + 2, "only `last` reached the upstream, once per replica");
}

#[tokio::test]
async fn a_replica_started_while_keys_exist_is_not_ready_until_it_has_loaded_them() {
    let mut redis = RedisServer::start().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &upstream, &redis, &[]);
    let key = create(&config, "existing").await;
    redis.save_and_kill().await;

    let mut replica = Served::start(&config).await;
    let readyz = replica.admin_get("/readyz").await;
    assert_eq!(readyz.status.as_u16(), 503, "{readyz}");
    let status = replica.status().await;
    assert_eq!((status["store"].as_str(), status["keys"].as_u64()), (Some("cluster"), Some(0)), "{status:#}");
    let refused = replica.get("/x", &key).send().await;
    assert_eq!(refused.status.as_u16(), 401, "{refused}");
    assert_eq!(upstream.count(), 0);

    redis.start_again().await;
    until_ready(&mut replica, DEADLINE).await;
    until_answers(&mut replica, &key, 200, None, DEADLINE).await;
    assert_eq!(upstream.count(), 1);
}

/// One entry of a generated key file.
fn entry(i: usize, secret: &str) -> String {
    format!(
        "[[keys]]\nid = \"k{i:06}\"\nname = \"bulk-{i}\"\nhash = \"{}\"\nscopes = [\"read\"]\ncreated_at = 2026-01-01T00:00:00Z\n",
        keygate::keys::hash_key(secret)
    )
}

fn secret(i: usize) -> String {
    format!("bulk-secret-number-{i:06}-of-many")
}

#[tokio::test]
async fn keys_copy_moves_100000_keys_into_redis_and_replicas_serve_them() {
    const N: usize = 100_000;
    let redis = RedisServer::start().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &upstream, &redis, &[]);
    let big = dir.path().join("big.toml");
    let text: String = (0..N).map(|i| entry(i, &secret(i))).collect();
    std::fs::write(&big, text).expect("write big.toml");
    // One replica follows the copy as it happens; another loads it whole when it starts.
    let mut following = replicas(&config, 1).await.remove(0);

    let (_, stderr) = keys(&config, &["copy", "--from", big.to_str().expect("path")], None, true).await;
    assert!(stderr.contains(&format!("copied {N}, skipped 0")), "{stderr}");
    let mut loading = Served::start(&config).await;
    let slow = Duration::from_secs(60);
    until_ready(&mut loading, slow).await;
    let middle = secret(N / 2);
    for replica in [&mut following, &mut loading] {
        until_answers(replica, &middle, 200, None, slow).await;
        until_answers(replica, &secret(N - 1), 200, None, DEADLINE).await;
        let status = replica.status().await;
        assert_eq!(status["keys"], N as u64, "{status:#}");
    }

    // Again: everything is there already.
    let (_, stderr) = keys(&config, &["copy", "--from", big.to_str().expect("path")], None, true).await;
    assert!(stderr.contains(&format!("copied 0, skipped {N}")), "{stderr}");
    // An id that holds another key here: an error naming it, and nothing copied.
    let clash = dir.path().join("clash.toml");
    std::fs::write(&clash, entry(7, "another-secret-for-seven") + &entry(N + 1, &secret(N + 1)))
        .expect("write");
    let (_, stderr) = keys(&config, &["copy", "--from", clash.to_str().expect("path")], None, false).await;
    assert!(stderr.contains("k000007") && !stderr.contains(&format!("k{:06}", N + 1)), "{stderr}");
    let count = redis.command(&["ZCARD", "test:keys:index"]).await.expect("ZCARD");
    assert_eq!(count.trim(), format!(":{N}"));
}

#[tokio::test]
async fn keys_copy_into_a_key_file_follows_the_same_rules() {
    let dir = tempfile::tempdir().expect("temp dir");
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new().route(Route::new("/", &upstream.url())).gateway_toml();
    let config = dir.path().join("keygate.toml");
    std::fs::write(&config, format!("{gateway}\n[admin]\nlisten = \"127.0.0.1:0\"\n")).expect("write");
    std::fs::write(dir.path().join("keys.toml"), entry(1, &secret(1))).expect("write");
    let other = dir.path().join("other.toml");
    std::fs::write(&other, entry(1, &secret(1)) + &entry(2, &secret(2))).expect("write");
    let (_, stderr) = keys(&config, &["copy", "--from", other.to_str().expect("path")], None, true).await;
    assert!(stderr.contains("copied 1, skipped 1"), "{stderr}");
    let written = std::fs::read_to_string(dir.path().join("keys.toml")).expect("read");
    assert!(written.contains("id = \"k000002\""), "{written}");
    let served = Served::start(&config).await;
    assert_eq!(served.status().await["store"], "file");
    let ok = served.get("/x", &secret(2)).send().await;
    assert_eq!(ok.status.as_u16(), 200, "{ok}");
    assert_eq!(upstream.count(), 1);
}

#[tokio::test]
async fn concurrent_cli_writers_lose_nothing_on_the_cluster_store() {
    let redis = RedisServer::start().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &upstream, &redis, &[]);
    let names: Vec<String> = (0..4).map(|i| format!("writer-{i}")).collect();
    let (a, b, c, d) = tokio::join!(
        create(&config, &names[0]),
        create(&config, &names[1]),
        create(&config, &names[2]),
        create(&config, &names[3])
    );
    let created = [a, b, c, d];
    let (listed, _) = keys(&config, &["list", "--json"], None, true).await;
    let listed: serde_json::Value = serde_json::from_str(&listed).expect("keys list --json");
    let mut seen: Vec<&str> =
        listed.as_array().expect("list").iter().filter_map(|k| k["name"].as_str()).collect();
    seen.sort_unstable();
    assert_eq!(seen, names.iter().map(String::as_str).collect::<Vec<_>>(), "{listed:#}");
    let mut replica = Served::start(&config).await;
    until_ready(&mut replica, DEADLINE).await;
    for key in &created {
        until_answers(&mut replica, key, 200, None, DEADLINE).await;
    }
}

/// A `/keys` API call to `replica` with admin token `token`, and a JSON body when given.
async fn key_api(
    replica: &Served,
    token: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Exchange {
    let call = Call::new(replica.admin, method, path).header("authorization", &format!("Bearer {token}"));
    let call = match body {
        Some(body) => call.header("content-type", "application/json").body(body.to_string()),
        None => call,
    };
    call.send().await
}

#[tokio::test]
async fn a_key_made_through_one_replicas_api_works_on_the_other_and_a_revoke_through_it_reaches_back() {
    let mut redis = RedisServer::start().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (token, entry) = admin_token(dir.path(), "ops").await;
    let config = write_config(dir.path(), &upstream, &redis, &[]);
    let text = std::fs::read_to_string(&config).expect("read keygate.toml");
    let with_token = text.replace("[admin]\n", &format!("[admin]\ntokens = [{entry}]\n"));
    assert_ne!(text, with_token, "the config helper's [admin] changed:\n{text}");
    std::fs::write(&config, with_token).expect("write keygate.toml");
    let mut fleet = replicas(&config, 2).await;

    let made = key_api(
        &fleet[0],
        &token,
        Method::POST,
        "/keys",
        Some(serde_json::json!({ "name": "via-api", "scopes": ["read"] })),
    )
    .await;
    assert_eq!(made.status.as_u16(), 201, "{made}");
    let made = made.json().unwrap_or_else(|| panic!("POST /keys answered no JSON"));
    let (key, id) = (made["key"].as_str().expect("key"), made["id"].as_str().expect("id"));
    // The replica that answered has the key already: no polling.
    let at_once = fleet[0].get("/x", key).send().await;
    assert_eq!(at_once.status.as_u16(), 200, "{at_once}\n{}", fleet[0].log());
    until_answers(&mut fleet[1], key, 200, None, DEADLINE).await;
    let requests = upstream.requests();
    assert!(requests.len() >= 2, "the upstream saw {} requests", requests.len());
    assert!(requests.iter().all(|r| r.header("x-keygate-key-id") == Some(id)), "not forwarded as {id}");

    let revoked = key_api(&fleet[1], &token, Method::POST, &format!("/keys/{id}/revoke"), None).await;
    assert_eq!(revoked.status.as_u16(), 200, "{revoked}");
    assert_eq!(revoked.json().map(|j| j["status"].clone()), Some("revoked".into()), "{revoked}");
    let refused = fleet[1].get("/x", key).send().await;
    assert_eq!(refused.status.as_u16(), 401, "{refused}");
    until_answers(&mut fleet[0], key, 401, Some("revoked_api_key"), DEADLINE).await;
    let seen = upstream.count();
    for replica in &fleet {
        let refused = replica.get("/x", key).send().await;
        assert_eq!(refused.error_code().as_deref(), Some("revoked_api_key"), "{refused}");
    }
    assert_eq!(upstream.count(), seen, "a revoked key reached the upstream");

    // Both replicas list the same store.
    for replica in &fleet {
        let listed = key_api(replica, &token, Method::GET, "/keys", None).await;
        let listed = listed.json().unwrap_or_else(|| panic!("GET /keys answered no JSON"));
        assert_eq!(listed["keys"][0]["id"], id, "{listed:#}");
        assert_eq!(listed["keys"][0]["status"], "revoked", "{listed:#}");
    }

    // Redis gone: the API says the store is out of reach, and the replica keeps serving.
    redis.save_and_kill().await;
    let body = serde_json::json!({ "name": "nope" });
    let refused = key_api(&fleet[0], &token, Method::POST, "/keys", Some(body)).await;
    assert_eq!(refused.status.as_u16(), 503, "{refused}");
    assert_eq!(refused.error_code().as_deref(), Some("store_unavailable"), "{refused}");
    let still = fleet[0].get("/x", key).send().await;
    assert_eq!(still.error_code().as_deref(), Some("revoked_api_key"), "{still}");
}

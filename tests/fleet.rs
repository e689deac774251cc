//! Quotas, consumers, usage and the fleet: real keygate processes (and in-process gateways)
//! in front of a recording upstream, sharing counts through a real `redis-server` or a
//! `[state]` file. Every limit is checked by counting what the upstream received.

mod support;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support::poll::{Attempts, DEADLINE};
use support::process::Served;
use support::redis::RedisServer;
use support::{GatewayConfig, Key, RecordingUpstream, Route, assert_error, join_all, keygate_command};

/// A key entry with extra fields (`rate_limit = "5/h"`, …) after the helper's own.
fn key_with(key: &Key, extra: &[(&str, &str)]) -> String {
    let mut out = key.to_toml();
    for (field, value) in extra {
        out.push_str(&format!("{field} = {value:?}\n"));
    }
    out
}

/// Writes keygate.toml (with an admin listener and `extra` sections) and keys.toml into `dir`.
fn write_config(dir: &Path, upstream: &RecordingUpstream, extra: &str, keys: &[String]) -> PathBuf {
    let config = GatewayConfig::new().route(Route::new("/", &upstream.url()));
    let gateway = format!("{}\n[admin]\nlisten = \"127.0.0.1:0\"\n{extra}", config.gateway_toml());
    let path = dir.join("keygate.toml");
    std::fs::write(&path, gateway).expect("write keygate.toml");
    std::fs::write(dir.join("keys.toml"), keys.join("\n")).expect("write keys.toml");
    path
}

fn cluster_section(redis: &RedisServer, timeout: &str) -> String {
    format!("[cluster]\nredis = {:?}\nnamespace = \"test\"\ntimeout = {timeout:?}\n", redis.url())
}

/// Starts `n` replicas of one config and waits until each is connected to Redis and sees all.
async fn fleet(config: &Path, n: u64) -> Vec<Served> {
    let mut replicas = Vec::new();
    for _ in 0..n {
        replicas.push(Served::start(config).await);
    }
    for replica in &replicas {
        replica
            .wait_status(&format!("connected with {n} replicas"), |s| {
                s["cluster"]["connected"] == true && s["cluster"]["replicas"] == n
            })
            .await;
    }
    replicas
}

/// Sends `n` requests round-robin over the replicas; returns (forwarded, refused with `code`).
async fn spread(replicas: &[Served], key: &str, n: usize, code: &str) -> (usize, usize) {
    let (mut forwarded, mut refused) = (0, 0);
    for i in 0..n {
        let replica = &replicas[i % replicas.len()];
        let exchange = replica.get("/x", key).send().await;
        match exchange.status.as_u16() {
            200 => forwarded += 1,
            429 if exchange.error_code().as_deref() == Some(code) => refused += 1,
            _ => panic!("request {i} to replica {}: unexpected answer\n{exchange}", i % replicas.len()),
        }
    }
    (forwarded, refused)
}

async fn replicas_share_one_limit(n: u64) {
    let redis = RedisServer::start().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = Key::generated("limited", &[]);
    let free = Key::generated("free", &[]);
    // 10 an hour: no token drips back while the test runs.
    let keys = [key_with(&key, &[("rate_limit", "10/h")]), free.to_toml()];
    let config = write_config(dir.path(), &upstream, &cluster_section(&redis, "500ms"), &keys);
    let replicas = fleet(&config, n).await;
    let (forwarded, refused) = spread(&replicas, &key.secret, 30, "rate_limited").await;
    assert_eq!((forwarded, refused), (10, 20), "the limit holds across {n} replicas together");
    assert_eq!(upstream.count(), 10, "the upstream saw exactly the limit");
    // A key with neither limit nor quota never reaches Redis on the request path: no bucket,
    // no count (its usage goes out later, in a batch, under test:usage:).
    assert_eq!(spread(&replicas, &free.secret, 10, "rate_limited").await, (10, 0));
    let limited_keys = redis.command(&["KEYS", &format!("test:{{k:{}}}*", key.id)]).await;
    assert!(limited_keys.as_deref().is_some_and(|r| r.starts_with("*1\r\n")), "{limited_keys:?}");
    let free_keys = redis.command(&["KEYS", &format!("test:{{k:{}}}*", free.id)]).await;
    assert_eq!(free_keys.as_deref(), Some("*0\r\n"), "the unlimited key touched Redis");
}

#[tokio::test]
async fn two_replicas_share_one_rate_limit() {
    replicas_share_one_limit(2).await;
}

#[tokio::test]
async fn three_replicas_share_one_rate_limit() {
    replicas_share_one_limit(3).await;
}

/// Sends `n` requests at once, round-robin over the replicas; returns how many were forwarded
/// and how many refused with each code.
async fn burst(replicas: &[Served], key: &str, n: usize) -> (usize, usize, usize) {
    let calls = (0..n).map(|i| replicas[i % replicas.len()].get("/x", key).send());
    let (mut forwarded, mut rate_limited, mut over_quota) = (0, 0, 0);
    for (i, exchange) in join_all(calls.collect()).await.into_iter().enumerate() {
        match (exchange.status.as_u16(), exchange.error_code().as_deref()) {
            (200, _) => forwarded += 1,
            (429, Some("rate_limited")) => rate_limited += 1,
            (429, Some("quota_exceeded")) => over_quota += 1,
            _ => panic!("request {i}: unexpected answer\n{exchange}"),
        }
    }
    (forwarded, rate_limited, over_quota)
}

/// Requests that reach Redis together are decided together (one script call per batch), and
/// each is judged as if they came one after the other: the limit holds exactly, a request the
/// quota refuses spends no token, and one that finds no token is `rate_limited`.
#[tokio::test]
async fn concurrent_requests_on_three_replicas_are_judged_one_after_another() {
    let redis = RedisServer::start().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let by_rate = Key::generated("by-rate", &[]);
    let by_quota = Key::generated("by-quota", &[]);
    let keys = [
        key_with(&by_rate, &[("rate_limit", "12/h"), ("quota", "100/day")]),
        key_with(&by_quota, &[("rate_limit", "20/h"), ("quota", "15/day")]),
    ];
    let config = write_config(dir.path(), &upstream, &cluster_section(&redis, "2s"), &keys);
    let replicas = fleet(&config, 3).await;
    assert_eq!(burst(&replicas, &by_rate.secret, 60).await, (12, 48, 0), "12 tokens, then none");
    assert_eq!(upstream.count(), 12);
    // 15 pass; every later request still finds one of the 5 tokens the refusals never spent.
    assert_eq!(burst(&replicas, &by_quota.secret, 60).await, (15, 0, 45));
    assert_eq!(burst(&replicas, &by_quota.secret, 30).await, (0, 0, 30), "the tokens are still there");
    assert_eq!(upstream.count(), 27, "the upstream saw exactly the admitted requests");
    for replica in &replicas {
        assert_eq!(cluster_errors(replica).await, 0, "every request was decided by Redis");
    }
}

/// Whole seconds from now to the next UTC midnight.
fn secs_to_utc_midnight() -> u64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock after 1970").as_secs();
    86_400 - now % 86_400
}

#[tokio::test]
async fn a_consumers_keys_share_one_quota_until_utc_midnight() {
    let upstream = RecordingUpstream::start().await;
    let old = Key::generated("acme-old", &[]);
    let new = Key::generated("acme-new", &[]);
    let other = Key::generated("other", &[]);
    let keys = [
        key_with(&old, &[("quota", "3/day"), ("consumer", "acme")]),
        key_with(&new, &[("quota", "3/day"), ("consumer", "acme")]),
        key_with(&other, &[("quota", "3/day")]),
    ];
    let config = GatewayConfig::new().route(Route::new("/", &upstream.url()));
    let gateway = support::TestGateway::start(&config.gateway_toml(), &keys.join("\n")).await;
    for (i, key) in [&old, &new, &old].iter().enumerate() {
        let exchange = gateway.get("/q").header("x-api-key", &key.secret).send().await;
        assert_eq!(exchange.status, 200, "request {i}\n{exchange}");
        let seen = upstream.expect_received(&exchange);
        assert_eq!(seen.header("x-keygate-consumer"), Some("acme"), "{seen:?}");
    }
    let before = secs_to_utc_midnight();
    let refused = gateway.get("/q").header("x-api-key", &new.secret).send().await;
    let after = secs_to_utc_midnight();
    assert_error(&refused, 429, "quota_exceeded");
    let retry: u64 = refused.header("retry-after").and_then(|v| v.parse().ok()).expect("a Retry-After");
    assert!(
        retry >= after.min(before) && retry <= before.max(after) + 1,
        "Retry-After {retry} runs to UTC midnight ({before}s)"
    );
    assert_eq!(upstream.count(), 3, "the refused request never reached the upstream");
    // A key of no consumer has a quota of its own, and sends no consumer header.
    let exchange = gateway.get("/q").header("x-api-key", &other.secret).send().await;
    assert_eq!(exchange.status, 200, "{exchange}");
    assert_eq!(upstream.expect_received(&exchange).header("x-keygate-consumer"), None);
}

#[tokio::test]
async fn rate_limit_is_judged_before_quota_and_a_refusal_spends_nothing() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("both", &[]);
    let keys = [key_with(&key, &[("rate_limit", "2/h"), ("quota", "2/month")])];
    let config = GatewayConfig::new().route(Route::new("/", &upstream.url()));
    let gateway = support::TestGateway::start(&config.gateway_toml(), &keys.join("\n")).await;
    for _ in 0..2 {
        let exchange = gateway.get("/a").header("x-api-key", &key.secret).send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
        assert!(exchange.header("ratelimit-limit").is_some(), "rate-limit headers stay\n{exchange}");
    }
    // Over both: the rate limit answers, with its own Retry-After (not the month's end).
    let refused = gateway.get("/a").header("x-api-key", &key.secret).send().await;
    assert_error(&refused, 429, "rate_limited");
    assert_eq!(upstream.count(), 2);
}

/// `keygate keys list` (or `--json`) run against `config`.
async fn keys_list(config: &Path, json: bool) -> String {
    let mut command = keygate_command(config.parent().expect("folder"));
    command.arg("keys").arg("list").arg("-c").arg(config);
    if json {
        command.arg("--json");
    }
    let out = tokio::time::timeout(Duration::from_secs(30), command.output())
        .await
        .expect("keys list finished")
        .expect("keys list ran");
    assert!(out.status.success(), "keys list failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn quota_survives_a_restart(extra: &str) {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = Key::generated("billed", &[]);
    let config = write_config(dir.path(), &upstream, extra, &[key_with(&key, &[("quota", "3/month")])]);
    let first = Served::start(&config).await;
    if extra.contains("[cluster]") {
        first.wait_status("connected", |s| s["cluster"]["connected"] == true).await;
    }
    for _ in 0..2 {
        let exchange = first.get("/a", &key.secret).send().await;
        assert_eq!(exchange.status, 200, "{exchange}");
    }
    first.terminate().await;
    let second = Served::start(&config).await;
    if extra.contains("[cluster]") {
        second.wait_status("connected", |s| s["cluster"]["connected"] == true).await;
    }
    let third = second.get("/a", &key.secret).send().await;
    assert_eq!(third.status, 200, "the third request of the month\n{third}");
    let fourth = second.get("/a", &key.secret).send().await;
    assert_error(&fourth, 429, "quota_exceeded");
    assert_eq!(upstream.count(), 3, "the quota held across the restart");
    // Usage reaches the store within a flush, and `keys list` reads it while the gateway runs.
    let mut poll = Attempts::within(DEADLINE * 2);
    let mut listed = String::new();
    while poll.again().await && !listed.contains("3/3") {
        listed = keys_list(&config, false).await;
    }
    assert!(listed.contains("3/3"), "keys list never showed 3/3 used ({}):\n{listed}", poll.report());
    assert!(listed.contains("LAST USED") && listed.contains("USED"), "{listed}");
    let json: serde_json::Value =
        serde_json::from_str(&keys_list(&config, true).await).expect("keys list --json");
    assert_eq!(json[0]["used"], 3, "{json:#}");
    assert!(json[0]["last_used_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{json:#}");
    let usage = second.admin_get("/usage").await.json().expect("/usage JSON");
    assert_eq!(usage["keys"][0]["quota"], "3/month", "{usage:#}");
}

#[tokio::test]
async fn quota_and_usage_survive_a_restart_with_a_state_file() {
    quota_survives_a_restart("[state]\npath = \"keygate.state\"\n").await;
}

#[tokio::test]
async fn quota_and_usage_survive_a_restart_with_redis() {
    let redis = RedisServer::start().await;
    quota_survives_a_restart(&cluster_section(&redis, "500ms")).await;
}

/// `cluster_errors_total` from `/metrics`.
async fn cluster_errors(replica: &Served) -> u64 {
    let metrics = replica.admin_get("/metrics").await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("keygate_cluster_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no keygate_cluster_errors_total in /metrics:\n{text}"))
}

/// Redis paused (slow) or killed (gone) under traffic: no request refused for it, the fallback
/// bucket of rate / replicas holds, quotas counted meanwhile are added back when it returns.
async fn redis_trouble_refuses_nothing(gone: bool) {
    let mut redis = RedisServer::start().await;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let open = Key::generated("open", &[]);
    let limited = Key::generated("limited", &[]);
    let billed = Key::generated("billed", &[]);
    let keys = [
        key_with(&open, &[("rate_limit", "100000/h")]),
        key_with(&limited, &[("rate_limit", "4/h")]),
        key_with(&billed, &[("quota", "5/day")]),
    ];
    let config = write_config(dir.path(), &upstream, &cluster_section(&redis, "100ms"), &keys);
    let mut replicas = fleet(&config, 2).await;
    // One billed request while Redis counts: a gone Redis forgets it, a slow one does not.
    assert_eq!(spread(&replicas, &billed.secret, 1, "quota_exceeded").await, (1, 0));

    if gone {
        redis.kill();
    } else {
        redis.pause();
    }
    // Traffic through the outage: every request is answered by the upstream.
    let (forwarded, refused) = spread(&replicas, &open.secret, 40, "rate_limited").await;
    assert_eq!((forwarded, refused), (40, 0), "Redis trouble refused requests");
    for replica in &replicas {
        let status = replica.wait_status("connected: false", |s| s["cluster"]["connected"] == false).await;
        assert!(status["cluster"]["last_error"].is_string(), "{status:#}");
        assert!(cluster_errors(replica).await >= 1);
    }
    // The fallback: 4/h over 2 replicas is 2 in each.
    let (forwarded, _) = spread(&replicas, &limited.secret, 10, "rate_limited").await;
    assert_eq!(forwarded, 4, "fallback buckets hold rate / replicas in all");
    // Quota counted locally meanwhile: 2 requests.
    assert_eq!(spread(&replicas, &billed.secret, 2, "quota_exceeded").await, (2, 0));
    for replica in &mut replicas {
        let warnings = replica.count("Redis failed");
        assert_eq!(warnings, 1, "one warning per outage\n{}", replica.log());
    }

    if gone {
        redis.restart().await;
    } else {
        redis.resume();
    }
    for replica in &replicas {
        replica.wait_status("connected again", |s| s["cluster"]["connected"] == true).await;
    }
    // Shared counting again, with the outage's 2 requests added back: a slow Redis kept the
    // first one too (5 - 3 = 2 left), a fresh one has only the outage's (5 - 2 = 3 left).
    let left = if gone { 3 } else { 2 };
    let (forwarded, refused) = spread(&replicas, &billed.secret, 6, "quota_exceeded").await;
    assert_eq!((forwarded, refused), (left, 6 - left), "counting resumed in Redis");
}

#[tokio::test]
async fn redis_paused_under_traffic_refuses_nothing_and_resumes() {
    redis_trouble_refuses_nothing(false).await;
}

#[tokio::test]
async fn redis_killed_under_traffic_refuses_nothing_and_resumes() {
    redis_trouble_refuses_nothing(true).await;
}

#[tokio::test]
async fn check_warns_when_quotas_would_reset_on_restart() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("billed", &[]);
    for (extra, warns) in [("", true), ("[state]\npath = \"keygate.state\"\n", false)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write_config(dir.path(), &upstream, extra, &[key_with(&key, &[("quota", "10/day")])]);
        let mut command = keygate_command(dir.path());
        command.arg("check").arg("-c").arg(&config);
        let out = command.output().await.expect("keygate check ran");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert_eq!(stderr.contains("reset when keygate restarts"), warns, "with {extra:?}: {stderr}");
    }
}

#[tokio::test]
async fn bad_quota_consumer_and_cluster_fields_are_located_errors() {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("k", &[]);
    let cases = [
        ("", key_with(&key, &[("quota", "10/week")]), "keys.toml:", "N/day or N/month"),
        ("", key_with(&key, &[("consumer", "a\tb")]), "keys.toml:", "consumer"),
        ("[cluster]\nredis = \"http://x\"\n", key.to_toml(), "keygate.toml:", "redis:// or rediss://"),
        (
            "[cluster]\nredis = \"redis://x\"\nnamespace = \"a b\"\n",
            key.to_toml(),
            "keygate.toml:",
            "namespace",
        ),
        ("[state]\npath = \"s\"\nextra = 1\n", key.to_toml(), "keygate.toml:", "extra"),
    ];
    for (extra, keys, file, want) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write_config(dir.path(), &upstream, extra, &[keys]);
        let mut command = keygate_command(dir.path());
        command.arg("check").arg("-c").arg(&config);
        let out = command.output().await.expect("keygate check ran");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra} accepted");
        assert!(stderr.contains(file) && stderr.contains(want), "want {file}…{want} in {stderr}");
    }
}

#[tokio::test]
async fn keys_create_and_rotate_keep_quota_and_consumer() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &upstream, "", &[]);
    let run = |args: &[&str]| {
        let mut command = keygate_command(dir.path());
        command.args(args).arg("-c").arg(&config);
        command.output()
    };
    let created =
        run(&["keys", "create", "--name", "acme-prod", "--quota", "100/month", "--consumer", "acme"])
            .await
            .expect("keys create ran");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let rotated = run(&["keys", "rotate", "acme-prod"]).await.expect("keys rotate ran");
    assert!(rotated.status.success(), "{}", String::from_utf8_lossy(&rotated.stderr));
    let listed: serde_json::Value =
        serde_json::from_str(&keys_list(&config, true).await).expect("keys list --json");
    let keys = listed.as_array().expect("a list");
    assert_eq!(keys.len(), 2, "{listed:#}");
    for key in keys {
        assert_eq!(
            (&key["consumer"], &key["quota"]),
            (&serde_json::json!("acme"), &serde_json::json!("100/month")),
            "{listed:#}"
        );
    }
    let bad = run(&["keys", "create", "--name", "x", "--quota", "5/week"]).await.expect("ran");
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("N/day or N/month"));
}

#[tokio::test]
async fn a_state_file_is_written_while_running_and_survives_a_crash() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = Key::generated("billed", &[]);
    let config = write_config(
        dir.path(),
        &upstream,
        "[state]\npath = \"keygate.state\"\n",
        &[key_with(&key, &[("quota", "3/day")])],
    );
    let first = Served::start(&config).await;
    for _ in 0..2 {
        assert_eq!(first.get("/a", &key.secret).send().await.status, 200);
    }
    // The periodic write (every 2 s), not the one at shutdown: seen while the gateway runs.
    let mut poll = Attempts::within(DEADLINE * 2);
    let mut listed = String::new();
    while poll.again().await && !listed.contains("2/3") {
        listed = keys_list(&config, false).await;
    }
    assert!(listed.contains("2/3"), "the state file never showed 2/3 ({}):\n{listed}", poll.report());
    first.kill().await; // no shutdown write
    let second = Served::start(&config).await;
    assert_eq!(second.get("/a", &key.secret).send().await.status, 200);
    assert_error(&second.get("/a", &key.secret).send().await, 429, "quota_exceeded");
    assert_eq!(upstream.count(), 3);
}

#[tokio::test]
async fn a_replica_started_before_redis_serves_and_joins_when_it_appears() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let key = Key::generated("limited", &[]);
    let port = support::redis::free_port();
    let cluster = format!(
        "[cluster]\nredis = \"redis://127.0.0.1:{port}/0\"\nnamespace = \"test\"\ntimeout = \"100ms\"\n"
    );
    let config = write_config(dir.path(), &upstream, &cluster, &[key_with(&key, &[("rate_limit", "3/h")])]);
    let mut replica = Served::start(&config).await;
    let status = replica.status().await;
    assert_eq!(status["cluster"]["connected"], false, "{status:#}");
    let warnings = replica.count("Redis is not reachable");
    assert_eq!(warnings, 1, "{}", replica.log());
    // Served from the start, limited locally (one replica known: the whole rate).
    let (forwarded, refused) = spread(std::slice::from_ref(&replica), &key.secret, 5, "rate_limited").await;
    assert_eq!((forwarded, refused), (3, 2));
    let redis = RedisServer::start_at(port).await;
    replica
        .wait_status("connected", |s| {
            s["cluster"]["connected"] == true && s["cluster"]["last_error"].is_null()
        })
        .await;
    // Shared counting from now on: a fresh bucket in Redis.
    let (forwarded, _) = spread(std::slice::from_ref(&replica), &key.secret, 5, "rate_limited").await;
    assert_eq!(forwarded, 3, "the bucket now lives in Redis");
    let bucket = redis.command(&["EXISTS", &format!("test:{{k:{}}}:bucket", key.id)]).await;
    assert_eq!(bucket.as_deref(), Some(":1\r\n"));
}

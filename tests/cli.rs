//! The real `keygate` binary: `check` output and exit codes, `serve` logs, `demo`.
//!
//! Every child runs in its own temp dir, is killed by a drop guard, and is read with deadlines.

mod support;

use std::fmt;
use std::ops::RangeInclusive;
use std::path::Path;
use std::time::Duration;

use http::Method;
use serde_json::Value;
use support::leak;
use support::process::{PROCESS_TIMEOUT, Process, listening_on};
use support::{Call, GatewayConfig, Key, RecordingUpstream, Route, keys_toml};
use tokio::process::Command;
use tokio::time::Instant;

use support::keygate_command as keygate;

/// A finished run of the binary.
struct Ran {
    command: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl fmt::Display for Ran {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ran: {}", self.command)?;
        writeln!(f, "exit code: {:?}", self.code)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

async fn run(mut command: Command) -> Ran {
    let description = format!("{:?}", command.as_std());
    // On timeout the future, and with it the child (kill_on_drop), is dropped.
    let output = tokio::time::timeout(PROCESS_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("{description} did not finish within {PROCESS_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("could not run {description}: {e}"));
    Ran {
        command: description,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// keygate check
// ---------------------------------------------------------------------------------------------

const GATEWAY_TOML: &str = r#"[server]
listen = "127.0.0.1:0"
request_timeout = "5s"

[auth]
keys_file = "keys.toml"
sources = ["header:x-api-key"]

[[routes]]
prefix = "/public/"
upstream = "http://127.0.0.1:9"
public = true

[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:9"
[routes.scopes]
GET = "read"
"*" = "write"
"#;

/// One active, one expired and one revoked key.
fn three_keys() -> String {
    keys_toml(&[
        Key::new("active01", "active", "active-secret-1", &["read"]),
        Key::new("expired1", "expired", "expired-secret-1", &["read"]).expires_at("2020-01-01T00:00:00Z"),
        Key::new("revoked1", "revoked", "revoked-secret-1", &["read", "write"])
            .revoked_at("2020-01-01T00:00:00Z"),
    ])
}

fn write_files(dir: &Path, gateway: &str, keys: &str) {
    std::fs::write(dir.join("keygate.toml"), gateway).expect("write keygate.toml");
    std::fs::write(dir.join("keys.toml"), keys).expect("write keys.toml");
}

const CHECK_OK: &str = "ok: 2 routes, 3 keys (1 active, 1 expired, 1 revoked)";

#[tokio::test]
async fn check_reports_counts_and_exits_0() {
    let dir = tempfile::tempdir().expect("temp dir");
    write_files(dir.path(), GATEWAY_TOML, &three_keys());
    let mut command = keygate(dir.path());
    command.args(["check", "-c"]).arg(dir.path().join("keygate.toml"));
    let ran = run(command).await;
    assert_eq!(ran.code, Some(0), "{ran}");
    assert!(ran.stdout.lines().any(|line| line.trim() == CHECK_OK), "expected the line {CHECK_OK:?}\n{ran}");
}

#[tokio::test]
async fn check_uses_keygate_config_env_then_the_current_dir() {
    let files = tempfile::tempdir().expect("temp dir");
    write_files(files.path(), GATEWAY_TOML, &three_keys());
    let config = files.path().join("keygate.toml");
    let elsewhere = tempfile::tempdir().expect("temp dir");

    // $KEYGATE_CONFIG, from a directory without a keygate.toml (keys.toml resolves next to it).
    let mut command = keygate(elsewhere.path());
    command.arg("check").env("KEYGATE_CONFIG", &config);
    let ran = run(command).await;
    assert_eq!(ran.code, Some(0), "{ran}");
    assert!(ran.stdout.contains(CHECK_OK), "{ran}");

    // -c wins over $KEYGATE_CONFIG.
    let mut command = keygate(elsewhere.path());
    command.args(["check", "-c"]).arg(&config).env("KEYGATE_CONFIG", elsewhere.path().join("missing.toml"));
    let ran = run(command).await;
    assert_eq!(ran.code, Some(0), "{ran}");

    // Neither: ./keygate.toml.
    let mut command = keygate(files.path());
    command.arg("check");
    let ran = run(command).await;
    assert_eq!(ran.code, Some(0), "{ran}");
    assert!(ran.stdout.contains(CHECK_OK), "{ran}");

    // Neither, and no ./keygate.toml: an error, not a silent default.
    let mut command = keygate(elsewhere.path());
    command.arg("check");
    let ran = run(command).await;
    assert_eq!(ran.code, Some(1), "{ran}");
}

/// 1-based number of the line holding the `nth` (1-based) occurrence of `needle`.
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    text.match_indices(needle)
        .nth(nth - 1)
        .map(|(at, _)| text[..at].matches('\n').count() + 1)
        .unwrap_or_else(|| panic!("{needle:?} (occurrence {nth}) not in:\n{text}"))
}

fn replace_first(text: &str, from: &str, to: &str) -> String {
    assert!(text.contains(from), "{from:?} not in:\n{text}");
    text.replacen(from, to, 1)
}

/// Every `FILE:LINE:COL` in `output`.
fn locations(output: &str, file: &str) -> Vec<(usize, usize)> {
    let marker = format!("{file}:");
    let number = |s: &str| -> Option<(usize, usize)> {
        let digits = s.bytes().take_while(u8::is_ascii_digit).count();
        Some((s[..digits].parse().ok()?, digits))
    };
    output
        .match_indices(&marker)
        .filter_map(|(at, _)| {
            let rest = &output[at + marker.len()..];
            let (line, used) = number(rest)?;
            let (column, _) = number(rest[used..].strip_prefix(':')?)?;
            Some((line, column))
        })
        .collect()
}

/// Runs `keygate check` on the given files and expects exit 1 with `file:line:col` where the
/// line lies in `lines`.
async fn assert_check_rejects(gateway: &str, keys: &str, file: &str, lines: RangeInclusive<usize>) {
    let dir = tempfile::tempdir().expect("temp dir");
    write_files(dir.path(), gateway, keys);
    let mut command = keygate(dir.path());
    command.args(["check", "-c"]).arg(dir.path().join("keygate.toml"));
    let ran = run(command).await;
    let broken = if file == "keys.toml" { keys } else { gateway };
    assert_eq!(ran.code, Some(1), "{ran}\n--- {file} ---\n{broken}");
    let output = format!("{}\n{}", ran.stdout, ran.stderr);
    let found = locations(&output, file);
    assert!(
        found.iter().any(|(line, column)| lines.contains(line) && *column >= 1),
        "expected {file}:LINE:COL with LINE in {lines:?}, found {found:?}\n{ran}\n--- {file} ---\n{broken}"
    );
}

async fn assert_gateway_toml_rejected(from: &str, to: &str) {
    let broken = replace_first(GATEWAY_TOML, from, to);
    // The offending line is the last line of the replacement.
    let line = line_of(&broken, to, 1) + to.trim_end().matches('\n').count();
    assert_check_rejects(&broken, &three_keys(), "keygate.toml", line..=line).await;
}

async fn assert_keys_toml_rejected(from: &str, to: &str) {
    let broken = replace_first(&three_keys(), from, to);
    // The offending line is the last line of the replacement.
    let line = line_of(&broken, to, 1) + to.trim_end().matches('\n').count();
    assert_check_rejects(GATEWAY_TOML, &broken, "keys.toml", line..=line).await;
}

#[tokio::test]
async fn check_rejects_unknown_route_field() {
    assert_gateway_toml_rejected("public = true", "publik = true").await;
}

#[tokio::test]
async fn check_rejects_unknown_key_field() {
    assert_keys_toml_rejected("name = \"active\"\n", "name = \"active\"\ncolour = \"blue\"\n").await;
}

#[tokio::test]
async fn check_rejects_duplicate_key_id() {
    let broken = replace_first(&three_keys(), "id = \"expired1\"", "id = \"active01\"");
    // Either entry may be named; the span runs from the first id to the second.
    let lines = line_of(&broken, "id = \"active01\"", 1)..=line_of(&broken, "id = \"active01\"", 2);
    assert_check_rejects(GATEWAY_TOML, &broken, "keys.toml", lines).await;
}

#[tokio::test]
async fn check_rejects_malformed_hash() {
    let hash_line =
        three_keys().lines().find(|line| line.starts_with("hash = ")).expect("a hash line").to_owned();
    assert_keys_toml_rejected(&hash_line, "hash = \"sha256:not-hex-at-all\"").await;
}

#[tokio::test]
async fn check_rejects_bad_date() {
    assert_keys_toml_rejected("created_at = 2024-01-01T00:00:00Z", "created_at = \"last tuesday\"").await;
}

#[tokio::test]
async fn check_rejects_bad_rate_limit() {
    assert_keys_toml_rejected("name = \"active\"\n", "name = \"active\"\nrate_limit = \"lots\"\n").await;
}

#[tokio::test]
async fn check_rejects_bad_upstream_url() {
    assert_gateway_toml_rejected("upstream = \"http://127.0.0.1:9\"", "upstream = \"ftp://127.0.0.1:9\"")
        .await;
}

#[tokio::test]
async fn check_rejects_bad_duration() {
    assert_gateway_toml_rejected("request_timeout = \"5s\"", "request_timeout = \"5 parsecs\"").await;
}

#[tokio::test]
async fn check_rejects_bad_source() {
    assert_gateway_toml_rejected("sources = [\"header:x-api-key\"]", "sources = [\"bogus:session\"]").await;
}

#[tokio::test]
async fn check_rejects_duplicate_route_host_and_prefix() {
    let broken = replace_first(GATEWAY_TOML, "prefix = \"/\"\n", "prefix = \"/public/\"\n");
    // Either route may be named: anywhere from the first [[routes]] to the second prefix.
    let lines = line_of(&broken, "[[routes]]", 1)..=line_of(&broken, "prefix = \"/public/\"", 2);
    assert_check_rejects(&broken, &three_keys(), "keygate.toml", lines).await;
}

#[tokio::test]
async fn check_rejects_toml_syntax_error() {
    assert_gateway_toml_rejected("[auth]\n", "[auth\n").await;
}

// ---------------------------------------------------------------------------------------------
// Long-running children
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// keygate serve: logs never hold keys
// ---------------------------------------------------------------------------------------------

/// A key whose checksum fails: keygate's shape, so it must be rejected before any lookup.
fn forged_key() -> String {
    leak::tampered(&Key::generated("forged", &[]).secret)
}

const RANDOM_KEY: &str = "Rq8vT2mXw9LpZk4Ny7Hc3Bd6Fg1Js5Ua0VeQ";

/// A finished `keygate serve` run and what was sent to it.
struct ServeRun {
    server: Process,
    probes: Vec<Probe>,
    /// Every key presented, valid or not.
    secrets: Vec<String>,
    _upstream: RecordingUpstream,
    _dir: tempfile::TempDir,
}

struct Probe {
    label: &'static str,
    request_id: String,
    call: Call,
    status: u16,
    key_id: Option<String>,
}

/// Starts `keygate serve` (RUST_LOG=trace), sends a valid key (header and query), a forged
/// `kg_` key and a random key, then kills it and returns the run and the probes sent.
async fn serve_with_probes(json_logs: bool) -> ServeRun {
    let upstream = RecordingUpstream::start().await;
    let key = Key::generated("cli-user", &["read"]);
    let config = GatewayConfig::new()
        .sources(&["header:x-api-key", "authorization:Bearer", "query:api_key"])
        .route(Route::new("/private/", &upstream.url()))
        .key(key.clone());
    let dir = tempfile::tempdir().expect("temp dir");
    write_files(dir.path(), &config.gateway_toml(), &config.keys_toml());

    let mut command = keygate(dir.path());
    command.args(["serve", "-c"]).arg(dir.path().join("keygate.toml")).env("RUST_LOG", "trace");
    if json_logs {
        command.env("KEYGATE_LOG_FORMAT", "json");
    }
    let mut server = Process::spawn(command);
    let addr = server.listening_addr().await;

    let forged = forged_key();
    let id = |label: &str| format!("cli-probe-{label}");
    let probes = vec![
        Probe {
            label: "valid-header",
            request_id: id("valid-header"),
            call: Call::new(addr, Method::GET, "/private/x").header("x-api-key", &key.secret),
            status: 200,
            key_id: Some(key.id.clone()),
        },
        Probe {
            label: "valid-query",
            request_id: id("valid-query"),
            call: Call::new(addr, Method::GET, &format!("/private/x?api_key={}&page=1", key.secret)),
            status: 200,
            key_id: Some(key.id.clone()),
        },
        Probe {
            label: "forged-kg",
            request_id: id("forged-kg"),
            call: Call::new(addr, Method::GET, "/private/x").header("x-api-key", &forged),
            status: 401,
            key_id: None,
        },
        Probe {
            label: "random",
            request_id: id("random"),
            call: Call::new(addr, Method::GET, "/private/x")
                .header("authorization", &format!("Bearer {RANDOM_KEY}")),
            status: 401,
            key_id: None,
        },
    ];
    for probe in &probes {
        let exchange = probe.call.clone().header("x-request-id", &probe.request_id).send().await;
        assert_eq!(
            exchange.status.as_u16(),
            probe.status,
            "{}: {exchange}\n{}",
            probe.label,
            server.transcript()
        );
    }

    // Access events may be written just after the response: wait for them, bounded.
    let ids: Vec<String> = probes.iter().map(|p| p.request_id.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    server
        .stderr
        .wait_until(deadline, |lines| ids.iter().all(|id| lines.iter().any(|l| l.contains(id.as_str()))))
        .await;
    server.kill_and_collect().await;

    ServeRun {
        secrets: vec![key.secret.clone(), forged, RANDOM_KEY.to_owned()],
        server,
        probes,
        _upstream: upstream,
        _dir: dir,
    }
}

fn assert_no_key_in_logs(server: &Process, secrets: &[String]) {
    let mut leaks = leak::leaks(server.all_lines(), secrets);
    leaks.dedup();
    assert!(
        leaks.is_empty(),
        "{} log line(s) hold part of a key:\n{}",
        leaks.len(),
        leaks.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
}

#[tokio::test]
async fn serve_trace_logs_never_contain_keys() {
    let ServeRun { server, probes, secrets, .. } = serve_with_probes(false).await;
    assert_no_key_in_logs(&server, &secrets);
    for probe in &probes {
        assert!(
            server.stderr.seen.iter().any(|l| l.contains(&probe.request_id)),
            "no log line carries request id {} ({})\n{}",
            probe.request_id,
            probe.label,
            server.transcript()
        );
    }
}

/// A field of a tracing JSON event: top level (flattened) or under `fields`.
fn event_field<'a>(event: &'a Value, name: &str) -> Option<&'a Value> {
    event.get(name).or_else(|| event.get("fields").and_then(|fields| fields.get(name)))
}

fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn serve_json_logs_are_json_with_one_access_event_per_request() {
    let ServeRun { server, probes, secrets, .. } = serve_with_probes(true).await;
    assert_no_key_in_logs(&server, &secrets);

    let mut events = Vec::new();
    for line in server.stderr.seen.iter().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(event) => events.push(event),
            Err(e) => panic!("a log line is not JSON ({e}): {line}"),
        }
    }

    for probe in &probes {
        let access: Vec<&Value> = events
            .iter()
            .filter(|e| {
                event_field(e, "request_id").map(as_text).as_deref() == Some(&probe.request_id)
                    && event_field(e, "method").is_some()
                    && event_field(e, "status").is_some()
            })
            .collect();
        let context = format!(
            "probe {} (request id {}): access events {access:#?}\n{}",
            probe.label,
            probe.request_id,
            server.transcript()
        );
        assert_eq!(access.len(), 1, "expected exactly one access event\n{context}");
        let event = access[0];
        let text = |name: &str| event_field(event, name).map(as_text);
        assert_eq!(text("method").as_deref(), Some("GET"), "{context}");
        assert!(text("path").is_some_and(|p| p.starts_with("/private/x")), "path\n{context}");
        assert_eq!(text("status"), Some(probe.status.to_string()), "{context}");
        assert!(text("route").is_some_and(|r| !r.is_empty() && r != "null"), "route\n{context}");
        if let Some(key_id) = &probe.key_id {
            assert_eq!(text("key_id").as_ref(), Some(key_id), "key_id\n{context}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// keygate demo
// ---------------------------------------------------------------------------------------------

/// A token shaped like a generated key: `<prefix>_<8 [0-9a-z]>_<38 base62>`.
fn find_key(text: &str) -> Option<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .find(|token| {
            let parts: Vec<&str> = token.split('_').collect();
            matches!(parts.as_slice(), [prefix, id, secret]
                if !prefix.is_empty()
                    && id.len() == 8
                    && id.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
                    && secret.len() == 38
                    && secret.bytes().all(|b| b.is_ascii_alphanumeric()))
        })
        .map(str::to_owned)
}

/// Splits a shell command line into words, honouring quotes and backslashes.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(next) = chars.next() {
                    word.push(next);
                    in_word = true;
                }
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

#[tokio::test]
async fn demo_prints_a_working_key_and_curl_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut command = keygate(dir.path());
    command.args(["demo", "--listen", "127.0.0.1:0"]);
    let mut demo = Process::spawn(command);

    let deadline = Instant::now() + PROCESS_TIMEOUT;
    let printed = demo
        .stdout
        .wait_until(deadline, |lines| {
            let text = lines.join("\n");
            find_key(&text).is_some() && lines.iter().any(|l| l.contains("curl "))
        })
        .await;
    assert!(printed, "no key and curl line on stdout\n{}", demo.transcript());
    let stdout = demo.stdout.seen.join("\n");
    let key = find_key(&stdout).expect("just found");
    let curl = demo.stdout.seen.iter().find(|l| l.contains("curl ")).expect("just found").clone();

    let words = shell_words(&curl);
    let url = words
        .iter()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no http:// URL in the curl line: {curl}"));
    let headers: Vec<(String, String)> = words
        .windows(2)
        .filter(|pair| pair[0] == "-H" || pair[0] == "--header")
        .filter_map(|pair| {
            let (name, value) = pair[1].split_once(':')?;
            Some((name.trim().to_owned(), value.trim().to_owned()))
        })
        .collect();
    let rest = &url["http://".len()..];
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let port: u16 = authority
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in the curl URL {url}"));

    let addr = {
        let found = demo
            .stderr
            .wait_until(deadline, |lines| {
                lines.iter().any(|l| listening_on(l).is_some_and(|a| a.port() == port))
            })
            .await;
        assert!(found, "no `listening on` for the curl line's port {port} ({curl})\n{}", demo.transcript());
        demo.stderr
            .seen
            .iter()
            .find_map(|l| listening_on(l).filter(|a| a.port() == port))
            .expect("just found")
    };

    let mut with_key = Call::new(addr, Method::GET, path);
    for (name, value) in &headers {
        with_key = with_key.header(name, value);
    }
    let exchange = with_key.send().await;
    assert_eq!(
        exchange.status,
        200,
        "the demo's own curl line (key {key}) failed: {curl}\n{exchange}\n{}",
        demo.transcript()
    );

    let bare_path = if path.contains(&key) { path.split('?').next().unwrap_or("/") } else { path };
    let mut without_key = Call::new(addr, Method::GET, bare_path);
    for (name, value) in headers.iter().filter(|(_, v)| !v.contains(&key)) {
        without_key = without_key.header(name, value);
    }
    let exchange = without_key.send().await;
    assert_eq!(exchange.status, 401, "{exchange}\n{}", demo.transcript());
    assert_eq!(exchange.error_code().as_deref(), Some("missing_api_key"), "{exchange}");
}

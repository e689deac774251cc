//! `keygate keys …` (SPEC §1 keys.toml, §4): the real binary edits a key file in a temp dir per
//! test, and a real gateway on 127.0.0.1:0 in front of a recording upstream — in-process with the
//! reload watcher, or a `keygate serve` child — shows what each edit means on the wire.
//!
//! Waits poll with deadlines and print the measured time; the product target for a key change
//! is 1 s, the tests allow [`DEADLINE`] so a slow machine shows up as a number, not a flake.

mod support;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use support::poll::{DEADLINE, MAX_POLLS, POLL_EVERY, ms};
use support::process::{PROCESS_TIMEOUT, Process};
use support::{Call, Exchange, GatewayConfig, RecordingUpstream, Route, WatchedGateway, sha256_ref};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The generated-key alphabets (SPEC §4).
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ID_ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

// ---------------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------------

/// A finished run of the binary: what was asked, and everything it said.
struct Ran {
    command: String,
    stdin: Option<String>,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl fmt::Display for Ran {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "ran: {}", self.command)?;
        if let Some(stdin) = &self.stdin {
            writeln!(f, "stdin: {stdin:?}")?;
        }
        writeln!(f, "exit code: {:?}", self.code)?;
        writeln!(f, "--- stdout ---\n{}", self.stdout)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

impl Ran {
    #[track_caller]
    fn assert_ok(&self) {
        assert_eq!(self.code, Some(0), "expected exit code 0\n{self}");
    }

    #[track_caller]
    fn assert_failed(&self) {
        assert!(
            self.code.is_some_and(|c| c != 0),
            "expected a non-zero exit code (and no crash by signal)\n{self}"
        );
        assert!(!self.stderr.trim().is_empty(), "a refusal should say why on stderr\n{self}");
    }

    /// stdout must be exactly one non-empty line; returns it.
    #[track_caller]
    fn single_line(&self) -> String {
        self.assert_ok();
        let line = self.stdout.strip_suffix('\n').unwrap_or_else(|| panic!("stdout must end in \\n\n{self}"));
        assert!(!line.is_empty() && !line.contains('\n'), "stdout must be exactly one line\n{self}");
        assert_eq!(line.trim(), line, "stdout must be the value alone, no padding\n{self}");
        line.to_owned()
    }
}

use support::keygate_command as keygate;

/// Waits for a spawned child (bounded) and collects its output.
async fn finish(child: Child, command: String, stdin: Option<String>) -> Ran {
    // On timeout the future, and with it the child (kill_on_drop), is dropped.
    let output = tokio::time::timeout(PROCESS_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{command} did not finish within {PROCESS_TIMEOUT:?}"))
        .unwrap_or_else(|e| panic!("could not wait for {command}: {e}"));
    Ran {
        command,
        stdin,
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

async fn run(mut command: Command, stdin: Option<&str>) -> Ran {
    let description = format!("{:?}", command.as_std());
    if stdin.is_some() {
        command.stdin(Stdio::piped());
    }
    let mut child = command.spawn().unwrap_or_else(|e| panic!("could not start {description}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        match tokio::time::timeout(PROCESS_TIMEOUT, pipe.write_all(input.as_bytes())).await {
            Err(_) => panic!("{description}: writing stdin timed out"),
            // A command that refuses its flags exits without reading stdin.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
            Ok(Err(e)) => panic!("{description}: writing stdin: {e}"),
            Ok(Ok(())) => {}
        }
        drop(pipe); // EOF, so the child stops reading
    }
    finish(child, description, stdin.map(str::to_owned)).await
}

// ---------------------------------------------------------------------------------------------
// A folder with keygate.toml and (maybe) keys.toml
// ---------------------------------------------------------------------------------------------

/// keygate.toml with one private route `/` to `upstream`.
fn gateway_toml(upstream: &str) -> String {
    GatewayConfig::new().route(Route::new("/", upstream)).gateway_toml()
}

/// The same with `key_prefix` set in `[auth]`.
fn gateway_toml_with_prefix(upstream: &str, prefix: &str) -> String {
    let base = gateway_toml(upstream);
    assert!(base.contains("[auth]\n"), "the support builder changed its output:\n{base}");
    base.replacen("[auth]\n", &format!("[auth]\nkey_prefix = {prefix:?}\n"), 1)
}

/// A temp dir for one test, holding keygate.toml and the key file it names.
struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    /// keygate.toml whose route goes to a closed port: for tests that never send a request.
    fn offline() -> Self {
        Self::new(&gateway_toml("http://127.0.0.1:9"))
    }

    fn new(gateway_toml: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("keygate.toml"), gateway_toml).expect("write keygate.toml");
        Self { dir }
    }

    fn with_keys(self, keys_toml: &str) -> Self {
        std::fs::write(self.keys_path(), keys_toml).expect("write keys.toml");
        self
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("keygate.toml")
    }

    fn keys_path(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }

    /// The key file's bytes, or None if it does not exist.
    fn keys_bytes(&self) -> Option<Vec<u8>> {
        match std::fs::read(self.keys_path()) {
            Ok(bytes) => Some(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => panic!("read {}: {e}", self.keys_path().display()),
        }
    }

    fn keys_text(&self) -> String {
        let bytes = self.keys_bytes().expect("the key file exists");
        String::from_utf8(bytes).expect("the key file is UTF-8")
    }

    /// `[[keys]]` entries of the key file, parsed independently of keygate.
    fn entries(&self) -> Vec<toml::Table> {
        let text = self.keys_text();
        let doc: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("the key file is not TOML: {e}\n{text}"));
        match doc.get("keys") {
            None => Vec::new(),
            Some(keys) => keys
                .as_array()
                .unwrap_or_else(|| panic!("`keys` is not an array of tables\n{text}"))
                .iter()
                .map(|k| k.as_table().cloned().unwrap_or_else(|| panic!("a key is not a table\n{text}")))
                .collect(),
        }
    }

    /// The entry with this id.
    fn entry(&self, id: &str) -> toml::Table {
        self.entries()
            .into_iter()
            .find(|e| field(e, "id") == id)
            .unwrap_or_else(|| panic!("no entry with id {id} in the key file\n{}", self.keys_text()))
    }

    fn ids(&self) -> Vec<String> {
        self.entries().iter().map(|e| field(e, "id")).collect()
    }

    /// Files in the folder other than the two config files and the lock file.
    fn leftovers(&self) -> Vec<String> {
        let expected = ["keygate.toml", "keys.toml", ".keys.toml.lock"];
        std::fs::read_dir(self.dir.path())
            .expect("list the temp dir")
            .map(|e| e.expect("dir entry").file_name().to_string_lossy().into_owned())
            .filter(|name| !expected.contains(&name.as_str()))
            .collect()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = keygate(self.dir.path());
        command.arg("-c").arg(self.config()).args(args);
        command
    }

    /// `keygate -c keygate.toml ARGS…`.
    async fn run(&self, args: &[&str]) -> Ran {
        run(self.command(args), None).await
    }

    /// `keygate -c keygate.toml ARGS…` with `stdin` on its standard input.
    async fn run_stdin(&self, args: &[&str], stdin: &str) -> Ran {
        run(self.command(args), Some(stdin)).await
    }

    /// `keys create ARGS…` that must succeed; returns the key after checking its format.
    async fn create(&self, args: &[&str]) -> String {
        let mut full = vec!["keys", "create"];
        full.extend_from_slice(args);
        let ran = self.run(&full).await;
        let key = ran.single_line();
        assert_key_format(&key, "kg", &ran);
        key
    }

    /// `keys import ARGS…` of `key` that must succeed; returns the id it printed.
    async fn import(&self, key: &str, args: &[&str]) -> String {
        let mut full = vec!["keys", "import"];
        full.extend_from_slice(args);
        let ran = self.run_stdin(&full, key).await;
        let id = ran.single_line();
        assert!(is_id(&id), "import must print the new id alone (8 of [0-9a-z])\n{ran}");
        id
    }

    /// `keys SUBCOMMAND ARGS…` that must succeed.
    async fn keys_ok(&self, args: &[&str]) -> Ran {
        let mut full = vec!["keys"];
        full.extend_from_slice(args);
        let ran = self.run(&full).await;
        ran.assert_ok();
        ran
    }

    /// `keys list --json`, parsed; every object must have exactly the documented fields.
    async fn list_json(&self) -> Vec<Value> {
        let ran = self.keys_ok(&["list", "--json"]).await;
        let value: Value = serde_json::from_str(&ran.stdout)
            .unwrap_or_else(|e| panic!("`keys list --json` is not JSON: {e}\n{ran}"));
        let items = value.as_array().unwrap_or_else(|| panic!("`keys list --json` is not an array\n{ran}"));
        let fields: HashSet<&str> =
            ["id", "name", "tail", "scopes", "created", "expires", "status"].into_iter().collect();
        for item in items {
            let keys: HashSet<&str> =
                item.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
            assert_eq!(keys, fields, "each listed key has exactly these fields\n{ran}");
        }
        items.clone()
    }

    /// The `keys list --json` object for `id`.
    async fn listed(&self, id: &str) -> Value {
        let list = self.list_json().await;
        list.iter()
            .find(|k| k["id"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} not in `keys list --json`: {list:#?}"))
    }

    /// `keygate check` must pass with exactly this summary.
    async fn assert_check(&self, summary: &str) {
        let ran = self.run(&["check"]).await;
        ran.assert_ok();
        assert_eq!(
            ran.stdout.trim_end(),
            format!("ok: {summary}"),
            "keygate check after the edits\n{ran}\n--- keys.toml ---\n{}",
            self.keys_text()
        );
    }
}

/// A string field of a key entry ("" if absent or not a string).
fn field(entry: &toml::Table, name: &str) -> String {
    match entry.get(name) {
        Some(toml::Value::String(s)) => s.clone(),
        Some(toml::Value::Datetime(d)) => d.to_string(),
        _ => String::new(),
    }
}

fn scopes_of(entry: &toml::Table) -> Vec<String> {
    entry
        .get("scopes")
        .and_then(toml::Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

fn is_id(text: &str) -> bool {
    text.len() == 8 && text.bytes().all(|b| ID_ALPHABET.contains(&b))
}

fn parse_time(text: &str) -> OffsetDateTime {
    OffsetDateTime::parse(text, &Rfc3339).unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
}

/// Asserts `at` lies within `slack` of `expected`.
#[track_caller]
fn assert_near(at: &str, expected: OffsetDateTime, slack: time::Duration, what: &str) {
    let got = parse_time(at);
    assert!(
        (got - expected).abs() <= slack,
        "{what}: {at} should be within {slack} of {expected} (off by {})",
        got - expected
    );
}

// ---------------------------------------------------------------------------------------------
// The key format, checked without the library
// ---------------------------------------------------------------------------------------------

/// CRC-32 (IEEE 802.3, reflected, as zlib and GitHub's tokens use), bit by bit.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// Six base62 digits, zero-padded.
fn base62_6(mut n: u32) -> String {
    let mut digits = [b'0'; 6];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(digits.to_vec()).expect("ASCII")
}

/// `<prefix>_<8 of [0-9a-z]>_<32 base62><6 base62 CRC32 of everything before>`; returns the id.
#[track_caller]
fn assert_key_format(key: &str, prefix: &str, ran: &Ran) -> String {
    let rest = key
        .strip_prefix(prefix)
        .and_then(|r| r.strip_prefix('_'))
        .unwrap_or_else(|| panic!("the key must start with {prefix}_\n{ran}"));
    let (id, secret) = rest.split_once('_').unwrap_or_else(|| panic!("no _ after the id\n{ran}"));
    assert!(is_id(id), "the id part must be 8 of [0-9a-z], got {id:?}\n{ran}");
    assert_eq!(secret.len(), 32 + 6, "32 random + 6 checksum characters after the id\n{ran}");
    assert!(secret.bytes().all(|b| BASE62.contains(&b)), "secret and checksum must be base62\n{ran}");
    let (signed, checksum) = key.split_at(key.len() - 6);
    assert_eq!(checksum, base62_6(crc32(signed.as_bytes())), "checksum = base62(CRC32({signed:?}))\n{ran}");
    assert!(keygate::keys::plausible(key, prefix), "the library must agree the key is well formed\n{ran}");
    id.to_owned()
}

/// The key with one character of its random part changed, keeping the shape (so only the
/// checksum can tell).
fn forge(key: &str) -> String {
    let at = key.len() - 6 - 16; // inside the 32 random characters
    let mut bytes = key.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).expect("ASCII")
}

/// The random part and checksum of a generated key: what must never be stored beyond the tail.
fn secret_part(key: &str) -> &str {
    &key[key.len() - 38..]
}

// ---------------------------------------------------------------------------------------------
// Talking to a gateway
// ---------------------------------------------------------------------------------------------

/// `GET /api/items` with `key` in `x-api-key`.
fn with_key(addr: SocketAddr, key: &str) -> impl Fn() -> Call + 'static {
    let key = key.to_owned();
    move || Call::new(addr, http::Method::GET, "/api/items").header("x-api-key", &key)
}

use support::Outcome as Want;

const OK: Want = Want::Forwarded;
const INVALID: Want = Want::Rejected(401, "invalid_api_key");
const REVOKED: Want = Want::Rejected(401, "revoked_api_key");
const EXPIRED: Want = Want::Rejected(401, "expired_api_key");

/// Checks one exchange against `want`, and that the upstream saw it exactly when forwarded.
#[track_caller]
fn assert_want(exchange: &Exchange, upstream: &RecordingUpstream, want: Want, context: &str) {
    match want {
        Want::Forwarded => {
            assert!(want.matches(exchange), "{context}: expected 200 from the upstream\n{exchange}");
            upstream.expect_received(exchange);
        }
        Want::Rejected(status, code) => {
            if !want.matches(exchange) {
                panic!("{context}: expected {status} {code}\n{exchange}");
            }
            support::assert_rejected(exchange, upstream, status, code);
        }
    }
}

async fn expect(call: Call, upstream: &RecordingUpstream, want: Want, context: &str) -> Exchange {
    let exchange = call.send().await;
    assert_want(&exchange, upstream, want, context);
    exchange
}

/// Polls `call()` until it gets `to`; until then every answer must be `from` (a change shows as
/// one clean switch, never a third state). Returns the time since `changed_at`. Fails after
/// [`DEADLINE`] with the measured time, the last exchange and `context()`.
async fn wait_for(
    call: impl Fn() -> Call,
    upstream: &RecordingUpstream,
    (from, to): (Want, Want),
    changed_at: Instant,
    change: &str,
    context: impl FnOnce() -> String,
) -> Duration {
    let mut polls = 0;
    let mut before = 0;
    loop {
        polls += 1;
        let exchange = call().send().await;
        let elapsed = changed_at.elapsed();
        if to.matches(&exchange) {
            assert_want(&exchange, upstream, to, change);
            eprintln!("[{change}] {from:?} → {to:?} after {} ({before} answer(s) before)", ms(elapsed));
            return elapsed;
        }
        if !from.matches(&exchange) {
            panic!(
                "{change}: after {} got neither {from:?} nor {to:?}\n{exchange}\n{}",
                ms(elapsed),
                context()
            );
        }
        assert_want(&exchange, upstream, from, change);
        before += 1;
        if elapsed >= DEADLINE || polls >= MAX_POLLS {
            panic!(
                "{change}: still {from:?}, not {to:?}, {} after the change ({polls} polls; target is 1 s)\n\
                 last exchange:\n{exchange}\n{}",
                ms(elapsed),
                context()
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// An in-process gateway with the reload watcher on a workspace's files, and its upstream.
struct Live {
    upstream: RecordingUpstream,
    ws: Workspace,
    gateway: WatchedGateway,
}

impl Live {
    /// A workspace whose keygate.toml routes `/` to a fresh recording upstream, for the test to
    /// fill with the CLI before [`Live::start`] loads it.
    async fn prepare() -> (RecordingUpstream, Workspace) {
        let upstream = RecordingUpstream::start().await;
        let ws = Workspace::new(&gateway_toml(&upstream.url()));
        (upstream, ws)
    }

    async fn start((upstream, ws): (RecordingUpstream, Workspace)) -> Self {
        let gateway = WatchedGateway::start(&ws.config()).await;
        Self { upstream, ws, gateway }
    }

    fn with(&self, key: &str) -> impl Fn() -> Call + 'static {
        with_key(self.gateway.addr, key)
    }

    async fn expect(&self, key: &str, want: Want, context: &str) -> Exchange {
        expect(self.with(key)(), &self.upstream, want, context).await
    }

    fn context(&self) -> String {
        format!("reload status: {:?}\n--- keys.toml ---\n{}", self.gateway.status(), self.ws.keys_text())
    }

    async fn wait_for(
        &self,
        key: &str,
        from_to: (Want, Want),
        changed_at: Instant,
        change: &str,
    ) -> Duration {
        wait_for(self.with(key), &self.upstream, from_to, changed_at, change, || self.context()).await
    }
}

// ---------------------------------------------------------------------------------------------
// 1. create
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn create_prints_only_a_well_formed_key_and_stores_only_its_hash() {
    let ws = Workspace::offline();
    assert!(ws.keys_bytes().is_none(), "the test starts without a key file");
    let ran = ws
        .run(&[
            "keys",
            "create",
            "--name",
            "billing-sync",
            "--scope",
            "read",
            "--scope",
            "write",
            "--expires",
            "90d",
            "--rate-limit",
            "100/s",
        ])
        .await;
    let started = OffsetDateTime::now_utc();
    let key = ran.single_line();
    let id = assert_key_format(&key, "kg", &ran);
    assert!(!ran.stderr.trim().is_empty(), "create should tell a person what it did on stderr\n{ran}");
    assert!(!ran.stderr.contains(secret_part(&key)), "the key goes to stdout only, not stderr\n{ran}");

    // The file (created because it was missing) holds the hash, the id and the tail.
    let text = ws.keys_text();
    let entry = ws.entry(&id);
    assert_eq!(field(&entry, "hash"), sha256_ref(&key), "hash = sha256 of the printed key\n{text}");
    assert_eq!(field(&entry, "hash"), keygate::keys::hash_key(&key), "the library agrees\n{text}");
    assert_eq!(field(&entry, "tail"), key[key.len() - 6..], "tail = last 6 characters\n{text}");
    assert_eq!(field(&entry, "name"), "billing-sync", "{text}");
    assert_eq!(scopes_of(&entry), ["read", "write"], "{text}");
    assert_eq!(field(&entry, "rate_limit"), "100/s", "{text}");
    assert!(entry.get("revoked_at").is_none(), "a new key is not revoked\n{text}");
    assert!(
        matches!(entry.get("created_at"), Some(toml::Value::Datetime(_))),
        "created_at is a TOML datetime\n{text}"
    );
    let slack = time::Duration::minutes(2);
    assert_near(&field(&entry, "created_at"), started, slack, "created_at");
    assert_near(&field(&entry, "expires_at"), started + time::Duration::days(90), slack, "expires_at (90d)");

    // No trace of the key beyond its tail, in the key file or anything beside it.
    for file in std::fs::read_dir(ws.dir.path()).expect("list dir") {
        let path = file.expect("dir entry").path();
        let content = String::from_utf8_lossy(&std::fs::read(&path).expect("read")).into_owned();
        let secret = secret_part(&key);
        for start in 0..=secret.len() - 7 {
            let piece = &secret[start..start + 7];
            assert!(
                !content.contains(piece),
                "{} holds {piece:?}, 7 characters of the key's secret (only the 6-character tail may be stored)\n\
                 key: {key}\n{content}",
                path.display()
            );
        }
    }
    assert!(ws.leftovers().is_empty(), "files left behind: {:?}", ws.leftovers());
    ws.assert_check("1 routes, 1 keys (1 active, 0 expired, 0 revoked)").await;

    // A second key is different, and the first entry stays as it was.
    let second = ws.create(&["--name", "reports"]).await;
    assert_ne!(second, key);
    assert_eq!(ws.entries().len(), 2, "{}", ws.keys_text());
    assert_eq!(ws.entry(&id), entry, "creating another key must not touch the first\n{}", ws.keys_text());
    ws.assert_check("1 routes, 2 keys (2 active, 0 expired, 0 revoked)").await;
}

#[tokio::test]
async fn create_honours_a_custom_key_prefix_and_the_gateway_accepts_it() {
    let upstream = RecordingUpstream::start().await;
    let ws = Workspace::new(&gateway_toml_with_prefix(&upstream.url(), "acme"));
    let ran = ws.run(&["keys", "create", "--name", "partner", "--scope", "read"]).await;
    let key = ran.single_line();
    assert!(key.starts_with("acme_"), "key_prefix = \"acme\" must give acme_ keys\n{ran}");
    let id = assert_key_format(&key, "acme", &ran);
    assert_eq!(field(&ws.entry(&id), "hash"), sha256_ref(&key));
    ws.assert_check("1 routes, 1 keys (1 active, 0 expired, 0 revoked)").await;

    let gateway = WatchedGateway::start(&ws.config()).await;
    let seen = expect(with_key(gateway.addr, &key)(), &upstream, OK, "the acme_ key").await;
    assert_eq!(upstream.expect_received(&seen).header("x-keygate-key-id"), Some(id.as_str()), "{seen}");
    // The checksum is enforced for the configured prefix too.
    expect(with_key(gateway.addr, &forge(&key))(), &upstream, INVALID, "a forged acme_ key").await;
}

// ---------------------------------------------------------------------------------------------
// 2. Comments and order
// ---------------------------------------------------------------------------------------------

/// A hand-written key file: a header comment, comments between entries, trailing comments.
fn commented_keys() -> String {
    format!(
        "# Staging keys. Managed with `keygate keys`; edit by hand with care.\n\
         # Only hashes live here, never keys.\n\
         \n\
         # nightly billing export\n\
         [[keys]]\n\
         id = \"billing1\"   # stable: dashboards use it\n\
         name = \"billing-sync\"\n\
         hash = \"{}\"\n\
         scopes = [\"read\", \"write\"]  # write: it posts invoices\n\
         created_at = 2024-01-01T00:00:00Z\n\
         \n\
         # reporting, read only\n\
         [[keys]]\n\
         id = \"report01\"\n\
         name = \"reports\" # owned by the data team\n\
         hash = \"{}\"\n\
         scopes = [\"read\"]\n\
         created_at = 2024-01-01T00:00:00Z # migrated from the old system\n\
         \n\
         # end of the hand-written keys\n",
        sha256_ref("billing-legacy-secret-0001"),
        sha256_ref("reports-legacy-secret-0002"),
    )
}

/// Every line of `original` must still be in `now`, in the same order (edits only add lines
/// or change values in entries they own).
#[track_caller]
fn assert_lines_kept(original: &str, now: &str, after: &str) {
    let mut remaining = now.lines();
    for line in original.lines() {
        assert!(
            remaining.any(|l| l == line),
            "after {after}: the line {line:?} is gone or out of order\n--- before ---\n{original}\n--- after ---\n{now}"
        );
    }
}

#[tokio::test]
async fn comments_and_order_survive_create_revoke_rotate_and_delete() {
    let original = commented_keys();
    let ws = Workspace::offline().with_keys(&original);
    ws.assert_check("1 routes, 2 keys (2 active, 0 expired, 0 revoked)").await;

    let ci = ws.create(&["--name", "ci", "--scope", "read"]).await;
    let ci_id = ci.split('_').nth(1).expect("id part").to_owned();
    assert_lines_kept(&original, &ws.keys_text(), "create");
    assert_eq!(ws.ids(), ["billing1", "report01", ci_id.as_str()], "{}", ws.keys_text());

    ws.keys_ok(&["revoke", "reports"]).await;
    assert_lines_kept(&original, &ws.keys_text(), "revoke");
    assert!(ws.entry("report01").contains_key("revoked_at"), "{}", ws.keys_text());

    let ran = ws.keys_ok(&["rotate", "billing-sync", "--grace", "1h"]).await;
    let rotated = ran.single_line();
    let rotated_id = assert_key_format(&rotated, "kg", &ran);
    assert_lines_kept(&original, &ws.keys_text(), "rotate");
    assert_eq!(ws.ids(), ["billing1", "report01", ci_id.as_str(), rotated_id.as_str()], "{}", ws.keys_text());

    ws.keys_ok(&["delete", &ci_id]).await;
    let text = ws.keys_text();
    assert_lines_kept(&original, &text, "delete");
    assert_eq!(ws.ids(), ["billing1", "report01", rotated_id.as_str()], "{text}");
    assert!(!text.contains(&ci_id), "the deleted entry is gone entirely\n{text}");
    ws.assert_check("1 routes, 3 keys (2 active, 0 expired, 1 revoked)").await;
    assert!(ws.leftovers().is_empty(), "files left behind: {:?}", ws.leftovers());
}

#[tokio::test]
async fn deleting_the_first_entry_keeps_the_file_header_comment() {
    let original = commented_keys();
    let ws = Workspace::offline().with_keys(&original);
    ws.keys_ok(&["delete", "billing1"]).await;
    let text = ws.keys_text();
    assert_eq!(ws.ids(), ["report01"], "{text}");
    // The entry's own comment may go with it; the file's header, separated by a blank line,
    // belongs to the file.
    // Lines 3..=9 are the first entry and the comment right above it; the rest must stay.
    let first_entry = 3..=9;
    assert!(original.lines().nth(3).is_some_and(|l| l.contains("nightly billing")), "test set-up");
    let kept: Vec<&str> = original
        .lines()
        .enumerate()
        .filter(|(i, line)| !first_entry.contains(i) && !line.is_empty())
        .map(|(_, line)| line)
        .collect();
    let mut remaining = text.lines();
    for line in kept {
        assert!(
            remaining.any(|l| l == line),
            "after deleting the first entry, {line:?} is gone or out of order\n--- before ---\n{original}\n--- after ---\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrent runs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sixteen_concurrent_creates_all_land() {
    const RUNS: usize = 16;
    let ws = Workspace::offline();
    // Spawn all first, so the runs really overlap; then wait for each (bounded).
    let mut children = Vec::new();
    for n in 0..RUNS {
        let name = format!("worker-{n:02}");
        let mut command = ws.command(&["keys", "create", "--name", &name, "--scope", "read"]);
        let description = format!("{:?}", command.as_std());
        let child = command.spawn().unwrap_or_else(|e| panic!("could not start {description}: {e}"));
        children.push((child, description));
    }
    let mut keys = Vec::new();
    for (child, description) in children {
        let ran = finish(child, description, None).await;
        let key = ran.single_line();
        assert_key_format(&key, "kg", &ran);
        keys.push(key);
    }
    let text = ws.keys_text();
    let distinct: HashSet<&String> = keys.iter().collect();
    assert_eq!(distinct.len(), RUNS, "every run printed a different key: {keys:#?}");
    let entries = ws.entries();
    assert_eq!(entries.len(), RUNS, "one entry per run, none lost\n{text}");
    let ids: HashSet<String> = entries.iter().map(|e| field(e, "id")).collect();
    assert_eq!(ids.len(), RUNS, "ids are unique\n{text}");
    let names: HashSet<String> = entries.iter().map(|e| field(e, "name")).collect();
    assert_eq!(names.len(), RUNS, "every run's name is there\n{text}");
    for key in &keys {
        let id = key.split('_').nth(1).expect("id part");
        assert_eq!(field(&ws.entry(id), "hash"), sha256_ref(key), "entry {id} holds its key's hash\n{text}");
    }
    ws.assert_check("1 routes, 16 keys (16 active, 0 expired, 0 revoked)").await;
    assert!(ws.leftovers().is_empty(), "temporary files left behind: {:?}", ws.leftovers());
}

// ---------------------------------------------------------------------------------------------
// 4. A running `keygate serve` picks the edits up
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn create_revoke_delete_take_effect_on_a_running_keygate_serve() {
    let upstream = RecordingUpstream::start().await;
    let ws = Workspace::new(&gateway_toml(&upstream.url()));
    // Another key stays in the file throughout, so no edit leaves it empty.
    let anchor = ws.create(&["--name", "anchor"]).await;
    let mut serve = Process::serve(&ws.config());
    let addr = serve.listening_addr().await;
    expect(with_key(addr, &anchor)(), &upstream, OK, "the anchor key before any edit").await;

    let key = ws.create(&["--name", "fresh", "--scope", "read"]).await;
    let created = Instant::now();
    let t_create = wait_for(with_key(addr, &key), &upstream, (INVALID, OK), created, "create", || {
        serve.stderr.drain();
        serve.transcript()
    })
    .await;

    let id = key.split('_').nth(1).expect("id part").to_owned();
    ws.keys_ok(&["revoke", &id]).await;
    let revoked = Instant::now();
    let t_revoke = wait_for(with_key(addr, &key), &upstream, (OK, REVOKED), revoked, "revoke", || {
        serve.stderr.drain();
        serve.transcript()
    })
    .await;

    ws.keys_ok(&["delete", &id]).await;
    let deleted = Instant::now();
    let t_delete = wait_for(with_key(addr, &key), &upstream, (REVOKED, INVALID), deleted, "delete", || {
        serve.stderr.drain();
        serve.transcript()
    })
    .await;

    expect(with_key(addr, &anchor)(), &upstream, OK, "the anchor key after the edits").await;
    eprintln!(
        "keygate serve: create {}, revoke {}, delete {} (target 1 s each)",
        ms(t_create),
        ms(t_revoke),
        ms(t_delete)
    );
}

#[tokio::test]
async fn deleting_the_last_key_takes_effect() {
    // `keys create` on a missing file, then `keys delete` of that key: the operator's file is
    // now keyless, and the key must stop working like any deleted key (SPEC §3: within 1 s).
    let prepared = Live::prepare().await;
    let key = prepared.1.create(&["--name", "only"]).await;
    let live = Live::start(prepared).await;
    live.expect(&key, OK, "the only key, before the delete").await;
    let id = key.split('_').nth(1).expect("id part").to_owned();
    live.ws.keys_ok(&["delete", &id]).await;
    let deleted = Instant::now();
    let bytes = live.ws.keys_bytes().map_or(0, |b| b.len());
    live.wait_for(&key, (OK, INVALID), deleted, &format!("delete of the last key (file now {bytes} bytes)"))
        .await;
    live.ws.assert_check("1 routes, 0 keys (0 active, 0 expired, 0 revoked)").await;
}

// ---------------------------------------------------------------------------------------------
// 5. Forged checksums
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn forged_checksum_is_refused_before_lookup_even_when_its_hash_is_imported() {
    let prepared = Live::prepare().await;
    let key = prepared.1.create(&["--name", "genuine"]).await;
    let live = Live::start(prepared).await;
    live.expect(&key, OK, "the genuine key").await;

    let forged = forge(&key);
    assert_eq!(forged.len(), key.len());
    assert_ne!(
        &forged[forged.len() - 6..],
        base62_6(crc32(&forged.as_bytes()[..forged.len() - 6])),
        "test set-up: the forged key's checksum must fail"
    );
    let before = live.upstream.count();
    live.expect(&forged, INVALID, "a key with one character of its secret changed").await;

    // Give the forged key an entry of its own, the way an operator might by mistake.
    let forged_id = live.ws.import(&forged, &["--name", "forged"]).await;
    assert_eq!(field(&live.ws.entry(&forged_id), "hash"), sha256_ref(&forged));
    // A canary made after the import proves the gateway has loaded a file holding that entry.
    let canary = live.ws.create(&["--name", "canary"]).await;
    let imported = Instant::now();
    live.wait_for(&canary, (INVALID, OK), imported, "canary created after importing the forged key").await;
    live.expect(&forged, INVALID, "a forged key whose hash IS in the key file").await;
    assert!(
        live.upstream.requests().iter().all(|r| r.header("x-keygate-key-id") != Some(forged_id.as_str())),
        "the forged key never reached the upstream: {:#?}",
        live.upstream.requests()
    );

    // The same shape with a correct checksum is checked against the table: unknown → invalid.
    let signed = &forged[..forged.len() - 6];
    let resigned = format!("{signed}{}", base62_6(crc32(signed.as_bytes())));
    assert!(keygate::keys::plausible(&resigned, "kg"));
    live.expect(&resigned, INVALID, "a well-formed key that is in no entry").await;
    assert_eq!(
        live.upstream.count(),
        before + 1,
        "only the canary's 200 reached the upstream since the first forged attempt"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. rotate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rotate_keeps_both_keys_for_the_grace_and_ends_the_old_one_with_grace_0s() {
    let prepared = Live::prepare().await;
    let old = prepared
        .1
        .create(&["--name", "svc", "--scope", "read", "--scope", "write", "--rate-limit", "100/s"])
        .await;
    let live = Live::start(prepared).await;
    let ws = &live.ws;
    let old_id = old.split('_').nth(1).expect("id part").to_owned();
    live.expect(&old, OK, "the first key").await;

    // Default grace: 24 h of overlap.
    let ran = ws.keys_ok(&["rotate", "svc"]).await;
    let rotated_at = OffsetDateTime::now_utc();
    let second = ran.single_line();
    let second_id = assert_key_format(&second, "kg", &ran);
    assert!(!ran.stderr.contains(secret_part(&second)), "the new key goes to stdout only\n{ran}");
    let changed = Instant::now();
    live.wait_for(&second, (INVALID, OK), changed, "rotated key (default grace)").await;
    live.expect(&old, OK, "the old key during the default 24h grace").await;

    let old_view = ws.listed(&old_id).await;
    assert_eq!(old_view["status"], "active", "{old_view:#}");
    let old_end = old_view["expires"].as_str().unwrap_or_else(|| panic!("old key has no end: {old_view:#}"));
    assert_near(old_end, rotated_at + time::Duration::hours(24), time::Duration::minutes(2), "old key's end");
    let new_view = ws.listed(&second_id).await;
    assert_eq!(new_view["name"], "svc", "{new_view:#}");
    assert_eq!(new_view["scopes"], serde_json::json!(["read", "write"]), "{new_view:#}");
    assert_eq!(new_view["status"], "active", "{new_view:#}");
    assert_eq!(field(&ws.entry(&second_id), "rate_limit"), "100/s", "{}", ws.keys_text());

    // --grace 0s: the old key ends now.
    let ran = ws.keys_ok(&["rotate", &second_id, "--grace", "0s"]).await;
    let third = ran.single_line();
    let third_id = assert_key_format(&third, "kg", &ran);
    let changed = Instant::now();
    assert_eq!(ws.listed(&second_id).await["status"], "expired", "--grace 0s ends the old key at once");
    live.wait_for(&third, (INVALID, OK), changed, "rotated key (--grace 0s)").await;
    // The reload that brought the third key in carries the second one's end: no more waiting.
    live.expect(&second, EXPIRED, "the key rotated away with --grace 0s").await;
    live.expect(&old, OK, "the first key, still inside its own 24h grace").await;

    let third_view = ws.listed(&third_id).await;
    assert_eq!(third_view["name"], "svc", "{third_view:#}");
    assert_eq!(third_view["scopes"], serde_json::json!(["read", "write"]), "{third_view:#}");
    assert_eq!(field(&ws.entry(&third_id), "rate_limit"), "100/s", "{}", ws.keys_text());
    // The rate limit is carried on the wire too.
    let seen = live.expect(&third, OK, "the third key's rate limit").await;
    assert_eq!(seen.header("ratelimit-limit"), Some("100"), "rotated key keeps its 100/s limit\n{seen}");
    ws.assert_check("1 routes, 3 keys (2 active, 1 expired, 0 revoked)").await;
}

// ---------------------------------------------------------------------------------------------
// 7. Selectors
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn ambiguous_or_unknown_selectors_change_nothing_and_tails_select() {
    let ws = Workspace::offline();
    let first = ws.create(&["--name", "dup", "--scope", "read"]).await;
    let second = ws.create(&["--name", "dup", "--scope", "read"]).await;
    let (first_id, second_id) = (first.split('_').nth(1).unwrap(), second.split('_').nth(1).unwrap());
    let before = ws.keys_bytes().expect("key file");

    for command in [
        vec!["keys", "revoke", "dup"],
        vec!["keys", "delete", "dup"],
        vec!["keys", "rotate", "dup"],
        vec!["keys", "rotate", "dup", "--grace", "0s"],
    ] {
        let ran = ws.run(&command).await;
        ran.assert_failed();
        assert!(ran.stdout.is_empty(), "a refused command prints no key\n{ran}");
        for id in [first_id, second_id] {
            assert!(ran.stderr.contains(id), "stderr must list candidate {id}\n{ran}");
        }
        assert_eq!(ws.keys_bytes().as_deref(), Some(&before[..]), "the file must be unchanged\n{ran}");
    }

    for selector in ["nosuchkey", "zzzzzzzz", "ZZZZZZ", ""] {
        for verb in ["revoke", "delete", "rotate"] {
            let ran = ws.run(&["keys", verb, selector]).await;
            ran.assert_failed();
            assert!(ran.stdout.is_empty(), "{ran}");
            assert_eq!(ws.keys_bytes().as_deref(), Some(&before[..]), "the file must be unchanged\n{ran}");
        }
    }

    // A tail picks one key; an id always wins over a name.
    let tail = &second[second.len() - 6..];
    ws.keys_ok(&["revoke", tail]).await;
    assert_eq!(ws.listed(second_id).await["status"], "revoked", "revoked by its tail {tail}");
    assert_eq!(ws.listed(first_id).await["status"], "active", "the other dup is untouched");
    ws.keys_ok(&["delete", first_id]).await;
    assert_eq!(ws.ids(), [second_id], "{}", ws.keys_text());
    let named_like_an_id = ws.create(&["--name", second_id]).await;
    ws.keys_ok(&["delete", second_id]).await;
    let left = named_like_an_id.split('_').nth(1).unwrap();
    assert_eq!(ws.ids(), [left], "selecting {second_id} must take the key with that id, not the name");

    // Several keys with one tail are ambiguous as well.
    let ws = Workspace::offline();
    let a = ws.import("first-legacy-api-key-SAME42", &["--name", "a"]).await;
    let b = ws.import("second-legacy-api-key-SAME42", &["--name", "b"]).await;
    let before = ws.keys_bytes().expect("key file");
    let ran = ws.run(&["keys", "revoke", "SAME42"]).await;
    ran.assert_failed();
    assert!(ran.stderr.contains(&a) && ran.stderr.contains(&b), "stderr lists both ids\n{ran}");
    assert_eq!(ws.keys_bytes().as_deref(), Some(&before[..]), "the file must be unchanged\n{ran}");
}

// ---------------------------------------------------------------------------------------------
// 8. list
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn list_and_list_json_show_active_expired_and_revoked() {
    let ws = Workspace::offline();
    let started = OffsetDateTime::now_utc();
    let active = ws.import("legacy-api-key-active-0001", &["--name", "live", "--scope", "read"]).await;
    let future = ws
        .import(
            "legacy-api-key-future-0002",
            &["--name", "later", "--scope", "read", "--expires", "2999-06-30T12:00:00+02:00"],
        )
        .await;
    let expired = ws
        .import(
            "legacy-api-key-expired-0003",
            &["--name", "old", "--scope", "a", "--scope", "b", "--expires", "2020-01-01T00:00:00Z"],
        )
        .await;
    let revoked = ws.import("legacy-api-key-revoked-0004", &["--name", "gone", "--scope", "*"]).await;
    let both =
        ws.import("legacy-api-key-both-0005", &["--name", "both", "--expires", "2020-01-01T00:00:00Z"]).await;
    ws.keys_ok(&["revoke", &revoked]).await;
    ws.keys_ok(&["revoke", &both]).await;

    struct Expect {
        id: String,
        name: &'static str,
        tail: &'static str,
        scopes: &'static [&'static str],
        expires: Option<&'static str>,
        status: &'static str,
    }
    let expected = [
        Expect {
            id: active,
            name: "live",
            tail: "e-0001",
            scopes: &["read"],
            expires: None,
            status: "active",
        },
        Expect {
            id: future,
            name: "later",
            tail: "e-0002",
            scopes: &["read"],
            expires: Some("2999-06-30T10:00:00Z"),
            status: "active",
        },
        Expect {
            id: expired,
            name: "old",
            tail: "d-0003",
            scopes: &["a", "b"],
            expires: Some("2020-01-01T00:00:00Z"),
            status: "expired",
        },
        Expect {
            id: revoked,
            name: "gone",
            tail: "d-0004",
            scopes: &["*"],
            expires: None,
            status: "revoked",
        },
        Expect {
            id: both,
            name: "both",
            tail: "h-0005",
            scopes: &[],
            expires: Some("2020-01-01T00:00:00Z"),
            status: "revoked",
        },
    ];

    let list = ws.list_json().await;
    assert_eq!(list.len(), expected.len(), "{list:#?}");
    for (got, want) in list.iter().zip(&expected) {
        let context = format!("{got:#}\n--- keys.toml ---\n{}", ws.keys_text());
        assert_eq!(got["id"], want.id.as_str(), "listed in file order\n{context}");
        assert_eq!(got["name"], want.name, "{context}");
        assert_eq!(got["tail"], want.tail, "{context}");
        assert_eq!(got["scopes"], serde_json::json!(want.scopes), "{context}");
        assert_eq!(got["status"], want.status, "{context}");
        match want.expires {
            Some(at) => assert_eq!(got["expires"], at, "expires in UTC\n{context}"),
            None => assert!(got["expires"].is_null(), "no expiry is null\n{context}"),
        }
        let created = got["created"].as_str().unwrap_or_else(|| panic!("created is a string\n{context}"));
        assert_near(created, started, time::Duration::minutes(2), "created");
    }

    // The table: a header, then one aligned row per key, same content as the JSON.
    let ran = ws.keys_ok(&["list"]).await;
    let lines: Vec<&str> = ran.stdout.lines().collect();
    let header = ["ID", "NAME", "TAIL", "SCOPES", "CREATED", "EXPIRES", "STATUS"];
    assert_eq!(
        lines.first().map(|l| l.split_whitespace().collect::<Vec<_>>()),
        Some(header.to_vec()),
        "{ran}"
    );
    assert_eq!(lines.len(), 1 + expected.len(), "{ran}");
    let starts: Vec<usize> = header.iter().map(|h| lines[0].find(h).expect("header word")).collect();
    for (line, want) in lines[1..].iter().zip(&expected) {
        let cells: Vec<&str> = (0..header.len())
            .map(|i| {
                let end = starts.get(i + 1).copied().unwrap_or(line.len()).min(line.len());
                assert!(
                    starts[i] == 0 || line.as_bytes().get(starts[i] - 1) == Some(&b' '),
                    "column {} must start at offset {} in every row\n{ran}",
                    header[i],
                    starts[i]
                );
                line.get(starts[i]..end).unwrap_or("").trim()
            })
            .collect();
        // The table shows "-" for a key without scopes, so every row has seven cells.
        let scopes = if want.scopes.is_empty() { "-".to_string() } else { want.scopes.join(",") };
        assert_eq!(cells[0], want.id, "ID column\n{ran}");
        assert_eq!(cells[1], want.name, "NAME column\n{ran}");
        assert_eq!(cells[2], want.tail, "TAIL column\n{ran}");
        assert_eq!(cells[3], scopes, "SCOPES column\n{ran}");
        assert_near(cells[4], started, time::Duration::minutes(2), "CREATED column");
        assert_eq!(cells[5], want.expires.unwrap_or("never"), "EXPIRES column\n{ran}");
        assert_eq!(cells[6], want.status, "STATUS column\n{ran}");
    }
    ws.assert_check("1 routes, 5 keys (2 active, 1 expired, 2 revoked)").await;
}

// ---------------------------------------------------------------------------------------------
// 9. import and hash
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn import_and_hash_ignore_surrounding_whitespace_and_refuse_empty_input() {
    let ws = Workspace::offline();
    let key = "legacy-key-0123456789abcdef";
    let padded = format!("  \n\t {key} \r\n\n");
    let id = ws.import(&padded, &["--name", "legacy", "--scope", "read"]).await;
    let entry = ws.entry(&id);
    assert_eq!(field(&entry, "hash"), sha256_ref(key), "the hash of the trimmed key\n{}", ws.keys_text());
    assert_eq!(field(&entry, "tail"), "abcdef", "{}", ws.keys_text());
    assert!(!ws.keys_text().contains("0123456789"), "no more than the tail is stored\n{}", ws.keys_text());

    for input in [padded.as_str(), key] {
        let ran = ws.run_stdin(&["keys", "hash"], input).await;
        let line = ran.single_line();
        assert_eq!(line, sha256_ref(key), "keys hash of the trimmed key\n{ran}");
        assert_eq!(line, field(&entry, "hash"), "keys hash agrees with the stored hash\n{ran}");
    }

    let before = ws.keys_bytes().expect("key file");
    for input in ["", "   \n\t \r\n"] {
        let ran = ws.run_stdin(&["keys", "import", "--name", "empty"], input).await;
        ran.assert_failed();
        assert!(ran.stdout.is_empty(), "{ran}");
        assert_eq!(ws.keys_bytes().as_deref(), Some(&before[..]), "an empty import writes nothing\n{ran}");
        let ran = ws.run_stdin(&["keys", "hash"], input).await;
        ran.assert_failed();
        assert!(ran.stdout.is_empty(), "no hash for no key\n{ran}");
    }

    // The same key again, however padded, is refused and names the entry that has it.
    let ran = ws.run_stdin(&["keys", "import", "--name", "again"], &format!("{key}\n")).await;
    ran.assert_failed();
    assert!(ran.stdout.is_empty(), "{ran}");
    assert!(ran.stderr.contains(&id), "the refusal names the existing id {id}\n{ran}");
    assert_eq!(ws.keys_bytes().as_deref(), Some(&before[..]), "a duplicate import writes nothing\n{ran}");
    ws.assert_check("1 routes, 1 keys (1 active, 0 expired, 0 revoked)").await;
}

// ---------------------------------------------------------------------------------------------
// 10. Invalid input writes nothing
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_inputs_are_refused_and_write_nothing() {
    let bad: &[(&str, &[&str])] = &[
        ("rate limit 0/s", &["--rate-limit", "0/s"]),
        ("rate limit per day", &["--rate-limit", "10/d"]),
        ("rate limit text", &["--rate-limit", "fast"]),
        ("rate limit empty", &["--rate-limit", ""]),
        ("rate limit negative", &["--rate-limit", "-1/s"]),
        ("expiry text", &["--expires", "soon"]),
        ("expiry month 13", &["--expires", "2030-13-01T00:00:00Z"]),
        ("expiry 30 February", &["--expires", "2030-02-30T00:00:00Z"]),
        ("expiry unknown unit", &["--expires", "12parsecs"]),
        ("expiry empty", &["--expires", ""]),
        ("scope with a comma", &["--scope", "read,write"]),
        ("scope with a space", &["--scope", "read write"]),
        ("scope with a quote", &["--scope", "re\"ad"]),
        ("scope empty", &["--scope", ""]),
    ];
    let bad_names = ["", "   ", "line\nbreak", "tab\there"];

    // Once with no key file (it must not be created), once with a commented one (byte for byte).
    for initial in [None, Some(commented_keys())] {
        let ws = Workspace::offline();
        if let Some(text) = &initial {
            std::fs::write(ws.keys_path(), text).expect("write keys.toml");
        }
        let before = ws.keys_bytes();
        let mut cases: Vec<(String, Vec<&str>, Option<&str>)> = Vec::new();
        for (what, flags) in bad {
            for verb in ["create", "import"] {
                let mut args = vec!["keys", verb, "--name", "svc"];
                args.extend_from_slice(flags);
                let stdin = (verb == "import").then_some("some-legacy-key-0001");
                cases.push((format!("{verb}: {what}"), args, stdin));
            }
        }
        for name in bad_names {
            cases.push((format!("create: name {name:?}"), vec!["keys", "create", "--name", name], None));
            let stdin = Some("some-legacy-key-0002");
            cases.push((format!("import: name {name:?}"), vec!["keys", "import", "--name", name], stdin));
        }
        if initial.is_some() {
            for (what, flags) in [
                ("grace text", ["--grace", "soon"]),
                ("grace negative", ["--grace", "-1h"]),
                ("rotate expiry text", ["--expires", "soon"]),
            ] {
                let mut args = vec!["keys", "rotate", "billing1"];
                args.extend_from_slice(&flags);
                cases.push((format!("rotate: {what}"), args, None));
            }
        }
        for (what, args, stdin) in cases {
            let ran = match stdin {
                Some(input) => ws.run_stdin(&args, input).await,
                None => ws.run(&args).await,
            };
            assert!(ran.code.is_some_and(|c| c != 0), "{what}: must be refused\n{ran}");
            assert!(ran.stdout.is_empty(), "{what}: a refused command prints no key or id\n{ran}");
            assert_eq!(ws.keys_bytes(), before, "{what}: the key file must be unchanged\n{ran}");
            assert!(ws.leftovers().is_empty(), "{what}: files left behind: {:?}\n{ran}", ws.leftovers());
        }
        if initial.is_some() {
            ws.assert_check("1 routes, 2 keys (2 active, 0 expired, 0 revoked)").await;
        }
    }

    // A key file that keygate would refuse is not "fixed" by an edit: nothing is written.
    let broken = commented_keys().replace("name = \"reports\"", "name = \"reports\"\ncolour = \"blue\"");
    let ws = Workspace::offline().with_keys(&broken);
    for (args, stdin) in [
        (vec!["keys", "create", "--name", "svc"], None),
        (vec!["keys", "import", "--name", "svc"], Some("some-legacy-key-0003")),
        (vec!["keys", "revoke", "billing1"], None),
        (vec!["keys", "rotate", "billing1"], None),
        (vec!["keys", "delete", "billing1"], None),
    ] {
        let ran = match stdin {
            Some(input) => ws.run_stdin(&args, input).await,
            None => ws.run(&args).await,
        };
        ran.assert_failed();
        assert!(ran.stdout.is_empty(), "{ran}");
        assert_eq!(ws.keys_text(), broken, "an edit of an invalid file writes nothing\n{ran}");
        assert!(ws.leftovers().is_empty(), "files left behind: {:?}\n{ran}", ws.leftovers());
    }
}

// ---------------------------------------------------------------------------------------------
// 11. Rate limits on the wire
// ---------------------------------------------------------------------------------------------

#[track_caller]
fn header_u64(exchange: &Exchange, name: &str) -> u64 {
    exchange
        .header(name)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("expected a numeric {name} header\n{exchange}"))
}

#[tokio::test]
async fn rate_limits_allow_the_burst_refuse_with_retry_after_refill_and_survive_reloads() {
    let prepared = Live::prepare().await;
    let ws = &prepared.1;
    // The exact burst is judged on 3/m (a token every 20 s), so how fast this machine sends
    // four requests cannot matter; the refill is watched on 3/s.
    let per_minute = ws.create(&["--name", "burst", "--rate-limit", "3/m"]).await;
    let per_second = ws.create(&["--name", "refill", "--rate-limit", "3/s"]).await;
    let hourly = ws.create(&["--name", "hourly", "--rate-limit", "2/h"]).await;
    let other = ws.create(&["--name", "other"]).await;
    let live = Live::start(prepared).await;

    // 3/m: exactly three back to back, then 429.
    let mut burst = Vec::new();
    for _ in 0..4 {
        burst.push(live.with(&per_minute)().send().await);
    }
    for (n, exchange) in burst[..3].iter().enumerate() {
        let context = format!("request {} of a 3/m burst", n + 1);
        assert_want(exchange, &live.upstream, OK, &context);
        assert_eq!(header_u64(exchange, "ratelimit-limit"), 3, "{context}\n{exchange}");
        assert_eq!(header_u64(exchange, "ratelimit-remaining"), 2 - n as u64, "{context}\n{exchange}");
        assert!(header_u64(exchange, "ratelimit-reset") <= 60, "{context}\n{exchange}");
    }
    let fourth = &burst[3];
    let context = "4th request of a 3/m burst";
    assert_want(fourth, &live.upstream, Want::Rejected(429, "rate_limited"), context);
    assert!((1..=20).contains(&header_u64(fourth, "retry-after")), "{context}: a token every 20 s\n{fourth}");
    assert_eq!(header_u64(fourth, "ratelimit-limit"), 3, "{context}\n{fourth}");
    assert_eq!(header_u64(fourth, "ratelimit-remaining"), 0, "{context}\n{fourth}");
    assert!((40..=60).contains(&header_u64(fourth, "ratelimit-reset")), "{context}: full in 60 s\n{fourth}");

    // 3/s: requests until the first 429 (three, plus whatever refilled meanwhile; bounded).
    let burst_started = Instant::now();
    let mut refused = None;
    for n in 1..=30 {
        let exchange = live.with(&per_second)().send().await;
        if exchange.status == 429 {
            refused = Some((n, exchange));
            break;
        }
        assert_want(&exchange, &live.upstream, OK, &format!("request {n} of a 3/s burst"));
    }
    let (n, refused) = refused.expect("30 requests on a 3/s key must meet a 429");
    assert!(n >= 4, "a 3/s key refused request {n}: its burst of 3 was not honoured\n{refused}");
    assert_want(&refused, &live.upstream, Want::Rejected(429, "rate_limited"), "3/s over its burst");
    assert_eq!(refused.header("retry-after"), Some("1"), "a token every 333 ms\n{refused}");
    let key = per_second;

    // After the refill it passes again. It cannot pass before a third of a second has gone by
    // since the bucket was first used: one more token than a bucket of 3 holds, refilled at 3/s.
    let refused_at = Instant::now();
    let refill = wait_for(
        live.with(&key),
        &live.upstream,
        (Want::Rejected(429, "rate_limited"), OK),
        refused_at,
        "3/s refill",
        || live.context(),
    )
    .await;
    let since_burst = burst_started.elapsed();
    assert!(
        since_burst >= Duration::from_millis(330),
        "a 4th token within {} of the first request: the bucket refilled too fast (refill seen {} after the 429)",
        ms(since_burst),
        ms(refill)
    );

    // 2/h: two, then a wait of about half an hour for the next token.
    for remaining in [1, 0] {
        let seen = live.expect(&hourly, OK, "2/h key within its burst").await;
        assert_eq!(header_u64(&seen, "ratelimit-limit"), 2, "{seen}");
        assert_eq!(header_u64(&seen, "ratelimit-remaining"), remaining, "{seen}");
    }
    let refused = live.expect(&hourly, Want::Rejected(429, "rate_limited"), "3rd request of 2/h").await;
    let retry_after = header_u64(&refused, "retry-after");
    assert!((1_790..=1_800).contains(&retry_after), "2/h: a token every 1800 s\n{refused}");
    assert_eq!(header_u64(&refused, "ratelimit-limit"), 2, "{refused}");
    assert_eq!(header_u64(&refused, "ratelimit-remaining"), 0, "{refused}");
    assert!((3_580..=3_600).contains(&header_u64(&refused, "ratelimit-reset")), "{refused}");

    // An unlimited key gets no RateLimit-* headers.
    let seen = live.expect(&other, OK, "a key without a rate limit").await;
    assert!(seen.header("ratelimit-limit").is_none(), "no limit, no RateLimit-Limit\n{seen}");

    // Editing another key reloads the file; the hourly bucket must stay empty.
    let generation = live.gateway.status().generation;
    live.ws.keys_ok(&["revoke", "other"]).await;
    let changed = Instant::now();
    live.wait_for(&other, (OK, REVOKED), changed, "revoke another key").await;
    assert!(live.gateway.status().generation > generation, "{:?}", live.gateway.status());
    let after = live.expect(&hourly, Want::Rejected(429, "rate_limited"), "2/h key after a reload").await;
    assert!(
        header_u64(&after, "retry-after") >= 1_700,
        "a reload must not refill or reset the bucket\n{after}\nbefore the reload:\n{refused}"
    );
}

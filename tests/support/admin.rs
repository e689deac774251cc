//! A real `keygate serve` with admin tokens made by `keygate admin token`, an audit log and a
//! recording upstream, and a client for its key API (SPEC §10).

use std::path::PathBuf;

use http::Method;

use super::served::Served;
use super::{Call, Exchange, Key, RecordingUpstream, Route, keygate_command, keys_toml};

/// A key in the key file from the start.
pub const SEED_SECRET: &str = "seed-secret-0123456789abcdef";
pub const SEED_ID: &str = "seed0001";

pub struct AdminGateway {
    pub served: Served,
    pub dir: tempfile::TempDir,
    pub upstream: RecordingUpstream,
    /// Admin tokens by name, as `keygate admin token` printed them.
    pub tokens: Vec<(String, String)>,
    /// The `[admin] tokens` entries `keygate admin token` printed, by name.
    pub lines: Vec<(String, String)>,
}

/// Runs the real `keygate admin token --name NAME`; returns (token from stdout, entry from stderr).
pub async fn admin_token(dir: &std::path::Path, name: &str) -> (String, String) {
    let output = keygate_command(dir)
        .args(["admin", "token", "--name", name])
        .output()
        .await
        .expect("run keygate admin token");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(output.status.success(), "keygate admin token failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let token = stdout.trim().to_string();
    assert_eq!(stdout.lines().count(), 1, "stdout is the token alone\n{stdout}");
    let line = stderr
        .lines()
        .find(|l| l.trim_start().starts_with("{ name"))
        .unwrap_or_else(|| panic!("no `{{ name, hash }}` line on stderr:\n{stderr}"))
        .trim()
        .to_string();
    assert!(!stderr.contains(&token), "the token goes to stdout only\n{stderr}");
    (token, line)
}

impl AdminGateway {
    /// One token named "ops".
    pub async fn start() -> Self {
        Self::with_tokens(&["ops"]).await
    }

    pub async fn with_tokens(names: &[&str]) -> Self {
        let upstream = RecordingUpstream::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let mut tokens = Vec::new();
        let mut lines = Vec::new();
        for name in names {
            let (token, line) = admin_token(dir.path(), name).await;
            tokens.push((name.to_string(), token));
            lines.push((name.to_string(), line));
        }
        let gateway =
            Self::gateway_toml(&upstream, &lines.iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>());
        std::fs::write(dir.path().join("keygate.toml"), gateway).expect("write keygate.toml");
        std::fs::write(
            dir.path().join("keys.toml"),
            keys_toml(&[Key::new(SEED_ID, "seed", SEED_SECRET, &["read"])]),
        )
        .expect("write keys.toml");
        let served = Served::start(&dir.path().join("keygate.toml")).await;
        Self { served, dir, upstream, tokens, lines }
    }

    /// keygate.toml with these `[admin] tokens` entries, an audit log, and one route that
    /// needs `read` for GET and `write` for anything else.
    pub fn gateway_toml(upstream: &RecordingUpstream, token_lines: &[&str]) -> String {
        let route = Route::new("/", &upstream.url()).scope("GET", &["read"]).scope("*", &["write"]);
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nrequest_timeout = \"5s\"\n\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntokens = [{}]\naudit_log = \"audit.jsonl\"\n\n\
             [auth]\nkeys_file = \"keys.toml\"\n\n{}",
            token_lines.join(", "),
            route.to_toml()
        )
    }

    pub fn token(&self, name: &str) -> &str {
        self.tokens.iter().find(|(n, _)| n == name).map(|(_, t)| t.as_str()).expect("a token by that name")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("keygate.toml")
    }

    pub fn keys_path(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }

    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// A key API call with the first token.
    pub fn api(&self, method: Method, path: &str) -> Call {
        let token = &self.tokens[0].1;
        self.anonymous(method, path).header("authorization", &format!("Bearer {token}"))
    }

    /// A call to the admin listener with no token.
    pub fn anonymous(&self, method: Method, path: &str) -> Call {
        Call::new(self.served.admin, method, path)
    }

    /// A JSON body for [`Call::body`], with its content-type.
    pub fn json_call(call: Call, body: &serde_json::Value) -> Call {
        call.header("content-type", "application/json").body(body.to_string())
    }

    /// `POST /keys` with `body`; the answer must be 201 with the key and its id.
    pub async fn create(&self, body: serde_json::Value) -> (String, serde_json::Value) {
        let exchange = Self::json_call(self.api(Method::POST, "/keys"), &body).send().await;
        assert_eq!(exchange.status, 201, "POST /keys {body}\n{exchange}");
        let json = exchange.json().unwrap_or_else(|| panic!("not JSON\n{exchange}"));
        let key =
            json["key"].as_str().unwrap_or_else(|| panic!("no key in the answer\n{exchange}")).to_string();
        (key, json)
    }

    /// `GET /data` on the gateway with `key`.
    pub async fn use_key(&self, key: &str) -> Exchange {
        self.served.get("/data", key).send().await
    }

    /// The audit log's lines, parsed; none if it does not exist yet.
    pub fn audit_lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(self.audit_path()).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON: {e}\n{l}")))
            .collect()
    }
}

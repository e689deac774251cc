//! A real `keygate serve` process: started from the built binary, its stderr collected line by
//! line, its gateway and admin addresses read from the log; stopped with SIGTERM or killed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Method;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use super::{Call, Exchange, IO_TIMEOUT};

pub struct Served {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config: PathBuf,
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

/// The address after `marker` in a log line (`listening on 127.0.0.1:4000`).
fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let after = &line[line.find(marker)? + marker.len()..];
    let token: String =
        after.trim_start().chars().take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':').collect();
    token.parse().ok()
}

impl Served {
    /// Starts `keygate serve -c config` (whose `[admin] listen` must be set) and waits until
    /// both listeners are up.
    pub async fn start(config: &Path) -> Self {
        let mut command = super::keygate_command(config.parent().expect("config folder"));
        command.arg("serve").arg("-c").arg(config).stdout(Stdio::null()).env("RUST_LOG", "info");
        let mut child = command.spawn().expect("start keygate serve");
        let stderr = child.stderr.take().expect("piped stderr");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        tokio::spawn(async move {
            let mut stderr = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = stderr.next_line().await {
                sink.lock().expect("lines").push(super::strip_ansi(&line));
            }
        });
        let mut served = Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
            config: config.to_path_buf(),
            child,
            lines,
        };
        served.addr = served
            .wait_for("`listening on ADDR`", |l| {
                (!l.contains("admin listening on")).then(|| addr_after(l, "listening on")).flatten()
            })
            .await;
        served.admin =
            served.wait_for("`admin listening on ADDR`", |l| addr_after(l, "admin listening on")).await;
        served
    }

    /// Polls stderr (bounded) until `pick` finds something in a line.
    pub async fn wait_for<T>(&mut self, what: &str, pick: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(found) = self.lines.lock().expect("lines").iter().find_map(|l| pick(l)) {
                return found;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("keygate serve exited ({status}) before logging {what}:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "keygate serve never logged {what}:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn log(&self) -> String {
        self.lines.lock().expect("lines").join("\n")
    }

    /// Log lines containing `text`.
    pub fn lines_with(&self, text: &str) -> Vec<String> {
        self.lines.lock().expect("lines").iter().filter(|l| l.contains(text)).cloned().collect()
    }

    pub fn get(&self, target: &str, key: &str) -> Call {
        Call::new(self.addr, Method::GET, target).header("x-api-key", key)
    }

    pub async fn admin_get(&self, path: &str) -> Exchange {
        Call::new(self.admin, Method::GET, path).send().await
    }

    /// `/status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let exchange = self.admin_get("/status").await;
        exchange.json().unwrap_or_else(|| panic!("/status is not JSON\n{exchange}"))
    }

    /// Polls `/status` (bounded, 10 s) until `done` holds for it; fails showing the last one.
    pub async fn wait_status(
        &self,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = self.status().await;
            if done(&status) {
                return status;
            }
            assert!(Instant::now() < deadline, "/status never showed {what}: {status:#}\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM, then waits (bounded) for a clean exit: what a deploy does.
    pub async fn terminate(mut self) -> String {
        let pid = self.child.id().expect("running child").to_string();
        let _ = std::process::Command::new("kill").arg("-TERM").arg(pid).status();
        let status = tokio::time::timeout(IO_TIMEOUT * 3, self.child.wait()).await;
        assert!(
            matches!(status, Ok(Ok(s)) if s.success()),
            "keygate did not exit cleanly on SIGTERM: {status:?}\n{}",
            self.log()
        );
        self.log()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

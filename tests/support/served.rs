//! A real `keygate serve` with an admin listener, as the fleet tests drive it: a
//! [`Process`](super::process::Process) plus its two addresses, requests with a key, `/status`
//! polling, and the two ways a replica stops (SIGTERM, SIGKILL).

use http::Method;
use std::net::SocketAddr;
use std::path::Path;

use super::poll::{Attempts, DEADLINE};
use super::process::{PROCESS_TIMEOUT, Process};
use super::{Call, Exchange};

pub struct Served {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    process: Process,
}

impl Served {
    /// Starts `keygate serve -c config` (whose `[admin] listen` must be set) and waits until
    /// both listeners are up.
    pub async fn start(config: &Path) -> Self {
        let mut process = Process::serve(config);
        let addr = process.listening_addr().await;
        let admin = process.admin_addr().await;
        Self { addr, admin, process }
    }

    /// The log so far, for failure messages.
    pub fn log(&mut self) -> String {
        self.process.stderr.drain();
        self.process.transcript()
    }

    /// How many log lines so far contain `text`.
    pub fn count(&mut self, text: &str) -> usize {
        self.process.stderr.drain();
        self.process.count(text)
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

    /// Polls `/status` (bounded: twice [`DEADLINE`], Redis being probed every half second)
    /// until `done` holds for it; fails showing the last one.
    pub async fn wait_status(
        &self,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut poll = Attempts::within(DEADLINE * 2);
        let mut status = serde_json::Value::Null;
        while poll.again().await {
            status = self.status().await;
            if done(&status) {
                return status;
            }
        }
        panic!("/status never showed {what} ({}): {status:#}\n{}", poll.report(), self.process.transcript());
    }

    /// SIGTERM, then waits (bounded) for a clean exit: what a deploy does.
    pub async fn terminate(mut self) {
        self.process.signal("TERM");
        let status = tokio::time::timeout(PROCESS_TIMEOUT, self.process.child.wait()).await;
        assert!(
            matches!(status, Ok(Ok(s)) if s.success()),
            "keygate did not exit cleanly on SIGTERM: {status:?}\n{}",
            self.log()
        );
    }

    /// SIGKILL, and waits until the process is gone: a crash, with no shutdown work.
    pub async fn kill(mut self) {
        self.process.kill_and_collect().await;
    }
}

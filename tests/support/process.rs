//! A running `keygate` child process for tests: its stdout and stderr read line by line (ANSI
//! colours stripped) by tasks, waited on with deadlines, its listening addresses parsed from
//! the log, and the child killed when dropped so a failing test leaks nothing; [`Served`] is
//! one `keygate serve` with its two listeners up, as the fleet tests drive replicas.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use http::Method;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::poll::{Attempts, DEADLINE};
use super::{Call, Exchange, keygate_command, strip_ansi};

/// Bound on a whole short run of the binary (`check`, `keys …`), on a server reaching
/// "listening on", and on its exit.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(30);

/// Lines of one output stream of a child, read by a task, collected with deadlines.
pub struct Lines {
    rx: Option<mpsc::UnboundedReceiver<String>>,
    /// Every line collected so far.
    pub seen: Vec<String>,
}

impl Lines {
    fn read(stream: impl AsyncRead + Unpin + Send + 'static) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stream);
            let mut line = Vec::new();
            // Ends at EOF, i.e. when the child exits.
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = strip_ansi(&String::from_utf8_lossy(&line));
                        if tx.send(text.trim_end().to_owned()).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        Self { rx: Some(rx), seen: Vec::new() }
    }

    /// A stream that was not piped: never any lines.
    fn none() -> Self {
        Self { rx: None, seen: Vec::new() }
    }

    /// Collects lines until `done(all lines so far)` holds (true), EOF or `deadline` (false).
    pub async fn wait_until(&mut self, deadline: Instant, mut done: impl FnMut(&[String]) -> bool) -> bool {
        loop {
            if done(&self.seen) {
                return true;
            }
            let Some(rx) = self.rx.as_mut() else { return false };
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) => {
                    self.rx = None;
                    return done(&self.seen);
                }
                Err(_) => return false,
            }
        }
    }

    /// Collects the lines that have already arrived, without waiting.
    pub fn drain(&mut self) {
        if let Some(rx) = self.rx.as_mut() {
            while let Ok(line) = rx.try_recv() {
                self.seen.push(line);
            }
        }
    }

    /// How many lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.seen.iter().filter(|l| l.contains(needle)).count()
    }
}

/// A running `keygate`, killed when dropped.
pub struct Process {
    pub child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

impl Process {
    /// Starts `command` (normally from [`keygate_command`]); reads whichever of stdout and
    /// stderr it pipes.
    pub fn spawn(mut command: Command) -> Self {
        let mut child =
            command.spawn().unwrap_or_else(|e| panic!("could not start {:?}: {e}", command.as_std()));
        let stdout = child.stdout.take().map_or_else(Lines::none, Lines::read);
        let stderr = child.stderr.take().map_or_else(Lines::none, Lines::read);
        Self { child, stdout, stderr }
    }

    /// `keygate serve -c CONFIG`, run in the config's folder with a clean environment; stderr
    /// (the log) is read, stdout dropped.
    pub fn serve(config: &Path) -> Self {
        let mut command = keygate_command(config.parent().expect("the config file's folder"));
        command.arg("serve").arg("-c").arg(config).stdout(Stdio::null());
        Self::spawn(command)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("the child is running")
    }

    /// Sends `signal` (`HUP`, `TERM`, …) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(&pid)
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed: {status}");
    }

    /// How many stderr lines so far contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.stderr.count(needle)
    }

    /// Collects stderr until `done(self)` holds (true), stderr closes or `within` passes.
    pub async fn wait_until(&mut self, within: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if done(self) {
                return true;
            }
            let Some(rx) = self.stderr.rx.as_mut() else { return false };
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(line)) => self.stderr.seen.push(line),
                Ok(None) => {
                    self.stderr.rx = None;
                    return done(self);
                }
                Err(_) => return false,
            }
        }
    }

    /// Waits up to [`PROCESS_TIMEOUT`] for a stderr line for which `pick` gives a value;
    /// fails the test, showing the log, if none comes.
    pub async fn wait_line<T>(&mut self, what: &str, pick: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        self.stderr.wait_until(deadline, |lines| lines.iter().any(|l| pick(l).is_some())).await;
        match self.stderr.seen.iter().find_map(|l| pick(l)) {
            Some(found) => found,
            None => panic!("no {what} on stderr\n{}", self.transcript()),
        }
    }

    /// The gateway's address, from its `listening on ADDR` log line.
    pub async fn listening_addr(&mut self) -> SocketAddr {
        self.wait_line("`listening on 127.0.0.1:PORT`", listening_on).await
    }

    /// The admin listener's address, from its `admin listening on ADDR` log line.
    pub async fn admin_addr(&mut self) -> SocketAddr {
        self.wait_line("`admin listening on 127.0.0.1:PORT`", |l| addr_after(l, "admin listening on")).await
    }

    /// Kills the child and collects whatever it wrote until its pipes close.
    pub async fn kill_and_collect(&mut self) {
        let _ = self.child.start_kill();
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        let _ = tokio::time::timeout_at(deadline, self.child.wait()).await;
        self.stdout.wait_until(deadline, |_| false).await;
        self.stderr.wait_until(deadline, |_| false).await;
    }

    /// Every line so far, stdout then stderr.
    pub fn all_lines(&self) -> impl Iterator<Item = &String> {
        self.stdout.seen.iter().chain(&self.stderr.seen)
    }

    /// What the child wrote so far, for failure messages (the last 80 lines of stderr).
    pub fn transcript(&self) -> String {
        let mut out = String::new();
        if !self.stdout.seen.is_empty() {
            let _ = writeln!(out, "--- keygate stdout ---\n{}", self.stdout.seen.join("\n"));
        }
        let skip = self.stderr.seen.len().saturating_sub(80);
        let _ =
            write!(out, "--- keygate stderr (last 80 lines) ---\n{}", self.stderr.seen[skip..].join("\n"));
        out
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// The address after `marker` in a log line, plain text (`listening on 127.0.0.1:4000`) or
/// JSON (`"listening on 127.0.0.1:4000"`, or an `addr` field after it).
pub fn addr_after(line: &str, marker: &str) -> Option<SocketAddr> {
    let after = &line[line.find(marker)? + marker.len()..];
    let start = after.find(|c: char| c.is_ascii_digit())?;
    let candidate = &after[start..];
    let end =
        candidate.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == ':')).unwrap_or(candidate.len());
    candidate[..end].parse().ok()
}

/// The gateway's (not the admin listener's) address in a `listening on ADDR` log line.
pub fn listening_on(line: &str) -> Option<SocketAddr> {
    if line.contains("admin listening on") {
        return None;
    }
    addr_after(line, "listening on")
}

/// A real `keygate serve` with an admin listener: a [`Process`] plus its two addresses,
/// requests with a key, `/status` polling, and the two ways a replica stops (SIGTERM, SIGKILL).
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

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends `signal` (`HUP`, `TERM`, …) to the process.
    pub fn signal(&self, signal: &str) {
        self.process.signal(signal);
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

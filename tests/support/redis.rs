//! A real `redis-server` for the tests: started on a free loopback port with persistence off,
//! paused, resumed, killed and restarted by its pid, and killed when dropped.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Where the Debian package puts the server; else whatever `PATH` finds.
fn binary() -> String {
    for candidate in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_string();
        }
    }
    let found = Command::new("sh").arg("-c").arg("command -v redis-server").output();
    match found {
        Ok(out) if out.status.success() && !out.stdout.is_empty() => {
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        }
        _ => panic!("these tests need a Redis server: apt-get install redis-server"),
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a probe port");
    probe.local_addr().expect("probe addr").port()
}

pub struct RedisServer {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts a server on a free port and waits (bounded) until it answers PING.
    pub async fn start() -> Self {
        Self::start_at(free_port()).await
    }

    /// A server on `port` (from [`free_port`]), for a test that names the address first.
    pub async fn start_at(port: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis");
        let mut server = Self { addr: SocketAddr::from(([127, 0, 0, 1], port)), child: None, dir };
        server.spawn().await;
        server
    }

    /// `redis://127.0.0.1:PORT/0`
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    async fn spawn(&mut self) {
        let child = Command::new(binary())
            .args(["--port", &self.addr.port().to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "yes"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start redis-server: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server on {} did not answer PING within 10 s", self.addr);
    }

    /// Whether the server answers PING within 500 ms.
    pub async fn ping(&self) -> bool {
        self.command(&["PING"]).await.is_some_and(|reply| reply.starts_with("+PONG"))
    }

    /// Sends one command (RESP array) and returns the raw reply, within 500 ms.
    pub async fn command(&self, args: &[&str]) -> Option<String> {
        let exchange = async {
            let mut stream = TcpStream::connect(self.addr).await.ok()?;
            let mut request = format!("*{}\r\n", args.len());
            for arg in args {
                request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
            }
            stream.write_all(request.as_bytes()).await.ok()?;
            let mut reply = vec![0u8; 4096];
            let n = stream.read(&mut reply).await.ok()?;
            Some(String::from_utf8_lossy(&reply[..n]).into_owned())
        };
        tokio::time::timeout(Duration::from_millis(500), exchange).await.ok().flatten()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(signal).arg(self.pid().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill {signal} {} failed", self.pid());
    }

    /// SIGSTOP: the server keeps its connections but answers nothing ("slow").
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT: it answers again, the queued commands first.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    /// SIGKILL ("gone"): every connection is refused until [`Self::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A fresh, empty server on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // A paused server ignores SIGKILL's wait until continued on some systems: resume first.
            let _ = Command::new("kill").arg("-CONT").arg(child.id().to_string()).status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

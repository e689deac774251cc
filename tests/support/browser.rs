//! A real headless Chromium, driven through chromedriver (WebDriver), and a tiny page server
//! to give its scripts an origin of their own.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{Call, IO_TIMEOUT, require_program};

/// How long chromedriver may take to come up and Chromium to start a session.
const STARTUP: Duration = Duration::from_secs(60);

/// A headless Chromium session with a fresh profile; [`Browser::close`] ends it.
pub struct Browser {
    pub client: fantoccini::Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub async fn start() -> Self {
        // Debian's names; each missing one fails the test with one sentence saying what to install.
        let chromium = require_program("chromium", "apt-get install chromium");
        let chromedriver = require_program("chromedriver", "apt-get install chromium-driver");
        // A free port for chromedriver: it cannot report one it picked itself.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        let mut command = tokio::process::Command::new(&chromedriver);
        command
            .arg(format!("--port={port}"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own process group, so the browsers it starts can be ended with it.
            .process_group(0)
            .kill_on_drop(true);
        let driver =
            command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", chromedriver.display()));
        let driver_addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_ready(driver_addr).await;

        let profile = tempfile::tempdir().expect("a temp dir for the browser profile");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let mut capabilities = fantoccini::wd::Capabilities::new();
        capabilities.insert(
            "goog:chromeOptions".to_string(),
            serde_json::json!({ "binary": chromium.to_string_lossy(), "args": args }),
        );
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let mut builder = fantoccini::ClientBuilder::new(connector);
        builder.capabilities(capabilities);
        let driver_url = format!("http://{driver_addr}");
        let connecting = builder.connect(&driver_url);
        let client = match tokio::time::timeout(STARTUP, connecting).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                kill_group(driver.id());
                panic!("chromedriver could not start {}: {e}", chromium.display())
            }
            Err(_) => {
                kill_group(driver.id());
                panic!("Chromium did not start within {STARTUP:?}")
            }
        };
        Self { client, driver, _profile: profile }
    }

    /// Runs `script` (an async WebDriver script: its last argument is the callback) with
    /// `args`, and returns what it passed to the callback.
    pub async fn run(&self, script: &str, args: Vec<serde_json::Value>) -> serde_json::Value {
        match tokio::time::timeout(IO_TIMEOUT * 3, self.client.execute_async(script, args)).await {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => panic!("the script failed in the browser: {e}\n{script}"),
            Err(_) => panic!("the script did not finish in the browser\n{script}"),
        }
    }

    /// Ends the session (Chromium quits); dropping it then ends chromedriver.
    pub async fn close(self) {
        let _ = tokio::time::timeout(IO_TIMEOUT, self.client.clone().close()).await;
    }
}

/// Kills chromedriver's process group (it and any browser it started).
fn kill_group(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
    }
}

/// Polls chromedriver's `/status` until it says it is ready.
async fn wait_ready(addr: SocketAddr) {
    let deadline = tokio::time::Instant::now() + STARTUP;
    let mut last = String::from("no answer yet");
    while tokio::time::Instant::now() < deadline {
        match Call::new(addr, Method::GET, "/status").try_send().await {
            Ok(answer)
                if answer.json().is_some_and(|j| j["value"]["ready"] == serde_json::Value::Bool(true)) =>
            {
                return;
            }
            Ok(answer) => last = answer.to_string(),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chromedriver on {addr} was not ready within {STARTUP:?}; last answer:\n{last}");
}

/// Serves one HTML page at every path on 127.0.0.1:0: an origin for a test's scripts.
pub struct PageServer {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl PageServer {
    pub async fn start(html: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the page server");
        let addr = listener.local_addr().expect("page server addr");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = service_fn(move |_request| async move {
                        let mut response = Response::new(Full::new(Bytes::from_static(html.as_bytes())));
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("text/html; charset=utf-8"),
                        );
                        Ok::<_, std::convert::Infallible>(response)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self { addr, task }
    }

    /// The page's origin, `http://127.0.0.1:PORT`.
    pub fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // After `close`, or a test that failed before it: chromedriver and any browser left.
        kill_group(self.driver.id());
        let _ = self.driver.start_kill();
    }
}

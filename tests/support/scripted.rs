//! A raw-TCP upstream on 127.0.0.1 whose every connection runs a script of the test's own:
//! for answers no HTTP library would send (two framings, bad lengths, garbage after the end).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::IO_TIMEOUT;

/// A raw upstream on 127.0.0.1 that runs `serve` on each connection it accepts (with the
/// connection's 1-based number) and counts them.
pub async fn raw_upstream<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, usize) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::spawn(serve(stream, n));
        }
    });
    (addr, accepted)
}

/// Reads one request head; false if the connection ended first.
pub async fn read_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// One request as an upstream saw it on the wire.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The connection's 1-based number.
    pub conn: usize,
    pub head: String,
    /// The body as sent, framing included (chunk sizes stay in).
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// An upstream connection read request by request.
pub struct RawConn {
    pub stream: TcpStream,
    pub n: usize,
    buf: Vec<u8>,
    log: Arc<Mutex<Vec<Seen>>>,
}

impl RawConn {
    pub fn new(stream: TcpStream, n: usize, log: Arc<Mutex<Vec<Seen>>>) -> Self {
        Self { stream, n, buf: Vec::new(), log }
    }

    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 16 * 1024];
        match tokio::time::timeout(IO_TIMEOUT, self.stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        }
    }

    /// The next request head, logged; `None` if the connection ended first.
    pub async fn head(&mut self) -> Option<Seen> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end + 4]).into_owned();
                self.buf.drain(..end + 4);
                return Some(Seen { conn: self.n, head, body: Vec::new() });
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    /// The next whole request (a `content-length` or chunked body), logged.
    pub async fn request(&mut self) -> Option<Seen> {
        let mut seen = self.head().await?;
        if let Some(length) = seen.header("content-length").and_then(|v| v.parse::<usize>().ok()) {
            while self.buf.len() < length {
                if !self.fill().await {
                    return None;
                }
            }
            seen.body = self.buf.drain(..length).collect();
        } else if seen.header("transfer-encoding").is_some() {
            while !self.buf.windows(5).any(|w| w == b"0\r\n\r\n") {
                if !self.fill().await {
                    return None;
                }
            }
            let end = self.buf.windows(5).position(|w| w == b"0\r\n\r\n").map_or(0, |at| at + 5);
            seen.body = self.buf.drain(..end).collect();
        }
        self.log.lock().expect("log").push(seen.clone());
        Some(seen)
    }

    /// Reads and counts whatever else arrives until the peer closes (or the wait runs out).
    pub async fn drain(&mut self) -> usize {
        let mut total = std::mem::take(&mut self.buf).len();
        let mut chunk = [0u8; 64 * 1024];
        while let Ok(Ok(n)) = tokio::time::timeout(IO_TIMEOUT, self.stream.read(&mut chunk)).await {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    }

    pub async fn send(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).await.is_ok()
    }
}

/// A raw upstream that logs every whole request it reads, for asserting on the wire.
pub struct Scripted {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub log: Arc<Mutex<Vec<Seen>>>,
}

impl Scripted {
    /// Runs `serve` on each accepted connection.
    pub async fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(RawConn) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let log = Arc::new(Mutex::new(Vec::new()));
        let for_conns = Arc::clone(&log);
        let (addr, accepted) =
            raw_upstream(move |stream, n| serve(RawConn::new(stream, n, Arc::clone(&for_conns)))).await;
        Self { addr, accepted, log }
    }

    /// Answers every request with `answer(request number, connection number)`: the bytes,
    /// and whether to close the connection after them (else the next request is awaited, so
    /// a connection keygate should not reuse stays open and only a new accept shows it).
    pub async fn answering<A>(answer: A) -> Self
    where
        A: Fn(usize, usize) -> (Vec<u8>, bool) + Send + Sync + 'static,
    {
        let served = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        Self::start(move |mut conn| {
            let (served, answer) = (Arc::clone(&served), Arc::clone(&answer));
            async move {
                while conn.request().await.is_some() {
                    let n = served.fetch_add(1, Ordering::SeqCst) + 1;
                    let (bytes, close) = answer(n, conn.n);
                    if !conn.send(&bytes).await || close {
                        return;
                    }
                }
            }
        })
        .await
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().expect("log").clone()
    }
}

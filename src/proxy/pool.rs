//! Plain-`http://` upstream connections: pooled per upstream, and driven from inside the task
//! of the request that is using them.
//!
//! hyper-util's pooled client runs every upstream connection as a task of its own and talks
//! to it over channels, so each proxied request costs two extra task wake-ups, a channel send
//! and receive and a boxed future. Here the request's own task reads and writes the socket,
//! speaking HTTP/1.1 through keygate's own codec ([`h1`](super::h1)): while sending the request
//! and waiting for the response head, and then, through [`UpstreamBody`], while the response
//! body streams to the client. A connection whose response was read exactly to its end goes
//! back to the pool when the body is dropped; any other is closed, so a half-read response can
//! never be mistaken for the start of the next one.
//!
//! Every connection holds a slot of the upstream's [`ConnectionLimit`]; with all slots taken a
//! request waits for whichever comes first, a connection handed back or a slot freed.
//!
//! `https://` upstreams and WebSocket upgrades keep using the hyper-util client.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;

use super::forward::{Added, RequestBody};
use super::h1::{self, Decoded, Decoder, Framing, RequestFraming};
use super::limit::{ConnectionLimit, ConnectionSlot, Waiting};

/// How long an unused connection is kept. Upstreams that close theirs sooner are noticed by
/// the sweep (or at checkout) and their connections dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often idle connections are checked for having been closed by the upstream.
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle connections kept per upstream; beyond this a finished connection is closed.
const MAX_IDLE_PER_UPSTREAM: usize = 1024;
/// How long a connection must have been idle before a safe request sent on it is kept for a
/// replay. Upstreams close idle keep-alive connections after a second or more (Node.js 5 s,
/// gunicorn 2 s, nginx 75 s), so the race with their close needs at least that much idleness.
pub const REPLAY_AFTER_IDLE: Duration = Duration::from_secs(1);
/// The first read of a response asks for this much; a read that fills it doubles the next,
/// up to [`MAX_READ`], so a large body is read in few calls and a small answer costs little.
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 256 * 1024;
/// Request body bytes gathered before writing: a head and a small body go out in one write,
/// and a fast client cannot make keygate buffer more than this for a slow upstream.
const GATHER: usize = 64 * 1024;
/// A connection keeps its write buffer for the next request up to this size: a request head
/// fits, and an idle connection holds no upload-sized buffer.
const KEEP_WRITE_BUFFER: usize = 16 * 1024;

/// Why a request could not be sent upstream. Never carries a header value.
#[derive(Debug)]
pub enum SendError {
    Connect(std::io::Error),
    /// The upstream closed or reset the connection before any byte of a response.
    Closed,
    Io(std::io::Error),
    Protocol(h1::Error),
    /// Reading the client's request body failed (its own 400 is decided by the pipeline).
    RequestBody,
    /// The request body was longer or shorter than its `content-length`.
    RequestBodyLength,
}

impl std::error::Error for SendError {}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(error) => write!(f, "connect: {error}"),
            Self::Closed => f.write_str("the upstream closed the connection before answering"),
            Self::Io(error) => write!(f, "upstream connection: {error}"),
            Self::Protocol(error) => write!(f, "{error}"),
            Self::RequestBody => f.write_str("reading the request body failed"),
            Self::RequestBodyLength => f.write_str("the request body did not match its content-length"),
        }
    }
}

/// The idle connections to one upstream. Each route's [`Upstream`](super::route::Upstream)
/// holds its pool, so a request finds it without a lookup; the gateway hands the same pool to
/// every snapshot that names the same upstream, so a reload keeps the warm connections.
#[derive(Clone)]
pub struct Http1Pool {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Http1Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http1Pool").field("authority", &self.shared.authority).finish_non_exhaustive()
    }
}

struct Shared {
    authority: Authority,
    limit: Arc<ConnectionLimit>,
    /// Woken when a connection goes back to the idle list, for requests waiting on the limit.
    returned: tokio::sync::Notify,
    idle: Mutex<Vec<Idle>>,
    sweeping: std::sync::OnceLock<()>,
}

struct Idle {
    conn: Box<Conn>,
    since: Instant,
}

/// One upstream connection.
struct Conn {
    stream: TcpStream,
    /// Bytes read from the upstream and not yet handed out.
    read: BytesMut,
    /// How much the next read asks for.
    read_size: usize,
    /// The buffer the last request was written from, kept for the next one.
    write: BytesMut,
    /// The worker thread that opened it: its socket is registered with that thread's event
    /// loop, which is the one its readiness wakes (see `checkout`).
    home: std::thread::ThreadId,
    _slot: ConnectionSlot,
}

impl Conn {
    /// Boxed: a connection is moved in and out of the pool and the response on every request.
    async fn open(authority: &Authority, slot: ConnectionSlot) -> Result<Box<Self>, SendError> {
        let connect = TcpStream::connect(authority.as_str());
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => return Err(SendError::Connect(error)),
            Err(_) => return Err(SendError::Connect(std::io::ErrorKind::TimedOut.into())),
        };
        // Requests are written whole; waiting for more to coalesce only adds latency.
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        let home = std::thread::current().id();
        let (read, write) = (BytesMut::new(), BytesMut::new());
        Ok(Box::new(Self { stream, read, read_size: FIRST_READ, write, home, _slot: slot }))
    }

    /// Reads what the socket has into `read`: `Ok(0)` is the upstream's end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        self.read.reserve(self.read_size);
        let asked = self.read.capacity() - self.read.len();
        // Through `AsyncRead`, which, unlike `try_read`, forgets the socket's readiness after a
        // short read: the next poll waits for the event loop instead of making a system call
        // that would only say "nothing yet".
        let polled = std::pin::pin!(self.stream.read_buf(&mut self.read)).poll(cx);
        if let Poll::Ready(Ok(n)) = polled
            && n == asked
        {
            self.read_size = (self.read_size * 2).min(MAX_READ);
        }
        polled
    }

    /// Whether a pooled connection can take a request now: the upstream has not closed it and
    /// sent nothing unasked. Never waits.
    fn usable(&mut self) -> bool {
        if !self.read.is_empty() {
            return false;
        }
        // Nothing waits on these polls: the connection is idle, and whoever takes it next polls
        // it again with a real waker. The socket is only read if the event loop saw it readable.
        let mut cx = Context::from_waker(Waker::noop());
        if self.stream.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        // Readable with nothing to read is a close; any bytes are an answer nobody asked for.
        self.poll_fill(&mut cx).is_pending()
    }
}

/// A request on its way out: its encoded head and body bytes, and the body still to read.
struct Outgoing {
    buf: BytesMut,
    /// How much of `buf` the socket has taken.
    at: usize,
    /// Some byte of this request reached the socket: it can no longer be sent elsewhere as is.
    sent: bool,
    body: Option<RequestBody>,
    framing: RequestFraming,
    /// Writing failed: the exchange now only waits for whatever the upstream still says.
    write_failed: Option<std::io::Error>,
}

impl Outgoing {
    /// Encodes `request` with the headers keygate `added` into `buf` (empty; a connection's
    /// recycled buffer).
    fn new(request: Request<RequestBody>, added: &Added, mut buf: BytesMut) -> Self {
        let (parts, body) = request.into_parts();
        let empty = body.is_end_stream();
        let framing = h1::encode_head(&parts, added, empty, body.size_hint().exact(), &mut buf);
        // A body that goes out unframed (empty, or GET/HEAD/CONNECT of unknown length) is not read.
        let body = (framing != RequestFraming::None).then_some(body);
        Self { buf, at: 0, sent: false, body, framing, write_failed: None }
    }

    /// Everything, body included, has been written.
    fn done(&self) -> bool {
        self.body.is_none() && self.at == self.buf.len() && self.write_failed.is_none()
    }

    /// The write buffer, emptied, for the connection's next request.
    fn recycle(&mut self) -> BytesMut {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() > KEEP_WRITE_BUFFER {
            return BytesMut::new();
        }
        buf.clear();
        buf
    }

    /// Ready to go again on another connection: only while no byte of it reached a socket, or
    /// for a request without a body, whose head is all `buf` ever held.
    fn rewind(&mut self) -> bool {
        if self.sent && self.framing != RequestFraming::None {
            return false;
        }
        self.at = 0;
        self.sent = false;
        self.write_failed = None;
        true
    }

    /// Writes as much as the socket and the body allow; `Ready(Ok)` once all is written.
    fn poll_send(&mut self, stream: &mut TcpStream, cx: &mut Context<'_>) -> Poll<Result<(), SendError>> {
        if self.write_failed.is_some() {
            return Poll::Pending;
        }
        loop {
            // Gather what the body has ready, so a head and a small body go out in one write.
            while self.buf.len() - self.at < GATHER
                && let Some(body) = self.body.as_mut()
            {
                if self.at == self.buf.len() && self.sent {
                    self.buf.clear();
                    self.at = 0;
                }
                match Pin::new(body).poll_frame(cx) {
                    Poll::Pending => break,
                    Poll::Ready(Some(Err(_))) => return Poll::Ready(Err(SendError::RequestBody)),
                    Poll::Ready(Some(Ok(frame))) => {
                        // Trailers are dropped: an HTTP/1 upstream gets none.
                        if let Ok(data) = frame.into_data() {
                            self.push(&data)?;
                        }
                    }
                    Poll::Ready(None) => {
                        match self.framing {
                            RequestFraming::Chunked => self.buf.extend_from_slice(h1::LAST_CHUNK),
                            RequestFraming::Length(0) | RequestFraming::None => {}
                            RequestFraming::Length(_) => {
                                return Poll::Ready(Err(SendError::RequestBodyLength));
                            }
                        }
                        self.body = None;
                    }
                }
            }
            if self.at == self.buf.len() {
                return if self.body.is_none() { Poll::Ready(Ok(())) } else { Poll::Pending };
            }
            while self.at < self.buf.len() {
                match Pin::new(&mut *stream).poll_write(cx, &self.buf[self.at..]) {
                    Poll::Ready(Ok(0)) => {
                        self.write_failed = Some(std::io::ErrorKind::WriteZero.into());
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(n)) => {
                        self.at += n;
                        self.sent = true;
                    }
                    Poll::Ready(Err(error)) => {
                        // The upstream may have answered and closed (a 413 for a body it will
                        // not take): its answer, or its close, is what the read side reports.
                        self.write_failed = Some(error);
                        return Poll::Pending;
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        }
    }

    fn push(&mut self, data: &Bytes) -> Result<(), SendError> {
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.framing {
            RequestFraming::Chunked => h1::encode_chunk(data, &mut self.buf),
            RequestFraming::Length(left) => {
                *left = left.checked_sub(data.len() as u64).ok_or(SendError::RequestBodyLength)?;
                self.buf.extend_from_slice(data);
            }
            RequestFraming::None => {}
        }
        Ok(())
    }
}

/// Sends the request and reads the response head, in this task. The head is read for as long
/// as the request is being written: an upstream may answer before taking the whole body.
async fn exchange(conn: &mut Conn, out: &mut Outgoing, head_request: bool) -> Result<h1::Head, SendError> {
    std::future::poll_fn(|cx| {
        loop {
            if !conn.read.is_empty() {
                match h1::parse_head(&mut conn.read, head_request) {
                    Ok(Some(head)) => return Poll::Ready(Ok(head)),
                    Ok(None) => {}
                    Err(error) => return Poll::Ready(Err(SendError::Protocol(error))),
                }
            }
            match conn.poll_fill(cx) {
                Poll::Ready(Ok(0)) if conn.read.is_empty() => return Poll::Ready(Err(SendError::Closed)),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(SendError::Protocol(h1::Error::IncompleteHead)));
                }
                Poll::Ready(Ok(_)) => continue,
                Poll::Ready(Err(error)) if conn.read.is_empty() && is_reset(&error) => {
                    return Poll::Ready(Err(SendError::Closed));
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(SendError::Io(error))),
                Poll::Pending => {}
            }
            return match out.poll_send(&mut conn.stream, cx) {
                Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
                Poll::Ready(Ok(())) | Poll::Pending => Poll::Pending,
            };
        }
    })
    .await
}

fn is_reset(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::UnexpectedEof
    )
}

impl Http1Pool {
    pub fn new(authority: Authority, limit: Arc<ConnectionLimit>) -> Self {
        let shared = Shared {
            authority,
            limit,
            returned: tokio::sync::Notify::new(),
            idle: Mutex::new(Vec::new()),
            sweeping: std::sync::OnceLock::new(),
        };
        Self { shared: Arc::new(shared) }
    }

    /// Sends `request` (origin-form target, `Host` set) on a pooled connection, or a new one;
    /// a pooled connection found closed before the request went out is replaced by a new one
    /// once.
    ///
    /// A safe request without a body (GET, HEAD, OPTIONS) that goes out on a connection idle
    /// for [`REPLAY_AFTER_IDLE`] or more is also sent again, once, on a new connection if the
    /// upstream closes or resets that connection without answering: the upstream closing an
    /// idle keep-alive connection just as the request arrives is the usual cause, and RFC 9110
    /// §9.2.2 lets a client retry such requests. (Only then is the request copied; under load
    /// connections are never idle that long.)
    ///
    /// Not an `async fn`, see `Gateway::forward`.
    #[allow(clippy::manual_async_fn, reason = "an async fn would copy the request once more")]
    pub fn send(
        &self,
        request: Request<RequestBody>,
        added: Added,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, SendError>> {
        async move {
            let authority = &self.shared.authority;
            let (mut conn, idle) = match self.checkout(Borrow::OwnOnly) {
                Some((conn, idle)) => (conn, Some(idle)),
                // Boxed: connecting is rare, and this keeps every request's future small.
                None => Box::pin(self.obtain()).await?,
            };
            let head_request = request.method() == http::Method::HEAD;
            let replayable = idle.is_some_and(|idle| idle >= REPLAY_AFTER_IDLE) && replayable(&request);
            let mut out = Outgoing::new(request, &added, std::mem::take(&mut conn.write));
            drop(added);
            let error = match exchange(&mut conn, &mut out, head_request).await {
                Ok(head) => {
                    let sent = out.done();
                    conn.write = out.recycle();
                    return Ok(self.lease(conn, head, sent));
                }
                Err(error) => error,
            };
            let closed = matches!(error, SendError::Closed);
            // A pooled connection found closed before any of the request reached it, or a safe
            // request crossing the upstream's close of an idle connection: a new connection.
            let again = idle.is_some() && closed && (!out.sent || replayable) && out.rewind();
            if !again {
                return Err(error);
            }
            if out.sent {
                tracing::debug!(upstream = %authority, "idle upstream connection closed under a request; sending it again");
            }
            drop(conn);
            let slot = self.shared.limit.acquire().await;
            let mut conn = Box::pin(Conn::open(authority, slot)).await?;
            let head = exchange(&mut conn, &mut out, head_request).await?;
            let sent = out.done();
            conn.write = out.recycle();
            Ok(self.lease(conn, head, sent))
        }
    }

    /// A connection when this worker had none idle: a new one if a slot is free, else
    /// whichever comes first, a connection handed back (by any worker) or a slot.
    async fn obtain(&self) -> Result<(Box<Conn>, Option<Duration>), SendError> {
        let shared = &self.shared;
        if let Some(slot) = shared.limit.try_acquire() {
            return Ok((Conn::open(&shared.authority, slot).await?, None));
        }
        loop {
            let returned = shared.returned.notified();
            let mut returned = std::pin::pin!(returned);
            // Registered before looking again, so a hand-back in between is not missed.
            returned.as_mut().enable();
            if let Some((conn, idle)) = self.checkout(Borrow::Any) {
                return Ok((conn, Some(idle)));
            }
            let waiting = Waiting::start();
            let slot = tokio::select! {
                slot = shared.limit.acquire() => Some(slot),
                () = &mut returned => None,
            };
            waiting.finish();
            if let Some(slot) = slot {
                return Ok((Conn::open(&shared.authority, slot).await?, None));
            }
        }
    }

    /// The response with a body that reads the rest from `conn`, and gives `conn` back to
    /// the pool if it may carry another request: the request went out whole (an early answer
    /// leaves the rest of a body unsent) and the response says the connection stays open.
    fn lease(&self, conn: Box<Conn>, head: h1::Head, request_sent: bool) -> Response<UpstreamBody> {
        let decoder = Decoder::new(head.framing);
        let reusable = request_sent && head.keep_alive && head.framing != Framing::Close;
        let lease = Lease { conn, pool: Arc::downgrade(&self.shared), reusable };
        head.response.map(|()| UpstreamBody { lease: Some(lease), decoder })
    }

    /// A pooled connection that looks usable, and how long it sat idle.
    fn checkout(&self, borrow: Borrow) -> Option<(Box<Conn>, Duration)> {
        let worker = std::thread::current().id();
        let mut list = self.shared.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Newest first: the most recently used connection is the least likely to have been
        // closed by the upstream.
        loop {
            let own = list.iter().rposition(|entry| entry.conn.home == worker);
            let at = match borrow {
                Borrow::OwnOnly => own?,
                Borrow::Any => own.or(list.len().checked_sub(1))?,
            };
            let mut entry = list.remove(at);
            let idle = entry.since.elapsed();
            if idle < IDLE_TIMEOUT && entry.conn.usable() {
                return Some((entry.conn, idle));
            }
        }
    }
}

/// Which idle connections a request may take.
///
/// A connection's socket is registered with the event loop of the worker thread that opened
/// it (`workers` > 1 runs one per thread), and its readiness wakes that thread: used from
/// another worker, every read and write of it costs a wake-up across threads (a system call
/// and a context switch each). So a worker opens a connection of its own rather than borrow
/// one, and borrows only when the upstream's connection limit leaves no other choice.
#[derive(Clone, Copy)]
enum Borrow {
    OwnOnly,
    Any,
}

impl Shared {
    /// Starts the sweep the first time a connection is pooled, from inside the runtime. It
    /// holds only a weak reference, so it ends once the gateway is gone.
    fn start_sweeping(self: &Arc<Self>) {
        // Called for every connection handed back: once it runs, that is all it costs.
        if self.sweeping.get().is_some() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let weak = Arc::downgrade(self);
        self.sweeping.get_or_init(|| {
            runtime.spawn(sweep(weak));
        });
    }

    fn put(&self, conn: Box<Conn>) {
        let mut list = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(Idle { conn, since: Instant::now() });
            drop(list);
            // Lock-free when nobody waits: only requests held back by the limit listen.
            self.returned.notify_one();
        }
    }

    fn sweep(&self) {
        let mut list = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        list.retain_mut(|entry| entry.since.elapsed() < IDLE_TIMEOUT && entry.conn.usable());
    }
}

/// A pool that drops its idle and dead connections when asked.
pub(crate) trait Sweep: Send + Sync + 'static {
    fn sweep(&self);
}

impl Sweep for Shared {
    fn sweep(&self) {
        Shared::sweep(self);
    }
}

/// Sweeps a pool every few seconds until the pool itself is gone: a pool nobody routes to any
/// more must not keep its connections, and must not be kept alive by its own sweeper.
pub(crate) async fn sweep<T: Sweep>(shared: Weak<T>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        match shared.upgrade() {
            Some(shared) => shared.sweep(),
            None => return,
        }
    }
}

/// Whether a request may be sent twice: safe, without a body, and not overridden to an unsafe
/// method the upstream would run.
fn replayable(request: &Request<RequestBody>) -> bool {
    let safe = matches!(*request.method(), http::Method::GET | http::Method::HEAD | http::Method::OPTIONS);
    let overridden = crate::proxy::auth::has_method_override(request.headers(), request.uri().query());
    safe && request.body().is_end_stream() && !overridden
}

/// A connection lent to one response, going back to the pool if that response is read whole.
struct Lease {
    conn: Box<Conn>,
    pool: Weak<Shared>,
    /// The exchange left the connection fit for another request once this body is read.
    reusable: bool,
}

/// A response body read from a pooled connection by the task polling it.
pub struct UpstreamBody {
    /// `None` once the body failed: the connection is gone.
    lease: Option<Lease>,
    decoder: Decoder,
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = h1::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h1::Error>>> {
        let this = self.get_mut();
        let Some(lease) = this.lease.as_mut() else { return Poll::Ready(None) };
        loop {
            let decoded = match this.decoder.decode(&mut lease.conn.read) {
                Ok(Decoded::More) => match lease.conn.poll_fill(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0)) => this.decoder.eof(),
                    Poll::Ready(Ok(_)) => continue,
                    Poll::Ready(Err(_)) => Err(h1::Error::IncompleteBody),
                },
                decoded => decoded,
            };
            return match decoded {
                Ok(Decoded::Data(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Decoded::Trailers(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Ok(Decoded::End | Decoded::More) => Poll::Ready(None),
                Err(error) => {
                    this.lease = None;
                    this.decoder.abandon();
                    Poll::Ready(Some(Err(error)))
                }
            };
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder.remaining().map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else { return };
        // Anything after the end of the response is an answer to no request: the connection
        // could only be trusted again by reading it, so it is closed instead.
        if !(lease.reusable && self.decoder.is_end() && lease.conn.read.is_empty()) {
            return;
        }
        let mut conn = lease.conn;
        // An idle connection keeps no large body's read buffer, and starts small again.
        if conn.read.capacity() > 2 * FIRST_READ {
            conn.read = BytesMut::new();
            conn.read_size = FIRST_READ;
        }
        if let Some(pool) = lease.pool.upgrade() {
            pool.put(conn);
            pool.start_sweeping();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use prometheus_client::metrics::gauge::Gauge;
    use tokio::sync::{mpsc, oneshot};

    use super::*;

    /// An upstream on loopback that answers every request on a connection with a small 200,
    /// counting the connections it accepted.
    fn upstream() -> (Authority, Arc<AtomicUsize>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let authority = Authority::try_from(listener.local_addr().unwrap().to_string()).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while stream.read(&mut byte).is_ok_and(|n| n == 1) {
                        head.push(byte[0]);
                        if head.ends_with(b"\r\n\r\n") {
                            head.clear();
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if stream.write_all(answer).is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (authority, accepted)
    }

    /// A worker: a thread whose current-thread runtime stays in `block_on` (so its event loop
    /// keeps running for connections it opened), sending one GET through `pool` per message.
    fn worker(pool: Http1Pool) -> mpsc::UnboundedSender<oneshot::Sender<Vec<u8>>> {
        let (tx, mut rx) = mpsc::unbounded_channel::<oneshot::Sender<Vec<u8>>>();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                while let Some(reply) = rx.recv().await {
                    let request =
                        Request::get("/").header(http::header::HOST, "up").body(RequestBody::empty());
                    let response = pool.send(request.unwrap(), Added::with_capacity(0)).await.unwrap();
                    // Read to its end and dropped: the connection goes back to the pool.
                    let body = response.into_body().collect().await.unwrap().to_bytes();
                    let _ = reply.send(body.to_vec());
                }
            });
        });
        tx
    }

    async fn get(worker: &mpsc::UnboundedSender<oneshot::Sender<Vec<u8>>>) -> Vec<u8> {
        let (reply, answer) = oneshot::channel();
        worker.send(reply).unwrap();
        answer.await.unwrap()
    }

    /// Connections the upstream saw after two workers took turns sending three GETs each
    /// through one pool capped at `limit`.
    async fn connections_opened(limit: usize) -> usize {
        let (authority, accepted) = upstream();
        let pool = Http1Pool::new(authority, ConnectionLimit::new(limit, Gauge::default()));
        let (a, b) = (worker(pool.clone()), worker(pool.clone()));
        for _ in 0..3 {
            assert_eq!(get(&a).await, b"ok");
            assert_eq!(get(&b).await, b"ok");
        }
        accepted.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn each_worker_opens_its_own_connection_while_the_limit_allows() {
        // Worker b found a's idle connection in the pool and opened its own instead; after
        // that, each reused its own.
        assert_eq!(connections_opened(8).await, 2);
    }

    #[tokio::test]
    async fn a_worker_borrows_another_workers_connection_at_the_limit() {
        assert_eq!(connections_opened(1).await, 1);
    }
}

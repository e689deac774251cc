//! Plain-`http://` upstream connections: pooled per upstream, and driven from inside the task
//! of the request that is using them.
//!
//! hyper-util's pooled client runs every upstream connection as a task of its own and talks
//! to it over channels, so each proxied request costs two extra task wake-ups, a channel send
//! and receive and a boxed future. Here the request's own task polls the connection: while
//! waiting for the response head, and then, through [`UpstreamBody`], while the response body
//! streams to the client. A connection whose response was read to the end goes back to the
//! pool when the body is dropped; any other is closed, so a half-read response can never be
//! mistaken for the start of the next one.
//!
//! Every connection holds a slot of the upstream's [`ConnectionLimit`]; with all slots taken a
//! request waits for whichever comes first, a connection handed back or a slot freed.
//!
//! `https://` upstreams and WebSocket upgrades keep using the hyper-util client.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::forward::RequestBody;
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

/// Why a request could not be sent upstream.
#[derive(Debug)]
pub enum SendError {
    Connect(std::io::Error),
    Http(hyper::Error),
}

impl std::error::Error for SendError {}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(error) => write!(f, "connect: {error}"),
            Self::Http(error) => write!(f, "{error}"),
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

/// One upstream connection: hyper's request handle and the connection state machine that
/// this crate polls itself.
struct Conn {
    sender: SendRequest<RequestBody>,
    driver: Connection<TokioIo<TcpStream>, RequestBody>,
    /// The driver has completed (closed or failed); it must not be polled again.
    closed: bool,
    /// What the driver is polled with; it passes wakes on to the task now using the connection.
    gate: Arc<Gate>,
    gate_waker: Waker,
    /// The worker thread that opened it: its socket is registered with that thread's event
    /// loop, which is the one its readiness wakes (see `checkout`).
    home: std::thread::ThreadId,
    _slot: ConnectionSlot,
}

/// The waker a connection's driver sees. It forwards to the task that drives the connection,
/// except while muted: taking a chunk from the response body makes hyper wake the connection
/// so that it reads on, which is this same task, which will drive the connection anyway the
/// next time the body is polled. Forwarded, that wake costs a whole extra pass over the
/// client connection per request.
#[derive(Default)]
struct Gate {
    task: Mutex<Option<Waker>>,
    muted: AtomicBool,
    /// A wake arrived while muted.
    swallowed: AtomicBool,
}

impl Gate {
    fn set(&self, waker: &Waker) {
        let mut task = self.task.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if !task.as_ref().is_some_and(|current| current.will_wake(waker)) {
            *task = Some(waker.clone());
        }
    }

    fn mute(&self) {
        self.swallowed.store(false, Ordering::Relaxed);
        self.muted.store(true, Ordering::Release);
    }

    /// Whether anything was swallowed while muted.
    fn unmute(&self) -> bool {
        self.muted.store(false, Ordering::Release);
        self.swallowed.load(Ordering::Acquire)
    }
}

impl Wake for Gate {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.muted.load(Ordering::Acquire) {
            self.swallowed.store(true, Ordering::Release);
            return;
        }
        let task = self.task.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
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
        // Requests and responses are written whole; waiting for more to coalesce only adds latency.
        stream.set_nodelay(true).map_err(SendError::Connect)?;
        let (sender, driver) = hyper::client::conn::http1::Builder::new()
            // One buffer per message rather than a queue gathered by writev: a request head
            // (and a small body) is copied once, which costs less than the queue.
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        let gate = Arc::new(Gate::default());
        let gate_waker = Waker::from(Arc::clone(&gate));
        let home = std::thread::current().id();
        Ok(Box::new(Self { sender, driver, closed: false, gate, gate_waker, home, _slot: slot }))
    }

    /// Lets the connection make whatever progress its socket allows.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if self.closed {
            return;
        }
        self.gate.set(cx.waker());
        if Pin::new(&mut self.driver).poll(&mut Context::from_waker(&self.gate_waker)).is_ready() {
            self.closed = true;
        }
    }

    /// Whether a pooled connection can take a request now: the upstream has not closed it and
    /// it has finished reading the previous response.
    fn usable(&mut self) -> bool {
        // Nothing waits on this poll: the connection is idle, and whoever takes it next polls
        // it again with a real waker.
        self.drive(&mut Context::from_waker(Waker::noop()));
        !self.closed && self.sender.is_ready()
    }
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
    pub async fn send(&self, request: Request<RequestBody>) -> Result<Response<UpstreamBody>, SendError> {
        let authority = &self.shared.authority;
        let (mut conn, idle) = match self.checkout() {
            Some((conn, idle)) => (conn, Some(idle)),
            // Boxed: connecting is rare, and this keeps every request's future small.
            None => Box::pin(self.obtain()).await?,
        };
        let replay = match idle {
            Some(idle) if idle >= REPLAY_AFTER_IDLE => replayable_copy(&request),
            _ => None,
        };
        let request = match exchange(&mut conn, request).await {
            Ok(response) => return Ok(self.lease(conn, response)),
            Err(mut error) => match (error.take_message(), replay) {
                // Never written: the connection was found closed on the way.
                (Some(request), _) if idle.is_some() => request,
                (_, Some(copy)) if closed_without_answer(error.error()) => {
                    tracing::debug!(upstream = %authority, "idle upstream connection closed under a request; sending it again");
                    copy
                }
                _ => return Err(SendError::Http(error.into_error())),
            },
        };
        drop(conn);
        let slot = self.shared.limit.acquire().await;
        let mut conn = Box::pin(Conn::open(authority, slot)).await?;
        match exchange(&mut conn, request).await {
            Ok(response) => Ok(self.lease(conn, response)),
            Err(error) => Err(SendError::Http(error.into_error())),
        }
    }

    /// A connection when none was idle: a new one if a slot is free, else whichever comes
    /// first, a connection handed back or a slot.
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
            if let Some((conn, idle)) = self.checkout() {
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

    fn lease(&self, conn: Box<Conn>, response: Response<Incoming>) -> Response<UpstreamBody> {
        let lease = Lease { conn, pool: Arc::downgrade(&self.shared) };
        response.map(|body| UpstreamBody {
            inner: body,
            lease: Some(lease),
            finished: false,
            yielded_data: false,
            held_error: None,
        })
    }

    /// A pooled connection that looks usable, and how long it sat idle.
    fn checkout(&self) -> Option<(Box<Conn>, Duration)> {
        let worker = std::thread::current().id();
        let mut list = self.shared.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // Newest first: the most recently used connection is the least likely to have been
        // closed by the upstream. One this worker thread opened comes before any other: its
        // socket is registered with this thread's event loop (`workers` > 1 runs one per
        // thread), so its readiness wakes no other thread. With one worker, the newest is it.
        loop {
            let at =
                list.iter().rposition(|entry| entry.conn.home == worker).or(list.len().checked_sub(1))?;
            let mut entry = list.remove(at);
            let idle = entry.since.elapsed();
            if idle < IDLE_TIMEOUT && entry.conn.usable() {
                return Some((entry.conn, idle));
            }
        }
    }
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

/// A copy of a safe, bodiless request, to send again if its connection turns out dead.
fn replayable_copy(request: &Request<RequestBody>) -> Option<Request<RequestBody>> {
    let safe = matches!(*request.method(), http::Method::GET | http::Method::HEAD | http::Method::OPTIONS);
    // An override may name an unsafe method that the upstream would run: never send twice.
    let overridden = crate::proxy::auth::has_method_override(request.headers(), request.uri().query());
    if !safe || !request.body().is_end_stream() || overridden {
        return None;
    }
    let mut copy = Request::new(RequestBody::empty());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// The upstream closed or reset the connection before any of a response arrived.
fn closed_without_answer(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = cause.source();
    }
    false
}

type Exchange = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<RequestBody>>>;

/// Writes the request and reads the response head, polling the connection in this task.
async fn exchange(conn: &mut Conn, request: Request<RequestBody>) -> Exchange {
    let mut response = std::pin::pin!(conn.sender.try_send_request(request));
    std::future::poll_fn(|cx| {
        conn.drive(cx);
        // The response can only arrive through `drive` above, which wakes this task through
        // the socket; a waker here would only make hyper wake this task once more for nothing.
        let polled = response.as_mut().poll(&mut Context::from_waker(Waker::noop()));
        if polled.is_pending() && conn.closed {
            // Unreachable by hyper's contract (a finished connection fails what it holds);
            // a stuck request must still not hang forever.
            return response.as_mut().poll(cx);
        }
        polled
    })
    .await
}

/// A connection lent to one response, going back to the pool if that response is read whole.
struct Lease {
    conn: Box<Conn>,
    pool: Weak<Shared>,
}

/// An upstream response body. When it came over a pooled connection, polling it also drives
/// that connection.
pub struct UpstreamBody {
    inner: Incoming,
    lease: Option<Lease>,
    /// The body was read to its end.
    finished: bool,
    /// The last poll handed out a frame.
    yielded_data: bool,
    /// An error held back for one poll, so data before it is flushed first.
    held_error: Option<hyper::Error>,
}

impl From<Incoming> for UpstreamBody {
    fn from(inner: Incoming) -> Self {
        Self { inner, lease: None, finished: false, yielded_data: false, held_error: None }
    }
}

impl Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(error) = this.held_error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let polled = match &mut this.lease {
            Some(lease) => {
                lease.conn.drive(cx);
                // What the body holds came from the `drive` above, and only a later `drive` can
                // bring more: no waker is needed on the body, and the wake hyper sends the
                // connection when a chunk is taken is muted (see `Gate`).
                lease.conn.gate.mute();
                let polled = Pin::new(&mut this.inner).poll_frame(&mut Context::from_waker(Waker::noop()));
                if lease.conn.gate.unmute() && polled.is_pending() {
                    // Something else woke the connection meanwhile (another thread's reactor):
                    // come back for it.
                    cx.waker().wake_by_ref();
                }
                polled
            }
            // hyper-util's client drives the connection in a task of its own.
            None => Pin::new(&mut this.inner).poll_frame(cx),
        };
        match polled {
            Poll::Ready(None) => this.finished = true,
            Poll::Ready(Some(Ok(_))) => this.finished = this.inner.is_end_stream(),
            // The connection died right behind the data just handed out (both came in one
            // read). hyper's server drops what it has buffered when a body fails, so the
            // client would get nothing at all; let that data go out first, then fail.
            Poll::Ready(Some(Err(error))) if this.yielded_data => {
                this.yielded_data = false;
                this.held_error = Some(error);
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        this.yielded_data = matches!(polled, Poll::Ready(Some(Ok(_))));
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let Some(lease) = self.lease.take() else { return };
        if !(self.finished || self.inner.is_end_stream()) || lease.conn.closed {
            // Dropping the connection closes it: the rest of this response is never read.
            return;
        }
        if let Some(pool) = lease.pool.upgrade() {
            pool.put(lease.conn);
            pool.start_sweeping();
        }
    }
}

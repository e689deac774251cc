//! HTTP/2 upstream connections (`protocol = "h2"`): prior knowledge over TCP, or TLS with
//! ALPN `h2`. Streams of many requests share a connection up to the peer's
//! `SETTINGS_MAX_CONCURRENT_STREAMS`; only when every connection is full is another opened,
//! one at a time and within the upstream's [`ConnectionLimit`].
//!
//! The h2 crate is used directly rather than through hyper's client because only it tells how
//! many streams the peer currently allows. Each connection is driven by a task of its own,
//! which holds the connection's slot; each request body is pumped upstream by a task of its
//! own, so both directions stream at once (bidirectional gRPC).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::uri::Authority;
use http::{Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Notify, oneshot};
use tokio_rustls::TlsConnector;

use super::forward::RequestBody;
use super::limit::{ConnectionLimit, ConnectionSlot, Waiting};
use super::transport::SendError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with no stream open this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts at a request whose stream could not be opened (see [`H2Pool::send`]).
const MAX_TRIES: u32 = 10;

/// The HTTP/2 connections to one upstream; clones share them.
#[derive(Clone)]
pub struct H2Pool {
    shared: Arc<Shared>,
}

struct Shared {
    authority: Authority,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    limit: Arc<ConnectionLimit>,
    state: Mutex<State>,
    /// Woken when a stream ends, a connection is established, fails or closes.
    changed: Notify,
    epoch: Instant,
    sweeping: std::sync::OnceLock<()>,
}

#[derive(Default)]
struct State {
    conns: Vec<Arc<Conn>>,
    /// A connection is being opened: others wait for it rather than open their own, so a burst
    /// of streams opens one connection, not one each.
    connecting: bool,
}

struct Conn {
    sender: SendRequest<Bytes>,
    /// Streams this pool has open on the connection.
    streams: AtomicUsize,
    /// The driver task has ended: the connection is gone.
    closed: Arc<AtomicBool>,
    /// When the last stream ended, in milliseconds since the pool's epoch.
    last_used: AtomicU64,
}

impl Conn {
    fn has_room(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && self.streams.load(Ordering::Acquire) < self.sender.current_max_send_streams()
    }
}

impl H2Pool {
    /// `tls`: the trust for an `https://` upstream (ALPN `h2` is added here); `None` for h2c.
    pub fn new(
        authority: Authority,
        tls: Option<Arc<rustls::ClientConfig>>,
        limit: Arc<ConnectionLimit>,
    ) -> Self {
        let tls = tls.and_then(|config| {
            let mut config = (*config).clone();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let name = ServerName::try_from(authority.host().trim_start_matches('[').trim_end_matches(']'))
                .ok()?
                .to_owned();
            Some((TlsConnector::from(Arc::new(config)), name))
        });
        let shared = Shared {
            authority,
            tls,
            limit,
            state: Mutex::default(),
            changed: Notify::new(),
            epoch: Instant::now(),
            sweeping: std::sync::OnceLock::new(),
        };
        Self { shared: Arc::new(shared) }
    }

    /// Sends `request` (absolute URI, no `Host`, no connection-specific headers) on a stream of
    /// a shared connection and waits for the response head.
    pub async fn send(&self, request: Request<RequestBody>) -> Result<Response<H2Body>, SendError> {
        let (head, body) = request.into_parts();
        let end = body.is_end_stream();
        // SPEC §2.4: only a safe request without a body, and without an override naming
        // another method, is ever sent a second time.
        let replayable = end
            && matches!(head.method, http::Method::GET | http::Method::HEAD | http::Method::OPTIONS)
            && !crate::proxy::auth::has_method_override(&head.headers, head.uri.query());
        let mut body = Some(body);
        let mut tries = 0;
        loop {
            tries += 1;
            let claim = self.claim().await?;
            // A connection found closed (GOAWAY, reset) before the stream was opened, or a
            // stream the peer left unprocessed (REFUSED_STREAM, or above a GOAWAY's last stream,
            // RFC 9113 §8.7; only for a safe request without a body), is tried again on
            // another: the upstream never acted on it.
            let mut sender = match claim.conn.sender.clone().ready().await {
                Ok(sender) => sender,
                Err(error) if tries < MAX_TRIES => {
                    self.unusable(&claim, &error);
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let (response, stream) = match sender.send_request(copy_head(&head), end) {
                Ok(sent) => sent,
                Err(error) if tries < MAX_TRIES => {
                    self.unusable(&claim, &error);
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let (cancel, cancelled) = oneshot::channel();
            let claim = Arc::new(claim);
            if let Some(body) = body.take().filter(|_| !end) {
                tokio::spawn(pump(body, stream, cancelled, Arc::clone(&claim)));
            }
            let response = match response.await {
                Ok(response) => response,
                Err(error) if replayable && tries < MAX_TRIES && unprocessed(&error) => continue,
                Err(error) => return Err(error.into()),
            };
            return Ok(response.map(|recv| H2Body {
                recv,
                data_done: false,
                _cancel: cancel,
                _claim: claim,
            }));
        }
    }

    fn unusable(&self, claim: &Claim, error: &h2::Error) {
        tracing::debug!(upstream = %self.shared.authority, %error, "h2 upstream connection unusable");
        claim.conn.closed.store(true, Ordering::Release);
    }

    /// A stream on a connection with room, opening a connection when none has any.
    async fn claim(&self) -> Result<Claim, SendError> {
        let shared = &self.shared;
        loop {
            let changed = shared.changed.notified();
            let mut changed = std::pin::pin!(changed);
            changed.as_mut().enable();
            let (slot, someone_connecting) = {
                let mut state = shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                state.conns.retain(|conn| !conn.closed.load(Ordering::Acquire));
                if let Some(conn) = state.conns.iter().find(|conn| conn.has_room()) {
                    conn.streams.fetch_add(1, Ordering::AcqRel);
                    return Ok(Claim { conn: Arc::clone(conn), pool: Arc::downgrade(shared) });
                }
                if state.connecting {
                    (None, true)
                } else {
                    let slot = shared.limit.try_acquire();
                    state.connecting = slot.is_some();
                    (slot, false)
                }
            };
            let slot = match slot {
                Some(slot) => slot,
                None => {
                    let waiting = Waiting::start();
                    if someone_connecting {
                        changed.await;
                        waiting.finish();
                        continue;
                    }
                    let slot = tokio::select! {
                        () = &mut changed => None,
                        slot = shared.limit.acquire() => Some(slot),
                    };
                    waiting.finish();
                    let Some(slot) = slot else { continue };
                    shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).connecting = true;
                    slot
                }
            };
            let connecting = Connecting(shared);
            let conn = Box::pin(self.connect(slot)).await?;
            shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).conns.push(conn);
            drop(connecting);
            self.start_sweeping();
        }
    }

    async fn connect(&self, slot: ConnectionSlot) -> Result<Arc<Conn>, SendError> {
        let shared = &self.shared;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(shared.authority.as_str()))
            .await
            .map_err(|_| "connect timed out")??;
        tcp.set_nodelay(true)?;
        match &shared.tls {
            None => self.handshake(tcp, slot).await,
            Some((connector, name)) => {
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| "TLS handshake timed out")??;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err("the upstream did not choose HTTP/2 (ALPN h2)".into());
                }
                self.handshake(tls, slot).await
            }
        }
    }

    async fn handshake<T>(&self, io: T, slot: ConnectionSlot) -> Result<Arc<Conn>, SendError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let handshake = h2::client::Builder::new()
            // Windows wide enough that a loopback or LAN upstream is not held back per stream.
            .initial_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .handshake::<_, Bytes>(io);
        let (sender, mut connection) = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| "h2 handshake timed out")??;
        let ping_pong = connection.ping_pong();
        let closed = Arc::new(AtomicBool::new(false));
        let pool = Arc::downgrade(&self.shared);
        let driver_closed = Arc::clone(&closed);
        let authority = self.shared.authority.clone();
        tokio::spawn(async move {
            // The slot is the connection's for as long as this task drives it.
            let _slot = slot;
            if let Err(error) = connection.await {
                tracing::debug!(upstream = %authority, %error, "h2 upstream connection ended");
            }
            driver_closed.store(true, Ordering::Release);
            if let Some(pool) = pool.upgrade() {
                pool.changed.notify_waiters();
            }
        });
        // The peer's SETTINGS (its stream limit above all) come before its answer to a PING,
        // so after one round trip `current_max_send_streams` is the peer's, not h2's guess.
        if let Some(mut ping_pong) = ping_pong {
            tokio::time::timeout(CONNECT_TIMEOUT, ping_pong.ping(h2::Ping::opaque()))
                .await
                .map_err(|_| "h2 settings exchange timed out")??;
        }
        let now = self.shared.now_ms();
        Ok(Arc::new(Conn { sender, streams: AtomicUsize::new(0), closed, last_used: AtomicU64::new(now) }))
    }

    fn start_sweeping(&self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let weak = Arc::downgrade(&self.shared);
        self.shared.sweeping.get_or_init(|| {
            runtime.spawn(super::pool::sweep(weak));
        });
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Drops connections that closed or sat without a stream for [`IDLE_TIMEOUT`]; dropping the
    /// last handle lets the driver close the connection and free its slot.
    fn sweep(&self) {
        let now = self.now_ms();
        let idle_ms = u64::try_from(IDLE_TIMEOUT.as_millis()).unwrap_or(u64::MAX);
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.conns.retain(|conn| {
            let idle = conn.streams.load(Ordering::Acquire) == 0
                && now.saturating_sub(conn.last_used.load(Ordering::Acquire)) >= idle_ms;
            !conn.closed.load(Ordering::Acquire) && !idle
        });
    }
}

impl super::pool::Sweep for Shared {
    fn sweep(&self) {
        Shared::sweep(self);
    }
}

/// Clears the pool's `connecting` mark however the connect ends (also when the request
/// waiting on it is cancelled), and wakes the requests that waited for it.
struct Connecting<'a>(&'a Arc<Shared>);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).connecting = false;
        self.0.changed.notify_waiters();
    }
}

/// One stream's place on a connection, given back when the request and response are done.
struct Claim {
    conn: Arc<Conn>,
    pool: Weak<Shared>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::AcqRel);
        if let Some(pool) = self.pool.upgrade() {
            self.conn.last_used.store(pool.now_ms(), Ordering::Release);
            pool.changed.notify_one();
        }
    }
}

/// The peer says it never processed the stream: refused, or cut off by its GOAWAY.
fn unprocessed(error: &h2::Error) -> bool {
    error.reason() == Some(Reason::REFUSED_STREAM) || (error.is_go_away() && error.is_remote())
}

/// The request head for one attempt (a failed attempt consumes its copy).
fn copy_head(head: &http::request::Parts) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    request
}

/// Copies the client's request body (data, then trailers) onto the upstream stream, within
/// the stream's flow-control window. Ends early, resetting the stream, when the client's body
/// fails or the response side is dropped (the client went away or keygate gave up).
async fn pump(
    mut body: RequestBody,
    mut stream: SendStream<Bytes>,
    mut cancelled: oneshot::Receiver<()>,
    _claim: Arc<Claim>,
) {
    let outcome = tokio::select! {
        outcome = copy_body(&mut body, &mut stream) => outcome,
        _ = &mut cancelled => Err(Reason::CANCEL),
    };
    if let Err(reason) = outcome {
        stream.send_reset(reason);
    }
}

async fn copy_body(body: &mut RequestBody, stream: &mut SendStream<Bytes>) -> Result<(), Reason> {
    loop {
        let frame = match std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await {
            None => return stream.send_data(Bytes::new(), true).map_err(|_| Reason::CANCEL),
            Some(Err(_)) => return Err(Reason::CANCEL),
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(mut data) => {
                let end = body.is_end_stream();
                if data.is_empty() {
                    // An empty DATA frame carrying only END_STREAM (as tonic ends a call).
                    if end {
                        return stream.send_data(data, true).map_err(|_| Reason::CANCEL);
                    }
                    continue;
                }
                while !data.is_empty() {
                    stream.reserve_capacity(data.len());
                    let granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
                        Some(Ok(n)) => n,
                        // The stream was reset or the connection lost: nothing more can go out.
                        Some(Err(_)) | None => return Err(Reason::CANCEL),
                    };
                    let chunk = data.split_to(granted.min(data.len()));
                    stream.send_data(chunk, end && data.is_empty()).map_err(|_| Reason::CANCEL)?;
                }
                if end {
                    return Ok(());
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            return stream.send_trailers(trailers).map_err(|_| Reason::CANCEL);
        }
    }
}

/// An HTTP/2 upstream response body: data, then trailers. Dropping it before the end resets
/// the upstream stream.
pub struct H2Body {
    recv: RecvStream,
    data_done: bool,
    /// Dropped with the body: tells the request pump to stop.
    _cancel: oneshot::Sender<()>,
    _claim: Arc<Claim>,
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match this.recv.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    // Handed on to the client connection, whose own flow control now holds it
                    // back: the upstream may send more.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.recv.poll_trailers(cx) {
            Poll::Ready(Ok(Some(trailers))) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

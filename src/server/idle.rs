//! Idle detection for a connection: an I/O wrapper that notes when bytes last moved, and a
//! clock of request progress, so the server can close a connection, or a stalled request body,
//! after `idle_timeout` of silence.
//!
//! It also keeps the HTTP/1 head clock (`header_read_timeout`): when the connection began
//! waiting for its next request head, so the watchdog can drop a client that does not finish
//! one in time. hyper has such a timer too, but it arms and disarms a tokio timer for every
//! request; here it costs one clock read when an exchange ends.
//!
//! On HTTP/2, bytes moving prove nothing: a peer that only sends PINGs (or SETTINGS, or
//! WINDOW_UPDATEs for a stream it never reads) keeps the socket busy while doing no work, and
//! would hold a `max_connections` slot forever. There the clock is request progress instead:
//! a request beginning or ending, or a body frame passing either way.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What a connection has done: when bytes last moved (milliseconds since it began), how many
/// bytes it has read and written, and how many requests are waiting on an upstream.
#[derive(Debug, Clone)]
pub struct Activity {
    start: Instant,
    /// `start` on the coarse clock, which the per-I/O notes read (see [`Activity::now_ms`]).
    coarse_start: coarsetime::Instant,
    shared: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    last_ms: AtomicU64,
    progress_ms: AtomicU64,
    read: AtomicU64,
    written: AtomicU64,
    in_flight: AtomicU64,
    /// Exchanges begun and not yet over (their response sent, or abandoned).
    active: AtomicU64,
    /// When the connection last began waiting for a request head: its start, or the end of
    /// its last exchange (milliseconds since it began).
    head_wait_ms: AtomicU64,
    /// Set once the client has sent the HTTP/2 connection preface.
    http2: AtomicBool,
}

/// More than one tick of the coarse clock at any kernel timer frequency down to 100 Hz.
const COARSE_SLACK_MS: u64 = 10;

/// The start of the HTTP/2 connection preface (RFC 9113 §3.4).
const PREFACE_START: &[u8] = b"PRI * HTTP/2.0";

/// The length of the HTTP/2 connection preface, the most a client must send before the
/// server can tell HTTP/1 from HTTP/2.
const PREFACE_LEN: u64 = 24;

impl Activity {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            coarse_start: coarsetime::Instant::now_without_cache_update(),
            shared: Arc::default(),
        }
    }

    /// Milliseconds since the connection began, rounded up by [`COARSE_SLACK_MS`]. Read on
    /// every read and write, so from the kernel's coarse clock (`CLOCK_MONOTONIC_COARSE`, a
    /// counter the timer tick updates), which costs a fraction of a precise reading. Running
    /// up to one tick behind, it could put a deadline that early; the slack makes every
    /// deadline derived from it late by at most a few milliseconds instead, never early.
    fn now_ms(&self) -> u64 {
        let elapsed = coarsetime::Instant::now_without_cache_update().duration_since(self.coarse_start);
        elapsed.as_millis().saturating_add(COARSE_SLACK_MS)
    }

    /// Bytes moved. Only HTTP/1's idle clock is bytes (see the module's note), so HTTP/2 skips
    /// the clock read.
    fn touch(&self) {
        if !self.is_http2() {
            self.shared.last_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// A request began or ended, or a body frame passed: the connection is doing work. Only
    /// HTTP/2's idle clock is progress, so HTTP/1 skips the clock read.
    pub fn progress(&self) {
        if self.is_http2() {
            self.shared.progress_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    pub fn is_http2(&self) -> bool {
        self.shared.http2.load(Ordering::Relaxed)
    }

    fn count(&self, counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    /// One request on this connection. While its body has been read to the end and its
    /// response has not begun, it waits on the upstream: not idle, however quiet the client
    /// is (that wait is bounded by `request_timeout` instead). A stalled body stays idle.
    pub fn exchange(&self) -> Exchange {
        self.progress();
        self.shared.active.fetch_add(1, Ordering::AcqRel);
        Exchange(Arc::new(ExchangeState {
            activity: self.clone(),
            stage: AtomicU8::new(READING),
            body_failed: AtomicBool::new(false),
        }))
    }

    pub fn has_requests_in_flight(&self) -> bool {
        self.shared.in_flight.load(Ordering::Relaxed) > 0
    }

    /// The instant by which the request head the connection waits for must have arrived, on
    /// HTTP/1; `None` while an exchange is under way (no head is awaited then).
    pub fn head_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.shared.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        Some(self.start + Duration::from_millis(self.shared.head_wait_ms.load(Ordering::Relaxed)) + timeout)
    }

    /// A client that, by `header_read_timeout`, has neither sent enough to choose a protocol
    /// nor been answered anything is not going to send a request head.
    pub fn never_spoke(&self) -> bool {
        self.shared.read.load(Ordering::Relaxed) < PREFACE_LEN
            && self.shared.written.load(Ordering::Relaxed) == 0
    }

    pub fn started(&self) -> Instant {
        self.start
    }

    /// The instant at which the connection will have been idle for `timeout`: on HTTP/1 with
    /// no bytes moving; on HTTP/2 with no request progress (see the module's note).
    pub fn idle_deadline(&self, timeout: Duration) -> Instant {
        let clock = if self.shared.http2.load(Ordering::Relaxed) {
            &self.shared.progress_ms
        } else {
            &self.shared.last_ms
        };
        self.start + Duration::from_millis(clock.load(Ordering::Relaxed)) + timeout
    }
}

const READING: u8 = 0;
const WAITING: u8 = 1;
const FINISHED: u8 = 2;

/// One request on a connection: its place in [`Activity`]'s count of requests waiting on an
/// upstream, and whether reading its body failed. Shared by the request body, the response
/// body and the service (one allocation per request for all of it); the exchange is over when
/// the last of them is dropped.
#[derive(Clone)]
pub struct Exchange(Arc<ExchangeState>);

struct ExchangeState {
    activity: Activity,
    stage: AtomicU8,
    body_failed: AtomicBool,
}

impl Exchange {
    /// A body frame passed, or the exchange ended.
    pub fn progress(&self) {
        self.0.activity.progress();
    }

    /// The body has been read to the end. Ignored once the response has begun.
    pub fn body_done(&self) {
        let state = &self.0;
        if state.stage.compare_exchange(READING, WAITING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            state.activity.shared.in_flight.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The response has begun (or the request failed); idempotent.
    pub fn finish(&self) {
        self.0.finish();
    }

    /// Reading the client's body failed (bad chunking, cut short).
    pub fn body_failed(&self) {
        self.0.body_failed.store(true, Ordering::Relaxed);
    }

    /// Whether reading the client's body failed.
    pub fn has_body_failed(&self) -> bool {
        self.0.body_failed.load(Ordering::Relaxed)
    }
}

impl ExchangeState {
    fn finish(&self) {
        if self.stage.swap(FINISHED, Ordering::AcqRel) == WAITING {
            self.activity.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for ExchangeState {
    fn drop(&mut self) {
        self.finish();
        let activity = &self.activity;
        // The wait for the next head starts now (only HTTP/1 has that clock).
        if !activity.is_http2() {
            activity.shared.head_wait_ms.store(activity.now_ms(), Ordering::Relaxed);
        }
        activity.shared.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An I/O stream that reports every successful read or write to its [`Activity`].
pub struct Tracked<T> {
    inner: T,
    activity: Activity,
    /// Bytes read once and given back, to be read again first (and not counted again).
    unread: bytes::Bytes,
}

impl<T> Tracked<T> {
    pub fn new(inner: T, activity: Activity) -> Self {
        Self { inner, activity, unread: bytes::Bytes::new() }
    }

    /// Gives back `read`, bytes read from this stream and not consumed: the next reads return
    /// them before anything new. How hyper takes over a connection keygate's own HTTP/1 loop
    /// has begun.
    pub fn put_back(&mut self, read: bytes::Bytes) {
        self.unread = read;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.unread.is_empty() {
            let n = this.unread.len().min(buf.remaining());
            buf.put_slice(&this.unread.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if matches!(result, Poll::Ready(Ok(()))) && read > 0 {
            let shared = &this.activity.shared;
            if shared.read.load(Ordering::Relaxed) == 0 && buf.filled()[before..].starts_with(PREFACE_START) {
                shared.http2.store(true, Ordering::Relaxed);
            }
            this.activity.count(&shared.read, read);
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            this.activity.count(&this.activity.shared.written, n);
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            this.activity.count(&this.activity.shared.written, n);
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A response body that reports each frame, and its own end, as progress of its exchange.
pub struct ProgressBody<B> {
    inner: B,
    exchange: Exchange,
}

impl<B> ProgressBody<B> {
    pub fn new(inner: B, exchange: Exchange) -> Self {
        Self { inner, exchange }
    }

    pub fn inner(&self) -> &B {
        &self.inner
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for ProgressBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            this.exchange.progress();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for ProgressBody<B> {
    fn drop(&mut self) {
        // The exchange is over (sent whole, or abandoned): the idle clock starts from here.
        self.exchange.progress();
    }
}

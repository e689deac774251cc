//! The cap on open connections to one upstream host:port (`upstream_max_connections`): every
//! connection holds a slot for its whole life, and a request that needs a new connection while
//! all slots are taken waits for one (or for a pooled connection to come free).
//!
//! A request waits within its `request_timeout`; [`bounded`] tells a request that ran out of
//! time still waiting for a slot (503 `upstream_busy`) from one the upstream was slow to answer
//! (504). The wait is marked through a task-local, because part of it happens inside
//! hyper-util's connector, which sees only a URI.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a connect that hyper-util finishes in the background (after the request that
/// started it was served by a pooled connection) may wait for a slot.
const BACKGROUND_WAIT: Duration = Duration::from_secs(30);

tokio::task_local! {
    /// Set while the request polled under [`bounded`] waits for a connection slot.
    static WAITING: Arc<AtomicBool>;
}

/// The slots of one upstream host:port, shared by every transport and snapshot that names it.
#[derive(Debug)]
pub struct ConnectionLimit {
    slots: Arc<Semaphore>,
    max: usize,
    open: Gauge,
}

impl ConnectionLimit {
    pub fn new(max: usize, open: Gauge) -> Arc<Self> {
        Arc::new(Self { slots: Arc::new(Semaphore::new(max)), max, open })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot if one is free now.
    pub fn try_acquire(&self) -> Option<ConnectionSlot> {
        let permit = Arc::clone(&self.slots).try_acquire_owned().ok()?;
        Some(self.slot(permit))
    }

    /// Waits for a slot, first come first served.
    pub async fn acquire(&self) -> ConnectionSlot {
        if let Some(slot) = self.try_acquire() {
            return slot;
        }
        let waiting = Waiting::start();
        match Arc::clone(&self.slots).acquire_owned().await {
            Ok(permit) => {
                waiting.finish();
                self.slot(permit)
            }
            // The semaphore is never closed; should it be, the request's timeout ends the wait.
            Err(_) => std::future::pending().await,
        }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> ConnectionSlot {
        self.open.inc();
        ConnectionSlot { _permit: permit, open: self.open.clone() }
    }
}

/// One open upstream connection's place under the limit; freed when the connection is dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    open: Gauge,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// Marks the current request as waiting for a connection until [`finish`](Self::finish)ed.
/// A wait cut short by the request's timeout is never finished, so the mark is still there
/// when [`bounded`] looks (the timeout drops the request's future before that).
pub struct Waiting(Option<Arc<AtomicBool>>);

impl Waiting {
    pub fn start() -> Self {
        let flag = WAITING.try_with(Arc::clone).ok();
        if let Some(flag) = &flag {
            flag.store(true, Ordering::Relaxed);
        }
        Self(flag)
    }
}

impl Waiting {
    pub fn finish(self) {
        if let Some(flag) = &self.0 {
            flag.store(false, Ordering::Relaxed);
        }
    }
}

/// Why [`bounded`] gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overdue {
    /// Still waiting for a connection slot.
    Busy,
    /// Sent, but no response head in time.
    Timeout,
}

/// Runs `sending` for at most `limit`, telling apart the two ways it can run out of time.
/// `send` makes the future: called once the box is there, so that the future is built in it
/// rather than built aside and copied in (a send future is a few kilobytes).
pub fn bounded<F: Future>(limit: Duration, send: impl FnOnce() -> F) -> Bounded<F> {
    let waiting = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&waiting);
    let timed = built_in_box(|| tokio::time::timeout(limit, WAITING.scope(flag, send())));
    Bounded { timed, waiting }
}

/// The future `make` makes, in a box: the box comes first and `make` is called to fill it,
/// so that a large future is built in place rather than built aside and copied in.
pub fn built_in_box<F: Future>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// A send under its deadline (see [`bounded`]).
///
/// Not an `async fn`: one would keep `sending` twice, as its argument and as the future it
/// awaits, and a send is the largest thing in a request's future. Boxed here, it is built in
/// place once, and the request's own future (which hyper moves whole) holds only a pointer.
pub struct Bounded<F: Future> {
    timed: Pin<Box<Timed<F>>>,
    waiting: Arc<AtomicBool>,
}

/// The send with its deadline, and the flag that tells a wait for a slot from a slow upstream.
type Timed<F> = tokio::time::Timeout<tokio::task::futures::TaskLocalFuture<Arc<AtomicBool>, F>>;

impl<F: Future> Future for Bounded<F> {
    type Output = Result<F::Output, Overdue>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        match this.timed.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(output)) => Poll::Ready(Ok(output)),
            Poll::Ready(Err(_)) if this.waiting.load(Ordering::Relaxed) => Poll::Ready(Err(Overdue::Busy)),
            Poll::Ready(Err(_)) => Poll::Ready(Err(Overdue::Timeout)),
        }
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

/// A connector for hyper-util's client whose connections each hold a slot of `limit`.
#[derive(Clone)]
pub struct LimitedConnector<C> {
    inner: C,
    limit: Arc<ConnectionLimit>,
}

impl<C> LimitedConnector<C> {
    pub fn new(inner: C, limit: Arc<ConnectionLimit>) -> Self {
        Self { inner, limit }
    }
}

impl<C> tower_service::Service<Uri> for LimitedConnector<C>
where
    C: tower_service::Service<Uri> + Clone + Send + 'static,
    C::Future: Send,
    C::Error: Into<BoxError>,
{
    type Response = Limited<C::Response>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        // The clone that was polled ready is the one that connects (tower's contract).
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let limit = Arc::clone(&self.limit);
        Box::pin(async move {
            let slot = if WAITING.try_with(|_| ()).is_ok() {
                limit.acquire().await
            } else {
                tokio::time::timeout(BACKGROUND_WAIT, limit.acquire())
                    .await
                    .map_err(|_| BoxError::from("no free connection slot for this upstream"))?
            };
            let io = inner.call(uri).await.map_err(Into::into)?;
            Ok(Limited { io, _slot: slot })
        })
    }
}

/// A connection that gives its slot back when it closes.
pub struct Limited<T> {
    io: T,
    _slot: ConnectionSlot,
}

impl<T: Connection> Connection for Limited<T> {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for Limited<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for Limited<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_wait_that_runs_out_is_busy_and_a_slow_answer_a_timeout() {
        let limit = ConnectionLimit::new(1, Gauge::default());
        let held = limit.acquire().await;
        let waited = bounded(Duration::from_millis(20), || limit.acquire()).await;
        assert_eq!(waited.err(), Some(Overdue::Busy));
        let slow = bounded(Duration::from_millis(20), std::future::pending::<()>).await;
        assert_eq!(slow.err(), Some(Overdue::Timeout));
        drop(held);
        assert!(bounded(Duration::from_secs(5), || limit.acquire()).await.is_ok());
    }

    #[test]
    fn the_gauge_counts_open_slots() {
        let open = Gauge::default();
        let limit = ConnectionLimit::new(2, open.clone());
        let a = limit.try_acquire();
        let b = limit.try_acquire();
        assert!(a.is_some() && b.is_some());
        assert!(limit.try_acquire().is_none());
        assert_eq!(open.get(), 2);
        drop(a);
        assert_eq!(open.get(), 1);
    }
}

//! The listener: accepts connections on one or more worker threads, serves HTTP/1.1 and
//! HTTP/2 on one port, and drains in-flight requests on shutdown.

pub mod h1;
pub(crate) mod idle;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_rustls::TlsAcceptor;

use crate::proxy::forward::{ClientInfo, ConnectionGuard, RequestBody};
use crate::proxy::{Gateway, Handled, ProxyBody};
use crate::tls::{self, CurrentCert};
use idle::{Activity, Exchange, ProgressBody, Tracked};

/// The hard cap on a request head, above `max_header_bytes` (where the pipeline answers its
/// JSON 431 for a whole head): a head not whole within it gets the JSON 431 from keygate's own
/// HTTP/1 loop, or hyper's empty one on a connection already handed to hyper (`server::h1`).
fn hard_head_limit(max_header_bytes: usize) -> usize {
    (max_header_bytes * 2).max(8192)
}

/// Serves `listener` until `shutdown` resolves, then stops accepting and waits for open
/// connections to finish, up to the configured `shutdown_timeout`. The listener is bound by
/// the caller, so tests and `main` share this one path.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(gateway.snapshot().server.max_connections));
    accept_loop(listener, gateway, slots, Share::alone(), shutdown).await
}

/// [`serve`] on `workers` threads: the calling one and `workers - 1` more, each a
/// current-thread runtime of its own accepting from the same listening socket (as nginx's
/// workers do), all sharing one `max_connections` cap. A connection, and every task it spawns,
/// stays on the thread that accepted it, so a request never waits in another thread's queue
/// and never has to wake another thread. One multi-thread runtime with 2 workers on 2 cores
/// served fewer requests than 1 worker (issue 17): its idle workers are woken to steal
/// on most task wake-ups, and HTTP/2 streams, spawned as tasks, ran on the other thread
/// from their connection. Whichever thread is free first takes the next connection, so a
/// busy worker is not handed more.
pub async fn serve_workers(
    workers: usize,
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if workers <= 1 {
        return serve(listener, gateway, shutdown).await;
    }
    let slots = Arc::new(Semaphore::new(gateway.snapshot().server.max_connections));
    // `into_std` leaves the socket non-blocking, as each runtime's `from_std` needs.
    let listener = listener.into_std()?;
    // The other workers stop when this says so, or when it is dropped (this one failed).
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut finished = Vec::with_capacity(workers - 1);
    let loads: Arc<[AtomicUsize]> = (0..workers).map(|_| AtomicUsize::new(0)).collect();
    for index in 1..workers {
        let listener = listener.try_clone()?;
        let gateway = Arc::clone(&gateway);
        let slots = Arc::clone(&slots);
        let share = Share { loads: Arc::clone(&loads), index };
        let mut stop = stop_rx.clone();
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new().name(format!("keygate-worker-{index}")).spawn(move || {
            let served =
                tokio::runtime::Builder::new_current_thread().enable_all().build().and_then(|runtime| {
                    runtime.block_on(async move {
                        let listener = TcpListener::from_std(listener)?;
                        let stopped = async move {
                            let _ = stop.changed().await;
                        };
                        accept_loop(listener, gateway, slots, share, stopped).await
                    })
                });
            let _ = done_tx.send(served);
        })?;
        finished.push(done_rx);
    }
    let listener = TcpListener::from_std(listener)?;
    let shutdown = async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    };
    let served = accept_loop(listener, gateway, slots, Share { loads, index: 0 }, shutdown).await;
    // Every worker drains within its own shutdown_timeout; the process ends after the last.
    for done in finished {
        match done.await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "a worker thread ended with an error"),
            Err(_) => tracing::warn!("a worker thread ended without reporting"),
        }
    }
    served
}

/// One worker's part of the connections: how many each worker holds, and which one is this.
struct Share {
    loads: Arc<[AtomicUsize]>,
    index: usize,
}

/// How long a worker holding more connections than another leaves a new connection to it.
const DEFER_TO_IDLER: Duration = Duration::from_millis(1);

impl Share {
    fn alone() -> Self {
        Self { loads: Arc::new([AtomicUsize::new(0)]), index: 0 }
    }

    /// Whether another worker holds fewer connections than this one.
    fn busier_than_another(&self) -> bool {
        let mine = self.loads[self.index].load(Ordering::Relaxed);
        self.loads.iter().enumerate().any(|(i, load)| i != self.index && load.load(Ordering::Relaxed) < mine)
    }

    /// Counts a connection against this worker until the returned mark is dropped.
    fn hold(&self) -> Held {
        self.loads[self.index].fetch_add(1, Ordering::Relaxed);
        Held { loads: Arc::clone(&self.loads), index: self.index }
    }
}

/// One connection counted against its worker (see [`Share`]).
struct Held {
    loads: Arc<[AtomicUsize]>,
    index: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.loads[self.index].fetch_sub(1, Ordering::Relaxed);
    }
}

/// One worker's accept loop: takes a slot of the shared connection cap, accepts, and runs the
/// connection on this thread's runtime; on `shutdown`, drains what this loop accepted.
///
/// Every worker is woken for every new connection and the first to call `accept` gets it, so
/// a few connections opened at once (an HTTP/2 client's handful) could all land on one
/// worker and leave the others idle for the connections' whole lives. So a worker holding
/// more connections than another waits [`DEFER_TO_IDLER`] before accepting: the idler one takes
/// the connection meanwhile, and if it is too busy to, nothing waits longer than that.
async fn accept_loop(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    slots: Arc<Semaphore>,
    share: Share,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let snapshot = gateway.snapshot();
    let settings = snapshot.server.clone();
    // Whether the listener speaks TLS is fixed at start; the certificate itself follows reloads.
    let tls = match &snapshot.tls {
        Some(_) => {
            let current = Arc::clone(&gateway);
            let resolver =
                CurrentCert(move || current.snapshot().tls.as_ref().map(|t| Arc::clone(&t.certified)));
            let config = tls::server_config(Arc::new(resolver)).map_err(std::io::Error::other)?;
            Some(TlsAcceptor::from(config))
        }
        None => None,
    };
    drop(snapshot);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The watchdog keeps this clock (see `Watchdog`): hyper's arms and disarms a tokio
        // timer for every request head.
        .header_read_timeout(None)
        .max_buf_size(hard_head_limit(settings.max_header_bytes))
        // One write of head and body, where writev gathers them from a queue of buffers: keygate's
        // answers and most proxied heads are small, and the queue costs more than the copy.
        .writev(false)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(hard_head_limit(settings.max_header_bytes)).unwrap_or(u32::MAX))
        // Rapid-reset (CVE-2023-44487) and error-flood limits.
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(1024));

    // Each connection task holds a sender; when every one is dropped, the drain is done.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    // Connections beyond the cap (`slots`) wait in the kernel's accept queue instead of costing
    // memory and file descriptors here.
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        if share.busier_than_another() {
            tokio::select! {
                () = tokio::time::sleep(DEFER_TO_IDLER) => {}
                () = &mut shutdown => break,
            }
        }
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => {
                    backoff = Duration::from_millis(5);
                    accepted
                }
                Err(error) => {
                    // Usually out of file descriptors: wait for some to close instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let connection = Connection {
            gateway: Arc::clone(&gateway),
            builder: builder.clone(),
            stop: stop_rx.clone(),
            idle_timeout: settings.idle_timeout,
            header_read_timeout: settings.header_read_timeout,
            head_limit: hard_head_limit(settings.max_header_bytes),
            // Released when the connection and any relay of its upgrade are both gone.
            guard: ConnectionGuard(Arc::new((slot, done_tx.clone(), share.hold()))),
        };
        let tls = tls.clone();
        let handshake_timeout = settings.header_read_timeout;
        tokio::spawn(async move {
            let activity = Activity::new();
            match tls {
                None => {
                    let client = ClientInfo::new(peer, false);
                    connection.run(Tracked::new(stream, activity.clone()), activity, client).await;
                }
                Some(acceptor) => {
                    // A handshake is bounded like a request head: a silent client is dropped.
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            let client = ClientInfo::new(peer, true);
                            connection.run(Tracked::new(stream, activity.clone()), activity, client).await;
                        }
                        Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    drop(listener);
    gateway.start_draining();
    let _ = stop_tx.send(true);
    drop(done_tx);
    if tokio::time::timeout(settings.shutdown_timeout, done_rx.recv()).await.is_err() {
        tracing::warn!("shutdown_timeout reached with requests still in flight; closing them");
    }
    Ok(())
}

/// What one connection needs from the server.
struct Connection {
    gateway: Arc<Gateway>,
    builder: auto::Builder<TokioExecutor>,
    stop: watch::Receiver<bool>,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    /// A request head not whole within this many bytes is refused (431).
    head_limit: usize,
    guard: ConnectionGuard,
}

impl Connection {
    /// Serves HTTP on `io` until the peer is done, the connection has been idle for
    /// `idle_timeout` (no bytes either way: an idle keep-alive or a stalled body), or a drain
    /// asks it to finish its requests and close.
    async fn run<IO>(self, mut io: Tracked<IO>, activity: Activity, client: ClientInfo)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let client = Arc::new(client.with_guard(self.guard.clone()));
        let peer = client.peer;
        let draining = AtomicBool::new(false);
        let connection = async {
            // keygate's own HTTP/1 path first; hyper takes over whatever that path does not serve.
            let serving = h1::Serving {
                gateway: &self.gateway,
                client: &client,
                activity: &activity,
                draining: &draining,
                head_limit: self.head_limit,
            };
            let read = match h1::serve(&mut io, serving).await {
                h1::Served::Closed => return Ok(()),
                h1::Served::Handoff(read) => read,
            };
            let gateway = Arc::clone(&self.gateway);
            let requests = activity.clone();
            let client = Arc::clone(&client);
            let service = service_fn(move |request: Request<Incoming>| {
                let exchange = requests.exchange();
                let request = request.map(|body| RequestBody::new(body, exchange.clone()));
                Answer {
                    handled: gateway.handle(&client, request),
                    exchange: Some(exchange),
                    for_hyper: true,
                }
            });
            io.put_back(read);
            let connection = self.builder.serve_connection_with_upgrades(TokioIo::new(io), service);
            let mut connection = std::pin::pin!(connection);
            let mut shutting_down = false;
            std::future::poll_fn(|cx| {
                if !shutting_down && draining.load(Ordering::Relaxed) {
                    shutting_down = true;
                    connection.as_mut().graceful_shutdown();
                }
                connection.as_mut().poll(cx)
            })
            .await
        };
        tokio::pin!(connection);
        // The clocks live in a task of their own: this loop is woken for every request, and
        // polling timers and the drain signal on each of those wakes is work for nothing.
        let (verdict_tx, mut verdict) = verdict_channel();
        let watch = Watchdog {
            activity: activity.clone(),
            idle_timeout: self.idle_timeout,
            header_read_timeout: self.header_read_timeout,
            stop: self.stop.clone(),
        };
        tokio::spawn(watch.run(verdict_tx));
        let result = tokio::select! {
            biased;
            result = connection.as_mut() => result,
            verdict = &mut verdict => match verdict {
                Verdict::Drain => {
                    // Finish what is under way, then close (either path reads this).
                    draining.store(true, Ordering::Relaxed);
                    connection.await
                }
                Verdict::Idle => {
                    tracing::debug!(%peer, "closing idle connection");
                    return;
                }
                Verdict::Silent => {
                    tracing::debug!(%peer, "closing a connection whose request head did not arrive in time");
                    return;
                }
            },
        };
        if let Err(error) = result {
            tracing::debug!(%peer, %error, "connection ended with an error");
        }
    }
}

/// One request's answer as hyper awaits it: ready at once when keygate answered the request
/// itself, else when the gateway's continuation is. Small, since hyper moves it into place
/// for every request; the continuation, when there is one, is boxed.
struct Answer {
    handled: Handled,
    exchange: Option<Exchange>,
    /// The answer goes to hyper, which writes a head from the header map alone (see
    /// [`crate::proxy::reply`]).
    for_hyper: bool,
}

impl Future for Answer {
    type Output = Result<Response<ProgressBody<ProxyBody>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let response = match &mut this.handled {
            Handled::Now(response) => response.take(),
            Handled::Later(continuation) => match continuation.as_mut().poll(cx) {
                Poll::Ready(response) => Some(response),
                Poll::Pending => return Poll::Pending,
            },
        };
        match (response, this.exchange.take()) {
            (Some(mut response), Some(exchange)) => {
                exchange.finish();
                if this.for_hyper {
                    crate::proxy::reply::settle(&mut response);
                }
                Poll::Ready(Ok(response.map(|body| ProgressBody::new(body, exchange))))
            }
            // Polled again after it was ready: a contract breach of the caller's.
            _ => Poll::Pending,
        }
    }
}

/// Why a connection's watchdog wants it to end.
enum Verdict {
    /// No bytes moved either way for `idle_timeout` while no request waited on an upstream.
    Idle,
    /// Nothing that could start a request arrived within `header_read_timeout`, or (HTTP/1) a
    /// request head did not arrive whole within `header_read_timeout` of the connection
    /// beginning to wait for it.
    Silent,
    /// Shutdown: finish the requests in flight, then close.
    Drain,
}

/// Watches one connection's clocks and the drain signal, and says when it must end.
struct Watchdog {
    activity: Activity,
    idle_timeout: Duration,
    header_read_timeout: Duration,
    stop: watch::Receiver<bool>,
}

impl Watchdog {
    /// Ends once it has given its verdict, or when the connection is gone.
    async fn run(mut self, verdict: VerdictSender) {
        let activity = &self.activity;
        // hyper's head timer starts only once it knows the protocol; a client that sends
        // nothing (or half an HTTP/2 preface) is dropped here at the same deadline.
        let first_words = tokio::time::sleep_until(activity.started() + self.header_read_timeout);
        tokio::pin!(first_words);
        let mut first_words_pending = true;
        let idle = tokio::time::sleep_until(activity.idle_deadline(self.idle_timeout));
        tokio::pin!(idle);
        // HTTP/1 only (hyper bounds HTTP/2's frames itself): re-armed while an exchange is
        // under way, since the head clock only starts when it ends.
        let head_deadline = |now: tokio::time::Instant| {
            activity.head_deadline(self.header_read_timeout).unwrap_or(now + self.header_read_timeout)
        };
        let head = tokio::time::sleep_until(head_deadline(activity.started()));
        tokio::pin!(head);
        let mut head_pending = true;
        let VerdictSender { sender: mut verdict, given } = verdict;
        let said = loop {
            tokio::select! {
                () = verdict.closed() => return,
                _ = self.stop.changed() => break Verdict::Drain,
                () = &mut first_words, if first_words_pending => {
                    first_words_pending = false;
                    if activity.never_spoke() {
                        break Verdict::Silent;
                    }
                }
                () = &mut head, if head_pending => {
                    if activity.is_http2() {
                        head_pending = false;
                        continue;
                    }
                    let now = tokio::time::Instant::now();
                    let deadline = head_deadline(now);
                    if deadline <= now {
                        break Verdict::Silent;
                    }
                    head.as_mut().reset(deadline);
                }
                () = &mut idle => {
                    let now = tokio::time::Instant::now();
                    // A request waiting on its upstream is bounded by request_timeout instead.
                    let deadline = if activity.has_requests_in_flight() {
                        now + self.idle_timeout
                    } else {
                        activity.idle_deadline(self.idle_timeout)
                    };
                    // Bytes may have moved while we slept; only a deadline still past counts.
                    if deadline <= now {
                        break Verdict::Idle;
                    }
                    idle.as_mut().reset(deadline);
                }
            }
        };
        given.store(true, Ordering::Release);
        let _ = verdict.send(said);
    }
}

/// The watchdog's end of [`verdict_channel`].
struct VerdictSender {
    sender: oneshot::Sender<Verdict>,
    given: Arc<AtomicBool>,
}

/// The connection's end of [`verdict_channel`]: a future of the verdict that, once it has
/// registered the task's waker with the channel, looks at the channel again only when a
/// verdict has been given. The connection's loop polls it on every wake-up of its task
/// (every request), where a channel's poll is several atomic operations and a budget check.
struct VerdictWait {
    receiver: oneshot::Receiver<Verdict>,
    given: Arc<AtomicBool>,
    registered: bool,
}

/// A one-shot channel for a [`Verdict`]. A sender dropped without a verdict (the runtime
/// shutting down) leaves the wait pending for good: the connection then serves to its end.
fn verdict_channel() -> (VerdictSender, VerdictWait) {
    let (sender, receiver) = oneshot::channel();
    let given = Arc::new(AtomicBool::new(false));
    (VerdictSender { sender, given: Arc::clone(&given) }, VerdictWait { receiver, given, registered: false })
}

impl Future for VerdictWait {
    type Output = Verdict;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Verdict> {
        let this = self.get_mut();
        // A task's waker stays the same for its life, so the one registered first is the one
        // the sender will wake.
        if this.registered && !this.given.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        this.registered = true;
        match Pin::new(&mut this.receiver).poll(cx) {
            Poll::Ready(Ok(verdict)) => Poll::Ready(verdict),
            Poll::Ready(Err(_)) | Poll::Pending => Poll::Pending,
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C): the signals that begin a graceful drain.
///
/// The handlers are installed when this is called, not when the future is first polled, so a
/// signal that arrives right after start-up is never the default "terminate now".
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let term = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::terminate())
            .map_err(
                |error| tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C will stop keygate"),
            )
            .ok()
    };
    #[cfg(unix)]
    let interrupt = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::interrupt())
            .map_err(|error| tracing::warn!(%error, "cannot listen for SIGINT"))
            .ok()
    };
    async move {
        #[cfg(unix)]
        {
            let (mut term, mut interrupt) = (term, interrupt);
            let term = async move {
                match term.as_mut() {
                    Some(term) => term.recv().await,
                    None => std::future::pending().await,
                }
            };
            let interrupt = async move {
                match interrupt.as_mut() {
                    Some(interrupt) => interrupt.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = term => {}
                _ = interrupt => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutting down: draining in-flight requests");
    }
}

/// Binds `addr` and logs the address actually bound (port 0 picks a free one).
pub async fn bind(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "listening on {}", listener.local_addr()?);
    Ok(listener)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_defers_only_to_one_holding_fewer_connections() {
        let loads: Arc<[AtomicUsize]> = (0..3).map(|_| AtomicUsize::new(0)).collect();
        let shares: Vec<Share> = (0..3).map(|index| Share { loads: Arc::clone(&loads), index }).collect();
        assert!(!shares.iter().any(Share::busier_than_another), "all idle: nobody defers");
        let first = shares[0].hold();
        assert!(shares[0].busier_than_another());
        assert!(!shares[1].busier_than_another() && !shares[2].busier_than_another());
        let second = shares[1].hold();
        let third = shares[2].hold();
        assert!(!shares.iter().any(Share::busier_than_another), "even: nobody defers");
        drop((first, second));
        assert!(shares[2].busier_than_another(), "a closed connection counts no more");
        drop(third);
        assert!(!Share::alone().busier_than_another(), "a single worker never waits");
    }
}

//! The listener: accepts connections, serves HTTP/1.1 and cleartext HTTP/2 on one port, and
//! drains in-flight requests on shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};

use crate::proxy::Gateway;
use crate::proxy::forward::ClientInfo;

/// hyper's own hard cap on a request head, above keygate's JSON 431 limit so that most
/// oversized heads get the JSON answer; beyond this hyper answers 431 itself.
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
    let settings = gateway.snapshot().server.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(hard_head_limit(settings.max_header_bytes))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(hard_head_limit(settings.max_header_bytes)).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(1024));

    // Each connection task holds a sender; when every one is dropped, the drain is done.
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    let mut backoff = Duration::from_millis(5);
    loop {
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
        let client = ClientInfo { peer, tls: false };
        let gateway = Arc::clone(&gateway);
        let builder = builder.clone();
        let done = done_tx.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let gateway = Arc::clone(&gateway);
                async move { Ok::<_, Infallible>(gateway.handle(client, request).await) }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                _ = stop.changed() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
            drop(done);
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

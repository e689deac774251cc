//! A real gRPC stack for the tests: a small tonic service (unary, server-streaming,
//! bidirectional, and a call that waits until it is cancelled) served by hyper over h2c or TLS,
//! and a tonic client over h2c or TLS. The service is written by hand against
//! `tonic::server::Grpc` with prost-derived messages, so no protoc is needed at build time.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::uri::PathAndQuery;
use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{MetadataKey, MetadataValue};
use tonic::{Status, Streaming};
use tonic_prost::ProstCodec;

use super::{ConnectionCount, IO_TIMEOUT};

/// The one message of the test service.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Note {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
}

/// Unary: answers `echo:<text>` with the same `seq`.
pub const ECHO: &str = "/keygate.test.Notes/Echo";
/// Server streaming: answers `seq` notes numbered 0, 1, ….
pub const COUNT: &str = "/keygate.test.Notes/Count";
/// Bidirectional: answers each note as it arrives with `echo:<text>`.
pub const CHAT: &str = "/keygate.test.Notes/Chat";
/// Unary that never answers; the server notes when it starts and when it is cancelled.
pub const HOLD: &str = "/keygate.test.Notes/Hold";
/// Server streaming: one note, then nothing, never ending (a stream that stays open).
pub const TRICKLE: &str = "/keygate.test.Notes/Trickle";

/// What the gRPC server saw.
#[derive(Default)]
pub struct Seen {
    /// Path and request headers (metadata) of every call.
    pub calls: Mutex<Vec<(String, HeaderMap)>>,
    pub held: AtomicUsize,
    pub cancelled: AtomicUsize,
    /// Woken whenever `held` or `cancelled` changes.
    pub changed: Notify,
}

impl Seen {
    pub fn calls(&self) -> Vec<(String, HeaderMap)> {
        self.calls.lock().expect("calls").clone()
    }

    /// Waits until `what` holds, re-checking at every change; fails after [`IO_TIMEOUT`].
    pub async fn wait_for(&self, description: &str, what: impl Fn(&Self) -> bool) {
        let deadline = tokio::time::Instant::now() + IO_TIMEOUT;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if what(self) {
                return;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "the gRPC server never saw {description} (held {}, cancelled {})",
                    self.held.load(Ordering::SeqCst),
                    self.cancelled.load(Ordering::SeqCst)
                );
            }
        }
    }
}

/// The test service on 127.0.0.1:0, speaking HTTP/2 only: h2c, or TLS with ALPN `h2`.
pub struct GrpcUpstream {
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    pub conns: Arc<ConnectionCount>,
    accept: JoinHandle<()>,
}

impl GrpcUpstream {
    /// h2c; `max_streams`: the SETTINGS_MAX_CONCURRENT_STREAMS it announces.
    pub async fn start(max_streams: Option<u32>) -> Self {
        Self::serve(None, max_streams).await
    }

    pub async fn start_tls(config: Arc<rustls::ServerConfig>) -> Self {
        Self::serve(Some(tokio_rustls::TlsAcceptor::from(config)), None).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>, max_streams: Option<u32>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind gRPC upstream");
        let addr = listener.local_addr().expect("gRPC upstream addr");
        let seen = Arc::new(Seen::default());
        let conns = Arc::new(ConnectionCount::default());
        let (task_seen, task_conns) = (Arc::clone(&seen), Arc::clone(&conns));
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let open = task_conns.opened();
                let seen = Arc::clone(&task_seen);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let _open = open;
                    let service = service_fn(move |req| dispatch(req, Arc::clone(&seen)));
                    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                    builder.max_concurrent_streams(max_streams);
                    match tls {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                        }
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        Self { addr, seen, conns, accept }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn https_url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

impl Drop for GrpcUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn dispatch(
    req: Request<Incoming>,
    seen: Arc<Seen>,
) -> Result<Response<tonic::body::Body>, Infallible> {
    let path = req.uri().path().to_owned();
    seen.calls.lock().expect("calls").push((path.clone(), req.headers().clone()));
    let mut grpc = tonic::server::Grpc::new(ProstCodec::<Note, Note>::default());
    let response = match path.as_str() {
        ECHO => grpc.unary(Echo, req).await,
        COUNT => grpc.server_streaming(Count, req).await,
        CHAT => grpc.streaming(Chat, req).await,
        HOLD => grpc.unary(Hold(seen), req).await,
        TRICKLE => grpc.server_streaming(Trickle, req).await,
        _ => Status::unimplemented("no such method").into_http(),
    };
    Ok(response)
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<tonic::Response<T>, Status>> + Send>>;
type NoteStream = Pin<Box<dyn Stream<Item = Result<Note, Status>> + Send>>;

struct Echo;

impl tonic::server::UnaryService<Note> for Echo {
    type Response = Note;
    type Future = BoxFuture<Note>;

    fn call(&mut self, request: tonic::Request<Note>) -> Self::Future {
        let note = request.into_inner();
        Box::pin(async move {
            Ok(tonic::Response::new(Note { text: format!("echo:{}", note.text), seq: note.seq }))
        })
    }
}

struct Count;

impl tonic::server::ServerStreamingService<Note> for Count {
    type Response = Note;
    type ResponseStream = NoteStream;
    type Future = BoxFuture<NoteStream>;

    fn call(&mut self, request: tonic::Request<Note>) -> Self::Future {
        let n = request.into_inner().seq;
        let notes = (0..n).map(|seq| Ok(Note { text: format!("note {seq}"), seq }));
        let stream: NoteStream = Box::pin(tokio_stream::iter(notes));
        Box::pin(async move { Ok(tonic::Response::new(stream)) })
    }
}

struct Trickle;

impl tonic::server::ServerStreamingService<Note> for Trickle {
    type Response = Note;
    type ResponseStream = NoteStream;
    type Future = BoxFuture<NoteStream>;

    fn call(&mut self, _request: tonic::Request<Note>) -> Self::Future {
        let first = tokio_stream::once(Ok(Note { text: "first".to_owned(), seq: 0 }));
        let stream: NoteStream = Box::pin(first.chain(tokio_stream::pending()));
        Box::pin(async move { Ok(tonic::Response::new(stream)) })
    }
}

struct Chat;

impl tonic::server::StreamingService<Note> for Chat {
    type Response = Note;
    type ResponseStream = NoteStream;
    type Future = BoxFuture<NoteStream>;

    fn call(&mut self, request: tonic::Request<Streaming<Note>>) -> Self::Future {
        let incoming = request.into_inner();
        let stream: NoteStream = Box::pin(
            incoming.map(|note| note.map(|n| Note { text: format!("echo:{}", n.text), seq: n.seq })),
        );
        Box::pin(async move { Ok(tonic::Response::new(stream)) })
    }
}

struct Hold(Arc<Seen>);

/// Counts a held call as cancelled when its future is dropped unfinished.
struct CancelGuard(Arc<Seen>);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }
}

impl tonic::server::UnaryService<Note> for Hold {
    type Response = Note;
    type Future = BoxFuture<Note>;

    fn call(&mut self, _request: tonic::Request<Note>) -> Self::Future {
        let seen = Arc::clone(&self.0);
        Box::pin(async move {
            let _guard = CancelGuard(Arc::clone(&seen));
            seen.held.fetch_add(1, Ordering::SeqCst);
            seen.changed.notify_waiters();
            std::future::pending::<()>().await;
            Ok(tonic::Response::new(Note::default()))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------------------------

/// A tonic client over hyper-util's client, HTTP/2 only.
#[derive(Clone)]
pub struct GrpcClient {
    inner: tonic::client::Grpc<Client<HttpsConnector<HttpConnector>, tonic::body::Body>>,
    metadata: Vec<(String, String)>,
}

impl GrpcClient {
    /// h2c (prior knowledge) to `addr`.
    pub fn h2c(addr: SocketAddr) -> Self {
        let origin: Uri = format!("http://{addr}").parse().expect("origin");
        Self::build(rustls_none(), origin)
    }

    /// TLS with ALPN `h2` to `https://localhost:PORT`, trusting `tls`'s roots.
    pub fn tls(addr: SocketAddr, tls: Arc<rustls::ClientConfig>) -> Self {
        let origin: Uri = format!("https://localhost:{}", addr.port()).parse().expect("origin");
        // The connector offers `h2` itself (ALPN must be left empty for it).
        let mut config = (*tls).clone();
        config.alpn_protocols.clear();
        Self::build(Arc::new(config), origin)
    }

    fn build(tls: Arc<rustls::ClientConfig>, origin: Uri) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new()).http2_only(true).build(connector);
        let inner = tonic::client::Grpc::with_origin(client, origin).max_decoding_message_size(64 << 20);
        Self { inner, metadata: Vec::new() }
    }

    /// Adds metadata (a request header) to every call from now on.
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.metadata.push((name.to_owned(), value.to_owned()));
        self
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        for (name, value) in &self.metadata {
            let key = MetadataKey::from_bytes(name.as_bytes()).expect("metadata name");
            let value: MetadataValue<_> = value.parse().expect("metadata value");
            request.metadata_mut().append(key, value);
        }
        request
    }

    pub async fn echo(&mut self, text: &str) -> Result<Note, Status> {
        self.unary(ECHO, Note { text: text.to_owned(), seq: 7 }).await
    }

    pub async fn unary(&mut self, path: &'static str, note: Note) -> Result<Note, Status> {
        self.inner.ready().await.map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let request = self.request(note);
        let call = self.inner.unary(request, PathAndQuery::from_static(path), ProstCodec::default());
        Ok(call.await?.into_inner())
    }

    /// Asks for `n` notes and collects them.
    pub async fn count(&mut self, n: u32) -> Result<Vec<Note>, Status> {
        self.inner.ready().await.map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let request = self.request(Note { text: String::new(), seq: n });
        let call =
            self.inner.server_streaming(request, PathAndQuery::from_static(COUNT), ProstCodec::default());
        let mut stream = call.await?.into_inner();
        let mut notes = Vec::new();
        while let Some(note) = stream.message().await? {
            notes.push(note);
        }
        Ok(notes)
    }

    /// Opens a [`TRICKLE`] call and returns its stream once the first note has arrived.
    pub async fn trickle(&mut self) -> Result<Streaming<Note>, Status> {
        self.inner.ready().await.map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let request = self.request(Note::default());
        let call =
            self.inner.server_streaming(request, PathAndQuery::from_static(TRICKLE), ProstCodec::default());
        let mut stream = call.await?.into_inner();
        stream.message().await?.ok_or_else(|| Status::internal("the trickle ended at once"))?;
        Ok(stream)
    }

    /// Sends `n` notes on one bidirectional call and collects the answers.
    pub async fn chat(&mut self, n: u32) -> Result<Vec<Note>, Status> {
        self.inner.ready().await.map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let outgoing = tokio_stream::iter((0..n).map(|seq| Note { text: format!("line {seq}"), seq }));
        let request = self.request(outgoing);
        let call = self.inner.streaming(request, PathAndQuery::from_static(CHAT), ProstCodec::default());
        let mut stream = call.await?.into_inner();
        let mut notes = Vec::new();
        while let Some(note) = stream.message().await? {
            notes.push(note);
        }
        Ok(notes)
    }
}

/// A client configuration for h2c, where TLS is never used.
fn rustls_none() -> Arc<rustls::ClientConfig> {
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
    )
}

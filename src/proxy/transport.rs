//! How a route's requests travel to its upstream: the one transport decision, made at config
//! load and stored on the route's upstream, so the pipeline sends, times out and maps errors
//! the same way whichever transport carries the request.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::forward::{Added, RequestBody, UpstreamClient};
use super::h2pool::{H2Body, H2Pool};
use super::limit::ConnectionLimit;
use super::pool::{Http1Pool, UpstreamBody};

pub type SendError = Box<dyn std::error::Error + Send + Sync>;

/// The protocol a route speaks to its upstream (`protocol` in the route's config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Protocol {
    #[default]
    Http1,
    /// HTTP/2: prior knowledge for `http://`, ALPN `h2` for `https://`.
    H2,
}

/// What a transport is built from; two routes with equal specs can share one transport.
#[derive(Clone)]
pub struct TransportSpec {
    pub scheme: Scheme,
    pub authority: Authority,
    pub protocol: Protocol,
    /// The trust for `https://`; `None` = the system's roots.
    pub private_ca: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for TransportSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportSpec")
            .field("scheme", &self.scheme)
            .field("authority", &self.authority)
            .field("protocol", &self.protocol)
            .field("private_ca", &self.private_ca.is_some())
            .finish()
    }
}

/// A route's way to its upstream, with the connections it holds.
#[derive(Clone)]
pub struct Transport {
    spec: TransportSpec,
    limit: Arc<ConnectionLimit>,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// Plain `http://` HTTP/1.1: the in-task pool. A WebSocket upgrade goes through hyper-util's
    /// client instead, which keeps the socket alive for the relay after the exchange ends.
    Http1 { pool: Http1Pool, upgrades: UpstreamClient },
    /// HTTP/1.1 over TLS: hyper-util's client with rustls.
    Http1Tls(UpstreamClient),
    /// HTTP/2, cleartext or TLS: streams of many requests share a few connections.
    H2(H2Pool),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport").field("spec", &self.spec).field("max", &self.limit.max()).finish()
    }
}

impl Transport {
    pub fn new(spec: TransportSpec, limit: Arc<ConnectionLimit>) -> Self {
        let trust = || spec.private_ca.clone().unwrap_or_else(crate::tls::system_trust);
        let kind = match (spec.protocol, spec.scheme == Scheme::HTTPS) {
            (Protocol::H2, tls) => {
                let tls = tls.then(trust);
                Kind::H2(H2Pool::new(spec.authority.clone(), tls, Arc::clone(&limit)))
            }
            (Protocol::Http1, true) => {
                Kind::Http1Tls(super::forward::upstream_client(trust(), Arc::clone(&limit)))
            }
            (Protocol::Http1, false) => Kind::Http1 {
                pool: Http1Pool::new(spec.authority.clone(), Arc::clone(&limit)),
                upgrades: super::forward::upstream_client(crate::tls::no_trust(), Arc::clone(&limit)),
            },
        };
        Self { spec, limit, kind }
    }

    pub fn spec(&self) -> &TransportSpec {
        &self.spec
    }

    pub fn limit(&self) -> &Arc<ConnectionLimit> {
        &self.limit
    }

    /// Whether this transport can relay a WebSocket upgrade (HTTP/1.1 only).
    pub fn relays_upgrades(&self) -> bool {
        !matches!(self.kind, Kind::H2(_))
    }

    /// Sends `request`, whose URI is origin-form, with the headers keygate `added` (`Host`
    /// among them), and returns the upstream's response head. `upgrade`: the request is a
    /// WebSocket handshake. Not an `async fn`, see `Gateway::forward`.
    #[allow(clippy::manual_async_fn, reason = "an async fn would copy the request once more")]
    pub fn send(
        &self,
        mut request: Request<RequestBody>,
        added: Added,
        upgrade: bool,
    ) -> impl Future<Output = Result<Response<ResponseBody>, SendError>> {
        async move {
            if let Kind::Http1 { pool, .. } = &self.kind
                && !upgrade
            {
                // keygate's codec writes the added headers straight into the request head.
                // Inline: `limit::bounded` builds the whole send once, in its box.
                let response = pool.send(request, added).await?;
                return Ok(response.map(|body| ResponseBody::Http1(FlushFirst::new(body))));
            }
            added.insert_into(request.headers_mut());
            match &self.kind {
                Kind::Http1 { upgrades: client, .. } | Kind::Http1Tls(client) => {
                    *request.version_mut() = Version::HTTP_11;
                    // hyper-util picks the connection from an absolute URI.
                    *request.uri_mut() = self.absolute(request.uri(), self.spec.authority.clone())?;
                    let response = client.request(request).await?;
                    Ok(response.map(|body| ResponseBody::Client(FlushFirst::new(body))))
                }
                Kind::H2(pool) => {
                    *request.version_mut() = Version::HTTP_2;
                    // HTTP/2 carries the host as `:authority` (RFC 9113 §8.3.1), never as `Host`.
                    let host = request.headers_mut().remove(http::header::HOST);
                    let authority = match host.as_ref().map(|h| Authority::try_from(h.as_bytes())) {
                        Some(Ok(authority)) => authority,
                        _ => self.spec.authority.clone(),
                    };
                    *request.uri_mut() = self.absolute(request.uri(), authority)?;
                    let response = pool.send(request).await?;
                    Ok(response.map(ResponseBody::H2))
                }
            }
        }
    }

    fn absolute(&self, target: &Uri, authority: Authority) -> Result<Uri, SendError> {
        let mut parts = target.clone().into_parts();
        parts.scheme = Some(self.spec.scheme.clone());
        parts.authority = Some(authority);
        Ok(Uri::from_parts(parts)?)
    }
}

/// An upstream response body, whichever transport brought it.
pub enum ResponseBody {
    /// From the in-task pool of plain `http://` connections.
    Http1(FlushFirst<UpstreamBody>),
    /// From hyper-util's client (`https://`, and an upgrade answered without switching).
    Client(FlushFirst<Incoming>),
    H2(H2Body),
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = SendError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, SendError>>> {
        match self.get_mut() {
            Self::Http1(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::Client(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            Self::H2(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Http1(body) => body.is_end_stream(),
            Self::Client(body) => body.is_end_stream(),
            Self::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Http1(body) => body.size_hint(),
            Self::Client(body) => body.size_hint(),
            Self::H2(body) => body.size_hint(),
        }
    }
}

/// An HTTP/1 response body whose failure is held back one poll when data came just before it.
/// The connection often dies right behind the last data (both in one read), and hyper's server
/// drops what it has buffered when a body fails, so the client would get nothing at all; this
/// lets that data go out first.
pub struct FlushFirst<B: Body> {
    inner: B,
    /// The last poll handed out a frame.
    yielded_data: bool,
    held_error: Option<B::Error>,
}

impl<B: Body> FlushFirst<B> {
    pub fn new(inner: B) -> Self {
        Self { inner, yielded_data: false, held_error: None }
    }
}

impl<B> Body for FlushFirst<B>
where
    B: Body + Unpin,
    B::Error: Unpin,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        if let Some(error) = this.held_error.take() {
            return Poll::Ready(Some(Err(error)));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled
            && this.yielded_data
        {
            this.yielded_data = false;
            if let Poll::Ready(Some(Err(error))) = polled {
                this.held_error = Some(error);
            }
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.yielded_data = matches!(polled, Poll::Ready(Some(Ok(_))));
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held_error.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

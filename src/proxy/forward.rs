//! The forwarded request and response: header hygiene, `x-forwarded-*`, identity headers, and
//! the pooled upstream client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::limit::{ConnectionLimit, LimitedConnector};
use crate::keys::KeyEntry;
use crate::server::idle::Exchange;

pub type UpstreamClient = Client<LimitedConnector<HttpsConnector<HttpConnector>>, RequestBody>;

/// A client's request body on its way upstream, telling its exchange once it has been read to
/// the end: from then on the request waits on the upstream, not on the client.
pub struct RequestBody {
    /// `None`: an empty body keygate made itself (a replayed request).
    inner: Option<Incoming>,
    /// Told of every frame read (on HTTP/2 that, not bytes, is what keeps a connection alive),
    /// of the end, and of a malformed body, so that failure is the client's 400, not the
    /// upstream's 502. `None` for a body keygate made itself.
    exchange: Option<Exchange>,
    /// The end has been reported.
    ended: bool,
}

/// Whether reading a client's body failed; readable after the body has been sent away.
pub struct BodyFailure(Option<Exchange>);

impl BodyFailure {
    pub fn happened(&self) -> bool {
        self.0.as_ref().is_some_and(Exchange::has_body_failed)
    }
}

impl RequestBody {
    pub fn new(inner: Incoming, exchange: Exchange) -> Self {
        let mut body = Self { inner: Some(inner), exchange: Some(exchange), ended: false };
        // A body that is empty from the start (most GETs) is never polled at all.
        if hyper::body::Body::is_end_stream(&body) {
            body.end();
        }
        body
    }

    /// The body of a request whose head says it has none (keygate's own HTTP/1 path).
    pub fn none(exchange: Exchange) -> Self {
        let mut body = Self { inner: None, exchange: Some(exchange), ended: false };
        body.end();
        body
    }

    /// An empty body, for a request keygate sends again itself.
    pub fn empty() -> Self {
        Self { inner: None, exchange: None, ended: true }
    }

    pub fn failure(&self) -> BodyFailure {
        BodyFailure(self.exchange.clone())
    }

    fn end(&mut self) {
        if !self.ended {
            self.ended = true;
            if let Some(exchange) = &self.exchange {
                exchange.body_done();
            }
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else { return std::task::Poll::Ready(None) };
        let polled = std::pin::Pin::new(&mut *inner).poll_frame(cx);
        let at_end = match &polled {
            std::task::Poll::Ready(None) => true,
            std::task::Poll::Ready(Some(Ok(_))) => {
                if let Some(exchange) = &this.exchange {
                    exchange.progress();
                }
                hyper::body::Body::is_end_stream(&*inner)
            }
            std::task::Poll::Ready(Some(Err(_))) => {
                if let Some(exchange) = &this.exchange {
                    exchange.body_failed();
                }
                false
            }
            std::task::Poll::Pending => false,
        };
        if at_end {
            this.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(hyper::body::Body::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.as_ref().map_or_else(|| hyper::body::SizeHint::with_exact(0), hyper::body::Body::size_hint)
    }
}

/// A pooled HTTP/1.1 client for one `http://` or `https://` upstream (verified with `tls`),
/// whose connections each hold a slot of `limit`.
pub fn upstream_client(tls: Arc<rustls::ClientConfig>, limit: Arc<ConnectionLimit>) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    connector.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    let connector = LimitedConnector::new(connector, limit);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_KEYGATE_KEY_ID: HeaderName = HeaderName::from_static("x-keygate-key-id");
const X_KEYGATE_KEY_NAME: HeaderName = HeaderName::from_static("x-keygate-key-name");
const X_KEYGATE_SCOPES: HeaderName = HeaderName::from_static("x-keygate-scopes");
const X_KEYGATE_CONSUMER: HeaderName = HeaderName::from_static("x-keygate-consumer");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// RFC 9110 §7.6.1 hop-by-hop headers, the proxy credentials that are meant for us, and
/// `HTTP2-Settings`, which only means something with the `Upgrade: h2c` that goes with it.
/// `Expect` too: hyper has already answered `Expect: 100-continue` towards the client when the
/// body is read; passing it on would make the upstream wait for a continue that never comes.
/// Not `Trailer`: RFC 2616's list had it (spelt `Trailers`), RFC 9110's no longer does; it
/// describes the message (§6.6.2), and an HTTP/1 client is sent a response's trailer fields
/// only when it names them.
/// A match on the name's text: every header of every message passes through here, and this
/// costs a length switch and at most one comparison, where a list of names costs eleven.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "http2-settings"
            | "connection"
            | "proxy-connection"
            | "keep-alive"
            | "te"
            | "transfer-encoding"
            | "upgrade"
            | "proxy-authorization"
            | "proxy-authenticate"
            | "expect"
    )
}

/// Removes hop-by-hop headers and every header that `Connection` names.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) {
    remove_where(headers, |_| false);
}

/// Removes from a client's request, before keygate adds its own: hop-by-hop headers, every
/// `x-keygate-*` header (only keygate may speak for a key), `Forwarded` (keygate sets the
/// `x-forwarded-*` family instead), and every header keygate sets itself (`Host`,
/// `x-forwarded-*`, `x-real-ip`, `x-request-id`), so that what it adds never meets a client's
/// value of the same name. Returns the client's `x-forwarded-for` chain, if it sent one: the
/// forwarded one extends it (see [`set_forwarding`]).
pub fn scrub_request(headers: &mut HeaderMap) -> Option<SentChain> {
    let doomed = doomed(headers, |name| {
        // An HTTP/1 upstream is sent no request trailers, so none is announced to any.
        *name == header::TRAILER
            || *name == FORWARDED
            || is_keygate_header(name)
            || *name == header::HOST
            || *name == X_FORWARDED_FOR
            || *name == X_FORWARDED_PROTO
            || *name == X_FORWARDED_HOST
            || *name == X_REAL_IP
            || *name == X_REQUEST_ID
    });
    let chain = doomed.contains(&X_FORWARDED_FOR).then(|| {
        let parts: Vec<&str> =
            headers.get_all(X_FORWARDED_FOR).iter().filter_map(|v| v.to_str().ok()).collect();
        SentChain(parts.join(", "))
    });
    for name in doomed {
        headers.remove(name);
    }
    chain
}

/// The `x-forwarded-for` chain a client sent (its visible-ASCII values, joined).
pub struct SentChain(String);

/// Removes the hop-by-hop headers, those `Connection` names, and those `also` picks.
fn remove_where(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    for name in doomed(headers, also) {
        headers.remove(name);
    }
}

/// The hop-by-hop headers present, those `Connection` names, and those `also` picks. One walk
/// over the names present finds them: most messages carry none, and removing an absent name
/// still costs a hash and a probe each.
fn doomed(headers: &HeaderMap, also: impl Fn(&HeaderName) -> bool) -> Vec<HeaderName> {
    // Empty until something is doomed: a message with nothing to remove costs no allocation.
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_hop_by_hop(name) || also(name) {
            doomed.push(name.clone());
        }
    }
    if doomed.contains(&header::CONNECTION) {
        let named = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The option nearly every upstream sends; a `Keep-Alive` header is doomed already.
            .filter(|name| !name.eq_ignore_ascii_case("keep-alive"))
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok());
        doomed.extend(named);
    }
    doomed
}

/// The headers keygate adds to a forwarded request (`Host`, `x-forwarded-*`, identity,
/// request id), kept beside the request's header map rather than in it. [`scrub_request`] has
/// removed every client header of these names, so they can simply follow the client's: a
/// transport that writes the request head itself writes them without hashing each name into
/// the map (the HTTP/1.1 pool); the others [`insert`](Added::insert_into) them.
#[derive(Debug, Clone, Default)]
pub struct Added(Vec<(HeaderName, HeaderValue)>);

impl Added {
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    pub fn push(&mut self, name: HeaderName, value: HeaderValue) {
        self.0.push((name, value));
    }

    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.0.iter().map(|(name, value)| (name, value))
    }

    /// Puts them into `headers`, after the client's (whose names they never share).
    pub fn insert_into(self, headers: &mut HeaderMap) {
        // In one growth: hyper sized the map for the client's headers only.
        headers.reserve(self.0.len());
        for (name, value) in self.0 {
            headers.append(name, value);
        }
    }
}

/// Whether the client's `TE` names `trailers`: it will read trailers, so an HTTP/2 upstream
/// may be told so (gRPC servers insist on `te: trailers`).
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| coding.split(';').next().is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers")))
}

/// The `Upgrade` value of an HTTP/1.1 WebSocket handshake (`Connection: upgrade` and
/// `Upgrade: websocket`), the only upgrade keygate relays.
pub fn websocket_upgrade(parts: &http::request::Parts) -> Option<HeaderValue> {
    // `Upgrade` first: nearly every request has none, and then `Connection` is not looked up.
    if parts.version != http::Version::HTTP_11 || !parts.headers.contains_key(header::UPGRADE) {
        return None;
    }
    let connection_upgrade = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let mut upgrades = parts.headers.get_all(header::UPGRADE).iter();
    match (upgrades.next(), upgrades.next()) {
        (Some(value), None) if connection_upgrade && value.as_bytes().eq_ignore_ascii_case(b"websocket") => {
            Some(value.clone())
        }
        _ => None,
    }
}

/// What a client connection holds while it lives (its place under `max_connections`, in the
/// drain). An upgraded connection outlives its HTTP exchange, so its relay holds it too.
#[derive(Clone)]
pub struct ConnectionGuard(pub Arc<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for ConnectionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConnectionGuard")
    }
}

/// Relays the bytes of an upgraded connection both ways until either side closes, or until no
/// byte has moved either way for `idle_timeout`: a silent tunnel must not hold its client's
/// `max_connections` slot forever.
pub async fn relay_upgraded(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle_timeout: Duration,
    _guard: Option<ConnectionGuard>,
) {
    use crate::server::idle::{Activity, Tracked};
    let (client, upstream) = tokio::join!(client, upstream);
    match (client, upstream) {
        (Ok(client), Ok(upstream)) => {
            // Every byte either way crosses the client's side, so one clock there sees both.
            let activity = Activity::new();
            let mut client = Tracked::new(hyper_util::rt::TokioIo::new(client), activity.clone());
            let mut upstream = hyper_util::rt::TokioIo::new(upstream);
            let relay = tokio::io::copy_bidirectional(&mut client, &mut upstream);
            tokio::pin!(relay);
            loop {
                let deadline = activity.idle_deadline(idle_timeout);
                tokio::select! {
                    ended = &mut relay => {
                        if let Err(error) = ended {
                            tracing::debug!(%error, "upgraded connection ended");
                        }
                        break;
                    }
                    () = tokio::time::sleep_until(deadline) => {
                        if activity.idle_deadline(idle_timeout) <= tokio::time::Instant::now() {
                            tracing::debug!("closing an idle upgraded connection");
                            break;
                        }
                    }
                }
            }
        }
        (Err(error), _) | (_, Err(error)) => tracing::debug!(%error, "upgrade failed"),
    }
}

/// The `Sec-WebSocket-Accept` an upstream must answer to a client's `Sec-WebSocket-Key`
/// (RFC 6455 §4.2.2): proof that it understood the handshake and is not some other service
/// tricked into a `101` that would turn keygate into a raw tunnel.
pub fn websocket_accept(key: &HeaderValue) -> String {
    use base64::Engine;
    use sha1::Digest;
    let mut sha1 = sha1::Sha1::new();
    sha1.update(key.as_bytes());
    sha1.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(sha1.finalize())
}

/// Whether a header claims to come from keygate, in any spelling a back end may fold to ours
/// (CGI-style servers turn `x_keygate_key_id` into the same variable as `x-keygate-key-id`).
fn is_keygate_header(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    name.len() >= 10
        && name[..10]
            .iter()
            .zip(b"x-keygate-")
            .all(|(&got, &want)| got == want || (got == b'_' && want == b'-'))
}

/// What the connection tells us about the client, worked out once per connection.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    /// The peer's IP address as a header value, for `x-forwarded-for` and `x-real-ip`.
    ip: HeaderValue,
    /// The connection's place under `max_connections`, which a WebSocket relay takes over.
    /// Carried here rather than in each request's extensions: inserting it there would build
    /// an extension map for every request, for the rare one that upgrades.
    guard: Option<ConnectionGuard>,
}

impl ClientInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let ip = crate::proxy::client::address_header(crate::proxy::client::canonical(peer.ip()));
        Self { peer, tls, ip, guard: None }
    }

    /// The same client, on a connection that holds `guard`.
    pub fn with_guard(self, guard: ConnectionGuard) -> Self {
        Self { guard: Some(guard), ..self }
    }

    pub fn guard(&self) -> Option<&ConnectionGuard> {
        self.guard.as_ref()
    }

    /// The peer's address as a header value.
    pub fn ip_header(&self) -> &HeaderValue {
        &self.ip
    }
}

/// Adds `x-forwarded-*` and `x-real-ip` from the connection and the client address, in place
/// of what the client sent (see [`scrub_request`]), except that `x-forwarded-for` extends the
/// client's chain with the client address (behind a trusted proxy: the chain up to the
/// client's entry).
pub fn set_forwarding(
    added: &mut Added,
    client: &ClientInfo,
    address: &crate::proxy::client::ClientAddress,
    host: Option<&HeaderValue>,
    sent: Option<SentChain>,
) {
    let ip = &address.header;
    let forwarded_for = match (sent, &address.chain) {
        (None, _) => ip.clone(),
        // Behind a trusted proxy, `proxy::client` has already cut the chain at the client.
        (Some(_), Some(chain)) => chain.clone(),
        (Some(SentChain(chain)), None) if chain.is_empty() => ip.clone(),
        (Some(SentChain(chain)), None) => {
            // A client chain of visible ASCII plus an address is always a valid value.
            let joined = format!("{chain}, {}", ip.to_str().unwrap_or("unknown"));
            HeaderValue::from_str(&joined).unwrap_or_else(|_| ip.clone())
        }
    };
    added.push(X_FORWARDED_FOR, forwarded_for);
    added.push(X_REAL_IP, ip.clone());
    added.push(X_FORWARDED_PROTO, HeaderValue::from_static(if client.tls { "https" } else { "http" }));
    if let Some(host) = host {
        added.push(X_FORWARDED_HOST, host.clone());
    }
}

/// Adds the caller's identity.
pub fn set_identity(added: &mut Added, key: &KeyEntry) {
    added.push(X_KEYGATE_KEY_ID, key.id.clone());
    added.push(X_KEYGATE_KEY_NAME, key.name.clone());
    added.push(X_KEYGATE_SCOPES, key.scopes.header().clone());
    for (name, value) in key.meta() {
        added.push(name.clone(), value.clone());
    }
    if let Some(consumer) = key.consumer() {
        added.push(X_KEYGATE_CONSUMER, consumer.name.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygate_headers_in_every_spelling() {
        for name in ["x-keygate-key-id", "x_keygate_key_id", "x-keygate_scopes", "x_keygate-"] {
            assert!(is_keygate_header(&HeaderName::from_bytes(name.as_bytes()).unwrap()), "{name}");
        }
        for name in ["x-keygate", "x-keygatex", "keygate-key-id", "x-api-key"] {
            assert!(!is_keygate_header(&HeaderName::from_bytes(name.as_bytes()).unwrap()), "{name}");
        }
    }

    #[test]
    fn websocket_accept_matches_rfc_6455() {
        // The example of RFC 6455 §1.3.
        let key = HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ==");
        assert_eq!(websocket_accept(&key), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn connection_named_headers_go() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-secret , bad name"));
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-stay", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-stay"));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut headers = HeaderMap::new();
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2"));
        headers.insert(FORWARDED, HeaderValue::from_static("for=evil"));
        headers.insert(X_REAL_IP, HeaderValue::from_static("6.6.6.6"));
        let client = ClientInfo::new("127.0.0.1:5000".parse().unwrap(), false);
        let address = crate::proxy::client::resolve(&client, &headers, &[]);
        let sent = scrub_request(&mut headers);
        let mut added = Added::default();
        set_forwarding(&mut added, &client, &address, Some(&HeaderValue::from_static("api.test")), sent);
        added.insert_into(&mut headers);
        assert_eq!(headers.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(headers[X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 127.0.0.1");
        assert_eq!(headers[X_REAL_IP], "127.0.0.1");
        assert_eq!(headers[X_FORWARDED_PROTO], "http");
        assert_eq!(headers[X_FORWARDED_HOST], "api.test");
        assert!(!headers.contains_key(FORWARDED));
    }
}

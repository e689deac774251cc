//! The request pipeline: route → extract → verify → authorize → rewrite → forward.
//! [`Gateway::handle`] is the only place a [`GatewayError`] becomes a response.

pub mod auth;
pub mod client;
pub mod cors;
pub mod forward;
pub mod h1;
pub mod h2pool;
pub mod host;
pub mod limit;
pub mod path;
pub mod pool;
pub mod redact;
pub mod reply;
pub mod route;
pub mod transport;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use http::header::{
    CONNECTION, CONTENT_TYPE, HOST, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::request::Parts;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::Either;
use hyper::upgrade::OnUpgrade;

use crate::config::Snapshot;
use crate::counters::{Ask, Counters};
use crate::error::GatewayError;
use crate::metrics::{LabelText, Metrics, Observation};
use crate::reload::ReloadStatus;
use crate::telemetry::AccessLog;
use forward::{ClientInfo, RequestBody, X_REQUEST_ID};
use host::RequestHost;
use limit::{ConnectionLimit, Overdue};
use reply::Reply;
use route::Route;
use transport::{Protocol, ResponseBody, Transport};

/// Upstream bodies stream through untouched; keygate's own answers are small and whole.
pub type ProxyBody = Either<ResponseBody, Reply>;

/// The running gateway: the current snapshot, swapped whole on reload, and the upstream pool.
pub struct Gateway {
    snapshot: ArcSwap<Snapshot>,
    /// Every upstream's transport and connection limit so far, handed on from snapshot to
    /// snapshot.
    transports: std::sync::Mutex<Transports>,
    request_ids: RequestIds,
    /// Rate limits, quotas and usage: the store chosen at start, kept across reloads.
    counters: Arc<dyn Counters>,
    reload_status: ReloadStatus,
    metrics: Metrics,
    /// Set when shutdown begins: `/readyz` then answers 503.
    draining: AtomicBool,
    /// False while a cluster key store's first whole load is pending: `/readyz` answers 503.
    keys_ready: AtomicBool,
    /// Held while a snapshot is swapped, so a reload and a key change never undo each other.
    swapping: std::sync::Mutex<()>,
    /// The last cluster key store change number in the key table, for the key API to wait on.
    keys_seq: tokio::sync::watch::Sender<u64>,
    /// The route label of requests that matched no route.
    no_route: LabelText,
}

impl Gateway {
    /// A gateway whose counts live in memory, whatever the config says (tests, the demo).
    pub fn new(snapshot: Snapshot) -> Self {
        Self::with_counters(snapshot, Arc::new(crate::counters::memory::Memory::default()))
    }

    /// A gateway with the counters store opened from the config ([`crate::counters::open`]).
    pub fn with_counters(mut snapshot: Snapshot, counters: Arc<dyn Counters>) -> Self {
        let mut transports = Transports::default();
        let metrics = Metrics::default();
        adopt_transports(&mut transports, &metrics, &mut snapshot);
        adopt_metrics(&metrics, &mut snapshot);
        Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            transports: std::sync::Mutex::new(transports),
            request_ids: RequestIds::new(),
            counters,
            reload_status: ReloadStatus::new(),
            metrics,
            draining: AtomicBool::new(false),
            keys_ready: AtomicBool::new(true),
            swapping: std::sync::Mutex::new(()),
            keys_seq: tokio::sync::watch::Sender::new(0),
            no_route: LabelText(Arc::from("-")),
        }
    }

    /// The snapshot in force now. A request takes it once and keeps it to the end, so it
    /// never sees half of one configuration and half of another.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn reload_status(&self) -> &ReloadStatus {
        &self.reload_status
    }

    pub fn counters(&self) -> &dyn Counters {
        &*self.counters
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether the keys are loaded (always, with a key file).
    pub fn keys_ready(&self) -> bool {
        self.keys_ready.load(Ordering::Acquire)
    }

    /// Marks the keys as still to be loaded: `/readyz` answers 503 until [`Self::set_keys_ready`].
    pub fn await_keys(&self) {
        self.keys_ready.store(false, Ordering::Release);
    }

    pub fn set_keys_ready(&self) {
        self.keys_ready.store(true, Ordering::Release);
    }

    /// Swaps in a new key table (a cluster store change), keeping everything else.
    pub fn replace_keys(&self, keys: Arc<crate::keys::KeyTable>) {
        let _swapping = self.swapping.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut next = Snapshot::clone(&self.snapshot());
        next.keys = keys;
        self.snapshot.store(Arc::new(next));
    }

    /// Records that the key table now holds every cluster store change up to `seq`.
    pub fn set_keys_seq(&self, seq: u64) {
        self.keys_seq.send_replace(seq);
    }

    /// Waits until the key table holds cluster store change `seq` (true), or `limit` passes.
    pub async fn keys_seq_reached(&self, seq: u64, limit: Duration) -> bool {
        let mut seen = self.keys_seq.subscribe();
        matches!(tokio::time::timeout(limit, seen.wait_for(|at| *at >= seq)).await, Ok(Ok(_)))
    }

    /// Replaces the snapshot atomically; requests already running finish on the old one.
    /// With the cluster store, a reload's snapshot has no keys of its own: it keeps the
    /// table the gateway follows.
    pub fn replace(&self, mut snapshot: Snapshot) {
        let _swapping = self.swapping.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if matches!(snapshot.key_source, crate::config::KeySource::Cluster(_)) {
            snapshot.keys = Arc::clone(&self.snapshot().keys);
        }
        let mut transports = self.transports.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        adopt_transports(&mut transports, &self.metrics, &mut snapshot);
        drop(transports);
        adopt_metrics(&self.metrics, &mut snapshot);
        self.snapshot.store(Arc::new(snapshot));
    }

    /// Handles one request. Everything up to the first wait runs now, so a request that keygate
    /// answers itself (a refusal above all) is answered without a future of its own; one that
    /// goes upstream (or waits on the counters store) continues in [`Handled::Later`].
    pub fn handle(self: &Arc<Self>, client: &Arc<ClientInfo>, request: Request<RequestBody>) -> Handled {
        let started = Instant::now();
        let snapshot = self.snapshot();
        let request_id = self.request_id(request.headers());
        let mut handling = Handling {
            started,
            log: AccessLog::new(request.method(), request_id),
            route: None,
            origin: request.headers().get(http::header::ORIGIN).cloned(),
            grpc: is_grpc(request.headers()),
            snapshot,
        };
        let checked = self.check(&handling.snapshot, client, request, &mut handling.log, &mut handling.route);
        match checked {
            Ok(Checked::Answered(response)) => Handled::Now(Some(self.conclude(&mut handling, Ok(response)))),
            Err(error) => Handled::Now(Some(self.conclude(&mut handling, Err(error)))),
            Ok(Checked::Outbound(outbound)) => {
                let gateway = Arc::clone(self);
                Handled::Later(limit::built_in_box(move || gateway.forward(handling, outbound)))
            }
        }
    }

    /// keygate's answer to an HTTP/1 request head that cannot be read, or is too large to: there
    /// is no request to route, so no access event or metric either (as when hyper answered
    /// these).
    pub fn refuse_head(&self, error: &GatewayError) -> Response<ProxyBody> {
        tracing::debug!(error = error.code(), "refused a request head");
        error.render(false, self.request_id(&http::HeaderMap::new())).map(Either::Right)
    }

    /// The end of every request, whatever became of it: the access event, the metrics, and
    /// the answer's own headers. The only place a [`GatewayError`] becomes a response.
    fn conclude(
        &self,
        handling: &mut Handling,
        forwarded: Result<Response<ProxyBody>, GatewayError>,
    ) -> Response<ProxyBody> {
        // By reference: the continuation keeps its handling in place to the end.
        let Handling { started, snapshot, log, route, origin, grpc } = handling;
        let grpc = *grpc;
        let matched = route.and_then(|position| snapshot.routes.at(position));
        let status = match &forwarded {
            Ok(response) => response.status(),
            Err(error) => {
                log.reason = Some(error.code());
                error.rendered_status(grpc)
            }
        };
        let duration = started.elapsed();
        log.emit(status, duration);
        let observation = Observation {
            route: log.route.as_ref().unwrap_or(&self.no_route),
            handles: matched.and_then(|route| route.metrics.as_deref()),
            status: status.as_u16(),
            key_id: log.key_id.as_ref().and_then(|k| k.to_str().ok()),
            rejection: log.reason,
            duration,
            upstream_duration: log.upstream_duration,
        };
        let per_key = snapshot.admin.as_ref().is_some_and(|a| a.per_key_metrics);
        self.metrics.observe(&observation, per_key);
        let quota = log.quota.take();
        // Last, once nothing else needs the log: the id moves into the response uncopied.
        let request_id = std::mem::replace(&mut log.request_id, HeaderValue::from_static("-"));
        let mut response = match forwarded {
            Ok(mut response) => {
                response.headers_mut().insert(X_REQUEST_ID, request_id);
                response
            }
            Err(error) => error.render(grpc, request_id).map(Either::Right),
        };
        // On a route with `[routes.cors]`, every answer to an allowed origin says so, keygate's
        // own 401/403/429 included: otherwise a browser app could not read why it was refused.
        if let (Some(route), Some(origin)) = (matched, &origin)
            && let Some(cors) = &route.cors
            && let Some(allow_origin) = cors.allow_origin(origin)
        {
            cors.decorate(response.headers_mut(), allow_origin);
        }
        if let Some(quota) = &quota {
            crate::error::set_quota_headers(response.headers_mut(), quota);
        }
        response
    }

    /// Route, extract, verify, authorize, rewrite: every step up to the send that needs no
    /// wait. A request that passes every check comes back rewritten, as [`Checked::Outbound`].
    /// (Its rate limit and quota, the last check, are the counters store's to judge: see
    /// [`Self::forward`].)
    fn check(
        &self,
        snapshot: &Snapshot,
        client: &ClientInfo,
        request: Request<RequestBody>,
        log: &mut AccessLog,
        matched: &mut Option<usize>,
    ) -> Result<Checked, GatewayError> {
        let (mut parts, body) = request.into_parts();
        // Framing first: a request whose size or body boundaries are in doubt is refused before
        // anything else looks at it.
        check_head_size(&parts, snapshot.server.max_header_bytes)?;
        check_transfer_encoding(&parts)?;

        // Route on the normalised path, which is also exactly what the upstream will get.
        let path = path::normalize(parts.uri.path(), snapshot.server.allow_encoded_slashes)
            .map_err(|e| GatewayError::BadRequest(e.reason()))?;
        let path: &str = log.path.insert(path);
        let host = request_host(&parts)?;
        let (route_position, route) = snapshot
            .routes
            .locate(host.as_ref().map(RequestHost::name), path)
            .ok_or(GatewayError::NoRoute)?;
        log.route = Some(route.label.clone());
        *matched = Some(route_position);
        let address = client::resolve(client, &parts.headers, &snapshot.server.trusted_proxies);
        log.client = Some(address.ip);

        // A preflight carries no key (browsers send none): keygate answers it for a route with
        // a CORS policy, else the upstream does, as it did before keygate, without identity.
        // (An HTTP/2 body needs no length header: the stream itself says whether one follows.)
        let preflight = cors::is_preflight(&parts) && hyper::body::Body::is_end_stream(&body);
        if preflight && let Some(policy) = &route.cors {
            let origin = parts.headers.get(http::header::ORIGIN);
            origin.and_then(|o| policy.allow_origin(o)).ok_or(GatewayError::OriginNotAllowed)?;
            return Ok(Checked::Answered(policy.preflight().map(|body| Either::Right(Reply::from(body)))));
        }

        let key = if route.public || preflight {
            None
        } else {
            let credential = auth::extract(&snapshot.auth.sources, &parts.headers, parts.uri.query())?
                .ok_or(GatewayError::MissingApiKey)?;
            let (position, key) = auth::lookup(credential.key(), &snapshot.auth, &snapshot.keys)?;
            // The clock is read only for a key that exists: a flood of made-up keys never does.
            let now = SystemTime::now();
            auth::usable(key, now)?;
            // From here on the key is known, so a 403 is logged against it.
            log.key_id = Some(key.id.clone());
            // After revocation and expiry (a dead key says so wherever it is used from), before
            // scope: the address decides whether this caller may use the key at all.
            if !key.admits(address.ip) {
                return Err(GatewayError::IpNotAllowed);
            }
            auth::authorize(route.scopes.as_ref(), key, &parts.method, &parts.headers, parts.uri.query())?;
            Some((key, position, now))
        };

        // Rewrite. Removals come before additions so nothing a client sent (a `Connection`
        // header naming ours, a spoofed `x-keygate-*`) can remove or shadow what keygate adds.
        let query = auth::strip_credentials(&snapshot.auth.sources, &mut parts.headers, parts.uri.query());
        let query = redact::remove_stray_keys(&snapshot.auth.key_prefix, &mut parts.headers, query);
        let upstream = &route.upstream;
        // Only a WebSocket upgrade to an HTTP/1.1 upstream is relayed; any other (`h2c` above
        // all) is dropped with the other hop-by-hop headers and the request goes on as a plain one.
        let websocket = forward::websocket_upgrade(&parts).filter(|_| upstream.transport.relays_upgrades());
        // `TE` is hop-by-hop, but over HTTP/2 `te: trailers` is the one value allowed
        // (RFC 9113 §8.2.2) and gRPC servers require it; an HTTP/1.1 upstream never gets it.
        let trailers =
            upstream.transport.spec().protocol == Protocol::H2 && forward::accepts_trailers(&parts.headers);
        let websocket_key = websocket.as_ref().and_then(|_| {
            let mut keys = parts.headers.get_all(SEC_WEBSOCKET_KEY).iter();
            match (keys.next(), keys.next()) {
                (Some(key), None) => Some(key.clone()),
                _ => None,
            }
        });
        let client_upgrade = websocket.as_ref().and_then(|_| parts.extensions.remove::<OnUpgrade>());
        let connection_guard = client_upgrade.as_ref().and_then(|_| client.guard().cloned());
        let sent_chain = forward::scrub_request(&mut parts.headers);
        if let Some(protocol) = &websocket {
            parts.headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(UPGRADE, protocol.clone());
        }
        if trailers {
            parts.headers.insert(TE, HeaderValue::from_static("trailers"));
        }
        let mut added = forward::Added::with_capacity(9 + key.map_or(0, |(k, _, _)| k.meta().len()));
        let host = host.map(|h| h.value);
        forward::set_forwarding(&mut added, client, &address, host.as_ref(), sent_chain);
        let upstream_host = match (&host, route.preserve_host) {
            (Some(host), true) => host.clone(),
            _ => upstream.host_header.clone(),
        };
        added.push(HOST, upstream_host);
        if let Some((key, _, _)) = key {
            forward::set_identity(&mut added, key);
        }
        added.push(X_REQUEST_ID, log.request_id.clone());
        let mut target = String::with_capacity(
            upstream.base_path.len() + path.len() + query.as_ref().map_or(0, |q| q.len() + 1),
        );
        target.push_str(&upstream.base_path);
        target.push_str(path);
        if let Some(q) = &query {
            target.push('?');
            target.push_str(q);
        }
        // Origin-form; the transport turns it into what its connections need.
        parts.uri = Uri::builder()
            .path_and_query(target)
            .build()
            .map_err(|_| GatewayError::BadRequest("the request target cannot be forwarded"))?;

        let body_failed = body.failure();
        Ok(Checked::Outbound(Outbound {
            request: Request::from_parts(parts, body),
            added,
            key: key.map(|(_, position, now)| (position, now)),
            body_failed,
            upgrade: Upgrade {
                protocol: websocket,
                key: websocket_key,
                client_side: client_upgrade,
                guard: connection_guard,
            },
        }))
    }

    /// Counts the request against its key's limits (the last check, the only one that may
    /// wait), then sends it upstream and relays the answer's head.
    ///
    /// Here and in the transports, a send is a plain `fn` returning an `async move` block:
    /// an `async fn` copies its arguments (the request among them) into its body's locals when
    /// first polled, a block uses what it captured in place.
    #[allow(clippy::manual_async_fn, reason = "an async fn would copy the request once more")]
    fn forward(
        self: Arc<Self>,
        mut handling: Handling,
        outbound: Outbound,
    ) -> impl Future<Output = Response<ProxyBody>> {
        async move {
            let admitted = self.admit(&handling.snapshot, &mut handling.log, outbound.key).await;
            let snapshot = &handling.snapshot;
            let route = handling.route.and_then(|position| snapshot.routes.at(position));
            let forwarded = match (admitted, route) {
                (Err(error), _) => Err(error),
                (Ok(()), None) => Err(GatewayError::Internal),
                (Ok(()), Some(route)) => {
                    // Send: the one place for every transport. The wait for a connection slot and
                    // the wait for the response head share `request_timeout`; which one ran out
                    // decides 503 or 504.
                    let upstream_started = Instant::now();
                    let upgrade = outbound.upgrade.protocol.is_some();
                    // `bounded` builds the send in a box of its own (see `limit::Bounded`).
                    let (request, added) = (outbound.request, outbound.added);
                    let send = || route.upstream.transport.send(request, added, upgrade);
                    let result = limit::bounded(snapshot.server.request_timeout, send).await;
                    handling.log.upstream_duration = Some(upstream_started.elapsed());
                    relay_head(snapshot, route, result, &outbound.body_failed, outbound.upgrade)
                }
            };
            self.conclude(&mut handling, forwarded)
        }
    }

    /// The last check: the key's rate limit, then its quota. A request refused for any other
    /// reason has spent neither; keys with neither never reach the counters store here.
    async fn admit(
        &self,
        snapshot: &Snapshot,
        log: &mut AccessLog,
        key: Option<(u32, SystemTime)>,
    ) -> Result<(), GatewayError> {
        let Some((position, now)) = key else {
            return Ok(());
        };
        let key = snapshot.keys.at(position).ok_or(GatewayError::Internal)?;
        if key.rate_limit().is_some() || key.quota().is_some() {
            let ask = Ask {
                subject: key.subject(),
                rate: key.rate_limit(),
                quota: key.quota(),
                now,
                instant: Instant::now(),
            };
            log.quota = self.counters.admit(ask).await?;
        }
        // Batched in memory; the store writes it out off the request path.
        self.counters.record(key.id.as_bytes(), key.usage_period(), now);
        Ok(())
    }

    /// The client's `x-request-id` if it sent one sane value, else a fresh one.
    fn request_id(&self, headers: &http::HeaderMap) -> HeaderValue {
        let mut sent = headers.get_all(X_REQUEST_ID).iter();
        match (sent.next(), sent.next()) {
            (Some(id), None)
                if !id.is_empty() && id.len() <= 128 && id.as_bytes().iter().all(u8::is_ascii_graphic) =>
            {
                id.clone()
            }
            _ => self.request_ids.next(),
        }
    }
}

/// A WebSocket handshake to relay, if the request was one: the protocol, the client's
/// `Sec-WebSocket-Key`, the client side of the upgrade, and the connection's slot for the
/// relay to hold.
struct Upgrade {
    protocol: Option<HeaderValue>,
    key: Option<HeaderValue>,
    client_side: Option<OnUpgrade>,
    guard: Option<forward::ConnectionGuard>,
}

/// What the client gets of the upstream's answer (or of its failure): the head, cleaned of
/// hop-by-hop headers, and for a proven WebSocket handshake a tunnel between the two sides.
fn relay_head(
    snapshot: &Snapshot,
    route: &Route,
    result: Result<Result<Response<ResponseBody>, transport::SendError>, Overdue>,
    body_failed: &forward::BodyFailure,
    upgrade: Upgrade,
) -> Result<Response<ProxyBody>, GatewayError> {
    // One match, not a chain of `map_err`s: each step of a chain moves the whole response.
    let mut response = match result {
        Ok(Ok(response)) => response,
        Ok(Err(error)) => {
            if body_failed.happened() {
                return Err(GatewayError::BadRequest("the request body is malformed or was cut short"));
            }
            tracing::debug!(route = %route.label, %error, "upstream request failed");
            return Err(GatewayError::UpstreamUnavailable);
        }
        Err(Overdue::Busy) => return Err(GatewayError::UpstreamBusy),
        Err(Overdue::Timeout) => return Err(GatewayError::UpstreamTimeout),
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client_side), Some(protocol), Some(key)) =
            (upgrade.client_side, upgrade.protocol, upgrade.key)
        else {
            // An upstream switching protocols that nobody asked for cannot be relayed.
            return Err(GatewayError::UpstreamUnavailable);
        };
        // Only an upstream that proves it speaks WebSocket gets a tunnel.
        let accept = forward::websocket_accept(&key);
        let mut accepts = response.headers().get_all(SEC_WEBSOCKET_ACCEPT).iter();
        if !matches!((accepts.next(), accepts.next()), (Some(got), None) if got.as_bytes() == accept.as_bytes())
        {
            tracing::debug!(route = %route.label, "upstream answered 101 without the right Sec-WebSocket-Accept");
            return Err(GatewayError::UpstreamUnavailable);
        }
        let upstream_side = hyper::upgrade::on(&mut response);
        let idle = snapshot.server.idle_timeout;
        tokio::spawn(forward::relay_upgraded(client_side, upstream_side, idle, upgrade.guard));
        let headers = response.headers_mut();
        forward::remove_hop_by_hop(headers);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, protocol);
        return Ok(response.map(Either::Left));
    }
    forward::remove_hop_by_hop(response.headers_mut());
    Ok(response.map(Either::Left))
}

/// A request's answer: ready now (keygate answered it itself, or refused it), or once the
/// upstream (or the counters store) has had its say.
pub enum Handled {
    /// `None` once taken.
    Now(Option<Response<ProxyBody>>),
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = Response<ProxyBody>> + Send>>),
}

/// What a request's handling carries from its start to its answer.
struct Handling {
    started: Instant,
    /// Taken once at the start and kept to the end, so a request never sees half of one
    /// configuration and half of another.
    snapshot: Arc<Snapshot>,
    log: AccessLog,
    /// The matched route's position in `snapshot`'s table.
    route: Option<usize>,
    origin: Option<HeaderValue>,
    grpc: bool,
}

/// How the steps that need no wait ended, when none refused the request.
#[allow(clippy::large_enum_variant, reason = "taken apart where it is made; a box would cost an allocation")]
enum Checked {
    /// keygate answered it itself (a CORS preflight).
    Answered(Response<ProxyBody>),
    Outbound(Outbound),
}

/// A request rewritten for its upstream, and what sending it needs. The key is kept as a
/// position in the request's snapshot, which the continuation owns, not as a borrow (the
/// route's position is the handling's).
struct Outbound {
    request: Request<RequestBody>,
    /// Written into the head by the transport (see `forward::Added`).
    added: forward::Added,
    /// The key's position in the table, and the instant it was judged usable at.
    key: Option<(u32, SystemTime)>,
    body_failed: forward::BodyFailure,
    upgrade: Upgrade,
}

/// What outlives snapshots: one connection limit per upstream host:port, and the transports
/// (with their pooled connections) of upstreams that use the system's trust.
#[derive(Default)]
struct Transports {
    limits: HashMap<Authority, Arc<ConnectionLimit>>,
    shared: HashMap<(Authority, http::uri::Scheme, Protocol), Transport>,
}

/// Gives each route of a new snapshot the transport its upstream already has, so connections
/// stay warm across reloads, and every transport to one host:port the same connection limit.
/// Transports of upstreams no longer named simply go idle and empty. A route with a private
/// CA gets a fresh transport, so a changed CA file takes effect.
fn adopt_transports(transports: &mut Transports, metrics: &Metrics, snapshot: &mut Snapshot) {
    let max = snapshot.server.upstream_max_connections;
    for route in snapshot.routes.iter_mut() {
        let upstream = &mut route.upstream;
        let spec = upstream.transport.spec().clone();
        let limit = transports
            .limits
            .entry(spec.authority.clone())
            .and_modify(|limit| {
                if limit.max() != max {
                    // Connections under the old limit count on until they close.
                    *limit = ConnectionLimit::new(max, metrics.upstream_connections(spec.authority.as_str()));
                }
            })
            .or_insert_with(|| {
                ConnectionLimit::new(max, metrics.upstream_connections(spec.authority.as_str()))
            })
            .clone();
        if spec.private_ca.is_some() {
            upstream.transport = Transport::new(spec, limit);
            continue;
        }
        let key = (spec.authority.clone(), spec.scheme.clone(), spec.protocol);
        let transport = transports
            .shared
            .entry(key)
            .and_modify(|transport| {
                if !Arc::ptr_eq(transport.limit(), &limit) {
                    *transport = Transport::new(spec.clone(), Arc::clone(&limit));
                }
            })
            .or_insert_with(|| Transport::new(spec, limit));
        upstream.transport = transport.clone();
    }
}

/// A gRPC request, which gets keygate's own answers in gRPC's form.
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|value| {
        let value = value.as_bytes();
        value.len() >= 16 && value[..16].eq_ignore_ascii_case(b"application/grpc")
    })
}

/// Gives each route of a new snapshot its metric handles.
fn adopt_metrics(metrics: &Metrics, snapshot: &mut Snapshot) {
    for route in snapshot.routes.iter_mut() {
        route.metrics = Some(metrics.route(&route.label));
    }
}

/// Refuses a request head larger than `max_header_bytes` with a JSON 431. (hyper itself cuts
/// off heads beyond twice that, see the server.)
fn check_head_size(parts: &Parts, max: usize) -> Result<(), GatewayError> {
    let headers: usize = parts.headers.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    let target = parts.uri.authority().map_or(0, |a| a.as_str().len() + 8)
        + parts.uri.path_and_query().map_or(1, |pq| pq.as_str().len());
    let line = parts.method.as_str().len() + target + 12;
    if headers + line > max { Err(GatewayError::HeadersTooLarge) } else { Ok(()) }
}

/// Only plain `chunked` may frame a request body: with any other coding the body's boundaries
/// are something keygate and the upstream could disagree on.
fn check_transfer_encoding(parts: &Parts) -> Result<(), GatewayError> {
    let mut codings = parts.headers.get_all(TRANSFER_ENCODING).iter();
    match (codings.next(), codings.next()) {
        (None, _) => Ok(()),
        (Some(one), None) if one.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(GatewayError::UnsupportedTransferEncoding),
    }
}

/// The host the client asked for: the target's authority when it has one (absolute-form,
/// HTTP/2), which RFC 9112 §3.2.2 says takes precedence over `Host`; else the one `Host`. Each
/// must be in the one `host[:port]` form every parser agrees on; the `Host` that is then
/// ignored too, so that no value any reader could split two ways gets through.
fn request_host(parts: &Parts) -> Result<Option<RequestHost>, GatewayError> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let header = match (hosts.next(), hosts.next()) {
        (None, _) => None,
        (Some(one), None) => Some(host::parse_header(one).map_err(|e| GatewayError::BadRequest(e.0))?),
        (Some(_), Some(_)) => {
            return Err(GatewayError::BadRequest("the request has more than one Host header"));
        }
    };
    match parts.uri.authority() {
        Some(authority) => {
            host::parse(authority.as_str().as_bytes()).map(Some).map_err(|e| GatewayError::BadRequest(e.0))
        }
        None => Ok(header),
    }
}

/// The two lower-case hex digits of every byte.
static HEX_PAIRS: [[u8; 2]; 256] = {
    let digits = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [digits[byte >> 4], digits[byte & 0xf]];
        byte += 1;
    }
    pairs
};

/// Request ids unique within the process and unpredictable across processes: a random seed
/// mixed with a counter (splitmix64), printed as 32 hex digits.
struct RequestIds {
    seeds: [u64; 2],
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut seed = [0u8; 16];
        // Without OS randomness the ids are still unique, only predictable; that is acceptable
        // for correlation ids, which grant nothing.
        let _ = getrandom::fill(&mut seed);
        let (a, b) = seed.split_at(8);
        let word = |s: &[u8]| s.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x));
        Self { seeds: [word(a), word(b)], counter: AtomicU64::new(0) }
    }

    /// splitmix64's finaliser: a bijection, so distinct counters give distinct ids.
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let words = [Self::mix(self.seeds[0].wrapping_add(n)), Self::mix(self.seeds[1] ^ n)];
        let mut text = [0u8; 32];
        // A byte at a time, its two digits from one table.
        let (first, second) = text.split_at_mut(16);
        for (half, word) in [first, second].into_iter().zip(words) {
            for (pair, byte) in half.chunks_exact_mut(2).zip(word.to_be_bytes()) {
                pair.copy_from_slice(&HEX_PAIRS[usize::from(byte)]);
            }
        }
        // Hex digits are always a valid header value.
        HeaderValue::from_bytes(&text).unwrap_or(HeaderValue::from_static("0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_32_hex_digits_and_distinct() {
        let ids = RequestIds::new();
        let seen: std::collections::HashSet<String> = (0..1000)
            .map(|_| {
                let id = ids.next();
                let text = id.to_str().unwrap().to_string();
                assert_eq!(text.len(), 32, "{text}");
                assert!(text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{text}");
                text
            })
            .collect();
        assert_eq!(seen.len(), 1000);
        assert_eq!(HEX_PAIRS[0xa7], *b"a7");
        assert_eq!(HEX_PAIRS[0x0f], *b"0f");
    }
}

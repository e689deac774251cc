//! The admin listener: liveness, readiness, Prometheus metrics and reload status, on an address
//! of its own so that it can stay private while the gateway port is public; with admin tokens,
//! also the key API ([`keys`]) and the web console ([`console`]). This file routes.

pub mod console;
pub mod keys;
pub mod token;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::error::AdminError;
use crate::metrics::Current;
use crate::proxy::Gateway;

/// Serves until the task is dropped; the caller keeps it running through the drain so that
/// `/readyz` can say 503 while requests finish.
pub async fn serve(listener: TcpListener, gateway: Arc<Gateway>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(10));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let gateway = Arc::clone(&gateway);
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let gateway = Arc::clone(&gateway);
                async move { Ok::<_, Infallible>(answer(gateway, request).await) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    response.headers_mut().insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    respond(status, "application/json", value.to_string())
}

/// Whether the admin listener answers a request naming this Host: an IP literal, `localhost`,
/// or a name in `[admin] hosts`. Anything else may be a DNS-rebinding page in an operator's
/// browser that has pointed its own name at this address.
fn host_allowed(gateway: &Gateway, request: &Request<Incoming>) -> bool {
    let raw = match request.uri().authority() {
        Some(authority) => authority.as_str().as_bytes().to_vec(),
        None => match request.headers().get(header::HOST) {
            Some(host) => host.as_bytes().to_vec(),
            // HTTP/1.0 without Host: no browser sends that.
            None => return true,
        },
    };
    let Ok(host) = crate::proxy::host::parse(&raw) else { return false };
    let name = host.name();
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<std::net::IpAddr>().is_ok() || name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    gateway
        .snapshot()
        .admin
        .as_ref()
        .is_some_and(|admin| admin.hosts.iter().any(|h| h.eq_ignore_ascii_case(name)))
}

pub async fn answer(gateway: Arc<Gateway>, request: Request<Incoming>) -> Response<Full<Bytes>> {
    route(gateway, request).await.unwrap_or_else(|error| error.to_response())
}

async fn route(
    gateway: Arc<Gateway>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, AdminError> {
    // Before anything else: a rebinding page must learn nothing, not even which paths exist.
    if !host_allowed(&gateway, &request) {
        return Err(AdminError::MisdirectedRequest);
    }
    let path = request.uri().path();
    if path == "/keys" || path.starts_with("/keys/") {
        return keys::answer(gateway, request).await;
    }
    if path == "/console" || path.starts_with("/console/") {
        return console::answer(&gateway, &request);
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(AdminError::MethodNotAllowed("GET, HEAD"));
    }
    Ok(match request.uri().path() {
        "/healthz" => respond(StatusCode::OK, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" if gateway.is_draining() => {
            respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", "draining\n")
        }
        "/readyz" if !gateway.keys_ready() => {
            respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain; charset=utf-8", "loading keys\n")
        }
        "/readyz" => respond(StatusCode::OK, "text/plain; charset=utf-8", "ready\n"),
        "/metrics" => {
            let reloads = gateway.reload_status().view();
            let summary = gateway.snapshot().summary(SystemTime::now());
            let current = Current {
                reload_successes: reloads.successes,
                reload_failures: reloads.failures,
                keys_active: summary.active as u64,
                keys_expired: summary.expired as u64,
                keys_revoked: summary.revoked as u64,
                cluster_errors: gateway.counters().status().cluster_errors,
            };
            match gateway.metrics().render(&current) {
                Ok(text) => respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(_) => return Err(AdminError::Internal),
            }
        }
        "/status" => {
            let snapshot = gateway.snapshot();
            let reloads = gateway.reload_status().view();
            let summary = snapshot.summary(SystemTime::now());
            let loaded_at = time::OffsetDateTime::from(snapshot.loaded_at)
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let counters = gateway.counters().status();
            let mut status = serde_json::json!({
                    "generation": reloads.generation,
                    "loaded_at": loaded_at,
                    "routes": summary.routes,
                    "keys": summary.keys,
                    "keys_by_state": {
                        "active": summary.active,
                        "expired": summary.expired,
                        "revoked": summary.revoked,
                    },
                    "reloads": { "success": reloads.successes, "failure": reloads.failures },
                    "last_reload_error": reloads.last_error,
                    "draining": gateway.is_draining(),
                    "store": snapshot.key_source.kind(),
                    "counters": counters.kind,
            });
            if let (Some(cluster), Some(object)) = (counters.cluster, status.as_object_mut()) {
                object.insert("cluster".to_string(), serde_json::json!(cluster));
            }
            json(StatusCode::OK, &status)
        }
        "/usage" => usage(&gateway).await?,
        _ => return Err(AdminError::NotFound),
    })
}

/// Every key's last use and requests this period, with its quota, from the counters store.
async fn usage(gateway: &Gateway) -> Result<Response<Full<Bytes>>, AdminError> {
    let snapshot = gateway.snapshot();
    let now = SystemTime::now();
    let keys: Vec<(String, crate::quota::Period)> = snapshot
        .keys
        .entries()
        .map(|k| (String::from_utf8_lossy(k.id.as_bytes()).into_owned(), k.usage_period()))
        .collect();
    match gateway.counters().usage(&keys, now).await {
        Ok(usage) => {
            let rows: Vec<serde_json::Value> = snapshot
                .keys
                .entries()
                .zip(&keys)
                .zip(usage)
                .map(|((entry, (id, _)), usage)| {
                    let quota = entry.quota().map(|q| {
                        let unit = match q.period {
                            crate::quota::Period::Day => "day",
                            crate::quota::Period::Month => "month",
                        };
                        format!("{}/{unit}", q.limit)
                    });
                    let consumer =
                        entry.consumer().map(|c| String::from_utf8_lossy(c.name.as_bytes()).into_owned());
                    serde_json::json!({
                        "id": id,
                        "consumer": consumer,
                        "quota": quota,
                        "last_used_at": usage.last_used_at.map(crate::counters::usage_timestamp),
                        "used": usage.used,
                    })
                })
                .collect();
            Ok(json(StatusCode::OK, &serde_json::json!({ "keys": rows })))
        }
        Err(error) => Err(AdminError::StoreUnavailable(format!("usage could not be read: {error}"))),
    }
}

//! The key API (SPEC §10): `/keys` on the admin listener, behind an admin token, calling the
//! same key store functions as `keygate keys`, and auditing every change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use super::{json, token};
use crate::audit::AuditLog;
use crate::counters::Usage;
use crate::error::AdminError;
use crate::keys::lifecycle::{self, GrantRequest, KeyView};
use crate::keys::store::{self, KeyChange, KeyStore, Rotation, StoreError};
use crate::proxy::Gateway;
use crate::quota::Period;

/// The largest body any `/keys` request needs is a few hundred bytes; this leaves room for
/// long meta and allowed_ips lists while keeping a flood from costing memory.
pub const BODY_LIMIT: usize = 64 * 1024;
/// A body that has not arrived by then is not coming.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a change through the cluster store waits for this replica to apply it; past
/// that (Redis gone just after the write) the change is stored all the same, and answered.
const REPLICA_WAIT: Duration = Duration::from_secs(5);

/// `POST /keys`: what `keygate keys create` takes, plus meta and allowed_ips.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
    expires: Option<String>,
    rate_limit: Option<String>,
    quota: Option<String>,
    consumer: Option<String>,
    #[serde(default)]
    meta: BTreeMap<String, String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
}

/// `POST /keys/{selector}/rotate`: both optional, as with `keygate keys rotate`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateBody {
    grace: Option<String>,
    expires: Option<String>,
}

/// `POST /keys/{selector}/revoke` takes no fields; an empty body or `{}` will do.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

pub async fn answer(
    gateway: Arc<Gateway>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, AdminError> {
    let snapshot = gateway.snapshot();
    let Some(admin) = snapshot.admin.as_ref().filter(|a| !a.tokens.is_empty()) else {
        return Err(AdminError::NotFound);
    };
    // The token before anything else: without one, no answer may depend on the path, the
    // method or the body, so a caller cannot even learn whether a selector exists.
    let authorization = request.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
    let Some(token) = token::verify(&admin.tokens, authorization) else {
        return Err(AdminError::AdminTokenRequired);
    };
    let actor = Actor { token: token.to_string(), audit: AuditLog::new(admin.audit_log.clone()) };
    drop(snapshot);

    let path = request.uri().path().to_string();
    let rest = path.strip_prefix("/keys").unwrap_or_default();
    let parts: Vec<&str> = match rest {
        "" | "/" => Vec::new(),
        _ => rest[1..].split('/').collect(),
    };
    let method = request.method().clone();
    match parts.as_slice() {
        [] => match method {
            Method::GET => list(&gateway).await,
            Method::POST => {
                let body = read_json::<CreateBody>(request).await?.ok_or_else(|| {
                    AdminError::InvalidRequest(
                        "POST /keys needs a JSON object with at least a name".to_string(),
                    )
                })?;
                create(&gateway, actor, body).await
            }
            _ => Err(AdminError::MethodNotAllowed("GET, POST")),
        },
        [selector] => {
            let selector = decode(selector)?;
            match method {
                Method::GET => get(&gateway, selector).await,
                Method::DELETE => {
                    change(&gateway, actor, move |store, now| store.delete(&selector, now)).await?;
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = StatusCode::NO_CONTENT;
                    Ok(response)
                }
                _ => Err(AdminError::MethodNotAllowed("GET, DELETE")),
            }
        }
        [selector, "revoke"] if method == Method::POST => {
            let selector = decode(selector)?;
            read_json::<NoFields>(request).await?;
            let change = change(&gateway, actor, move |store, now| store.revoke(&selector, now)).await?;
            let usage = usage_of(&gateway, std::slice::from_ref(&change.key)).await;
            Ok(json(StatusCode::OK, &key_json(&change.key, usage.first().copied().flatten())))
        }
        [selector, "rotate"] if method == Method::POST => {
            let selector = decode(selector)?;
            let body = read_json::<RotateBody>(request).await?.unwrap_or_default();
            let now = OffsetDateTime::now_utc();
            let grace = match body.grace.as_deref() {
                Some(text) => lifecycle::parse_grace(text).map_err(AdminError::InvalidRequest)?,
                None => lifecycle::DEFAULT_GRACE,
            };
            let expires_at = body
                .expires
                .as_deref()
                .map(|e| lifecycle::parse_expiry(e, now))
                .transpose()
                .map_err(AdminError::InvalidRequest)?;
            let rotation = Rotation { grace, expires_at };
            let change =
                change(&gateway, actor, move |store, now| store.rotate(&selector, &rotation, now)).await?;
            Ok(created(&change))
        }
        [_, "revoke" | "rotate"] => Err(AdminError::MethodNotAllowed("POST")),
        _ => Err(AdminError::NotFound),
    }
}

/// Who is making changes through this request, and where they are recorded.
struct Actor {
    token: String,
    audit: AuditLog,
}

async fn list(gateway: &Arc<Gateway>) -> Result<Response<Full<Bytes>>, AdminError> {
    let store = store::of_snapshot(&gateway.snapshot());
    let views = blocking(move || store.list(OffsetDateTime::now_utc())).await?;
    let usage = usage_of(gateway, &views).await;
    let keys: Vec<serde_json::Value> =
        views.iter().zip(usage).map(|(view, usage)| key_json(view, usage)).collect();
    Ok(json(StatusCode::OK, &serde_json::json!({ "keys": keys })))
}

async fn get(gateway: &Arc<Gateway>, selector: String) -> Result<Response<Full<Bytes>>, AdminError> {
    let store = store::of_snapshot(&gateway.snapshot());
    let view = blocking(move || store.find(&selector, OffsetDateTime::now_utc())).await?;
    let usage = usage_of(gateway, std::slice::from_ref(&view)).await;
    Ok(json(StatusCode::OK, &key_json(&view, usage.first().copied().flatten())))
}

async fn create(
    gateway: &Arc<Gateway>,
    actor: Actor,
    body: CreateBody,
) -> Result<Response<Full<Bytes>>, AdminError> {
    let CreateBody { name, scopes, expires, rate_limit, quota, consumer, meta, allowed_ips } = body;
    let request = GrantRequest {
        name,
        scopes,
        expires,
        rate_limit,
        quota,
        consumer,
        meta: meta.into_iter().collect(),
        allowed_ips,
    };
    let grant = request.check(OffsetDateTime::now_utc()).map_err(AdminError::InvalidRequest)?;
    let change = change(gateway, actor, move |store, now| store.create(&grant, now)).await?;
    Ok(created(&change))
}

/// 201 with the new key, shown this once, and where to find it from now on.
fn created(change: &KeyChange) -> Response<Full<Bytes>> {
    let mut body = key_json(&change.key, None);
    if let Some(object) = body.as_object_mut() {
        let secret = change.secret.as_ref().map(|s| s.expose().to_string());
        object.insert("key".to_string(), serde_json::Value::from(secret));
        if let Some(old) = &change.replaced {
            object.insert("replaced".to_string(), key_json(old, None));
        }
    }
    let mut response = json(StatusCode::CREATED, &body);
    if let Ok(location) = HeaderValue::from_str(&format!("/keys/{}", change.key.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// Runs one change on the configured store, audits it and puts it in force on this gateway
/// before answering, so a key the API returns works at once.
async fn change(
    gateway: &Arc<Gateway>,
    actor: Actor,
    operation: impl FnOnce(&dyn KeyStore, OffsetDateTime) -> Result<KeyChange, StoreError> + Send + 'static,
) -> Result<KeyChange, AdminError> {
    let store = store::of_snapshot(&gateway.snapshot());
    let reloading = Arc::clone(gateway);
    let change = blocking(move || {
        let change = operation(store.as_ref(), OffsetDateTime::now_utc())?;
        if change.changed {
            actor.audit.record(&actor.token, &change);
        }
        // Read-your-writes: the file watcher picks the change up within a second anyway (and
        // that is the reload counted), but a client that hands the new key on at once must
        // not meet a 401.
        if change.cluster_seq.is_none()
            && let Err(errors) = crate::reload::reload(&reloading, crate::reload::Attempt::Uncounted)
        {
            tracing::warn!("the key change is written but the reload after it failed: {errors}");
        }
        Ok(change)
    })
    .await?;
    // With the cluster store the change reaches this replica through the stream it follows,
    // as it reaches every other; waiting for it here gives the same read-your-writes.
    if let Some(seq) = change.cluster_seq
        && !gateway.keys_seq_reached(seq, REPLICA_WAIT).await
    {
        tracing::warn!(
            seq,
            "the key change is stored in Redis but this replica has not applied it yet; it will once Redis is back in reach"
        );
    }
    Ok(change)
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, AdminError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(store_error),
        Err(_) => Err(AdminError::Internal),
    }
}

fn store_error(error: StoreError) -> AdminError {
    match error {
        StoreError::NotFound(_) => AdminError::KeyNotFound,
        StoreError::Ambiguous { .. } => AdminError::AmbiguousSelector(error.to_string()),
        StoreError::AlreadyPresent(_) => AdminError::InvalidRequest(error.to_string()),
        StoreError::Invalid(message) => AdminError::InvalidRequest(message),
        StoreError::Unavailable(message) => AdminError::StoreUnavailable(message),
    }
}

/// Reads a JSON body of at most [`BODY_LIMIT`] bytes; `None` for an empty one.
async fn read_json<T: DeserializeOwned>(request: Request<Incoming>) -> Result<Option<T>, AdminError> {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        return Err(AdminError::BodyTooLarge(BODY_LIMIT));
    }
    let collected =
        tokio::time::timeout(BODY_TIMEOUT, Limited::new(request.into_body(), BODY_LIMIT).collect())
            .await
            .map_err(|_| AdminError::InvalidRequest("the request body did not arrive in time".to_string()))?;
    let bytes = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(error) if error.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(AdminError::BodyTooLarge(BODY_LIMIT));
        }
        Err(_) => return Err(AdminError::InvalidRequest("the request body could not be read".to_string())),
    };
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| AdminError::InvalidRequest(format!("the body is not the JSON this endpoint takes: {e}")))
}

/// A path segment, percent-decoded once (a name may hold spaces or a slash).
fn decode(segment: &str) -> Result<String, AdminError> {
    let invalid =
        || AdminError::InvalidRequest("the selector is not valid percent-encoded UTF-8".to_string());
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(invalid)?;
            let hex = std::str::from_utf8(hex).map_err(|_| invalid())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| invalid())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let text = String::from_utf8(out).map_err(|_| invalid())?;
    if text.is_empty() {
        return Err(AdminError::NotFound);
    }
    Ok(text)
}

/// Each key's last use and requests this period, from the counters store; unknown (null)
/// when the store cannot say right now — listing keys does not depend on it.
async fn usage_of(gateway: &Gateway, views: &[KeyView]) -> Vec<Option<Usage>> {
    let keys: Vec<(String, Period)> = views.iter().map(|v| (v.id.clone(), v.usage_period())).collect();
    match gateway.counters().usage(&keys, SystemTime::now()).await {
        Ok(usage) => usage.into_iter().map(Some).collect(),
        Err(error) => {
            tracing::warn!(%error, "key usage could not be read for the key API");
            vec![None; views.len()]
        }
    }
}

/// One key as the API shows it (SPEC §10), plus its allowed_ips.
fn key_json(view: &KeyView, usage: Option<Usage>) -> serde_json::Value {
    let meta: serde_json::Map<String, serde_json::Value> =
        view.meta.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str()))).collect();
    serde_json::json!({
        "id": view.id,
        "name": view.name,
        "tail": (!view.tail.is_empty()).then_some(view.tail.as_str()),
        "scopes": view.scopes,
        "consumer": view.consumer,
        "meta": meta,
        "allowed_ips": view.allowed_ips,
        "created_at": view.created,
        "expires_at": view.expires,
        "revoked_at": view.revoked,
        "status": view.status,
        "rate_limit": view.rate_limit,
        "quota": view.quota,
        "last_used_at": usage.and_then(|u| u.last_used_at).map(crate::counters::usage_timestamp),
        "used": usage.map(|u| u.used),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_are_decoded_once() {
        assert_eq!(decode("billing%20sync").unwrap(), "billing sync");
        assert_eq!(decode("a%2Fb").unwrap(), "a/b");
        assert_eq!(decode("%252e").unwrap(), "%2e");
        assert!(matches!(decode("%zz"), Err(AdminError::InvalidRequest(_))));
        assert!(matches!(decode("%ff"), Err(AdminError::InvalidRequest(_))));
        assert!(matches!(decode("%4"), Err(AdminError::InvalidRequest(_))));
    }
}

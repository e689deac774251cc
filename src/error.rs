//! Every rejection keygate answers itself, and the one function that renders it as HTTP.

use std::sync::OnceLock;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body_util::Full;

use crate::proxy::forward::X_REQUEST_ID;
use crate::proxy::reply::{Fixed, Reply};

/// How many [`GatewayError`] variants there are (see `GatewayError::slot`).
const VARIANTS: usize = 17;

/// Why keygate answered a request itself instead of forwarding it.
///
/// Messages are fixed sentences: nothing from the request is echoed back, so no key (or part
/// of one) can ever leave through an error body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("the request is malformed: {0}")]
    BadRequest(&'static str),
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("no API key was presented")]
    MissingApiKey,
    #[error("the API key is not valid")]
    InvalidApiKey,
    #[error("the API key has been revoked")]
    RevokedApiKey,
    #[error("the API key has expired")]
    ExpiredApiKey,
    #[error("the API key may not be used from this client address")]
    IpNotAllowed,
    #[error("the API key lacks the scope this request needs")]
    InsufficientScope,
    #[error("this origin may not make cross-origin requests to this route")]
    OriginNotAllowed,
    #[error("the API key is over its rate limit")]
    RateLimited { retry_after_secs: u64, quota: crate::ratelimit::Quota },
    #[error("the API key has used its quota for this period")]
    QuotaExceeded { retry_after_secs: u64 },
    #[error("the request headers are too large")]
    HeadersTooLarge,
    #[error("transfer codings other than chunked are not supported")]
    UnsupportedTransferEncoding,
    #[error("the upstream could not be reached")]
    UpstreamUnavailable,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("every connection to the upstream is busy")]
    UpstreamBusy,
    #[error("the gateway failed to handle the request")]
    Internal,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NoRoute => StatusCode::NOT_FOUND,
            Self::MissingApiKey | Self::InvalidApiKey | Self::RevokedApiKey | Self::ExpiredApiKey => {
                StatusCode::UNAUTHORIZED
            }
            Self::IpNotAllowed | Self::InsufficientScope | Self::OriginNotAllowed => StatusCode::FORBIDDEN,
            Self::RateLimited { .. } | Self::QuotaExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::UnsupportedTransferEncoding => StatusCode::NOT_IMPLEMENTED,
            Self::UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamBusy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code of the JSON body, also the `reason` of rejection metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::NoRoute => "no_route",
            Self::MissingApiKey => "missing_api_key",
            Self::InvalidApiKey => "invalid_api_key",
            Self::RevokedApiKey => "revoked_api_key",
            Self::ExpiredApiKey => "expired_api_key",
            Self::IpNotAllowed => "ip_not_allowed",
            Self::InsufficientScope => "insufficient_scope",
            Self::OriginNotAllowed => "origin_not_allowed",
            Self::RateLimited { .. } => "rate_limited",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::HeadersTooLarge => "headers_too_large",
            Self::UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamTimeout => "upstream_timeout",
            Self::UpstreamBusy => "upstream_busy",
            Self::Internal => "internal_error",
        }
    }

    /// The JSON body. Every variant but `BadRequest` (whose reason varies) always renders the
    /// same bytes, so those are rendered once and shared: a flood of invalid keys then costs
    /// no JSON building per request.
    fn body(&self) -> Bytes {
        static RENDERED: [OnceLock<Bytes>; VARIANTS] = [const { OnceLock::new() }; VARIANTS];
        if let Self::BadRequest(_) = self {
            return self.render_body();
        }
        RENDERED[self.slot()].get_or_init(|| self.render_body()).clone()
    }

    /// Each variant's own index, for what is rendered once per variant.
    fn slot(&self) -> usize {
        match self {
            Self::BadRequest(_) => 16,
            Self::NoRoute => 0,
            Self::MissingApiKey => 1,
            Self::InvalidApiKey => 2,
            Self::RevokedApiKey => 3,
            Self::ExpiredApiKey => 4,
            Self::IpNotAllowed => 5,
            Self::InsufficientScope => 6,
            Self::OriginNotAllowed => 7,
            Self::RateLimited { .. } => 8,
            Self::QuotaExceeded { .. } => 9,
            Self::HeadersTooLarge => 10,
            Self::UnsupportedTransferEncoding => 11,
            Self::UpstreamUnavailable => 12,
            Self::UpstreamTimeout => 13,
            Self::Internal => 14,
            Self::UpstreamBusy => 15,
        }
    }

    fn render_body(&self) -> Bytes {
        let body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        Bytes::from(body.to_string())
    }

    /// The gRPC status a gRPC client gets for this error (SPEC §2.5), derived from the HTTP
    /// status so that every variant has one.
    pub fn grpc_status(&self) -> u8 {
        match self.status().as_u16() {
            400 => 3,              // INVALID_ARGUMENT
            401 => 16,             // UNAUTHENTICATED
            403 => 7,              // PERMISSION_DENIED
            404 | 405 | 501 => 12, // UNIMPLEMENTED
            429 | 431 => 8,        // RESOURCE_EXHAUSTED
            502 | 503 => 14,       // UNAVAILABLE
            504 => 4,              // DEADLINE_EXCEEDED
            500 => 13,             // INTERNAL
            _ => 2,                // UNKNOWN
        }
    }

    /// Renders the error for the client that sent the request, with its `x-request-id`: a
    /// gRPC client (`content-type: application/grpc…`) gets a trailers-only gRPC answer, any
    /// other the JSON one. The only place errors become responses.
    ///
    /// The JSON answer's fields that never change for its kind, and its request id, are held
    /// beside its header map (see [`Reply`]); the map has only what varies.
    pub fn render(&self, grpc: bool, request_id: HeaderValue) -> Response<Reply> {
        if grpc {
            let mut response = self.to_grpc_response();
            response.headers_mut().insert(X_REQUEST_ID, request_id);
            return response.map(Reply::from);
        }
        static FIXED: [OnceLock<Fixed>; VARIANTS] = [const { OnceLock::new() }; VARIANTS];
        let fixed = FIXED[self.slot()].get_or_init(|| Fixed::new(self.fixed_headers()));
        let mut response = Response::new(Reply::refusal(self.body(), fixed, request_id));
        *response.status_mut() = self.status();
        match self {
            Self::RateLimited { retry_after_secs, quota } => {
                let headers = response.headers_mut();
                headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
                set_quota_headers(headers, quota);
            }
            Self::QuotaExceeded { retry_after_secs } => {
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            _ => {}
        }
        response
    }

    /// The status the client sees for this error: gRPC answers are HTTP 200.
    pub fn rendered_status(&self, grpc: bool) -> StatusCode {
        if grpc { StatusCode::OK } else { self.status() }
    }

    /// HTTP 200 with `grpc-status` and `grpc-message` (the error code) in the headers and no
    /// body: gRPC's trailers-only response, which every gRPC client reads as the call's status.
    /// A JSON 401 would reach the caller as `UNKNOWN`.
    fn to_grpc_response(&self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::new()));
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert("grpc-status", HeaderValue::from(u16::from(self.grpc_status())));
        headers.insert("grpc-message", HeaderValue::from_static(self.code()));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Self::RateLimited { retry_after_secs, quota } = self {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            set_quota_headers(headers, quota);
        }
        response
    }

    /// The headers of this variant's JSON answer that never change.
    fn fixed_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        // Errors are answers about this request, never something a cache may replay.
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Self::MissingApiKey | Self::InvalidApiKey | Self::RevokedApiKey | Self::ExpiredApiKey = self {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("ApiKey realm=\"keygate\""));
        }
        headers
    }
}

impl From<crate::counters::Refusal> for GatewayError {
    fn from(refusal: crate::counters::Refusal) -> Self {
        match refusal {
            crate::counters::Refusal::RateLimited(e) => {
                Self::RateLimited { retry_after_secs: e.retry_after_secs, quota: e.quota }
            }
            crate::counters::Refusal::QuotaExceeded { retry_after_secs } => {
                Self::QuotaExceeded { retry_after_secs }
            }
        }
    }
}

/// `RateLimit-*` headers (IETF draft-ietf-httpapi-ratelimit-headers), on every response to a
/// rate-limited key.
pub fn set_quota_headers(headers: &mut http::HeaderMap, quota: &crate::ratelimit::Quota) {
    headers.insert("ratelimit-limit", HeaderValue::from(quota.limit));
    headers.insert("ratelimit-remaining", HeaderValue::from(quota.remaining));
    headers.insert("ratelimit-reset", HeaderValue::from(quota.reset_secs));
}

/// Why the admin listener (`/keys`, `/console`, health and metrics) answered with an error.
/// Messages never echo a key; the ones an unauthenticated caller can get are fixed sentences.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("the admin listener does not answer for this Host; add it to [admin] hosts")]
    MisdirectedRequest,
    #[error("this path needs an admin token: Authorization: Bearer <token> (see `keygate admin token`)")]
    AdminTokenRequired,
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the request body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("no key matches this selector (by id, name or tail)")]
    KeyNotFound,
    #[error("{0}")]
    AmbiguousSelector(String),
    #[error("the key store cannot be used right now: {0}")]
    StoreUnavailable(String),
    #[error("no such admin endpoint")]
    NotFound,
    #[error("this admin endpoint does not answer this method (it answers {0})")]
    MethodNotAllowed(&'static str),
    #[error("the admin listener failed to handle the request")]
    Internal,
}

impl AdminError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MisdirectedRequest => StatusCode::MISDIRECTED_REQUEST,
            Self::AdminTokenRequired => StatusCode::UNAUTHORIZED,
            Self::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::KeyNotFound | Self::NotFound => StatusCode::NOT_FOUND,
            Self::AmbiguousSelector(_) => StatusCode::CONFLICT,
            Self::StoreUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MisdirectedRequest => "misdirected_request",
            Self::AdminTokenRequired => "admin_token_required",
            // SPEC §10 names invalid_request for every refused body; the status says why.
            Self::InvalidRequest(_) | Self::BodyTooLarge(_) => "invalid_request",
            Self::KeyNotFound => "key_not_found",
            Self::AmbiguousSelector(_) => "ambiguous_selector",
            Self::StoreUnavailable(_) => "store_unavailable",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::Internal => "internal_error",
        }
    }

    /// Renders the error as the admin listener's JSON error response. The only place that does.
    pub fn to_response(&self) -> Response<Full<Bytes>> {
        let body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        match self {
            Self::AdminTokenRequired => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"keygate-admin\""),
                );
            }
            Self::MethodNotAllowed(allow) => {
                headers.insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Either};

    const QUOTA: crate::ratelimit::Quota = crate::ratelimit::Quota { limit: 10, remaining: 0, reset_secs: 9 };

    #[test]
    fn every_variant_has_its_status_and_code() {
        let table = [
            (GatewayError::BadRequest("x"), 400, "bad_request"),
            (GatewayError::NoRoute, 404, "no_route"),
            (GatewayError::MissingApiKey, 401, "missing_api_key"),
            (GatewayError::InvalidApiKey, 401, "invalid_api_key"),
            (GatewayError::RevokedApiKey, 401, "revoked_api_key"),
            (GatewayError::ExpiredApiKey, 401, "expired_api_key"),
            (GatewayError::IpNotAllowed, 403, "ip_not_allowed"),
            (GatewayError::InsufficientScope, 403, "insufficient_scope"),
            (GatewayError::OriginNotAllowed, 403, "origin_not_allowed"),
            (GatewayError::RateLimited { retry_after_secs: 3, quota: QUOTA }, 429, "rate_limited"),
            (GatewayError::QuotaExceeded { retry_after_secs: 60 }, 429, "quota_exceeded"),
            (GatewayError::HeadersTooLarge, 431, "headers_too_large"),
            (GatewayError::UnsupportedTransferEncoding, 501, "unsupported_transfer_encoding"),
            (GatewayError::UpstreamUnavailable, 502, "upstream_unavailable"),
            (GatewayError::UpstreamTimeout, 504, "upstream_timeout"),
            (GatewayError::UpstreamBusy, 503, "upstream_busy"),
            (GatewayError::Internal, 500, "internal_error"),
        ];
        for (error, status, code) in table {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
            assert_eq!(error.code(), code, "{error:?}");
            let response = settled(error.render(false, HeaderValue::from_static("id-1")));
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(error.rendered_status(false).as_u16(), status);
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(response.headers().get_all(X_REQUEST_ID).iter().collect::<Vec<_>>(), ["id-1"]);
            assert_eq!(response.headers().contains_key(header::WWW_AUTHENTICATE), status == 401, "{error:?}");
            let body = futures_body(response);
            let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(json["error"], code);
            assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn shared_bodies_match_a_fresh_rendering() {
        for error in [GatewayError::InvalidApiKey, GatewayError::QuotaExceeded { retry_after_secs: 1 }] {
            assert_eq!(error.body(), error.render_body());
            assert_eq!(error.body(), error.render_body(), "second use of the shared body");
        }
        assert_ne!(GatewayError::BadRequest("a").body(), GatewayError::BadRequest("b").body());
    }

    #[test]
    fn every_admin_variant_has_its_status_and_code() {
        let table = [
            (AdminError::MisdirectedRequest, 421, "misdirected_request"),
            (AdminError::AdminTokenRequired, 401, "admin_token_required"),
            (AdminError::InvalidRequest("x".into()), 400, "invalid_request"),
            (AdminError::BodyTooLarge(10), 413, "invalid_request"),
            (AdminError::KeyNotFound, 404, "key_not_found"),
            (AdminError::AmbiguousSelector("x".into()), 409, "ambiguous_selector"),
            (AdminError::StoreUnavailable("x".into()), 503, "store_unavailable"),
            (AdminError::NotFound, 404, "not_found"),
            (AdminError::MethodNotAllowed("GET"), 405, "method_not_allowed"),
            (AdminError::Internal, 500, "internal_error"),
        ];
        for (error, status, code) in table {
            let response = error.to_response();
            assert_eq!(response.status().as_u16(), status, "{error:?}");
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
            assert_eq!(response.headers().contains_key(header::WWW_AUTHENTICATE), status == 401, "{error:?}");
            let json: serde_json::Value = serde_json::from_slice(&futures_body(response)).unwrap();
            assert_eq!(json["error"], code);
            assert!(json["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn grpc_clients_get_trailers_only_answers() {
        let table = [
            (GatewayError::MissingApiKey, 16),
            (GatewayError::InvalidApiKey, 16),
            (GatewayError::InsufficientScope, 7),
            (GatewayError::RateLimited { retry_after_secs: 3, quota: QUOTA }, 8),
            (GatewayError::NoRoute, 12),
            (GatewayError::BadRequest("x"), 3),
            (GatewayError::UpstreamUnavailable, 14),
            (GatewayError::UpstreamBusy, 14),
            (GatewayError::UpstreamTimeout, 4),
        ];
        for (error, grpc_status) in table {
            let response = settled(error.render(true, HeaderValue::from_static("id-2")));
            assert_eq!(response.status(), StatusCode::OK, "{error:?}");
            assert_eq!(error.rendered_status(true), StatusCode::OK);
            assert_eq!(response.headers()[X_REQUEST_ID], "id-2");
            assert_eq!(response.headers()[header::CONTENT_TYPE], "application/grpc");
            assert_eq!(response.headers()["grpc-status"], grpc_status.to_string().as_str(), "{error:?}");
            assert_eq!(response.headers()["grpc-message"], error.code());
            assert!(futures_body(response).is_empty());
        }
    }

    #[test]
    fn rate_limited_carries_retry_after() {
        let response = settled(
            GatewayError::RateLimited { retry_after_secs: 7, quota: QUOTA }
                .render(false, HeaderValue::from_static("-")),
        );
        assert_eq!(response.headers()[header::RETRY_AFTER], "7");
        assert_eq!(response.headers()["ratelimit-limit"], "10");
        assert_eq!(response.headers()["ratelimit-remaining"], "0");
        assert_eq!(response.headers()["ratelimit-reset"], "9");
    }

    /// The response as hyper is given it: every field in its map.
    fn settled(response: Response<Reply>) -> Response<Reply> {
        let mut response = response.map(Either::<(), Reply>::Right);
        crate::proxy::reply::settle(&mut response);
        response.map(|body| match body {
            Either::Right(reply) => reply,
            Either::Left(()) => unreachable!(),
        })
    }

    fn futures_body<B: hyper::body::Body<Data = Bytes>>(response: Response<B>) -> Bytes
    where
        B::Error: std::fmt::Debug,
    {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        runtime.block_on(async { response.into_body().collect().await.unwrap().to_bytes() })
    }
}

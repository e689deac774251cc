//! The web console at `/console`: one static page, its script and its style, embedded in the
//! binary. The page holds no secret, so it is served without a token; every API call it makes
//! sends the admin token the operator types in, as a Bearer header.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::error::AdminError;
use crate::proxy::Gateway;

const INDEX: &str = include_str!("console/index.html");
const SCRIPT: &str = include_str!("console/app.js");
const STYLE: &str = include_str!("console/style.css");

/// Scripts only from this origin (no inline script: every value the page shows is data, never
/// code), calls only to this origin, and no framing, forms or base-URL tricks.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn answer(gateway: &Gateway, request: &Request<Incoming>) -> Result<Response<Full<Bytes>>, AdminError> {
    // No admin tokens: no key API, so no console either.
    if gateway.snapshot().admin.as_ref().is_none_or(|a| a.tokens.is_empty()) {
        return Err(AdminError::NotFound);
    }
    let (content_type, body) = match request.uri().path() {
        "/console" | "/console/" => ("text/html; charset=utf-8", INDEX),
        "/console/app.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "/console/style.css" => ("text/css; charset=utf-8", STYLE),
        _ => return Err(AdminError::NotFound),
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Err(AdminError::MethodNotAllowed("GET, HEAD"));
    }
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

//! CORS for routes with `[routes.cors]`: keygate answers their preflights itself, and marks
//! every response to an allowed origin — its own errors too — so a browser app can read it.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;

use crate::proxy::route::ScopeRule;

/// What a browser app may read besides the CORS-safelisted response headers: enough to
/// correlate a request and to back off from a 429.
const EXPOSED: HeaderValue = HeaderValue::from_static(
    "x-request-id, retry-after, ratelimit-limit, ratelimit-remaining, ratelimit-reset",
);

/// The methods a route that admits any method lists in its preflight answers; CONNECT and
/// TRACE are refused anyway.
const EVERY_METHOD: &str = "GET, HEAD, POST, PUT, PATCH, DELETE";

/// A route's CORS policy, in ready header values.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Origins,
    allow_methods: HeaderValue,
    allow_headers: HeaderValue,
    max_age: HeaderValue,
}

#[derive(Debug, Clone)]
enum Origins {
    /// `["*"]`: any origin, answered with `*`.
    Any,
    /// Exact origins, lower case as browsers send them.
    Listed(Box<[Box<str>]>),
}

/// Checks one `allow_origins` entry: `*` or `scheme://host[:port]`, exactly as a browser
/// writes an `Origin` (no path, not even a trailing `/`). Returns it in lower case.
pub fn parse_origin(text: &str) -> Result<String, String> {
    if text == "*" {
        return Ok(text.to_string());
    }
    let bad =
        |why: &str| format!("allow_origins entry {text:?} {why}; write it as https://host[:port] or \"*\"");
    let (scheme, rest) = text.split_once("://").ok_or_else(|| bad("has no scheme"))?;
    if scheme.is_empty() || !scheme.bytes().all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b)) {
        return Err(bad("has an invalid scheme"));
    }
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(bad("must be scheme://host[:port] without a path"));
    }
    if rest.parse::<http::uri::Authority>().is_err() {
        return Err(bad("has an invalid host or port"));
    }
    Ok(text.to_ascii_lowercase())
}

impl Cors {
    /// `origins` come from [`parse_origin`]; `key_headers` are the headers the route's key
    /// sources read, which a browser app must be allowed to send.
    pub fn new(
        origins: Vec<String>,
        scopes: Option<&ScopeRule>,
        key_headers: &[HeaderName],
        extra_headers: &[HeaderName],
        max_age: Duration,
    ) -> Result<Self, String> {
        let origins = if origins.iter().any(|o| o == "*") {
            if origins.len() > 1 {
                return Err("allow_origins = [\"*\"] allows every origin; list no others with it".to_string());
            }
            Origins::Any
        } else if origins.is_empty() {
            return Err("allow_origins must name at least one origin, or be [\"*\"]".to_string());
        } else {
            Origins::Listed(origins.into_iter().map(String::into_boxed_str).collect())
        };
        let methods = match scopes {
            // A method without an entry is refused (and the "*" entry admits any other), so
            // the listed methods are exactly the ones a browser app can use.
            Some(rule) if rule.other.is_none() => {
                let mut names: Vec<&str> = rule.by_method.iter().map(|(m, _)| m.as_str()).collect();
                names.dedup();
                names.join(", ")
            }
            _ => EVERY_METHOD.to_string(),
        };
        let mut names: Vec<&str> = Vec::new();
        for name in key_headers.iter().chain([&header::CONTENT_TYPE]).chain(extra_headers) {
            if !names.contains(&name.as_str()) {
                names.push(name.as_str());
            }
        }
        let text_value =
            |text: String| HeaderValue::from_str(&text).map_err(|_| format!("{text:?} is not header text"));
        Ok(Self {
            origins,
            allow_methods: text_value(methods)?,
            allow_headers: text_value(names.join(", "))?,
            max_age: HeaderValue::from(max_age.as_secs()),
        })
    }

    /// The `Access-Control-Allow-Origin` value for a request from `origin`, if it is allowed.
    pub fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        match &self.origins {
            Origins::Any => Some(HeaderValue::from_static("*")),
            Origins::Listed(list) => {
                let origin_text = origin.to_str().ok()?;
                list.iter().any(|o| o.eq_ignore_ascii_case(origin_text)).then(|| origin.clone())
            }
        }
    }

    /// The answer to an allowed preflight; [`Cors::decorate`] adds the origin and `Vary`.
    pub fn preflight(&self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::NO_CONTENT;
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, self.allow_methods.clone());
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, self.allow_headers.clone());
        headers.insert(header::ACCESS_CONTROL_MAX_AGE, self.max_age.clone());
        response
    }

    /// Marks a response to an allowed origin. keygate owns CORS on such a route, so the
    /// origin it decided replaces any the upstream sent; headers the upstream exposes stay
    /// exposed alongside keygate's.
    pub fn decorate(&self, headers: &mut HeaderMap, allow_origin: HeaderValue) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
        let varies = headers.get_all(header::VARY).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',').any(|t| matches!(t.trim(), "*") || t.trim().eq_ignore_ascii_case("origin"))
            })
        });
        if !varies {
            headers.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        let exposed = match headers.get(header::ACCESS_CONTROL_EXPOSE_HEADERS).and_then(|v| v.to_str().ok()) {
            Some(theirs) if !theirs.trim().is_empty() => {
                HeaderValue::from_str(&format!("{theirs}, {}", EXPOSED.to_str().unwrap_or("")))
                    .unwrap_or(EXPOSED)
            }
            _ => EXPOSED,
        };
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, exposed);
    }
}

/// A CORS preflight: `OPTIONS` with `Origin` and `Access-Control-Request-Method`. Browsers
/// never send credentials with one, so it must not need a key.
///
/// Nor does a browser's preflight ever carry a body, an `Upgrade`, or a method override: an
/// `OPTIONS` with any of those is an ordinary request and needs a key, so that a forged
/// "preflight" cannot take a `DELETE` (by override), a body or a WebSocket past
/// authentication to an upstream that acts on them.
pub fn is_preflight(parts: &Parts) -> bool {
    parts.method == Method::OPTIONS
        && parts.headers.contains_key(header::ORIGIN)
        && parts.headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
        && !parts.headers.contains_key(header::UPGRADE)
        && !parts.headers.contains_key(header::TRANSFER_ENCODING)
        && parts.headers.get_all(header::CONTENT_LENGTH).iter().all(|v| v.as_bytes().trim_ascii() == b"0")
        && !crate::proxy::auth::has_method_override(&parts.headers, parts.uri.query())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(origins: &[&str], rule: Option<&ScopeRule>) -> Cors {
        let origins = origins.iter().map(|o| parse_origin(o).unwrap()).collect();
        let extra = [HeaderName::from_static("x-client")];
        Cors::new(origins, rule, &[HeaderName::from_static("x-api-key")], &extra, Duration::from_secs(600))
            .unwrap()
    }

    #[test]
    fn origins_are_checked_at_load_and_matched_exactly() {
        for bad in ["https://a.test/", "a.test", "https://", "https://a.test/x", "https://u@a.test", "null"] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_origin("HTTPS://App.Test:8443").unwrap(), "https://app.test:8443");
        let listed = cors(&["https://app.test"], None);
        assert!(listed.allow_origin(&HeaderValue::from_static("https://app.test")).is_some());
        assert!(listed.allow_origin(&HeaderValue::from_static("https://app.test.evil")).is_none());
        assert!(listed.allow_origin(&HeaderValue::from_static("http://app.test")).is_none());
        let any = cors(&["*"], None);
        assert_eq!(any.allow_origin(&HeaderValue::from_static("https://x.test")).unwrap(), "*");
        assert!(
            Cors::new(vec!["*".into(), "https://a.test".into()], None, &[], &[], Duration::ZERO).is_err()
        );
        assert!(Cors::new(vec![], None, &[], &[], Duration::ZERO).is_err());
    }

    #[test]
    fn preflight_lists_the_route_methods_and_headers() {
        let rule = ScopeRule {
            by_method: vec![
                (Method::GET, vec!["read".into()].into()),
                (Method::POST, vec!["write".into()].into()),
            ],
            other: None,
        };
        let answer = cors(&["https://app.test"], Some(&rule)).preflight();
        assert_eq!(answer.status(), 204);
        assert_eq!(answer.headers()[header::ACCESS_CONTROL_ALLOW_METHODS], "GET, POST");
        assert_eq!(
            answer.headers()[header::ACCESS_CONTROL_ALLOW_HEADERS],
            "x-api-key, content-type, x-client"
        );
        assert_eq!(answer.headers()[header::ACCESS_CONTROL_MAX_AGE], "600");
        let open = cors(&["*"], None).preflight();
        assert_eq!(open.headers()[header::ACCESS_CONTROL_ALLOW_METHODS], EVERY_METHOD);
    }

    #[test]
    fn decoration_keeps_the_upstreams_vary_and_exposed_headers() {
        let policy = cors(&["https://app.test"], None);
        let mut headers = HeaderMap::new();
        headers.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        headers.insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static("x-total"));
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
        policy.decorate(&mut headers, HeaderValue::from_static("https://app.test"));
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://app.test");
        let vary: Vec<_> = headers.get_all(header::VARY).iter().collect();
        assert_eq!(vary, ["accept-encoding", "Origin"]);
        assert!(
            headers[header::ACCESS_CONTROL_EXPOSE_HEADERS]
                .to_str()
                .unwrap()
                .starts_with("x-total, x-request-id")
        );
        policy.decorate(&mut headers, HeaderValue::from_static("https://app.test"));
        assert_eq!(headers.get_all(header::VARY).iter().count(), 2, "Origin is added once");
    }

    #[test]
    fn only_a_bodiless_plain_options_is_a_preflight() {
        let parts = |target: &str, extra: &[(&str, &str)]| {
            let mut request = http::Request::builder()
                .method(Method::OPTIONS)
                .uri(target)
                .header("origin", "https://app.test")
                .header("access-control-request-method", "DELETE");
            for (name, value) in extra {
                request = request.header(*name, *value);
            }
            request.body(()).unwrap().into_parts().0
        };
        assert!(is_preflight(&parts("/x", &[])));
        assert!(is_preflight(&parts("/x?method=a", &[("content-length", "0")])));
        for (target, extra) in [
            ("/x", &[("x-http-method-override", "DELETE")][..]),
            ("/x", &[("x_method_override", "DELETE")][..]),
            ("/x?a=1&_method=DELETE", &[][..]),
            ("/x?%5Fmethod=DELETE", &[][..]),
            ("/x", &[("content-length", "5")][..]),
            ("/x", &[("transfer-encoding", "chunked")][..]),
            ("/x", &[("upgrade", "websocket"), ("connection", "upgrade")][..]),
        ] {
            assert!(!is_preflight(&parts(target, extra)), "{target} {extra:?}");
        }
        let mut get = parts("/x", &[]);
        get.method = Method::GET;
        assert!(!is_preflight(&get));
    }
}

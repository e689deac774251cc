//! Authentication and authorization: find the presented key, verify it against the table,
//! check the route's scope; and remove every configured credential before forwarding.

use std::borrow::Cow;
use std::time::SystemTime;

use http::header::{AUTHORIZATION, COOKIE, HeaderName};
use http::{HeaderMap, Method};

use crate::error::GatewayError;
use crate::keys::{KeyEntry, KeyHash, KeyState, KeyTable, PresentedKey, plausible};
use crate::proxy::route::ScopeRule;

/// Where a key may travel in a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The whole value of a header.
    Header(HeaderName),
    /// `Authorization: <scheme> <key>`; the scheme is kept as configured, matched ignoring case.
    Authorization(String),
    /// A query parameter.
    Query(String),
    /// A cookie of the `Cookie` header(s); names are case-sensitive, as browsers keep them.
    Cookie(String),
}

impl Source {
    /// Parses `header:NAME`, `authorization:SCHEME`, `query:NAME` or `cookie:NAME`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (kind, name) = text.split_once(':').ok_or_else(|| {
            format!("source {text:?} must be header:NAME, authorization:SCHEME, query:NAME or cookie:NAME")
        })?;
        let name = name.trim();
        if name.is_empty() {
            return Err(format!("source {text:?} has an empty name"));
        }
        match kind.trim() {
            "header" => {
                let header = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("source {text:?}: {name:?} is not a valid header name"))?;
                if header == AUTHORIZATION {
                    return Err("use authorization:SCHEME for the Authorization header".to_string());
                }
                Ok(Self::Header(header))
            }
            "authorization" => {
                if !name.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!("source {text:?}: the scheme must be one token"));
                }
                Ok(Self::Authorization(name.to_string()))
            }
            "query" => Ok(Self::Query(name.to_string())),
            "cookie" => {
                // RFC 6265 §4.1.1: a cookie name is an RFC 2616 token.
                if !name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b)) {
                    return Err(format!("source {text:?}: {name:?} is not a valid cookie name"));
                }
                Ok(Self::Cookie(name.to_string()))
            }
            _ => Err(format!("source {text:?}: the kind must be header, authorization, query or cookie")),
        }
    }
}

/// How keys are found and recognised, from `[auth]`.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub sources: Vec<Source>,
    pub key_prefix: String,
}

impl AuthSettings {
    /// The request headers a key may travel in, which a browser app must be allowed to send.
    pub fn key_headers(&self) -> Vec<HeaderName> {
        let mut names: Vec<HeaderName> = Vec::new();
        for source in &self.sources {
            let name = match source {
                Source::Header(name) => name.clone(),
                Source::Authorization(_) => AUTHORIZATION,
                Source::Query(_) | Source::Cookie(_) => continue,
            };
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

/// `name=value` pairs of every `Cookie` header, in order, as raw bytes: a header that is not
/// text still has its cookies found (and removed).
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    headers.get_all(COOKIE).iter().flat_map(|v| v.as_bytes().split(|&b| b == b';')).filter_map(|pair| {
        let pair = pair.trim_ascii();
        if pair.is_empty() {
            return None;
        }
        let at = pair.iter().position(|&b| b == b'=');
        Some(match at {
            Some(at) => (pair[..at].trim_ascii(), pair[at + 1..].trim_ascii()),
            None => (pair, &b""[..]),
        })
    })
}

/// A cookie value as a key: one pair of double quotes (RFC 6265 allows them) is not part of
/// it; a value that is not text can be no key, and is made one that matches none.
fn cookie_value(raw: &[u8]) -> &str {
    let raw = match raw {
        [b'"', inner @ .., b'"'] => inner,
        other => other,
    };
    std::str::from_utf8(raw).map(str::trim).unwrap_or("\u{0}")
}

/// The key value of an `Authorization` header if its scheme is `scheme`.
fn authorization_credential<'a>(value: &'a str, scheme: &str) -> Option<&'a str> {
    let value = value.trim_start();
    let (got, rest) = value.split_once([' ', '\t']).unwrap_or((value, ""));
    got.eq_ignore_ascii_case(scheme).then(|| rest.trim())
}

/// `name=value` pairs of a query, split but not decoded.
fn query_pairs(query: &str) -> impl Iterator<Item = (&str, &str)> {
    query.split('&').filter(|p| !p.is_empty()).map(|p| p.split_once('=').unwrap_or((p, "")))
}

/// Percent-decodes a query component; `+` stays `+` so that base64 keys survive unencoded.
fn percent_decode(text: &str) -> Cow<'_, str> {
    match percent_decode_bytes(text.as_bytes()) {
        Cow::Borrowed(_) => Cow::Borrowed(text),
        Cow::Owned(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
    }
}

/// `%XX` decoded once; anything else, a malformed escape included, kept as it is.
pub(crate) fn percent_decode_bytes(bytes: &[u8]) -> Cow<'_, [u8]> {
    if !bytes.contains(&b'%') {
        return Cow::Borrowed(bytes);
    }
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits make at most 0xff.
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    Cow::Owned(out)
}

/// Collects the values of one source; more than one is refused, since which of two keys
/// "counts" is exactly the kind of ambiguity a front end and a back end can disagree on.
fn single<'r>(mut values: impl Iterator<Item = Cow<'r, str>>) -> Result<Option<Cow<'r, str>>, GatewayError> {
    let first = values.next();
    if values.next().is_some() {
        return Err(GatewayError::InvalidApiKey);
    }
    Ok(first)
}

/// Finds the key: sources are tried in configured order and the first present one wins.
pub fn extract<'r>(
    sources: &[Source],
    headers: &'r HeaderMap,
    query: Option<&'r str>,
) -> Result<Option<PresentedCredential<'r>>, GatewayError> {
    for source in sources {
        let found = match source {
            Source::Header(name) => single(
                headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().map(|s| Cow::Borrowed(s.trim())).unwrap_or(Cow::Borrowed("\u{0}"))),
            )?,
            Source::Authorization(scheme) => single(headers.get_all(AUTHORIZATION).iter().filter_map(|v| {
                // A non-text Authorization value cannot be any configured scheme's.
                v.to_str().ok().and_then(|s| authorization_credential(s, scheme)).map(Cow::Borrowed)
            }))?,
            Source::Query(name) => single(
                query_pairs(query.unwrap_or("")).filter(|(n, _)| percent_decode(n) == name.as_str()).map(
                    |(_, v)| match percent_decode(v) {
                        Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
                        Cow::Owned(s) => Cow::Owned(s.trim().to_string()),
                    },
                ),
            )?,
            Source::Cookie(name) => single(
                cookie_pairs(headers)
                    .filter(|(n, _)| *n == name.as_bytes())
                    .map(|(_, v)| Cow::Borrowed(cookie_value(v))),
            )?,
        };
        if let Some(value) = found.filter(|v| !v.is_empty()) {
            return Ok(Some(PresentedCredential(value)));
        }
    }
    Ok(None)
}

/// An extracted key, owned or borrowed from the request; never printed.
pub struct PresentedCredential<'r>(Cow<'r, str>);

impl PresentedCredential<'_> {
    pub fn key(&self) -> PresentedKey<'_> {
        PresentedKey::new(&self.0)
    }
}

/// Checks a presented key against the table and the clock.
pub fn verify<'t>(
    key: PresentedKey<'_>,
    settings: &AuthSettings,
    table: &'t KeyTable,
    now: SystemTime,
) -> Result<&'t KeyEntry, GatewayError> {
    let (_, entry) = lookup(key, settings, table)?;
    usable(entry, now)?;
    Ok(entry)
}

/// The table's entry for a presented key, whatever its state, with its position in the table
/// (see [`KeyTable::locate`]).
pub fn lookup<'t>(
    key: PresentedKey<'_>,
    settings: &AuthSettings,
    table: &'t KeyTable,
) -> Result<(u32, &'t KeyEntry), GatewayError> {
    // A key in keygate's own format with a bad checksum is a typo or a forgery: refuse it
    // before touching the table, as GitHub does with its tokens.
    if !plausible(key.expose(), &settings.key_prefix) {
        return Err(GatewayError::InvalidApiKey);
    }
    table.locate(&KeyHash::of(key.expose())).ok_or(GatewayError::InvalidApiKey)
}

/// Whether a key found in the table may be used at `now`: neither revoked nor expired.
pub fn usable(entry: &KeyEntry, now: SystemTime) -> Result<(), GatewayError> {
    match entry.state_at(now) {
        KeyState::Active => Ok(()),
        KeyState::Revoked => Err(GatewayError::RevokedApiKey),
        KeyState::Expired => Err(GatewayError::ExpiredApiKey),
    }
}

/// Headers through which a client asks a framework to treat a request as another method.
const METHOD_OVERRIDES: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// The query parameter through which Laravel, Symfony and Rails take a method override.
const METHOD_PARAMETER: &str = "_method";

/// Whether a header name is a method override, also in `_` spellings, which CGI-style back
/// ends fold into the same variable.
fn is_override_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    METHOD_OVERRIDES.iter().any(|o| {
        o.len() == name.len() && o.bytes().zip(name.bytes()).all(|(a, b)| a == b || (a == b'-' && b == b'_'))
    })
}

/// Every method the request asks an upstream framework to run instead of its own, read the way
/// those frameworks read it: trimmed and upper-cased, so `delete` is judged as `DELETE`. From the
/// override headers (each comma-separated part) and every `_method` query parameter. A value
/// that is no method token is refused: which method a framework would make of it is a guess.
pub fn method_overrides(headers: &HeaderMap, query: Option<&str>) -> Result<Vec<Method>, GatewayError> {
    let mut methods = Vec::new();
    let mut judge = |text: &str| -> Result<(), GatewayError> {
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let upper = part.to_ascii_uppercase();
            let method = Method::from_bytes(upper.as_bytes())
                .map_err(|_| GatewayError::BadRequest("a method override does not name a method"))?;
            methods.push(method);
        }
        Ok(())
    };
    for (_, value) in headers.iter().filter(|(name, _)| is_override_header(name)) {
        let text =
            value.to_str().map_err(|_| GatewayError::BadRequest("a method-override header is not text"))?;
        judge(text)?;
    }
    if let Some(query) = query {
        for (name, value) in query_pairs(query) {
            if percent_decode(name).eq_ignore_ascii_case(METHOD_PARAMETER) {
                // Form encoding: `+` is a space here, which trimming then drops.
                judge(&percent_decode(value).replace('+', " "))?;
            }
        }
    }
    Ok(methods)
}

/// Whether anything in the request could make an upstream run another method than its own.
pub fn has_method_override(headers: &HeaderMap, query: Option<&str>) -> bool {
    headers.keys().any(is_override_header) || method_overrides(headers, query).map_or(true, |m| !m.is_empty())
}

/// Checks that the key holds a scope the route requires for the method, and for every method
/// an override asks for, since the upstream may act on the override.
pub fn authorize(
    rule: Option<&ScopeRule>,
    key: &KeyEntry,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<(), GatewayError> {
    // Read first, even without a scope rule: a malformed override is the client's error.
    let overrides = method_overrides(headers, query)?;
    let Some(rule) = rule else { return Ok(()) };
    let allowed = |method: &Method| {
        rule.required(method).is_some_and(|scopes| scopes.iter().any(|s| key.scopes.holds(s)))
    };
    if !allowed(method) || !overrides.iter().all(allowed) {
        return Err(GatewayError::InsufficientScope);
    }
    Ok(())
}

/// The whole auth step of a protected route: extract → verify → authorize.
pub fn authenticate<'t>(
    settings: &AuthSettings,
    table: &'t KeyTable,
    rule: Option<&ScopeRule>,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
    now: SystemTime,
) -> Result<&'t KeyEntry, GatewayError> {
    let credential = extract(&settings.sources, headers, query)?.ok_or(GatewayError::MissingApiKey)?;
    let entry = verify(credential.key(), settings, table, now)?;
    authorize(rule, entry, method, headers, query)?;
    Ok(entry)
}

/// Removes every configured credential, whichever one supplied the key, so no key reaches
/// the upstream. An `Authorization` header whose scheme no source claims is left alone.
/// Returns the query to forward (`None` when nothing is left of it).
pub fn strip_credentials(sources: &[Source], headers: &mut HeaderMap, query: Option<&str>) -> Option<String> {
    let mut strip_query = false;
    let mut strip_authorization = false;
    let mut strip_cookies = false;
    for source in sources {
        match source {
            Source::Header(name) => {
                headers.remove(name);
            }
            Source::Authorization(_) => strip_authorization = true,
            Source::Query(_) => strip_query = true,
            Source::Cookie(_) => strip_cookies = true,
        }
    }
    if strip_cookies && headers.contains_key(COOKIE) {
        strip_cookie_sources(sources, headers);
    }
    if strip_authorization && headers.contains_key(AUTHORIZATION) {
        let claimed = |value: &http::HeaderValue| {
            value.to_str().is_ok_and(|s| {
                sources.iter().any(|source| {
                    matches!(source, Source::Authorization(scheme) if authorization_credential(s, scheme).is_some())
                })
            })
        };
        let kept: Vec<_> = headers.get_all(AUTHORIZATION).iter().filter(|v| !claimed(v)).cloned().collect();
        headers.remove(AUTHORIZATION);
        for value in kept {
            headers.append(AUTHORIZATION, value);
        }
    }
    let query = query.filter(|q| !q.is_empty())?;
    if !strip_query {
        return Some(query.to_string());
    }
    let is_credential = |name: &str| {
        let name = percent_decode(name);
        sources.iter().any(|s| matches!(s, Source::Query(q) if *q == name))
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| !is_credential(pair.split_once('=').map_or(*pair, |(n, _)| n)))
        .collect();
    let kept = kept.join("&");
    (!kept.is_empty()).then_some(kept)
}

/// Removes the source cookies and sends the others on in order, in one `Cookie` header: the
/// upstream hop is HTTP/1.1, where RFC 9113 §8.2.3 has HTTP/2's several cookie fields joined.
fn strip_cookie_sources(sources: &[Source], headers: &mut HeaderMap) {
    let is_source =
        |name: &[u8]| sources.iter().any(|s| matches!(s, Source::Cookie(c) if c.as_bytes() == name));
    let mut kept: Vec<u8> = Vec::new();
    for value in headers.get_all(COOKIE) {
        for pair in value.as_bytes().split(|&b| b == b';').map(<[u8]>::trim_ascii).filter(|p| !p.is_empty()) {
            let name = pair.iter().position(|&b| b == b'=').map_or(pair, |at| pair[..at].trim_ascii());
            if !is_source(name) {
                if !kept.is_empty() {
                    kept.extend_from_slice(b"; ");
                }
                kept.extend_from_slice(pair);
            }
        }
    }
    headers.remove(COOKIE);
    // Pieces of valid header values joined by "; " are a valid header value.
    if let Ok(value) = http::HeaderValue::from_bytes(&kept)
        && !kept.is_empty()
    {
        headers.insert(COOKIE, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn sources() -> Vec<Source> {
        ["header:x-api-key", "authorization:Bearer", "query:api_key"]
            .iter()
            .map(|s| Source::parse(s).unwrap())
            .collect()
    }

    fn found(headers: &HeaderMap, query: Option<&str>) -> Result<Option<String>, GatewayError> {
        extract(&sources(), headers, query).map(|c| c.map(|c| c.key().expose().to_string()))
    }

    #[test]
    fn sources_parse() {
        assert_eq!(Source::parse("query:k").unwrap(), Source::Query("k".into()));
        assert_eq!(Source::parse("cookie:kg_session").unwrap(), Source::Cookie("kg_session".into()));
        for bad in
            ["x-api-key", "cookie:a=b", "cookie:a;b", "header:", "header:bad name", "header:authorization"]
        {
            assert!(Source::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn first_present_source_wins_and_duplicates_are_refused() {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_static("bearer  tok "));
        assert_eq!(found(&headers, Some("api_key=q")).unwrap().as_deref(), Some("tok"));
        headers.insert("x-api-key", HeaderValue::from_static(" hdr "));
        assert_eq!(found(&headers, None).unwrap().as_deref(), Some("hdr"));
        headers.append("x-api-key", HeaderValue::from_static("other"));
        assert_eq!(found(&headers, None), Err(GatewayError::InvalidApiKey));
        assert_eq!(
            found(&HeaderMap::new(), Some("a=1&api_key=x%2By&api_key=z")),
            Err(GatewayError::InvalidApiKey)
        );
        assert_eq!(found(&HeaderMap::new(), Some("a=1&api_key=x%2By+")).unwrap().as_deref(), Some("x+y+"));
        assert_eq!(found(&HeaderMap::new(), Some("a=1")).unwrap(), None);
    }

    #[test]
    fn credentials_are_stripped_but_foreign_authorization_stays() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("k"));
        headers.append(AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        headers.append(AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        let query = strip_credentials(&sources(), &mut headers, Some("a=1&api_key=k&b=2&api%5Fkey=k"));
        assert_eq!(query.as_deref(), Some("a=1&b=2"));
        assert!(!headers.contains_key("x-api-key"));
        let auth: Vec<_> = headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(auth, ["Basic abc"]);
        assert_eq!(strip_credentials(&sources(), &mut headers, Some("api_key=k")), None);
    }

    fn cookie_sources() -> Vec<Source> {
        vec![Source::parse("cookie:session").unwrap(), Source::parse("header:x-api-key").unwrap()]
    }

    #[test]
    fn cookie_source_reads_every_cookie_header() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("theme=dark; sessionx=1"));
        headers.append(COOKIE, HeaderValue::from_static("session=\"k1\" ; lang=en"));
        let got = extract(&cookie_sources(), &headers, None).unwrap().map(|c| c.key().expose().to_string());
        assert_eq!(got.as_deref(), Some("k1"));
        headers.append(COOKIE, HeaderValue::from_static("session=k2"));
        assert!(matches!(extract(&cookie_sources(), &headers, None), Err(GatewayError::InvalidApiKey)));
        let none = HeaderMap::new();
        assert!(extract(&cookie_sources(), &none, None).unwrap().is_none());
    }

    #[test]
    fn only_the_source_cookie_is_stripped_and_the_rest_keep_their_order() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; session=k1"));
        headers.append(COOKIE, HeaderValue::from_static("b=2;session=k2; Session=3"));
        strip_credentials(&cookie_sources(), &mut headers, None);
        let cookies: Vec<_> = headers.get_all(COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2; Session=3"]);
        let mut only = HeaderMap::new();
        only.insert(COOKIE, HeaderValue::from_static("session=k1"));
        strip_credentials(&cookie_sources(), &mut only, None);
        assert!(!only.contains_key(COOKIE), "an emptied Cookie header is removed");
    }
}

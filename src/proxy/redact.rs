//! Keys in keygate's own format that travel where no source is configured — another header, a
//! cookie, a query parameter under another name — found by their shape and checksum and removed
//! before forwarding, so no upstream parser (or upstream log) ever sees a key keygate did not
//! judge. The CRC32 checksum makes this free of false positives.

use std::borrow::Cow;

use base64::Engine;
use http::header::COOKIE;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::keys::{KEY_BODY_LEN, plausible};
use crate::proxy::auth::percent_decode_bytes;

/// Whether `bytes` holds, anywhere, a key `<prefix>_…` with a valid checksum: as it is, percent-
/// decoded (a query or cookie value), or in `Basic` credentials (base64 of `user:password`,
/// where Stripe-style clients put an API key).
pub fn holds_key(bytes: &[u8], prefix: &str) -> bool {
    // Decoding (percent or base64) only ever shortens, so a value shorter than one key holds
    // none in any spelling. Most header values are: they cost a comparison, not a search.
    if bytes.len() < prefix.len() + 1 + KEY_BODY_LEN {
        return false;
    }
    if holds_plain_key(bytes, prefix) {
        return true;
    }
    if bytes.contains(&b'%') && holds_plain_key(&percent_decode_bytes(bytes), prefix) {
        return true;
    }
    basic_credentials(bytes).is_some_and(|decoded| holds_key(&decoded, prefix))
}

fn holds_plain_key(bytes: &[u8], prefix: &str) -> bool {
    let len = prefix.len() + 1 + KEY_BODY_LEN;
    memchr::memmem::find_iter(bytes, prefix.as_bytes()).any(|at| {
        bytes.get(at + prefix.len()) == Some(&b'_')
            && bytes
                .get(at..at + len)
                .and_then(|candidate| std::str::from_utf8(candidate).ok())
                // `plausible` passes anything without the prefix; here the prefix is there, so
                // it is exactly the shape-and-checksum check.
                .is_some_and(|candidate| plausible(candidate, prefix))
    })
}

/// The decoded part of a `Basic <base64>` value.
fn basic_credentials(bytes: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(bytes).ok()?.trim();
    let (scheme, rest) = text.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()
}

/// Removes every header value, cookie and query parameter that carries a keygate-format key.
/// Returns the query to forward.
pub fn remove_stray_keys(prefix: &str, headers: &mut HeaderMap, query: Option<String>) -> Option<String> {
    // Nearly every request carries none: find that out with one scan before rebuilding anything.
    let tainted: Vec<HeaderName> = headers
        .iter()
        .filter(|(_, value)| holds_key(value.as_bytes(), prefix))
        .map(|(name, _)| name.clone())
        .collect();
    for name in tainted {
        if headers.contains_key(&name) {
            let kept: Vec<HeaderValue> =
                headers.get_all(&name).iter().filter_map(|value| clean_value(&name, value, prefix)).collect();
            headers.remove(&name);
            for value in kept {
                headers.append(name.clone(), value);
            }
        }
    }
    let query = query?;
    if !holds_key(query.as_bytes(), prefix) {
        return Some(query);
    }
    let kept: Vec<&str> = query.split('&').filter(|pair| !holds_key(pair.as_bytes(), prefix)).collect();
    let kept = kept.join("&");
    (!kept.is_empty()).then_some(kept)
}

/// What is left of one header value: a `Cookie` line loses only the cookies that carry a key;
/// any other value carrying one goes whole.
fn clean_value(name: &HeaderName, value: &HeaderValue, prefix: &str) -> Option<HeaderValue> {
    if !holds_key(value.as_bytes(), prefix) {
        return Some(value.clone());
    }
    if *name != COOKIE {
        return None;
    }
    let text: Cow<'_, str> = String::from_utf8_lossy(value.as_bytes());
    let kept: Vec<&str> = text
        .split(';')
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && !holds_key(pair.as_bytes(), prefix))
        .collect();
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join("; ")).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> String {
        crate::keys::generate("kg").unwrap().1
    }

    #[test]
    fn found_in_every_spelling_and_only_with_a_valid_checksum() {
        let key = key();
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
        let encoded = key.replace('_', "%5F");
        for carrier in [
            key.clone(),
            format!("Token {key}"),
            format!("x=1;api_key={key}"),
            format!("Basic {b64}"),
            encoded,
            format!("{key}trailing"),
        ] {
            assert!(holds_key(carrier.as_bytes(), "kg"), "{carrier}");
        }
        let mut forged = key.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'a' { 'b' } else { 'a' });
        assert!(!holds_key(forged.as_bytes(), "kg"));
        assert!(!holds_key(key.as_bytes(), "other"));
        assert!(!holds_key(b"kg_short", "kg"));
    }

    #[test]
    fn only_the_carrying_values_go() {
        let key = key();
        let mut headers = HeaderMap::new();
        headers.insert("x_api_key", HeaderValue::from_str(&key).unwrap());
        headers.append("x-other", HeaderValue::from_static("fine"));
        headers.append(COOKIE, HeaderValue::from_str(&format!("a=1; sid={key}; b=2")).unwrap());
        headers.append(COOKIE, HeaderValue::from_static("c=3"));
        let query = remove_stray_keys("kg", &mut headers, Some(format!("a=1&api_key[]={key}&b=2")));
        assert_eq!(query.as_deref(), Some("a=1&b=2"));
        assert!(!headers.contains_key("x_api_key"));
        assert_eq!(headers["x-other"], "fine");
        let cookies: Vec<_> = headers.get_all(COOKIE).iter().collect();
        assert_eq!(cookies, ["a=1; b=2", "c=3"]);
    }
}

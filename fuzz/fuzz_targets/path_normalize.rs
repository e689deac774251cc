//! Fuzzes path normalisation: whatever a client sends, the path keygate forwards is in one
//! inert normal form, and routing on it again would pick the same route.
//!
//! Input: one flag byte (bit 0 = `allow_encoded_slashes`), then the path as UTF-8.
#![no_main]

use keygate::proxy::path::normalize;
use keygate::proxy::route::{Route, RouteTable};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

/// The prefixes of tests/routing_props.rs: nested public/protected routes and one with an
/// unreserved character that clients may percent-encode (`~` as `%7E`).
fn table() -> &'static RouteTable {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    TABLE.get_or_init(|| {
        let route = |prefix: &str, public: bool| Route::placeholder(None, prefix, public);
        RouteTable::new(vec![
            route("/", false),
            route("/public/", true),
            route("/public/admin/", false),
            route("/a~b/", true),
            route("/a%20b/", true),
        ])
    })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn route_of(path: &str) -> Option<&'static str> {
    table().find(None, path).map(|r| r.prefix.as_str())
}

/// Every property a forwarded path must have; panics (a crash for libFuzzer) on the first
/// one broken, naming the input.
fn check(raw: &str, allow: bool) {
    let Ok(path) = normalize(raw, allow) else { return };
    let context = format!("raw {raw:?} (allow_encoded_slashes = {allow}) → {path:?}");

    // Idempotent: the upstream gets a path that keygate would leave as it is.
    let again = normalize(&path, allow);
    assert_eq!(again.as_deref(), Ok(path.as_str()), "not idempotent: {context}");
    // ...and so routes where it was routed.
    if let Ok(again) = &again {
        assert_eq!(route_of(again), route_of(&path), "route changed on re-normalising: {context}");
    }

    assert!(path.starts_with('/'), "not absolute: {context}");
    assert!(!path.contains("//"), "repeated slash: {context}");
    assert!(!path.contains('\\'), "backslash: {context}");
    assert!(!path.bytes().any(|b| b.is_ascii_control()), "control byte: {context}");
    for segment in path.split('/') {
        assert!(segment != "." && segment != "..", "dot-segment: {context}");
        assert!(
            !segment.starts_with(".;") && !segment.starts_with("..;"),
            "dot-segment with parameters: {context}"
        );
    }
    let lower = path.to_ascii_lowercase();
    assert!(!lower.contains("%2e"), "encoded dot: {context}");
    if !allow {
        assert!(!lower.contains("%2f") && !lower.contains("%5c"), "encoded slash: {context}");
    }

    // Every escape left is upper-case hex of a byte that must stay encoded: not unreserved
    // (those are decoded, once), not a control byte.
    let bytes = path.as_bytes();
    for (i, _) in path.match_indices('%') {
        let (Some(hi), Some(lo)) =
            (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        else {
            panic!("escape at {i} is not upper-case hex: {context}");
        };
        let value = (hi << 4) | lo;
        assert!(!is_unreserved(value), "encoded unreserved byte {value:#04x}: {context}");
        assert!(!value.is_ascii_control(), "encoded control byte {value:#04x}: {context}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let Ok(raw) = std::str::from_utf8(rest) else { return };
    check(raw, flags & 1 == 1);
});

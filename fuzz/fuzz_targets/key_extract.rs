//! Fuzzes the auth step on attacker-controlled headers and query: extract and authenticate
//! never panic and agree with each other, and stripping leaves no configured credential behind
//! while keeping an `Authorization` header that no source claims.
//!
//! Input: lines (`\n`), each starting with a tag; the format is textual so that seeds are
//! easy to write by hand (see fuzz/seeds/key_extract/):
//! - `s<spec>`: a key source such as `sheader:x-api-key` (invalid specs are skipped; none
//!   valid means the default `header:x-api-key`)
//! - `h<name>:<value>`: a header line, raw bytes (invalid names or values are skipped)
//! - `q<query>`: the query string (the last one counts)
//! - `m<method>`: the method (default GET)
//!
//! `$KEY0`…`$KEY3` anywhere in a line is replaced by a key of the table: 0 active with scope
//! `read`, 1 active in keygate's own format with `*`, 2 revoked, 3 expired.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;
use std::time::SystemTime;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use keygate::error::GatewayError;
use keygate::keys::{KeyHash, KeyTable, hash_key};
use keygate::proxy::auth::{AuthSettings, Source, authenticate, extract, strip_credentials};
use keygate::proxy::route::ScopeRule;
use libfuzzer_sys::fuzz_target;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A key in keygate's format with a valid CRC32 checksum, built the way `keys::generate` does
/// but from fixed characters, so that a crash reproduces exactly.
fn kg_key() -> String {
    let body = "kg_fuzz0001_0123456789abcdefghijABCDEFGHIJklmnop";
    let mut n = u64::from(crc32fast::hash(body.as_bytes()));
    let mut digits = [b'0'; 6];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    format!("{body}{}", String::from_utf8_lossy(&digits))
}

struct Fixture {
    keys: [String; 4],
    table: KeyTable,
    rule: ScopeRule,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let keys = [
            "fuzz-read-key".to_string(),
            kg_key(),
            "fuzz-revoked-key".to_string(),
            "fuzz-expired-key".to_string(),
        ];
        let text = format!(
            "[[keys]]\nid = \"k0\"\nname = \"reader\"\nhash = \"{}\"\nscopes = [\"read\"]\n\n\
             [[keys]]\nid = \"fuzz0001\"\nname = \"admin\"\nhash = \"{}\"\nscopes = [\"*\"]\n\n\
             [[keys]]\nid = \"k2\"\nname = \"revoked\"\nhash = \"{}\"\nscopes = [\"read\"]\n\
             revoked_at = 2020-01-01T00:00:00Z\n\n\
             [[keys]]\nid = \"k3\"\nname = \"expired\"\nhash = \"{}\"\nscopes = [\"read\"]\n\
             expires_at = 2020-01-01T00:00:00Z\n",
            hash_key(&keys[0]),
            hash_key(&keys[1]),
            hash_key(&keys[2]),
            hash_key(&keys[3]),
        );
        let table = match keygate::config::check_keys(Path::new("keys.toml"), &text) {
            Ok(table) => table,
            Err(errors) => panic!("the fixture key file is invalid:\n{errors}\n{text}"),
        };
        let scopes = |s: &str| vec![Box::<str>::from(s)].into_boxed_slice();
        let rule = ScopeRule {
            by_method: vec![(Method::GET, scopes("read")), (Method::HEAD, scopes("read"))],
            other: Some(scopes("write")),
        };
        Fixture { keys, table, rule }
    })
}

struct Request {
    sources: Vec<Source>,
    headers: HeaderMap,
    query: Option<String>,
    method: Method,
}

fn parse(data: &[u8], keys: &[String; 4]) -> Request {
    let mut request =
        Request { sources: Vec::new(), headers: HeaderMap::new(), query: None, method: Method::GET };
    for raw in data.split(|&b| b == b'\n') {
        let Some((&tag, rest)) = raw.split_first() else { continue };
        let mut line = rest.to_vec();
        for (i, key) in keys.iter().enumerate() {
            let placeholder = format!("$KEY{i}");
            while let Some(at) = line.windows(placeholder.len()).position(|w| w == placeholder.as_bytes()) {
                line.splice(at..at + placeholder.len(), key.bytes());
            }
        }
        match tag {
            b's' => {
                if let Ok(source) =
                    std::str::from_utf8(&line).map_err(drop).and_then(|t| Source::parse(t).map_err(drop))
                {
                    request.sources.push(source);
                }
            }
            b'h' => {
                let Some(colon) = line.iter().position(|&b| b == b':') else { continue };
                if let (Ok(name), Ok(value)) =
                    (HeaderName::from_bytes(&line[..colon]), HeaderValue::from_bytes(&line[colon + 1..]))
                {
                    request.headers.append(name, value);
                }
            }
            b'q' => request.query = String::from_utf8(line).ok(),
            b'm' => request.method = Method::from_bytes(&line).unwrap_or(Method::GET),
            _ => {}
        }
    }
    if request.sources.is_empty() {
        request.sources.push(Source::Header(HeaderName::from_static("x-api-key")));
    }
    request
}

/// Whether one of the `authorization:SCHEME` sources claims this `Authorization` value: its
/// first word is the scheme, ignoring case (the rule of spec §2.2, restated independently).
fn claimed(sources: &[Source], value: &HeaderValue) -> bool {
    let Ok(text) = value.to_str() else { return false };
    let text = text.trim_start();
    let scheme = text.split([' ', '\t']).next().unwrap_or(text);
    sources.iter().any(|s| matches!(s, Source::Authorization(want) if want.eq_ignore_ascii_case(scheme)))
}

fuzz_target!(|data: &[u8]| {
    let fixture = fixture();
    let request = parse(data, &fixture.keys);
    let settings = AuthSettings { sources: request.sources.clone(), key_prefix: "kg".to_string() };
    let query = request.query.as_deref();
    let now = SystemTime::now();

    let extracted = extract(&settings.sources, &request.headers, query)
        .map(|found| found.map(|credential| KeyHash::of(credential.key().expose())));
    for rule in [Some(&fixture.rule), None] {
        let result =
            authenticate(&settings, &fixture.table, rule, &request.method, &request.headers, query, now);
        match (&extracted, &result) {
            // What was admitted is exactly the key that extract found.
            (Ok(Some(hash)), Ok(entry)) => assert_eq!(&entry.hash, hash, "admitted another key"),
            (_, Ok(entry)) => panic!("admitted {:?} without an extracted key: {extracted:?}", entry.id),
            (Ok(None), Err(error)) => {
                assert_eq!(*error, GatewayError::MissingApiKey, "no key, yet {error:?}")
            }
            // A revoked or expired key is refused as such, whatever else the request says.
            (Ok(Some(hash)), Err(error)) if *hash == KeyHash::of(&fixture.keys[2]) => {
                assert_eq!(*error, GatewayError::RevokedApiKey, "the revoked key, yet {error:?}")
            }
            (Ok(Some(hash)), Err(error)) if *hash == KeyHash::of(&fixture.keys[3]) => {
                assert_eq!(*error, GatewayError::ExpiredApiKey, "the expired key, yet {error:?}")
            }
            _ => {}
        }
    }

    // Stripping removes every configured credential, whichever source supplied the key.
    let mut stripped = request.headers.clone();
    let forwarded_query = strip_credentials(&settings.sources, &mut stripped, query);
    match extract(&settings.sources, &stripped, forwarded_query.as_deref()) {
        Ok(None) => {}
        Ok(Some(_)) => panic!("a credential survived stripping; query now {forwarded_query:?}"),
        Err(error) => {
            panic!("stripped request still has credentials ({error:?}); query now {forwarded_query:?}")
        }
    }
    for source in &settings.sources {
        if let Source::Header(name) = source {
            assert!(!stripped.contains_key(name), "header {name} survived stripping");
        }
    }
    // ...but an Authorization header that no source claims passes through untouched, in order.
    let unclaimed: Vec<&HeaderValue> =
        request.headers.get_all(AUTHORIZATION).iter().filter(|v| !claimed(&settings.sources, v)).collect();
    let kept: Vec<&HeaderValue> = stripped.get_all(AUTHORIZATION).iter().collect();
    let any_authorization_source = settings.sources.iter().any(|s| matches!(s, Source::Authorization(_)));
    if any_authorization_source {
        assert_eq!(kept, unclaimed, "unclaimed Authorization values changed");
    } else {
        let before: Vec<&HeaderValue> = request.headers.get_all(AUTHORIZATION).iter().collect();
        assert_eq!(kept, before, "Authorization changed although no source reads it");
    }
    // Stripping never adds to a query, and never leaves one empty instead of absent.
    if let Some(q) = &forwarded_query {
        assert!(!q.is_empty(), "an empty query is forwarded as absent");
        assert!(q.len() <= query.map_or(0, str::len), "stripping grew the query");
    }
});

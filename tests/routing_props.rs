//! Property tests: the path keygate routes on and the path it forwards can never disagree, and
//! both are what SPEC §2.1 says. The expected values come from a reference model written here
//! from the SPEC — decode once, refuse, merge slashes, then RFC 3986 §5.2.4's own
//! remove_dot_segments loop — and a reference router (longest prefix over a plain list), never
//! from the `normalize` or `RouteTable` under test. Each property counts the paths it accepted
//! and refused and fails unless it saw enough of both, so a `normalize` that refuses everything
//! (or nothing) cannot pass.

use keygate::proxy::path::normalize;
use keygate::proxy::route::{Route, RouteTable};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// `(prefix, public)`: the routes of [`table`], for the reference router.
const ROUTES: [(&str, bool); 4] =
    [("/", false), ("/public/", true), ("/public/admin/", false), ("/a~b/", true)];

const CASES: u32 = 4096;

fn table() -> RouteTable {
    RouteTable::new(ROUTES.iter().map(|(prefix, public)| Route::placeholder(None, prefix, *public)).collect())
}

// ---------------------------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------------------------

/// SPEC §2.1, step by step, as plainly as it can be written: `None` is a 400.
fn reference_normalize(raw: &str, allow_encoded_slashes: bool) -> Option<String> {
    if !raw.starts_with('/') {
        return None;
    }
    // 1. Decode percent-encoded unreserved characters, once; refuse what SPEC refuses; keep
    //    other encodings, spelled with upper-case hex.
    let bytes = raw.as_bytes();
    let mut decoded: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            let unreserved = v.is_ascii_alphanumeric() || b"-._~".contains(&v);
            if unreserved {
                decoded.push(v);
            } else if ((v == b'/' || v == b'\\') && !allow_encoded_slashes) || v < 0x20 || v == 0x7f {
                // An encoded slash or backslash (unless allowed), or an encoded control byte.
                return None;
            } else {
                decoded.extend_from_slice(format!("%{v:02X}").as_bytes());
            }
            i += 3;
            continue;
        }
        if b == b'\\' || b < 0x20 || b == 0x7f {
            return None;
        }
        decoded.push(b);
        i += 1;
    }
    let decoded = String::from_utf8(decoded).ok()?;

    // 2. Merge repeated slashes.
    let mut merged = String::new();
    for c in decoded.chars() {
        if !(c == '/' && merged.ends_with('/')) {
            merged.push(c);
        }
    }

    // A dot-segment carrying parameters is refused, whatever follows.
    if merged.split('/').any(|segment| segment.starts_with(".;") || segment.starts_with("..;")) {
        return None;
    }

    // 3. RFC 3986 §5.2.4, with "above the root" (step C with nothing left to remove) refused.
    let mut input = merged;
    let mut output = String::new();
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../").or_else(|| input.strip_prefix("./")) {
            input = rest.to_owned();
        } else if input.starts_with("/./") {
            input = input[2..].to_owned();
        } else if input == "/." {
            input = "/".to_owned();
        } else if input.starts_with("/../") || input == "/.." {
            input = if input == "/.." { "/".to_owned() } else { input[3..].to_owned() };
            if output.is_empty() {
                return None;
            }
            let cut = output.rfind('/').unwrap_or(0);
            output.truncate(cut);
        } else if input == "." || input == ".." {
            input.clear();
        } else {
            let end = input[1..].find('/').map_or(input.len(), |n| n + 1);
            output.push_str(&input[..end]);
            input = input[end..].to_owned();
        }
    }
    Some(output)
}

/// The longest matching prefix of [`ROUTES`].
fn reference_route(path: &str) -> Option<(&'static str, bool)> {
    ROUTES
        .iter()
        .filter(|(prefix, _)| path.starts_with(prefix))
        .max_by_key(|(prefix, _)| prefix.len())
        .copied()
}

/// Checks the model against SPEC §2.1's examples, so a wrong model cannot bless a wrong gateway.
#[test]
fn the_reference_model_follows_the_spec_examples() {
    let cases: [(&str, bool, Option<&str>); 16] = [
        ("/a/b/../c", false, Some("/a/c")),
        ("/a/./b//c/", false, Some("/a/b/c/")),
        ("/%7euser/%41", false, Some("/~user/A")),
        ("/%2e%2e/x", false, None),
        ("/x/%2e%2e/y", false, Some("/y")),
        ("/%252e", false, Some("/%252e")),
        ("/x/%2f", false, None),
        ("/x/%2f", true, Some("/x/%2F")),
        ("/x/%5c", false, None),
        ("/x\\y", false, None),
        ("/x/..;/y", false, None),
        ("/x/.;x/y", false, None),
        ("/..", false, None),
        ("/x/%zz", false, None),
        ("/x/%00", false, None),
        ("/a/b/..", false, Some("/a/")),
    ];
    for (raw, allow, want) in cases {
        assert_eq!(
            reference_normalize(raw, allow).as_deref(),
            want,
            "{raw} (allow_encoded_slashes = {allow})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// Path pieces chosen to hit every rule: dot-segments plain and encoded, slashes, parameters,
/// encodings of unreserved and reserved characters, double encoding.
fn piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "/", "//", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e", "public", "admin", "a", "~", "%7e", "%7E", "b",
        ";", "..;", "%3b", "%25", "%252e", "%2f", "%5c", "%41", "%zz", "x y", "%20", "?",
    ])
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 0..12).prop_map(|pieces| format!("/{}", pieces.concat()))
}

/// Runs `property` on [`CASES`] generated inputs; it returns whether `normalize` accepted the
/// path. Fails on the first counterexample, and unless at least a tenth of the paths were
/// accepted and a tenth refused.
fn check<S: Strategy>(name: &str, strategy: S, property: impl Fn(S::Value) -> Result<bool, TestCaseError>)
where
    S::Value: std::fmt::Debug,
{
    let accepted = std::cell::Cell::new(0u32);
    let refused = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(Config { cases: CASES, failure_persistence: None, ..Config::default() });
    let result = runner.run(&strategy, |input| {
        let counter = if property(input)? { &accepted } else { &refused };
        counter.set(counter.get() + 1);
        Ok(())
    });
    if let Err(error) = result {
        panic!("{name}: {error}");
    }
    let (accepted, refused) = (accepted.get(), refused.get());
    println!("{name}: {accepted} paths accepted, {refused} refused");
    assert!(
        accepted >= CASES / 10 && refused >= CASES / 10,
        "{name}: too one-sided to prove anything: {accepted} paths accepted, {refused} refused"
    );
}

// ---------------------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------------------

/// `normalize` refuses exactly the paths SPEC refuses and makes exactly the path it describes.
#[test]
fn normalize_agrees_with_the_reference_model() {
    check("normalize_agrees_with_the_reference_model", (path(), any::<bool>()), |(raw, allow)| {
        let got = normalize(&raw, allow).ok();
        prop_assert_eq!(
            &got,
            &reference_normalize(&raw, allow),
            "{} (allow_encoded_slashes = {})",
            raw,
            allow
        );
        Ok(got.is_some())
    });
}

/// What keygate forwards is routed to the route the request was routed to, and an upstream
/// that normalises the forwarded path itself gets that same path back, so it can never land
/// somewhere keygate did not judge. The route is the reference router's, not the table's.
#[test]
fn forwarded_path_routes_like_the_request() {
    let table = table();
    check("forwarded_path_routes_like_the_request", (path(), any::<bool>()), |(raw, allow)| {
        let Ok(forwarded) = normalize(&raw, allow) else { return Ok(false) };
        let upstream_view = reference_normalize(&forwarded, allow);
        prop_assert_eq!(upstream_view.as_deref(), Some(forwarded.as_str()), "{} → {}", raw, forwarded);
        let again = normalize(&forwarded, allow);
        prop_assert_eq!(again.as_ref(), Ok(&forwarded), "not idempotent: {}", raw);
        let routed = table.find(None, &forwarded).map(|r| (r.prefix.clone(), r.public));
        let want = reference_route(&forwarded).map(|(prefix, public)| (prefix.to_owned(), public));
        prop_assert_eq!(routed, want, "{} → {}", raw, forwarded);
        Ok(true)
    });
}

/// A normalised path has no segment an upstream could still resolve or decode into a
/// different location.
#[test]
fn normalised_paths_are_inert() {
    check("normalised_paths_are_inert", path(), |raw| {
        let Ok(path) = normalize(&raw, false) else { return Ok(false) };
        prop_assert!(path.starts_with('/'));
        prop_assert!(!path.contains("//"), "{}", path);
        for segment in path.split('/') {
            prop_assert!(segment != "." && segment != "..", "{}", path);
        }
        let lower = path.to_ascii_lowercase();
        for encoded in ["%2e", "%2f", "%5c", "%7e", "%41"] {
            prop_assert!(!lower.contains(encoded), "{} in {}", encoded, path);
        }
        prop_assert!(!path.contains('\\'));
        Ok(true)
    });
}

/// A request under the public prefix whose path resolves outside it is routed on where it
/// resolves to (by the reference model), never on its raw prefix.
#[test]
fn public_prefix_is_judged_after_resolution() {
    check("public_prefix_is_judged_after_resolution", path(), |tail| {
        let raw = format!("/public{tail}");
        let Some(resolved) = reference_normalize(&raw, false) else {
            prop_assert!(normalize(&raw, false).is_err(), "{} must be refused", raw);
            return Ok(false);
        };
        let got = normalize(&raw, false).ok().and_then(|path| table().find(None, &path).map(|r| r.public));
        prop_assert_eq!(
            got,
            reference_route(&resolved).map(|(_, public)| public),
            "{} resolves to {}",
            raw,
            resolved
        );
        Ok(true)
    });
}

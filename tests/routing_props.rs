//! Property tests: the path keygate routes on and the path it forwards can never disagree.

use keygate::proxy::path::normalize;
use keygate::proxy::route::{Route, RouteTable};
use proptest::prelude::*;

fn table() -> RouteTable {
    let route = |prefix: &str, public: bool| Route::placeholder(None, prefix, public);
    RouteTable::new(vec![
        route("/", false),
        route("/public/", true),
        route("/public/admin/", false),
        route("/a~b/", true),
    ])
}

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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// What keygate forwards routes to the same route as what the client sent, and forwarding
    /// it again would change nothing: normalisation is idempotent.
    #[test]
    fn forwarded_path_routes_like_the_request(raw in path(), allow in any::<bool>()) {
        let table = table();
        if let Ok(forwarded) = normalize(&raw, allow) {
            let again = normalize(&forwarded, allow);
            prop_assert_eq!(again.as_ref(), Ok(&forwarded));
            let first = table.find(None, &forwarded).map(|r| r.label.0.to_string());
            let second = again.ok().and_then(|p| table.find(None, &p).map(|r| r.label.0.to_string()));
            prop_assert_eq!(first, second);
        }
    }

    /// A normalised path has no segment an upstream could still resolve or decode into a
    /// different location.
    #[test]
    fn normalised_paths_are_inert(raw in path()) {
        if let Ok(path) = normalize(&raw, false) {
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
        }
    }

    /// A request under the public prefix whose path resolves outside it is routed on where it
    /// resolves to, never on its raw prefix.
    #[test]
    fn public_prefix_is_judged_after_resolution(tail in path()) {
        let raw = format!("/public{tail}");
        if let Ok(path) = normalize(&raw, false) {
            let route = table().find(None, &path).map(|r| r.public);
            prop_assert_eq!(route, Some(path.starts_with("/public/") && !path.starts_with("/public/admin/") || path.starts_with("/a~b/")));
        }
    }
}

//! Property tests: a Host (or `:authority`) that keygate accepts is read the same way by the
//! references an upstream may use — the `http` crate's `Authority` (hyper, and so most Rust
//! servers) and the WHATWG URL standard (browsers, Node.js, Deno; the `url` crate) — so no
//! value can route on one host and be served as another.

use keygate::proxy::host;
use proptest::prelude::*;

/// Pieces that hit every rule: names, dots, colons, ports, user info, brackets, numbers in
/// every base WHATWG knows, percent-encoding, separators other parsers split on.
fn piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "a",
        "Admin",
        "example",
        "com",
        ".",
        "..",
        ":",
        "::",
        "80",
        "8443",
        "65535",
        "65536",
        "0",
        "007",
        "@",
        "[",
        "]",
        "::1",
        "fe80::1",
        "%",
        "%2e",
        "%41",
        "0x7f",
        "0X1",
        "127",
        "1",
        "255",
        "256",
        "_",
        "~",
        "-",
        ",",
        ";",
        "/",
        "\\",
        " ",
        "?",
        "#",
        "é",
        "xn--nxasmq6b",
    ])
}

fn value() -> impl Strategy<Value = String> {
    prop::collection::vec(piece(), 1..8).prop_map(|pieces| pieces.concat())
}

/// Host and port as the `http` crate reads the value.
fn http_crate(raw: &str) -> Option<(String, Option<u16>)> {
    let authority: http::uri::Authority = raw.parse().ok()?;
    Some((authority.host().to_ascii_lowercase(), authority.port_u16()))
}

/// Host and port as a WHATWG URL parser reads `http://<value>/` (the default port 80 folds to
/// none, as WHATWG does).
fn whatwg(raw: &str) -> Option<(String, Option<u16>)> {
    let url = url::Url::parse(&format!("http://{raw}/")).ok()?;
    Some((url.host_str()?.to_string(), url.port()))
}

fn ours(parsed: &host::RequestHost) -> (String, Option<u16>) {
    let text = parsed.value.to_str().unwrap_or_default().to_string();
    let port = if parsed.name().starts_with('[') {
        text.rsplit_once("]:").and_then(|(_, p)| p.parse().ok())
    } else {
        text.split_once(':').and_then(|(_, p)| p.parse().ok())
    };
    (parsed.name().to_ascii_lowercase(), port)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn an_accepted_host_means_the_same_host_and_port_to_every_reference(raw in value()) {
        if let Ok(parsed) = host::parse(raw.as_bytes()) {
            let (name, port) = ours(&parsed);
            let http = http_crate(&raw);
            prop_assert!(http.is_some(), "{raw:?}: accepted here, refused by the http crate");
            let (http_host, http_port) = http.unwrap_or_default();
            // The http crate keeps a trailing dot; keygate ignores one for matching.
            prop_assert_eq!(http_host.trim_end_matches('.'), name.as_str(), "{:?}", raw);
            prop_assert_eq!(http_port, port, "{:?}", raw);
            // WHATWG may refuse what keygate takes (an `xn--` label that is no valid Punycode):
            // an upstream that cannot parse the value serves no host at all, which is no second
            // reading. When it does parse, it must read the same host and port.
            if let Some((web_host, web_port)) = whatwg(&raw) {
                prop_assert_eq!(web_host.trim_end_matches('.'), name.as_str(), "{:?}", raw);
                prop_assert_eq!(web_port, port.filter(|p| *p != 80), "{:?}", raw);
            }
        }
    }
}

/// The property above only says something if the generator reaches accepted values often:
/// count them, so a parser that refused everything would fail here.
#[test]
fn the_generator_reaches_accepted_and_refused_values() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..5_000 {
        let raw = value().new_tree(&mut runner).expect("a value").current();
        if host::parse(raw.as_bytes()).is_ok() { accepted += 1 } else { refused += 1 }
    }
    assert!(accepted > 250 && refused > 250, "accepted {accepted}, refused {refused}");
}

/// Values the generator reaches only rarely, checked against the references one by one.
#[test]
fn rare_accepted_values_agree_with_the_references() {
    for raw in ["[::1]", "[FE80::1]:8443", "0.0.0.0:80", "a_b.example", "xn--bcher-kva.example"] {
        let parsed = host::parse(raw.as_bytes()).unwrap_or_else(|e| panic!("{raw}: {e:?}"));
        let (name, port) = ours(&parsed);
        assert_eq!(
            http_crate(raw).map(|(h, p)| (h.trim_end_matches('.').to_string(), p)),
            Some((name.clone(), port))
        );
        if let Some((web_host, web_port)) = whatwg(raw) {
            assert_eq!((web_host, web_port), (name, port.filter(|p| *p != 80)), "{raw}");
        }
    }
}

#[test]
fn the_reported_spellings_are_refused() {
    for raw in [
        "admin.example.com:1:2",
        "a.example:@b.example",
        "a.example@b.example",
        "127.1",
        "0x7f.1",
        "[0::1]",
        "[::ffff:1.2.3.4]",
    ] {
        assert!(host::parse(raw.as_bytes()).is_err(), "{raw}");
    }
}

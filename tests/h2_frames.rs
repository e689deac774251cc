//! HTTP/2 conformance at the frame level: the Python scripts in tests/h2/ (the `h2` package's
//! low-level API, and frames built by hand) run against a real gateway in front of a recording
//! upstream, over cleartext prior knowledge and over TLS with ALPN h2. A script exits 0 when
//! keygate behaved; then this file checks what the upstream saw: nothing a script marked
//! `reject-`, no connection-specific header, no credential, no unauthenticated request on a
//! protected route, no path that was not normalised.
//!
//! Needs Python 3 with the `h2` package (`pip install h2`); without it these tests fail, by
//! design, rather than pass without having run.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use support::{GatewayConfig, Key, PROBE_HEADER, Recorded, RecordingUpstream, Route, TestGateway, toml_str};

/// The gateway's limits under test; the scripts are told them.
const MAX_STREAMS: u32 = 4;
const MAX_HEADER_BYTES: usize = 16_384;
/// The slowest script (flow control and concurrency wait on purpose) takes about 10 s.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(120);

/// Headers that must never reach an upstream: connection-specific ones (RFC 9113 §8.2.2) and
/// the credential. `transfer-encoding` is checked apart: keygate's own upstream connection
/// frames a streamed body with plain `chunked`.
const NEVER_UPSTREAM: [&str; 6] =
    ["connection", "keep-alive", "proxy-connection", "upgrade", "te", "x-api-key"];

/// The Python interpreter: `$PYTHON`, else `python3`. Fails the test, saying what to install,
/// when it or the `h2` package is missing.
fn python_with_h2() -> String {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let probe = std::process::Command::new(&python)
        .args(["-c", "import h2, hpack, hyperframe; print(h2.__version__)"])
        .output();
    match probe {
        Ok(output) if output.status.success() => python,
        Ok(output) => panic!(
            "the HTTP/2 conformance tests need the Python h2 package: pip install h2\n\
             ({python} -c 'import h2' said: {})",
            String::from_utf8_lossy(&output.stderr).trim()
        ),
        Err(error) => panic!(
            "the HTTP/2 conformance tests need Python 3 with the h2 package (pip install h2); \
             cannot run {python}: {error}"
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A CA and a `localhost` leaf signed by it, as PEM files in their own temp dir.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "keygate h2 test CA");
        ca.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key")).expect("CA");

        let mut leaf = CertificateParams::new(vec!["localhost".to_owned()]).expect("leaf params");
        leaf.distinguished_name.push(DnType::CommonName, "localhost");
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().expect("leaf key");
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).expect("sign leaf");

        let dir = tempfile::tempdir().expect("temp dir for certificates");
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("write ca.pem");
        std::fs::write(dir.path().join("cert.pem"), leaf_cert.pem()).expect("write cert.pem");
        std::fs::write(dir.path().join("key.pem"), leaf_key.serialize_pem()).expect("write key.pem");
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

// ---------------------------------------------------------------------------------------------
// The gateway the scripts talk to
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Cleartext,
    Tls,
}

/// A recording upstream behind keygate: `/public/` is public, everything else needs `key`.
struct Fixture {
    transport: Transport,
    upstream: RecordingUpstream,
    gateway: TestGateway,
    key: Key,
    pki: Option<Pki>,
}

impl Fixture {
    async fn start(transport: Transport) -> Self {
        let upstream = RecordingUpstream::start().await;
        let key = Key::generated("h2-client", &["read", "write"]);
        let mut config = GatewayConfig::new()
            .server("h2_max_concurrent_streams", &MAX_STREAMS.to_string())
            .server("max_header_bytes", &MAX_HEADER_BYTES.to_string())
            .route(Route::new("/public/", &upstream.url()).public())
            .route(Route::new("/", &upstream.url()))
            .key(key.clone());
        let pki = (transport == Transport::Tls).then(Pki::new);
        if let Some(pki) = &pki {
            let cert = pki.path("cert.pem");
            let tls_key = pki.path("key.pem");
            config = config
                .server("tls_cert", &toml_str(&cert.to_string_lossy()))
                .server("tls_key", &toml_str(&tls_key.to_string_lossy()));
        }
        let gateway = config.start().await;
        Self { transport, upstream, gateway, key, pki }
    }

    /// Runs `tests/h2/<script>.py` against this gateway; fails the test, showing the script's
    /// output, unless it exits 0 within [`SCRIPT_TIMEOUT`].
    async fn run_script(&self, python: &str, script: &str) -> String {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/h2").join(format!("{script}.py"));
        let mut command = tokio::process::Command::new(python);
        command
            .arg(&path)
            .args(["--host", "127.0.0.1", "--port", &self.gateway.addr.port().to_string()])
            .args(["--key", &self.key.secret])
            .args(["--max-streams", &MAX_STREAMS.to_string()])
            .args(["--max-header-bytes", &MAX_HEADER_BYTES.to_string()])
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("PYTHONUNBUFFERED", "1")
            .kill_on_drop(true);
        if let Some(pki) = &self.pki {
            command.arg("--tls").arg("--ca").arg(pki.path("ca.pem")).args(["--server-name", "localhost"]);
        }
        let what = format!("{script}.py over {:?}", self.transport);
        let output = match tokio::time::timeout(SCRIPT_TIMEOUT, command.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(error)) => panic!("cannot run {what}: {error}"),
            Err(_) => panic!("{what} did not finish within {SCRIPT_TIMEOUT:?}"),
        };
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "{what} failed ({}):\n{stdout}\n--- stderr ---\n{stderr}\n--- the upstream saw {} request(s) ---\n{:#?}",
            output.status,
            self.upstream.count(),
            self.upstream.requests()
        );
        stdout
    }

    /// What the upstream saw must be clean, whatever the scripts sent.
    #[track_caller]
    fn assert_upstream_clean(&self, log: &str) {
        for seen in self.upstream.requests() {
            let context = format!("script output:\n{log}\nthe upstream saw:\n  {seen:?}");
            let probe = seen.header(PROBE_HEADER).unwrap_or_default();
            assert!(!probe.is_empty(), "a request without a probe reached the upstream\n{context}");
            assert!(
                !probe.starts_with("reject-"),
                "a request keygate had to refuse reached the upstream\n{context}"
            );
            for name in NEVER_UPSTREAM {
                assert!(seen.headers.get(name).is_none(), "`{name}` reached the upstream\n{context}");
            }
            for value in seen.header_all("transfer-encoding") {
                assert_eq!(value, "chunked", "a client's transfer-encoding reached the upstream\n{context}");
            }
            if !seen.path().starts_with("/public/") {
                assert_eq!(
                    seen.header("x-keygate-key-id"),
                    Some(self.key.id.as_str()),
                    "a request on the protected route reached the upstream without the key's identity\n{context}"
                );
            }
            assert_normalised(seen.path(), &context);
        }
    }

    /// The upstream saw the request with this probe; returns it.
    #[track_caller]
    fn seen(&self, probe: &str, log: &str) -> Recorded {
        self.upstream.requests().into_iter().find(|r| r.header(PROBE_HEADER) == Some(probe)).unwrap_or_else(
            || {
                panic!(
                    "the upstream never saw probe {probe}\nscript output:\n{log}\nit saw: {:#?}",
                    self.upstream.requests()
                )
            },
        )
    }
}

#[track_caller]
fn assert_normalised(path: &str, context: &str) {
    assert!(path.starts_with('/') && !path.contains("//"), "unnormalised path upstream\n{context}");
    assert!(!path.contains('\\'), "a backslash reached the upstream\n{context}");
    let lower = path.to_ascii_lowercase();
    assert!(!lower.contains("%2e") && !lower.contains("%2f"), "an encoded dot or slash upstream\n{context}");
    assert!(
        path.split('/').all(|segment| segment != "." && segment != ".."),
        "a dot-segment reached the upstream\n{context}"
    );
}

/// Runs `script` over cleartext and over TLS, each against a fresh gateway, checks the
/// upstream, then hands each fixture and the script's output to `then` for its own checks.
async fn conformance(script: &str, then: impl Fn(&Fixture, &str)) {
    let python = python_with_h2();
    for transport in [Transport::Cleartext, Transport::Tls] {
        let fixture = Fixture::start(transport).await;
        let log = fixture.run_script(&python, script).await;
        // Shown with --nocapture, or when a later check fails.
        println!("{log}");
        fixture.assert_upstream_clean(&log);
        then(&fixture, &log);
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn python_h2_is_installed() {
    python_with_h2();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_streams_get_401_and_keyed_ones_reach_the_upstream() {
    conformance("auth", |fixture, log| {
        let seen = fixture.seen("auth-ok", log);
        assert_eq!(&seen.body[..], b"hello over h2", "{log}\n{seen:?}");
        for i in 0..10 {
            fixture.seen(&format!("auth-multi-{i}"), log);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_specific_headers_are_protocol_errors() {
    conformance("connection_headers", |fixture, log| {
        // `te: trailers` is legal in HTTP/2; keygate answers it and drops the header (hop-by-hop).
        fixture.seen("connhdr-te-trailers", log);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pseudo_headers_and_upper_case_names_are_refused() {
    conformance("pseudo_headers", |_, _| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_segments_in_the_path_are_normalised_or_refused() {
    conformance("path_traversal", |fixture, log| {
        for (probe, path) in [
            ("path-keyed-0", "/y"),
            ("path-keyed-1", "/y"),
            ("path-keyed-2", "/y/"),
            ("path-keyed-3", "/x/y/"),
            ("path-keyed-4", "/~user/A"),
        ] {
            let seen = fixture.seen(probe, log);
            assert_eq!(seen.path(), path, "{probe}: the upstream must get the normalised path\n{log}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_the_server_stays_up() {
    conformance("rapid_reset", |_, _| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_flood_is_cut_off_and_the_server_stays_up() {
    conformance("continuation_flood", |_, _| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_windows_are_respected() {
    conformance("flow_control", |fixture, log| {
        fixture.seen("flow-default", log);
        fixture.seen("flow-zero", log);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_beyond_max_concurrent_streams_are_refused() {
    conformance("concurrency", |fixture, log| {
        let served = fixture
            .upstream
            .requests()
            .iter()
            .filter(|r| r.header(PROBE_HEADER).is_some_and(|p| p.starts_with("conc-") && p != "conc-after"))
            .count();
        assert!(
            served >= MAX_STREAMS as usize,
            "at least {MAX_STREAMS} of the streams must reach the upstream, {served} did\n{log}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_on_closed_or_idle_streams_is_an_error() {
    conformance("closed_stream", |fixture, log| {
        // The body sent after END_STREAM must not have been taken as the request's body (the
        // request itself may or may not have been forwarded before the stream error).
        let half =
            fixture.upstream.requests().into_iter().find(|r| r.header(PROBE_HEADER) == Some("closed-half"));
        if let Some(half) = half {
            assert!(half.body.is_empty(), "DATA after END_STREAM reached the upstream\n{log}\n{half:?}");
        }
    })
    .await;
}

//! Attack class 1: path confusion between the router and the upstream.

use super::*;

/// What a path trick must come to.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// 400 and nothing upstream: keygate's JSON `bad_request`, or hyper's own 400 for a request
    /// line it cannot parse.
    Refused,
    /// Routed on this normalised path (and query): the upstream gets exactly its base + this.
    To(Dest, &'static str),
    /// Either; where the SPEC leaves refusing to the implementation.
    RefusedOr(Dest, &'static str),
}

/// Request targets of every shape that has split a router from its upstream elsewhere.
fn path_cases() -> Vec<(&'static str, Expect)> {
    use Dest::{Admin, Public, Root};
    use Expect::{RefusedOr, To};
    const REFUSED: Expect = Expect::Refused;
    vec![
        // Dot-segments, plain and percent-encoded.
        ("/public/../admin/x", To(Admin, "/admin/x")),
        ("/public/./../admin/x", To(Admin, "/admin/x")),
        ("/public/%2e%2e/admin/x", To(Admin, "/admin/x")),
        ("/public/%2E%2E/admin/x", To(Admin, "/admin/x")),
        ("/public/.%2e/admin/x", To(Admin, "/admin/x")),
        ("/public/%2e./admin/x", To(Admin, "/admin/x")),
        ("/public/%2E/../admin/x", To(Admin, "/admin/x")),
        ("/public/%2e/admin/x", To(Public, "/public/admin/x")),
        ("/public/admin/..", To(Public, "/public/")),
        ("/admin/../public/x", To(Public, "/public/x")),
        ("/admin/%2e%2e/public/x", To(Public, "/public/x")),
        ("/admin/..", To(Root, "/")),
        ("/admin/.", To(Admin, "/admin/")),
        ("/admin/%2e", To(Admin, "/admin/")),
        ("/./admin/x", To(Admin, "/admin/x")),
        ("/.", To(Root, "/")),
        ("/.../admin/x", To(Root, "/.../admin/x")),
        ("/public/.../../admin/x", To(Public, "/public/admin/x")),
        // The prefix is `/admin/`: `/admin` itself belongs to `/` (README: write routes for it).
        ("/admin", To(Root, "/admin")),
        // Climbing above the root, and so out of the upstream base path.
        ("/public/../../admin/x", REFUSED),
        ("/../admin/x", REFUSED),
        ("/%2e%2e/admin/x", REFUSED),
        ("/%2E%2E/%2e%2e/root/x", REFUSED),
        ("/public/%2e%2e/%2e%2e/admin/x", REFUSED),
        ("/public/.%2e/.%2e/pub/x", REFUSED),
        ("/..", REFUSED),
        ("/admin/../..", REFUSED),
        // Repeated, encoded and raw slashes and backslashes.
        ("//admin/x", To(Admin, "/admin/x")),
        ("///admin///x", To(Admin, "/admin/x")),
        ("/public//../admin/x", To(Admin, "/admin/x")),
        ("/admin//../public/x", To(Public, "/public/x")),
        ("/public/..%2fadmin/x", REFUSED),
        ("/public/..%2Fadmin/x", REFUSED),
        ("/public%2f..%2fadmin/x", REFUSED),
        ("/public/%2e%2e%2fadmin/x", REFUSED),
        ("/%2fadmin/x", REFUSED),
        ("/public/..%5cadmin/x", REFUSED),
        ("/public/..%5Cadmin/x", REFUSED),
        ("/public/..\\admin/x", REFUSED),
        ("/public\\..\\admin/x", REFUSED),
        ("\\admin\\x", REFUSED),
        // Path parameters on dot-segments (Tomcat/Jetty read `..;x` as `..`), `;` elsewhere.
        ("/public/..;/admin/x", REFUSED),
        ("/public/..;x=1/admin/x", REFUSED),
        ("/public/.;/admin/x", REFUSED),
        ("/public/.;x/admin/x", REFUSED),
        ("/public/%2e%2e;/admin/x", REFUSED),
        ("/public/.%2e;jsessionid=1/admin/x", REFUSED),
        ("/public/..%3b/admin/x", RefusedOr(Public, "/public/..%3B/admin/x")),
        ("/admin;/x", To(Root, "/admin;/x")),
        ("/admin;x=1/", To(Root, "/admin;x=1/")),
        ("/public;/../admin/x", To(Admin, "/admin/x")),
        ("/admin/x;/../../public/y", To(Public, "/public/y")),
        // Fragments never take part.
        ("/public/x#/../../admin/", RefusedOr(Public, "/public/x")),
        ("/public/#/../admin/x", RefusedOr(Public, "/public/")),
        ("/public/x%23/../../admin/y", To(Admin, "/admin/y")),
        // Queries that look like paths.
        ("/public?/../admin/x", To(Root, "/public?/../admin/x")),
        ("/public/?/../../admin/x", To(Public, "/public/?/../../admin/x")),
        ("/admin?x=/../public/", To(Root, "/admin?x=/../public/")),
        ("/public/x?%2e%2e/admin", To(Public, "/public/x?%2e%2e/admin")),
        ("/?/admin/", To(Root, "/?/admin/")),
        // Decoding happens once.
        ("/public/%252e%252e/admin/x", To(Public, "/public/%252e%252e/admin/x")),
        ("/public/%252e%252e%252fadmin/x", To(Public, "/public/%252e%252e%252fadmin/x")),
        ("/public/%25%32%65%25%32%65/admin/x", To(Public, "/public/%252e%252e/admin/x")),
        ("/public/%%32%65%%32%65/admin/x", REFUSED),
        // Invalid encodings.
        ("/public/%zz/../../admin/x", REFUSED),
        ("/public/%", REFUSED),
        ("/public/%2", REFUSED),
        ("/public/%2g/../../admin/x", REFUSED),
        ("/public/%u002e%u002e/admin/x", REFUSED),
        // Overlong and look-alike UTF-8: kept encoded (upper-case hex), or refused.
        ("/public/%c0%ae%c0%ae/admin/x", RefusedOr(Public, "/public/%C0%AE%C0%AE/admin/x")),
        ("/public/%c0%af../admin/x", RefusedOr(Public, "/public/%C0%AF../admin/x")),
        ("/public/%e0%80%ae%e0%80%ae/admin/x", RefusedOr(Public, "/public/%E0%80%AE%E0%80%AE/admin/x")),
        ("/public/%ef%bc%8f..%ef%bc%8fadmin", RefusedOr(Public, "/public/%EF%BC%8F..%EF%BC%8Fadmin")),
        ("/public/%80", RefusedOr(Public, "/public/%80")),
        // Absolute-form and odd targets.
        ("http://127.0.0.1/public/../admin/x", To(Admin, "/admin/x")),
        ("http://127.0.0.1//admin/x", To(Admin, "/admin/x")),
        ("http://evil.example/admin/x", To(Admin, "/admin/x")),
        ("http://127.0.0.1/public/%2e%2e/admin/x", To(Admin, "/admin/x")),
        ("HTTP://127.0.0.1/admin/x", RefusedOr(Admin, "/admin/x")),
        ("http://127.0.0.1", To(Root, "/")),
        ("http://127.0.0.1?/admin/", RefusedOr(Root, "/?/admin/")),
        ("http://user:pw@127.0.0.1/admin/x", RefusedOr(Admin, "/admin/x")),
        ("http:/admin/x", RefusedOr(Admin, "/admin/x")),
        ("*", REFUSED),
        ("127.0.0.1:80", REFUSED),
        ("admin/x", REFUSED),
        ("../admin/x", REFUSED),
        ("?/admin/", REFUSED),
        ("", REFUSED),
        // Case: prefixes are case-sensitive, so these belong to `/` and need a key there.
        ("/ADMIN/x", To(Root, "/ADMIN/x")),
        ("/Admin/x", To(Root, "/Admin/x")),
        ("/Public/x", To(Root, "/Public/x")),
        ("/%41DMIN/x", To(Root, "/ADMIN/x")),
        ("/%61dmin/x", To(Admin, "/admin/x")),
        ("/adm%69n/x", To(Admin, "/admin/x")),
        ("/%70ublic/../%61dmin/x", To(Admin, "/admin/x")),
        // NUL and control bytes, raw and encoded; tab and space.
        ("/public/\0/../../admin/x", REFUSED),
        ("/public/\x01", REFUSED),
        ("/public/\x7f", REFUSED),
        ("/public/%00/../../admin/x", REFUSED),
        ("/public/%0a", REFUSED),
        ("/public/%0D%0Ax-keygate-scopes:%20admin", REFUSED),
        ("/public/%09", REFUSED),
        ("/public/%1f", REFUSED),
        ("/public/%7f", REFUSED),
        ("/public/a\tb/../../admin/x", REFUSED),
        ("/public/a b/../../admin/x", REFUSED),
        ("/public/\u{e9}", RefusedOr(Public, "/public/\u{e9}")),
    ]
}

/// Whether `answer` (and what the upstream saw of the request with `probe`) fits `expect`.
fn judge(
    upstream: &RecordingUpstream,
    probe: &str,
    answer: &Answer,
    who: Who,
    expect: Expect,
) -> Result<(), String> {
    let seen = seen_probe(upstream, probe);
    let refused = || -> Result<(), String> {
        if answer.status != Some(400) {
            return Err(format!("expected 400, got {:?} {:?}", answer.status, answer.code));
        }
        if let Some(code) = &answer.code
            && code != "bad_request"
        {
            return Err(format!("400 with error {code:?}, expected bad_request"));
        }
        match &seen {
            Some(seen) => Err(format!("a refused request reached the upstream as {:?}", seen.uri)),
            None => Ok(()),
        }
    };
    let routed = |dest: Dest, path: &str| -> Result<(), String> {
        let (status, code) = dest.outcome(who);
        if answer.status != Some(status) || answer.code.as_deref() != code {
            return Err(format!(
                "expected {status} {code:?} (routed to {dest:?} as {path:?}), got {:?} {:?}",
                answer.status, answer.code
            ));
        }
        match (&seen, status) {
            (Some(seen), 200) => {
                let want = format!("{}{path}", dest.base());
                if seen.uri != want {
                    return Err(format!("the upstream got {:?}, expected {want:?}", seen.uri));
                }
                if !answer.from_upstream {
                    return Err("a 200 that did not come from the upstream".into());
                }
                Ok(())
            }
            (None, 200) => Err("a 200 the upstream never saw".into()),
            (Some(seen), _) => Err(format!("a rejected request reached the upstream as {:?}", seen.uri)),
            (None, _) => Ok(()),
        }
    };
    match expect {
        Expect::Refused => refused(),
        Expect::To(dest, path) => routed(dest, path),
        Expect::RefusedOr(dest, path) => {
            refused().or_else(|not_refused| routed(dest, path).map_err(|e| format!("{not_refused}; and {e}")))
        }
    }
}

#[tokio::test]
async fn path_confusion_over_raw_http1_is_refused_or_routed_on_exactly_what_the_upstream_gets() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).start().await;
    let cases = path_cases();
    let mut failures = Vec::new();
    for (target, expect) in &cases {
        for who in Who::ALL {
            let request = RawRequest::get(target).who(who);
            let raw = gateway.raw(&request.bytes()).await;
            if matches!(expect, Expect::RefusedOr(..)) {
                eprintln!(
                    "either-case {:?} as {who:?}: {:?}",
                    target.escape_debug().to_string(),
                    raw.status()
                );
            }
            if let Err(why) = judge(&upstream, &request.probe, &Answer::of_raw(&raw), who, *expect) {
                failures
                    .push(format!("target {:?} as {who:?}: {why}\n{raw}", target.escape_debug().to_string()));
            }
        }
    }
    failures.extend(upstream_violations(&upstream));
    assert_no_failures("path tricks", cases.len() * Who::ALL.len(), &failures);
    assert!(upstream.count() > 0, "nothing reached the upstream at all: the table proves nothing");
}

#[tokio::test]
async fn path_confusion_over_http2_is_refused_or_routed_on_exactly_what_the_upstream_gets() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).start().await;
    let mut failures = Vec::new();
    let mut tried = 0;
    for (target, expect) in path_cases() {
        // Only targets an HTTP/2 client can put in `:path` (the rest are refused client-side).
        if !target.starts_with('/') || format!("http://127.0.0.1{target}").parse::<http::Uri>().is_err() {
            continue;
        }
        for who in Who::ALL {
            tried += 1;
            let mut call = gateway.get(target).http2();
            if let Some(secret) = who.secret() {
                call = call.header("x-api-key", secret);
            }
            let before = upstream.count();
            let exchange = match call.try_send().await {
                Ok(exchange) => exchange,
                // A stream reset is a refusal: right for a refused target if nothing went upstream.
                Err(error) => {
                    if upstream.count() != before || matches!(expect, Expect::To(..)) {
                        failures.push(format!("{target:?} as {who:?}: reset, expected {expect:?}\n{error}"));
                    }
                    continue;
                }
            };
            if let Err(why) = judge(&upstream, &exchange.probe, &Answer::of_exchange(&exchange), who, expect)
            {
                failures.push(format!("{target:?} as {who:?} over h2: {why}\n{exchange}"));
            }
        }
    }
    failures.extend(upstream_violations(&upstream));
    assert_no_failures("h2 path tricks", tried, &failures);
    assert!(tried > 150, "only {tried} h2 cases were tried");
}

#[tokio::test]
async fn upstream_base_path_cannot_be_climbed_out_of_and_no_route_is_404() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(Route::new("/svc/", &format!("{}/base/", upstream.url())).public())
        .route(Route::new("/api/", &format!("{}/base/inner", upstream.url())))
        .key(reader_key())
        .start()
        .await;
    // (target, key, expected status, expected error or the exact upstream target)
    let cases: &[(&str, Option<&str>, u16, &str)] = &[
        ("/svc/x", None, 200, "/base/svc/x"),
        ("/svc/./x?y=/../../z", None, 200, "/base/svc/x?y=/../../z"),
        ("/svc/../api/x", None, 401, "missing_api_key"),
        ("/svc/../api/x", Some(READER_SECRET), 200, "/base/inner/api/x"),
        ("/svc/%2e%2e/api/x", Some(READER_SECRET), 200, "/base/inner/api/x"),
        ("/svc/../x", None, 404, "no_route"),
        ("/svc", None, 404, "no_route"),
        ("/base/svc/x", None, 404, "no_route"),
        ("/svc/../../base/x", None, 400, "bad_request"),
        ("/svc/%2e%2e/%2e%2e/etc/passwd", None, 400, "bad_request"),
        ("/svc/..%2f..%2fetc/passwd", None, 400, "bad_request"),
        ("/api/../../base/svc/x", Some(READER_SECRET), 400, "bad_request"),
    ];
    let mut failures = Vec::new();
    for (target, key, status, what) in cases {
        let mut request = RawRequest::get(target);
        if let Some(key) = key {
            request = request.key(key);
        }
        let raw = gateway.raw(&request.bytes()).await;
        let seen = seen_probe(&upstream, &request.probe);
        let ok = if *status == 200 {
            raw.status() == Some(200) && seen.as_ref().map(|s| s.uri.as_str()) == Some(*what)
        } else {
            raw.status() == Some(*status) && raw.error_code().as_deref() == Some(*what) && seen.is_none()
        };
        if !ok {
            failures.push(format!("{target}: expected {status} {what}\n{raw}\nupstream saw: {seen:?}"));
        }
    }
    assert_no_failures("base-path cases", cases.len(), &failures);
}

#[tokio::test]
async fn host_confusion_routes_on_the_same_host_it_forwards() {
    let upstream = RecordingUpstream::start().await;
    let gateway = GatewayConfig::new()
        .route(
            Route::new("/", &format!("{}/hadm", upstream.url()))
                .host("admin.example.com")
                .scope("*", &["admin"])
                .preserve_host(),
        )
        .route(Route::new("/", &format!("{}/hpub", upstream.url())).public().preserve_host())
        .key(admin_key())
        .key(reader_key())
        .start()
        .await;
    // (request line target, Host lines, whether keygate must treat it as admin.example.com)
    let cases: &[(&str, &[&str], Option<bool>)] = &[
        ("/x", &["Host: admin.example.com"], Some(true)),
        ("/x", &["Host: ADMIN.Example.COM."], Some(true)),
        ("/x", &["Host: admin.example.com:8443"], Some(true)),
        ("/x", &["Host: other.example"], Some(false)),
        ("http://admin.example.com/x", &["Host: other.example"], Some(true)),
        ("http://other.example/x", &["Host: admin.example.com"], Some(false)),
        ("http://ADMIN.EXAMPLE.COM:80/x", &[], Some(true)),
        ("/x", &["Host: admin.example.com", "Host: other.example"], None),
        ("/x", &["Host: other.example", "Host: admin.example.com"], None),
        // Not exactly host[:port]: refused (SPEC §2.1), never routed as one host or the other.
        ("/x", &["Host: admin.example.com, other.example"], None),
        ("/x", &["Host: admin.example.com\0"], None),
        ("/x", &["Host: admin.example.com\r\n other.example"], None),
        ("/x", &["Host : admin.example.com"], None),
    ];
    let mut failures = Vec::new();
    for (target, hosts, admin) in cases {
        for who in Who::ALL {
            let mut request = RawRequest::get(target).who(who);
            request.lines.remove(0);
            for host in *hosts {
                request = request.line(host);
            }
            let raw = gateway.raw(&request.bytes()).await;
            let seen = seen_probe(&upstream, &request.probe);
            let expected = match admin {
                None => (400, None),
                Some(true) => match who {
                    Who::Nobody => (401, Some("missing_api_key")),
                    Who::Reader => (403, Some("insufficient_scope")),
                    Who::Admin => (200, None),
                },
                Some(false) => (200, None),
            };
            let mut problems = Vec::new();
            if raw.status() != Some(expected.0) {
                problems.push(format!("expected {expected:?}, got {:?}", raw.status()));
            } else if expected.1.is_some() && raw.error_code().as_deref() != expected.1 {
                problems.push(format!("expected {expected:?}, got {:?}", raw.error_code()));
            }
            match (&seen, expected.0) {
                (Some(seen), 200) => {
                    let base = if *admin == Some(true) { "/hadm/" } else { "/hpub/" };
                    if !seen.uri.starts_with(base) {
                        problems.push(format!("forwarded by the wrong route: {:?}", seen.uri));
                    }
                    // preserve_host: the Host sent on is the one routed on.
                    let host = seen.header_all("host").join(" | ").to_ascii_lowercase();
                    let name = host.rsplit_once(':').map_or(host.as_str(), |(n, _)| n).trim_end_matches('.');
                    if (name == "admin.example.com") != (*admin == Some(true)) {
                        problems.push(format!("routed as admin={admin:?} but forwarded Host {host:?}"));
                    }
                }
                (None, 200) => problems.push("a 200 the upstream never saw".into()),
                (Some(seen), _) => problems.push(format!("a rejected request reached upstream: {seen:?}")),
                (None, _) => {}
            }
            if !problems.is_empty() {
                failures.push(format!("{target} {hosts:?} as {who:?}: {}\n{raw}", problems.join("; ")));
            }
        }
    }
    for seen in upstream.requests() {
        if seen.uri.starts_with("/hadm/")
            && !seen.header_all("x-keygate-scopes").iter().any(|s| s.split(',').any(|x| x == "admin"))
        {
            failures.push(format!("admin host reached without admin scope: {seen:?}"));
        }
    }
    assert_no_failures("host cases", cases.len() * 3, &failures);
}

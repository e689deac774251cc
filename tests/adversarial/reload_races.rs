//! Attack class 7: reload races.

use super::*;
use support::poll::{Attempts, DEADLINE};

/// Truncates `path` and writes `text` into the same inode with one `write` call.
fn write_in_place(path: &Path, text: &str) {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let written = file.write(text.as_bytes()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    assert_eq!(written, text.len(), "a short write to {}", path.display());
}

/// Writes a temporary file beside `path` and renames it over `path`.
fn rename_over(path: &Path, text: &str) {
    let temp = path.with_extension(format!("tmp{}", NEXT_PROBE.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&temp, text).unwrap_or_else(|e| panic!("write {}: {e}", temp.display()));
    std::fs::rename(&temp, path).unwrap_or_else(|e| panic!("rename over {}: {e}", path.display()));
}

/// A key file entry of exactly 256 bytes, so 16 entries fill a 4 KiB page: a reader that catches
/// a write between pages sees a shorter file that is still valid TOML, lacking the later keys.
fn page_aligned_entry(id: &str, name_seed: &str, secret: &str) -> String {
    let entry = |name: &str| {
        format!(
            "[[keys]]\nid = \"{id}\"\nname = \"{name}\"\nhash = \"{}\"\nscopes = [\"read\"]\n\
             created_at = 2024-01-01T00:00:00Z\n\n",
            sha256_ref(secret)
        )
    };
    let pad = 256 - entry("").len();
    let name = format!("{name_seed:-<pad$}");
    let text = entry(&name);
    assert_eq!(text.len(), 256, "entry for {id}");
    text
}

const STABLE_SECRET: &str = "stb-P1aN7eT3sT4bLe9Q";

/// One version of a 1,000-key file: `extra` more keys each time, names that change with
/// `version`, and the stable key last, where a torn read would lose it first.
fn burst_keys_file(version: usize, extra: usize, final_key: bool) -> String {
    let mut out = String::with_capacity(1_010 * 256);
    for i in 0..999 {
        out.push_str(&page_aligned_entry(
            &format!("k{i:07}"),
            &format!("v{version}-{i}"),
            &format!("burst-{i}"),
        ));
    }
    for j in 0..extra {
        out.push_str(&page_aligned_entry(
            &format!("x{j:07}"),
            &format!("v{version}"),
            &format!("extra-{version}-{j}"),
        ));
    }
    if final_key {
        out.push_str(&page_aligned_entry("final001", "final", "final-secret-9Zq"));
    }
    out.push_str(&page_aligned_entry("stable01", "stable", STABLE_SECRET));
    out
}

/// One request's fate under fire.
#[derive(Clone, Debug)]
struct Shot {
    sent: Instant,
    done: Instant,
    status: u16,
    code: Option<String>,
}

/// Sends `secret` to `/hammer` from `clients` tasks until `stop` is set (or `max` requests each,
/// or 30 s), recording every answer (status 0 for a transport error).
fn hammer(
    addr: SocketAddr,
    secret: &'static str,
    clients: usize,
    max: usize,
    stop: Arc<AtomicBool>,
) -> JoinSet<Vec<Shot>> {
    let mut set = JoinSet::new();
    for _ in 0..clients {
        let stop = Arc::clone(&stop);
        set.spawn(async move {
            let started = Instant::now();
            let mut shots = Vec::new();
            for _ in 0..max {
                if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(30) {
                    break;
                }
                let sent = Instant::now();
                let answer =
                    Call::new(addr, Method::GET, "/hammer").header("x-api-key", secret).try_send().await;
                let (status, code) = match answer {
                    Ok(exchange) => (exchange.status.as_u16(), exchange.error_code()),
                    Err(error) => (0, Some(error)),
                };
                shots.push(Shot { sent, done: Instant::now(), status, code });
            }
            shots
        });
    }
    set
}

async fn collect_shots(mut set: JoinSet<Vec<Shot>>) -> Vec<Shot> {
    let mut all = Vec::new();
    while let Some(done) = set.join_next().await {
        all.extend(done.expect("hammer task"));
    }
    all.sort_by_key(|s| s.sent);
    all
}

/// Polls until `secret` gets `status` (bounded by [`DEADLINE`]); the time it took, or `None`.
async fn wait_for_status(addr: SocketAddr, secret: &str, status: u16) -> Option<Duration> {
    let mut poll = Attempts::within(DEADLINE);
    while poll.again().await {
        let exchange = Call::new(addr, Method::GET, "/wait").header("x-api-key", secret).try_send().await;
        if exchange.is_ok_and(|e| e.status.as_u16() == status) {
            return Some(poll.start.elapsed());
        }
    }
    None
}

/// keygate.toml (every path needs a key) and keys.toml in a fresh folder; the config path.
fn reload_dir(upstream: &RecordingUpstream, keys: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("keygate.toml");
    let gateway_toml = GatewayConfig::new().route(Route::new("/", &upstream.url())).gateway_toml();
    std::fs::write(&config, gateway_toml).expect("write keygate.toml");
    std::fs::write(dir.path().join("keys.toml"), keys).expect("write keys.toml");
    (dir, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_under_fire_never_succeeds_after_its_first_revoked_answer() {
    let upstream = RecordingUpstream::start().await;
    const VICTIM: &str = "vic-T1m3oFcH3cK9uSe";
    let victim = Key::new("victim01", "victim", VICTIM, &["read"]);
    let padding: Vec<Key> = (0..200)
        .map(|i| Key::new(&format!("pad{i:05}"), "pad", &format!("pad-secret-{i}"), &["read"]))
        .collect();
    let file = |victim: Key| {
        let mut keys = padding.clone();
        keys.push(victim);
        keys.push(reader_key());
        keys_toml(&keys)
    };
    let (dir, config) = reload_dir(&upstream, &file(victim.clone()));
    let gateway = WatchedGateway::start(&config).await;
    let stop = Arc::new(AtomicBool::new(false));
    let shots = hammer(gateway.addr, VICTIM, 3, 5_000, Arc::clone(&stop));

    // The key must work before the revoke, or a key that never worked would pass: wait (bounded)
    // until the upstream has seen the victim's identity, and demand it did.
    let victim_hits =
        || upstream.requests().iter().filter(|r| r.header("x-keygate-key-id") == Some("victim01")).count();
    let mut poll = Attempts::within(DEADLINE);
    while poll.again().await && victim_hits() < 30 {}
    assert!(
        victim_hits() >= 30,
        "the victim key was forwarded only {} times before the revoke ({})",
        victim_hits(),
        poll.report()
    );
    let renamed = Instant::now();
    rename_over(&dir.path().join("keys.toml"), &file(victim.revoked_at("2020-01-01T00:00:00Z")));
    let took = wait_for_status(gateway.addr, VICTIM, 401).await;
    // Keep firing a little longer after the revocation has shown.
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let shots = collect_shots(shots).await;
    let revoked: Vec<&Shot> = shots.iter().filter(|s| s.code.as_deref() == Some("revoked_api_key")).collect();
    let ok = shots.iter().filter(|s| s.status == 200).count();
    eprintln!(
        "{} shots: {ok} × 200, {} × revoked; revocation seen {took:?} after the rename",
        shots.len(),
        revoked.len()
    );
    let ok_before = shots.iter().filter(|s| s.status == 200 && s.done < renamed).count();
    assert!(
        ok_before > 0,
        "no shot got 200 before the revoke: {:?}",
        shots.iter().take(5).collect::<Vec<_>>()
    );
    // The product promises a key edit within about a second; DEADLINE is five times that.
    assert!(took.is_some(), "revocation not in effect {DEADLINE:?} after the rename");
    let first_revoked = revoked.iter().map(|s| s.done).min().expect("the hammer saw the revocation");
    let late: Vec<&Shot> = shots.iter().filter(|s| s.status == 200 && s.sent > first_revoked).collect();
    assert!(late.is_empty(), "{} requests sent after a revoked answer still got 200: {late:?}", late.len());
    let odd: Vec<&Shot> =
        shots.iter().filter(|s| s.status != 200 && s.code.as_deref() != Some("revoked_api_key")).collect();
    assert!(odd.is_empty(), "answers other than 200 or revoked: {odd:?}");
}

/// How a burst rewrites the key file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rewrite {
    /// Temporary file + rename, every time: what the README asks writers to do.
    Rename,
    /// Alternately rename and a single in-place `write` call.
    Mixed,
}

/// Rewrites a 1,000-key file 200 times while two clients hammer the stable key (last in the
/// file) and one the first key; fails on any answer but 200 for the stable key.
async fn burst_of_rewrites(mode: Rewrite) {
    let upstream = RecordingUpstream::start().await;
    let (dir, config) = reload_dir(&upstream, &burst_keys_file(0, 0, false));
    let keys_path = dir.path().join("keys.toml");
    let gateway = WatchedGateway::start(&config).await;
    let stop = Arc::new(AtomicBool::new(false));
    let shots = hammer(gateway.addr, STABLE_SECRET, 2, 20_000, Arc::clone(&stop));
    // The first key of the file, to tell a torn prefix (first key kept) from an empty table.
    let first_shots = hammer(gateway.addr, "burst-0", 1, 20_000, Arc::clone(&stop));

    const REWRITES: usize = 200;
    let writer = tokio::task::spawn_blocking(move || {
        for version in 1..=REWRITES {
            let text = burst_keys_file(version, version % 5, version == REWRITES);
            if mode == Rewrite::Rename || version % 2 == 0 {
                rename_over(&keys_path, &text);
            } else {
                write_in_place(&keys_path, &text);
            }
            std::thread::sleep(Duration::from_millis(3));
        }
    });
    tokio::time::timeout(Duration::from_secs(60), writer).await.expect("writer in time").expect("writer");
    let took = wait_for_status(gateway.addr, "final-secret-9Zq", 200).await;
    // A little more fire on the settled file.
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let shots = collect_shots(shots).await;
    let first_shots = collect_shots(first_shots).await;
    let status = gateway.status();
    let bad: Vec<&Shot> = shots.iter().filter(|s| s.status != 200).collect();
    let first_bad = first_shots.iter().filter(|s| s.status != 200).count();
    let window = bad.first().zip(bad.last()).map(|(a, b)| b.done - a.sent);
    eprintln!(
        "{mode:?} burst: {} stable-key shots, {} not 200 (over {window:?}); first key: {first_bad} of {} not 200; \
         reload status {status:?}",
        shots.len(),
        bad.len(),
        first_shots.len()
    );
    assert!(shots.len() > 100, "too few shots ({}) to prove anything", shots.len());
    assert!(
        bad.is_empty(),
        "{mode:?} burst: the stable key (last in the file) was refused {} times over {window:?}, while the \
         first key of the file was refused {first_bad} times; reload status {status:?}; first refusals: {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    assert!(took.is_some(), "the final version was never loaded; reload status {status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_renames_over_a_thousand_key_file_never_lose_the_stable_key() {
    burst_of_rewrites(Rewrite::Rename).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_of_mixed_rewrites_of_a_thousand_key_file_never_serve_a_half_written_table() {
    burst_of_rewrites(Rewrite::Mixed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_writes_pausing_far_shorter_than_the_debounce_never_serve_half_a_file() {
    let upstream = RecordingUpstream::start().await;
    let (dir, config) = reload_dir(&upstream, &burst_keys_file(0, 0, false));
    let keys_path = dir.path().join("keys.toml");
    let gateway = WatchedGateway::start(&config).await;
    let stop = Arc::new(AtomicBool::new(false));
    let shots = hammer(gateway.addr, STABLE_SECRET, 2, 50_000, Arc::clone(&stop));
    let first_shots = hammer(gateway.addr, "burst-0", 1, 50_000, Arc::clone(&stop));
    let writer = tokio::task::spawn_blocking(move || {
        let texts: Vec<String> = (1..=4).map(|v| burst_keys_file(v, v % 3, false)).collect();
        let started = std::time::Instant::now();
        let mut writes = 0;
        // Bounded by time and count: about 4 s of rewriting, each write pausing 5 ms halfway
        // (cut at an entry boundary, so the first half is a valid file on its own).
        while started.elapsed() < Duration::from_secs(4) && writes < 5_000 {
            writes += 1;
            let text = &texts[writes % texts.len()];
            let cut = text.len() / 2 / 256 * 256;
            let mut file =
                std::fs::OpenOptions::new().write(true).truncate(true).open(&keys_path).expect("open");
            file.write_all(&text.as_bytes()[..cut]).expect("write the first half");
            std::thread::sleep(Duration::from_millis(5));
            file.write_all(&text.as_bytes()[cut..]).expect("write the second half");
            drop(file);
            std::thread::sleep(Duration::from_millis(1));
        }
        writes
    });
    let writes =
        tokio::time::timeout(Duration::from_secs(30), writer).await.expect("in time").expect("writer");
    let back = wait_for_status(gateway.addr, STABLE_SECRET, 200).await;
    stop.store(true, Ordering::Relaxed);
    let shots = collect_shots(shots).await;
    let first_shots = collect_shots(first_shots).await;
    let bad: Vec<&Shot> = shots.iter().filter(|s| s.status != 200).collect();
    let first_bad = first_shots.iter().filter(|s| s.status != 200).count();
    let status = gateway.status();
    assert!(back.is_some(), "the stable key never came back; {status:?}");
    assert!(
        bad.is_empty(),
        "{writes} in-place writes pausing 5 ms: the stable key (last in the file) was refused {} of {} times \
         ({:?}) while the first key was refused {first_bad} times: half a file was served; {status:?}",
        bad.len(),
        shots.len(),
        bad.first().map(|s| (s.status, s.code.clone()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_then_pause_writes_never_lose_the_running_keys() {
    let upstream = RecordingUpstream::start().await;
    let stable = Key::new("stable01", "stable", STABLE_SECRET, &["read"]);
    let version = move |round: usize| {
        let mut keys = vec![stable.clone()];
        keys.extend(
            (0..=round)
                .map(|r| Key::new(&format!("round{r:03}"), "round", &format!("round-secret-{r}"), &["read"])),
        );
        keys_toml(&keys)
    };
    let (dir, config) = reload_dir(&upstream, &version(0));
    let keys_path = dir.path().join("keys.toml");
    let gateway = WatchedGateway::start(&config).await;
    let stop = Arc::new(AtomicBool::new(false));
    let shots = hammer(gateway.addr, STABLE_SECRET, 2, 20_000, Arc::clone(&stop));
    const ROUNDS: usize = 5;
    let mut took = Vec::new();
    for round in 1..=ROUNDS {
        drop(std::fs::OpenOptions::new().write(true).truncate(true).open(&keys_path).expect("truncate"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut file = std::fs::OpenOptions::new().write(true).open(&keys_path).expect("open");
        file.write_all(version(round).as_bytes()).expect("write");
        drop(file);
        // Each round's write must take effect (the next truncate waits for it).
        took.push(wait_for_status(gateway.addr, &format!("round-secret-{round}"), 200).await);
    }
    stop.store(true, Ordering::Relaxed);
    let shots = collect_shots(shots).await;
    let status = gateway.status();
    let bad: Vec<&Shot> = shots.iter().filter(|s| s.status != 200).collect();
    eprintln!("{} stable-key shots, {} not 200; reload status {status:?}", shots.len(), bad.len());
    assert!(
        bad.is_empty(),
        "truncate-and-pause lost the stable key {} times: {:?}",
        bad.len(),
        &bad[..bad.len().min(10)]
    );
    assert!(took.iter().all(Option::is_some), "a round's write was never loaded: {took:?}; {status:?}");
    assert!(status.failures >= 1, "no empty file was ever refused, so the pause was never seen: {status:?}");
}

/// The README's documented limit: a writer that pauses mid-write with a valid prefix in the
/// file can be read half-written. This pins down what that means: the keys after the cut are
/// `invalid_api_key` for the length of the pause, and come back once the write completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_partial_write_is_the_documented_limit_and_recovers() {
    let upstream = RecordingUpstream::start().await;
    let text = burst_keys_file(0, 0, false);
    let (dir, config) = reload_dir(&upstream, &text);
    let keys_path = dir.path().join("keys.toml");
    let gateway = WatchedGateway::start(&config).await;
    let stop = Arc::new(AtomicBool::new(false));
    let shots = hammer(gateway.addr, STABLE_SECRET, 1, 20_000, Arc::clone(&stop));
    let cut = text.len() - 256; // everything but the stable key: a valid file on its own
    let writer = tokio::task::spawn_blocking(move || {
        let mut file = std::fs::OpenOptions::new().write(true).truncate(true).open(&keys_path).expect("open");
        file.write_all(&text.as_bytes()[..cut]).expect("write the first part");
        std::thread::sleep(Duration::from_millis(600));
        file.write_all(&text.as_bytes()[cut..]).expect("write the rest");
        Instant::now()
    });
    let completed =
        tokio::time::timeout(Duration::from_secs(30), writer).await.expect("in time").expect("writer");
    let took = wait_for_status(gateway.addr, STABLE_SECRET, 200).await;
    stop.store(true, Ordering::Relaxed);
    let shots = collect_shots(shots).await;
    let refused: Vec<&Shot> = shots.iter().filter(|s| s.status != 200).collect();
    eprintln!(
        "paused partial write: {} of {} stable-key requests refused during the pause ({:?}); back {took:?} after the write completed",
        refused.len(),
        shots.len(),
        refused.first().map(|s| (s.status, s.code.clone()))
    );
    assert!(
        refused.iter().all(|s| s.status == 401 && s.code.as_deref() == Some("invalid_api_key")),
        "a half-written file may lose keys, but only as invalid_api_key: {refused:?}"
    );
    // A completed write is promised to load within about a second; DEADLINE is five times that,
    // so only a gateway that never reloads (not a slow machine) fails here.
    let late = shots.iter().filter(|s| s.status != 200 && s.sent > completed + DEADLINE).count();
    assert_eq!(late, 0, "the stable key was still refused {DEADLINE:?} after the write completed");
    assert!(took.is_some(), "the stable key never came back");
}

#[tokio::test]
async fn a_malformed_chunked_request_body_is_a_client_error_not_an_upstream_failure() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).start().await;
    for body in ["0x5\r\nhello\r\n0\r\n\r\n", "5\r\nhelloXX0\r\n\r\n", "3\r\nhello\r\n0\r\n\r\n"] {
        let request =
            RawRequest::new("POST", "/public/bad-chunks").line("Transfer-Encoding: chunked").raw_body(body);
        let raw = gateway.raw(&request.bytes()).await;
        assert_eq!(raw.status(), Some(400), "a client's broken body is not the upstream's fault\n{raw}");
        assert_eq!(raw.error_code().as_deref(), Some("bad_request"), "{raw}");
    }
}

#[tokio::test]
async fn refused_or_unanswered_websocket_upgrades_never_open_a_tunnel() {
    let upstream = RecordingUpstream::start().await;
    let gateway = three_routes(&upstream).start().await;
    // The recording upstream answers 200, not 101: keygate must keep speaking HTTP, or the
    // next bytes would go to the upstream unauthenticated (websocket smuggling).
    let cases = [(Who::Nobody, 401), (Who::Reader, 403), (Who::Admin, 200)];
    let mut failures = Vec::new();
    for (who, status) in cases {
        let upgrade = RawRequest::get("/admin/ws")
            .who(who)
            .line("Connection: Upgrade")
            .line("Upgrade: websocket")
            .line("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==")
            .line("Sec-WebSocket-Version: 13")
            .keep_alive();
        let behind = RawRequest::get("/admin/tunnel").keep_alive();
        let mut conn = RawConn::open(gateway.addr).await;
        conn.send(&upgrade.bytes()).await;
        let first = conn.response().await;
        conn.send(&behind.bytes()).await;
        let second = conn.response().await;
        let ok = first.as_ref().is_some_and(|r| r.status == status)
            && second.as_ref().is_some_and(|r| r.status == 401)
            && seen_probe(&upstream, &behind.probe).is_none()
            && (status == 200) == seen_probe(&upstream, &upgrade.probe).is_some();
        if !ok {
            failures.push(format!("as {who:?}: expected {status} then 401\n{conn}"));
        }
    }
    if upstream.requests().iter().any(|r| r.uri.contains("tunnel")) {
        failures
            .push(format!("a request behind an upgrade reached the upstream: {:#?}", upstream.requests()));
    }
    failures.extend(upstream_violations(&upstream));
    assert_no_failures("upgrade cases", cases.len(), &failures);
}

//! Hot reload (SPEC §3): in-place writes, renames over the file, Kubernetes `..data` swaps,
//! delete-then-recreate, invalid files, route changes, SIGHUP, and reloads under traffic.
//!
//! Each test runs its own gateway and watcher on files in its own temp dir, changes a file the
//! way a tool would, then polls with requests until the change shows or a deadline passes. The
//! product promises an effect within 1 s; the tests allow [`DEADLINE`] and print the measured
//! time, so a slow machine shows up as a number rather than as a flaky failure.

mod support;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keygate::reload::StatusView;
use support::poll::{DEADLINE, MAX_POLLS, POLL_EVERY, ms};
use support::process::Process;
use support::{Call, Exchange, GatewayConfig, Key, RecordingUpstream, Route, WatchedGateway, keys_toml};
use support::{inode, rename_over};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// Keys and configs
// ---------------------------------------------------------------------------------------------

/// A key with an 8-character id (`name` padded with `0`) and a secret derived from the name.
fn key(name: &str) -> Key {
    let id = format!("{name:0<8}");
    Key::new(&id, name, &format!("secret-of-{name}-0123456789abcdef"), &["read"])
}

/// A copy of `key` revoked since 2020.
fn revoked(key: &Key) -> Key {
    key.clone().revoked_at("2020-01-01T00:00:00Z")
}

/// keygate.toml: every path under `/` needs a key and goes to `upstream`.
fn private_config(upstream: &RecordingUpstream) -> GatewayConfig {
    GatewayConfig::new().route(Route::new("/", &upstream.url()))
}

/// Writes `keygate.toml` and `keys.toml` as plain files in `dir`; returns the config path.
fn write_plain(dir: &Path, gateway_toml: &str, keys: &str) -> PathBuf {
    let config = dir.join("keygate.toml");
    std::fs::write(&config, gateway_toml).expect("write keygate.toml");
    std::fs::write(dir.join("keys.toml"), keys).expect("write keys.toml");
    config
}

// ---------------------------------------------------------------------------------------------
// Changing files the ways tools do
// ---------------------------------------------------------------------------------------------

/// Truncates the file and writes `text` into the same inode with a single `write` call, as
/// `echo … > file` or an editor set to overwrite does. One call keeps the window in which the
/// file is empty as short as the kernel allows.
fn write_in_place(path: &Path, text: &str) {
    let before = inode(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for an in-place write: {e}", path.display()));
    let written = file.write(text.as_bytes()).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    assert_eq!(written, text.len(), "a short write to {}: the test needs one write call", path.display());
    drop(file);
    assert_eq!(inode(path), before, "an in-place write must keep the inode of {}", path.display());
}

/// vim's default save: rename the file to `file~`, write a new file, delete the backup. For a
/// moment the file does not exist at all.
fn vim_save(path: &Path, text: &str) {
    let name = path.file_name().expect("a file name").to_string_lossy();
    let backup = path.with_file_name(format!("{name}~"));
    std::fs::rename(path, &backup).unwrap_or_else(|e| panic!("rename {} to its backup: {e}", path.display()));
    std::fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    std::fs::remove_file(&backup).unwrap_or_else(|e| panic!("remove {}: {e}", backup.display()));
}

/// Lays out a Kubernetes ConfigMap/Secret volume in `dir`: the files in `dir/..<stamp>/`,
/// `dir/..data -> ..<stamp>`, and for each file `dir/NAME -> ..data/NAME`.
fn k8s_volume(dir: &Path, stamp: &str, files: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).expect("create the volume folder");
    let data = dir.join(format!("..{stamp}"));
    std::fs::create_dir(&data).expect("create the ..<stamp> folder");
    for (name, text) in files {
        std::fs::write(data.join(name), text).unwrap_or_else(|e| panic!("write ..{stamp}/{name}: {e}"));
    }
    std::os::unix::fs::symlink(format!("..{stamp}"), dir.join("..data")).expect("symlink ..data");
    for (name, _) in files {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name))
            .unwrap_or_else(|e| panic!("symlink {name} -> ..data/{name}: {e}"));
    }
}

/// The Kubernetes atomic writer's update: the new files in `..<stamp>/`, a `..data_tmp`
/// symlink to it renamed over `..data`, then the old `..<stamp>` folder removed. The
/// top-level `NAME -> ..data/NAME` links never change.
fn k8s_swap(dir: &Path, stamp: &str, files: &[(&str, &str)]) {
    let old = k8s_swap_link(dir, stamp, files);
    std::fs::remove_dir_all(&old).unwrap_or_else(|e| panic!("remove {}: {e}", old.display()));
}

/// [`k8s_swap`] without the clean-up: returns the old `..<stamp>` folder, still in place.
fn k8s_swap_link(dir: &Path, stamp: &str, files: &[(&str, &str)]) -> PathBuf {
    let old = std::fs::read_link(dir.join("..data")).expect("read the ..data symlink");
    let data = dir.join(format!("..{stamp}"));
    std::fs::create_dir(&data).expect("create the new ..<stamp> folder");
    for (name, text) in files {
        std::fs::write(data.join(name), text).unwrap_or_else(|e| panic!("write ..{stamp}/{name}: {e}"));
    }
    let tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink(format!("..{stamp}"), &tmp).expect("symlink ..data_tmp");
    std::fs::rename(&tmp, dir.join("..data")).expect("rename ..data_tmp over ..data");
    dir.join(old)
}

// ---------------------------------------------------------------------------------------------
// Waiting for a change to show
// ---------------------------------------------------------------------------------------------

use support::Outcome;

#[track_caller]
fn assert_outcome(exchange: &Exchange, outcome: Outcome, context: &str) {
    assert!(outcome.matches(exchange), "{context}: expected {outcome:?}\n{exchange}");
}

/// Sends `call` once and fails the test unless it gets `outcome`: for baselines, and for what
/// must already hold once a change has been seen.
async fn check(call: Call, outcome: Outcome, context: &str) -> Exchange {
    let exchange = call.send().await;
    assert_outcome(&exchange, outcome, context);
    exchange
}

/// Sends `call()` every [`POLL_EVERY`] until the answer is `outcome`; returns the time since
/// `changed_at` and the matching exchange. Fails the test after [`DEADLINE`], showing the change,
/// the last exchange and the reload status.
async fn wait_for(
    gateway: &WatchedGateway,
    call: impl Fn() -> Call,
    outcome: Outcome,
    changed_at: Instant,
    change: &str,
) -> (Duration, Exchange) {
    let mut polls = 0;
    loop {
        polls += 1;
        let exchange = call().send().await;
        let elapsed = changed_at.elapsed();
        if outcome.matches(&exchange) {
            eprintln!("[{change}] seen after {}", ms(elapsed));
            return (elapsed, exchange);
        }
        if elapsed >= DEADLINE || polls >= MAX_POLLS {
            panic!(
                "{change}: no {outcome:?} within {} ({polls} polls; target is 1 s)\n\
                 reload status: {:?}\nlast exchange:\n{exchange}",
                ms(elapsed),
                gateway.status()
            );
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls the reload status every [`POLL_EVERY`] until `done` holds; returns it and the time
/// since `changed_at`.
async fn wait_for_status(
    gateway: &WatchedGateway,
    done: impl Fn(&StatusView) -> bool,
    changed_at: Instant,
    what: &str,
) -> (Duration, StatusView) {
    let mut polls = 0;
    loop {
        polls += 1;
        let status = gateway.status();
        let elapsed = changed_at.elapsed();
        if done(&status) {
            eprintln!("[{what}] seen after {}", ms(elapsed));
            return (elapsed, status);
        }
        if elapsed >= DEADLINE || polls >= MAX_POLLS {
            panic!("{what}: not within {} ({polls} polls); reload status: {status:?}", ms(elapsed));
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// True if `error` holds `file:LINE:COL:` with numbers of at least 1.
fn names_line_and_column(error: &str, file: &str) -> bool {
    error.match_indices(&format!("{file}:")).any(|(at, found)| {
        let mut parts = error[at + found.len()..].splitn(3, ':');
        let number = |p: Option<&str>| p.and_then(|p| p.parse::<u32>().ok()).is_some_and(|n| n >= 1);
        number(parts.next()) && number(parts.next()) && parts.next().is_some()
    })
}

// ---------------------------------------------------------------------------------------------
// One gateway with plain files
// ---------------------------------------------------------------------------------------------

/// A recording upstream and a watched gateway in front of it, serving files in `dir`.
struct Fixture {
    upstream: RecordingUpstream,
    dir: tempfile::TempDir,
    gateway: WatchedGateway,
}

impl Fixture {
    /// keygate.toml and keys.toml (holding `keys`) as plain files in a fresh temp dir.
    async fn plain(keys: &[Key]) -> Self {
        let upstream = RecordingUpstream::start().await;
        let dir = tempfile::tempdir().expect("temp dir");
        let config = write_plain(dir.path(), &private_config(&upstream).gateway_toml(), &keys_toml(keys));
        let gateway = WatchedGateway::start(&config).await;
        Self { upstream, dir, gateway }
    }

    fn keys_path(&self) -> PathBuf {
        self.dir.path().join("keys.toml")
    }

    /// `GET /api/items` with `key` in `x-api-key`.
    fn with(&self, key: &Key) -> impl Fn() -> Call + 'static {
        let (addr, secret) = (self.gateway.addr, key.secret.clone());
        move || Call::new(addr, http::Method::GET, "/api/items").header("x-api-key", &secret)
    }

    async fn wait_for(&self, key: &Key, outcome: Outcome, changed_at: Instant, change: &str) -> Duration {
        let (elapsed, exchange) = wait_for(&self.gateway, self.with(key), outcome, changed_at, change).await;
        match outcome {
            Outcome::Forwarded => {
                self.upstream.expect_received(&exchange);
            }
            Outcome::Rejected(..) => {
                assert!(
                    self.upstream.received(&exchange).is_none(),
                    "{change}: a rejected request went upstream\n{exchange}"
                );
            }
        }
        elapsed
    }
}

const INVALID: Outcome = Outcome::Rejected(401, "invalid_api_key");
const REVOKED: Outcome = Outcome::Rejected(401, "revoked_api_key");
const OK: Outcome = Outcome::Forwarded;

// ---------------------------------------------------------------------------------------------
// 1. In-place write
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn in_place_write_adding_a_key_lets_it_in() {
    let (alice, bob) = (key("alice"), key("bob"));
    let t = Fixture::plain(std::slice::from_ref(&alice)).await;
    check(t.with(&bob)(), INVALID, "before the change, bob is unknown").await;
    check(t.with(&alice)(), OK, "before the change, alice is valid").await;

    let changed_at = Instant::now();
    write_in_place(&t.keys_path(), &keys_toml(&[alice.clone(), bob.clone()]));
    t.wait_for(&bob, OK, changed_at, "in-place write adding bob").await;

    check(t.with(&alice)(), OK, "alice after the change").await;
    let status = t.gateway.status();
    assert!(status.generation >= 2 && status.failures == 0 && status.last_error.is_none(), "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// 2. Rename over the file; vim-style saves
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rename_over_revoking_a_key_twice_in_a_row() {
    let (alice, bob, carol) = (key("alice"), key("bob"), key("carol"));
    let t = Fixture::plain(&[alice.clone(), bob.clone(), carol.clone()]).await;
    check(t.with(&bob)(), OK, "before the change, bob is valid").await;

    let changed_at = Instant::now();
    rename_over(&t.keys_path(), &keys_toml(&[alice.clone(), revoked(&bob), carol.clone()]));
    t.wait_for(&bob, REVOKED, changed_at, "rename over revoking bob").await;
    check(t.with(&carol)(), OK, "carol after bob's revocation").await;

    // The second rename replaces the inode the first one created: the watch must follow.
    let changed_at = Instant::now();
    rename_over(&t.keys_path(), &keys_toml(&[alice.clone(), revoked(&bob), revoked(&carol)]));
    t.wait_for(&carol, REVOKED, changed_at, "second rename over revoking carol").await;
    check(t.with(&bob)(), REVOKED, "bob after the second change").await;
    check(t.with(&alice)(), OK, "alice after both changes").await;
}

#[tokio::test]
async fn vim_style_saves_twice_in_a_row_are_both_seen() {
    let (alice, bob, carol) = (key("alice"), key("bob"), key("carol"));
    let t = Fixture::plain(&[alice.clone(), bob.clone(), carol.clone()]).await;
    check(t.with(&bob)(), OK, "before the change, bob is valid").await;

    let changed_at = Instant::now();
    vim_save(&t.keys_path(), &keys_toml(&[alice.clone(), revoked(&bob), carol.clone()]));
    t.wait_for(&bob, REVOKED, changed_at, "first vim save revoking bob").await;

    let changed_at = Instant::now();
    vim_save(&t.keys_path(), &keys_toml(&[alice.clone(), revoked(&bob), revoked(&carol)]));
    t.wait_for(&carol, REVOKED, changed_at, "second vim save revoking carol").await;
    check(t.with(&alice)(), OK, "alice after both saves").await;
}

// ---------------------------------------------------------------------------------------------
// 3. Kubernetes volumes
// ---------------------------------------------------------------------------------------------

/// keys.toml in a Secret-style volume of its own (`keys/`), keygate.toml a plain file.
#[tokio::test]
async fn kubernetes_secret_swaps_of_the_keys_file_are_seen_twice() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (alice, bob, carol) = (key("alice"), key("bob"), key("carol"));
    let volume = dir.path().join("keys");
    k8s_volume(&volume, "2026_A", &[("keys.toml", &keys_toml(&[alice.clone(), bob.clone()]))]);
    let gateway_toml = private_config(&upstream)
        .gateway_toml()
        .replace("keys_file = \"keys.toml\"", "keys_file = \"keys/keys.toml\"");
    let config = dir.path().join("keygate.toml");
    std::fs::write(&config, &gateway_toml).expect("write keygate.toml");
    let gateway = WatchedGateway::start(&config).await;
    let t = Fixture { upstream, dir, gateway };
    check(t.with(&bob)(), OK, "before the swap, bob is valid").await;
    check(t.with(&carol)(), INVALID, "before the swap, carol is unknown").await;

    let changed_at = Instant::now();
    k8s_swap(&volume, "2026_B", &[("keys.toml", &keys_toml(&[alice.clone(), revoked(&bob), carol.clone()]))]);
    t.wait_for(&bob, REVOKED, changed_at, "first ..data swap revoking bob").await;
    check(t.with(&carol)(), OK, "carol after the first swap").await;

    // The file now resolves into ..2026_B; the old folder is gone. The second swap must be
    // seen through the new target.
    let changed_at = Instant::now();
    k8s_swap(&volume, "2026_C", &[("keys.toml", &keys_toml(&[alice.clone(), revoked(&bob)]))]);
    t.wait_for(&carol, INVALID, changed_at, "second ..data swap deleting carol").await;
    check(t.with(&alice)(), OK, "alice after both swaps").await;
    assert_eq!(t.gateway.status().failures, 0, "{:?}", t.gateway.status());
}

/// keygate.toml and keys.toml both in one ConfigMap-style volume; route changes swap in.
#[tokio::test]
async fn kubernetes_configmap_swaps_of_keygate_toml_are_seen_twice() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let alice = key("alice");
    let keys = keys_toml(std::slice::from_ref(&alice));
    let base = private_config(&upstream);
    let with_open = base.clone().route(Route::new("/open/", &upstream.url()).public());
    let with_free = with_open.clone().route(Route::new("/free/", &upstream.url()).public());
    k8s_volume(dir.path(), "2026_A", &[("keygate.toml", &base.gateway_toml()), ("keys.toml", &keys)]);
    let gateway = WatchedGateway::start(&dir.path().join("keygate.toml")).await;
    let t = Fixture { upstream, dir, gateway };
    let no_key = |path: &'static str| {
        let addr = t.gateway.addr;
        move || Call::new(addr, http::Method::GET, path)
    };
    let missing = Outcome::Rejected(401, "missing_api_key");
    check(no_key("/open/x")(), missing, "before the swap, /open/ needs a key").await;

    let changed_at = Instant::now();
    k8s_swap(t.dir.path(), "2026_B", &[("keygate.toml", &with_open.gateway_toml()), ("keys.toml", &keys)]);
    let (_, seen) =
        wait_for(&t.gateway, no_key("/open/x"), OK, changed_at, "first swap adding public /open/").await;
    t.upstream.expect_received(&seen);
    check(no_key("/free/x")(), missing, "after the first swap, /free/ still needs a key").await;

    let changed_at = Instant::now();
    k8s_swap(t.dir.path(), "2026_C", &[("keygate.toml", &with_free.gateway_toml()), ("keys.toml", &keys)]);
    let (_, seen) =
        wait_for(&t.gateway, no_key("/free/x"), OK, changed_at, "second swap adding public /free/").await;
    t.upstream.expect_received(&seen);
    check(t.with(&alice)(), OK, "alice after both swaps").await;
    assert_eq!(t.gateway.status().failures, 0, "{:?}", t.gateway.status());
}

/// The rename of `..data` alone is the change: it must be seen before (and without) the old
/// folder being removed, which the kubelet does only afterwards and may fail to do.
#[tokio::test]
async fn kubernetes_data_link_swap_is_seen_before_the_old_folder_is_removed() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (alice, bob) = (key("alice"), key("bob"));
    let config = dir.path().join("keygate.toml");
    std::fs::write(&config, private_config(&upstream).gateway_toml()).expect("write keygate.toml");
    k8s_volume(dir.path(), "2026_A", &[("keys.toml", &keys_toml(std::slice::from_ref(&alice)))]);
    let gateway = WatchedGateway::start(&config).await;
    let t = Fixture { upstream, dir, gateway };
    check(t.with(&bob)(), INVALID, "before the swap, bob is unknown").await;

    let changed_at = Instant::now();
    let old =
        k8s_swap_link(t.dir.path(), "2026_B", &[("keys.toml", &keys_toml(&[alice.clone(), bob.clone()]))]);
    t.wait_for(&bob, OK, changed_at, "..data swap, old folder left in place").await;
    assert!(old.exists(), "the old folder must still be there for this test to mean anything");

    let changed_at = Instant::now();
    let older =
        k8s_swap_link(t.dir.path(), "2026_C", &[("keys.toml", &keys_toml(&[alice.clone(), revoked(&bob)]))]);
    t.wait_for(&bob, REVOKED, changed_at, "second ..data swap, old folders left in place").await;
    assert!(older.exists());
}

/// keys.toml is a symlink to a file in another folder (a dotfiles repo, a shared mount); an
/// editor changes the real file, in place and then by rename. The watcher must cover the
/// folder the link resolves to, not only the folder of the link.
#[tokio::test]
async fn symlinked_keys_file_changed_at_its_target_is_seen() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let (alice, bob, carol) = (key("alice"), key("bob"), key("carol"));
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).expect("create shared/");
    let target = shared.join("keys.toml");
    std::fs::write(&target, keys_toml(std::slice::from_ref(&alice))).expect("write shared/keys.toml");
    std::os::unix::fs::symlink(&target, dir.path().join("keys.toml")).expect("symlink keys.toml");
    let config = dir.path().join("keygate.toml");
    std::fs::write(&config, private_config(&upstream).gateway_toml()).expect("write keygate.toml");
    let gateway = WatchedGateway::start(&config).await;
    let t = Fixture { upstream, dir, gateway };
    check(t.with(&bob)(), INVALID, "before the change, bob is unknown").await;

    let changed_at = Instant::now();
    write_in_place(&target, &keys_toml(&[alice.clone(), bob.clone()]));
    t.wait_for(&bob, OK, changed_at, "in-place write of the symlink's target adding bob").await;

    let changed_at = Instant::now();
    rename_over(&target, &keys_toml(&[alice.clone(), bob.clone(), carol.clone()]));
    t.wait_for(&carol, OK, changed_at, "rename over the symlink's target adding carol").await;
}

/// keygate.toml switches `keys_file` to another folder: from then on, that folder's file is
/// the one watched.
#[tokio::test]
async fn keys_file_moved_to_another_folder_is_watched_there() {
    let (alice, bob, carol) = (key("alice"), key("bob"), key("carol"));
    let t = Fixture::plain(std::slice::from_ref(&alice)).await;
    let elsewhere = t.dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("create elsewhere/");
    let moved_keys = elsewhere.join("keys.toml");
    std::fs::write(&moved_keys, keys_toml(&[alice.clone(), bob.clone()])).expect("write elsewhere/keys.toml");
    check(t.with(&bob)(), INVALID, "before the switch, bob is unknown").await;

    let gateway_toml = private_config(&t.upstream)
        .gateway_toml()
        .replace("keys_file = \"keys.toml\"", "keys_file = \"elsewhere/keys.toml\"");
    let changed_at = Instant::now();
    rename_over(&t.dir.path().join("keygate.toml"), &gateway_toml);
    t.wait_for(&bob, OK, changed_at, "keygate.toml pointing keys_file at elsewhere/").await;

    let changed_at = Instant::now();
    write_in_place(&moved_keys, &keys_toml(&[alice.clone(), bob.clone(), carol.clone()]));
    t.wait_for(&carol, OK, changed_at, "in-place write of elsewhere/keys.toml adding carol").await;
    // The old file no longer matters: spoil it, then make one more change that must be seen
    // (reloads run one at a time, so any reload the spoiling caused is over by then).
    let dave = key("dave");
    write_in_place(&t.keys_path(), "this is not TOML");
    let changed_at = Instant::now();
    rename_over(&moved_keys, &keys_toml(&[alice.clone(), bob.clone(), carol.clone(), dave.clone()]));
    t.wait_for(&dave, OK, changed_at, "elsewhere/keys.toml adding dave after the old file was spoiled").await;
    check(t.with(&carol)(), OK, "carol after the old keys file was spoiled").await;
    let status = t.gateway.status();
    assert_eq!(status.failures, 0, "the old, spoiled keys.toml was read: {status:?}");
}

/// A file rewritten more often than the debounce's quiet period is still reloaded: the debounce
/// has an upper bound, so the change shows while the writes go on.
#[tokio::test]
async fn a_file_rewritten_without_pause_is_still_reloaded() {
    const WRITE_EVERY: Duration = Duration::from_millis(30);
    const MAX_WRITES: u32 = 200;
    let (alice, bob) = (key("alice"), key("bob"));
    let t = Fixture::plain(std::slice::from_ref(&alice)).await;
    check(t.with(&bob)(), INVALID, "before the writes, bob is unknown").await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, stop) = (t.keys_path(), Arc::clone(&stop));
        let text = keys_toml(&[alice.clone(), bob.clone()]);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut writes = 0;
            while !stop.load(Ordering::Relaxed) && writes < MAX_WRITES && started.elapsed() < DEADLINE * 2 {
                write_in_place(&path, &text);
                writes += 1;
                tokio::time::sleep(WRITE_EVERY).await;
            }
            writes
        })
    };
    let changed_at = Instant::now();
    t.wait_for(&bob, OK, changed_at, "rewrites every 30 ms adding bob").await;
    let still_writing = !writer.is_finished();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await.expect("writer task");
    assert!(
        still_writing,
        "the writer stopped ({writes} writes) before the change showed: the test proved nothing"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. Delete, then recreate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn deleted_keys_file_keeps_the_old_keys_until_it_is_recreated() {
    let (alice, bob, carol) = (key("alice"), key("bob"), key("carol"));
    let t = Fixture::plain(&[alice.clone(), bob.clone()]).await;
    check(t.with(&bob)(), OK, "before the delete, bob is valid").await;
    let before = t.gateway.status();

    let changed_at = Instant::now();
    std::fs::remove_file(t.keys_path()).expect("delete keys.toml");
    let (_, failed) = wait_for_status(
        &t.gateway,
        |s| s.failures > before.failures,
        changed_at,
        "reload failure after delete",
    )
    .await;
    assert_eq!(
        failed.generation, before.generation,
        "a failed reload must not bump the generation: {failed:?}"
    );
    let error = failed.last_error.clone().unwrap_or_default();
    assert!(error.contains("keys.toml"), "last_error should name keys.toml: {failed:?}");
    // The file is still absent: the running snapshot serves.
    assert!(!t.keys_path().exists());
    check(t.with(&alice)(), OK, "alice while keys.toml is absent").await;
    check(t.with(&bob)(), OK, "bob while keys.toml is absent").await;

    let changed_at = Instant::now();
    std::fs::write(t.keys_path(), keys_toml(&[alice.clone(), revoked(&bob), carol.clone()]))
        .expect("recreate keys.toml");
    t.wait_for(&bob, REVOKED, changed_at, "recreated keys.toml revoking bob").await;
    check(t.with(&carol)(), OK, "carol from the recreated file").await;
    let after = t.gateway.status();
    assert!(after.generation > before.generation && after.last_error.is_none(), "{after:?}");
}

// ---------------------------------------------------------------------------------------------
// 5. Invalid, then valid
// ---------------------------------------------------------------------------------------------

/// Writes `bad` (which also tries to add `intruder`), checks the old keys keep working and the
/// error is reported with file:line:col, then writes a valid file and checks it takes over.
async fn invalid_then_valid(bad: &str, what: &str, intruder: &Key) {
    let (alice, bob, carol) = (key("alice"), key("bob"), key("carol"));
    let t = Fixture::plain(&[alice.clone(), bob.clone()]).await;
    check(t.with(&alice)(), OK, "before the change, alice is valid").await;
    let before = t.gateway.status();

    let changed_at = Instant::now();
    write_in_place(&t.keys_path(), bad);
    let (_, failed) = wait_for_status(
        &t.gateway,
        |s| s.failures > before.failures,
        changed_at,
        &format!("failure on {what}"),
    )
    .await;
    let error = failed.last_error.clone().unwrap_or_default();
    assert!(
        names_line_and_column(&error, "keys.toml"),
        "{what}: last_error should be keys.toml:LINE:COL: …, got {failed:?}\nfile:\n{bad}"
    );
    assert_eq!(failed.generation, before.generation, "{what}: a failed reload bumped the generation");
    check(t.with(&alice)(), OK, &format!("alice after {what}")).await;
    check(t.with(&bob)(), OK, &format!("bob after {what}")).await;
    check(t.with(intruder)(), INVALID, &format!("the key that {what} tried to add")).await;

    let changed_at = Instant::now();
    write_in_place(&t.keys_path(), &keys_toml(&[alice.clone(), revoked(&bob), carol.clone()]));
    t.wait_for(&carol, OK, changed_at, &format!("valid file after {what}")).await;
    check(t.with(&bob)(), REVOKED, &format!("bob in the valid file after {what}")).await;
    let after = t.gateway.status();
    assert!(after.last_error.is_none(), "a successful reload must clear last_error: {after:?}");
    assert!(after.generation > failed.generation, "generation should have increased: {after:?}");
}

#[tokio::test]
async fn invalid_toml_keeps_the_old_keys_then_a_valid_file_takes_over() {
    let intruder = key("mallory");
    let bad = format!("{}\n[[keys]]\nid = \"broken\nname = \"half-written\"\n", intruder.to_toml());
    invalid_then_valid(&bad, "a TOML syntax error", &intruder).await;
}

#[tokio::test]
async fn duplicate_id_keeps_the_old_keys_then_a_valid_file_takes_over() {
    let alice = key("alice");
    // Same id as alice, another secret: the whole file is rejected, so this key never works.
    let twin = Key::new(&alice.id, "alice-twin", "secret-of-the-twin-0123456789", &["read"]);
    let bad = keys_toml(&[alice, key("bob"), twin.clone()]);
    invalid_then_valid(&bad, "a duplicate key id", &twin).await;
}

// ---------------------------------------------------------------------------------------------
// 6. keygate.toml changes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn keygate_toml_route_change_is_seen() {
    let alice = key("alice");
    let t = Fixture::plain(std::slice::from_ref(&alice)).await;
    let (addr, config_path) = (t.gateway.addr, t.dir.path().join("keygate.toml"));
    let open = move || Call::new(addr, http::Method::GET, "/open/doc");
    check(open(), Outcome::Rejected(401, "missing_api_key"), "before the change, /open/ needs a key").await;

    // A new public route; the listen address changes too, which needs a restart: the reload
    // still succeeds and the gateway keeps serving where it is.
    let changed = private_config(&t.upstream)
        .server("listen", "\"127.0.0.1:1\"")
        .route(Route::new("/open/", &t.upstream.url()).public());
    let changed_at = Instant::now();
    write_in_place(&config_path, &changed.gateway_toml());
    let (_, seen) = wait_for(&t.gateway, open, OK, changed_at, "keygate.toml adding public /open/").await;
    let upstream_saw = t.upstream.expect_received(&seen);
    assert_eq!(upstream_saw.header("x-keygate-key-id"), None, "a public route adds no identity\n{seen}");
    check(t.with(&alice)(), OK, "alice after the route change").await;
    let status = t.gateway.status();
    assert!(status.failures == 0 && status.generation >= 2, "{status:?}");
}

// ---------------------------------------------------------------------------------------------
// 7. The real binary: SIGHUP, and a changed listen address
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn sighup_reloads_the_real_binary() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let alice = key("alice");
    let config = write_plain(
        dir.path(),
        &private_config(&upstream).gateway_toml(),
        &keys_toml(std::slice::from_ref(&alice)),
    );
    let mut serve = Process::serve(&config);
    let addr = serve.listening_addr().await;
    let call = || Call::new(addr, http::Method::GET, "/api/items").header("x-api-key", &alice.secret);
    let first = check(call(), OK, "before SIGHUP").await;
    upstream.expect_received(&first);
    let reloaded = "configuration reloaded";
    assert_eq!(serve.count(reloaded), 0, "a reload before any SIGHUP\n{}", serve.transcript());

    // Nothing changed on disk, so no file event can explain a reload: each SIGHUP is one.
    for n in 1..=2 {
        let sent_at = Instant::now();
        serve.signal("HUP");
        let done = serve.wait_until(DEADLINE, |s| s.count(reloaded) >= n && s.count("SIGHUP") >= n).await;
        assert!(
            done,
            "SIGHUP #{n}: no `SIGHUP` and `{reloaded}` lines within {}\n{}",
            ms(sent_at.elapsed()),
            serve.transcript()
        );
        eprintln!("[SIGHUP #{n}] reload logged after {}", ms(sent_at.elapsed()));
        check(call(), OK, &format!("after SIGHUP #{n}\n{}", serve.transcript())).await;
    }
    assert!(
        serve.child.try_wait().expect("child status").is_none(),
        "keygate exited\n{}",
        serve.transcript()
    );
}

/// An operator or a supervisor (`systemctl reload`) may send SIGHUP as soon as keygate says it
/// is listening. That must reload, never end the process (SIGHUP's default action). Several
/// starts, since the window is short.
#[tokio::test]
async fn sighup_as_soon_as_listening_is_logged_does_not_kill_the_binary() {
    const STARTS: usize = 20;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config =
        write_plain(dir.path(), &private_config(&upstream).gateway_toml(), &keys_toml(&[key("alice")]));
    for start in 1..=STARTS {
        let mut serve = Process::serve(&config);
        serve.listening_addr().await;
        serve.signal("HUP");
        let reloaded = serve.wait_until(DEADLINE, |s| s.count("configuration reloaded") >= 1).await;
        // stderr may have closed because keygate is dying: give it a moment to be reaped.
        let exit = match serve.child.try_wait().expect("child status") {
            Some(status) => Some(status),
            None if reloaded => None,
            None => tokio::time::timeout(Duration::from_secs(1), serve.child.wait())
                .await
                .ok()
                .and_then(Result::ok),
        };
        let how = match exit {
            None => "still running".to_owned(),
            Some(status) => match std::os::unix::process::ExitStatusExt::signal(&status) {
                Some(1) => "killed by SIGHUP itself: no handler was installed yet".to_owned(),
                Some(signal) => format!("killed by signal {signal}"),
                None => format!("exited: {status}"),
            },
        };
        assert!(
            reloaded && exit.is_none(),
            "start {start}/{STARTS}: SIGHUP sent right after `listening on`: reloaded = {reloaded}, \
             keygate {how}\n{}",
            serve.transcript()
        );
    }
}

#[tokio::test]
async fn changed_listen_keeps_serving_on_the_old_port_of_the_real_binary() {
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let alice = key("alice");
    let config = write_plain(
        dir.path(),
        &private_config(&upstream).gateway_toml(),
        &keys_toml(std::slice::from_ref(&alice)),
    );
    let mut serve = Process::serve(&config);
    let addr = serve.listening_addr().await;
    let open = || Call::new(addr, http::Method::GET, "/open/doc");
    check(open(), Outcome::Rejected(401, "missing_api_key"), "before the change").await;

    // Another port than the running one; whether it is free does not matter, as it must not
    // be bound before a restart.
    let other = format!("\"127.0.0.1:{}\"", if addr.port() == 65_000 { 65_001 } else { 65_000 });
    let changed = private_config(&upstream)
        .server("listen", &other)
        .route(Route::new("/open/", &upstream.url()).public());
    let changed_at = Instant::now();
    rename_over(&config, &changed.gateway_toml());
    let mut polls = 0;
    loop {
        polls += 1;
        let exchange = open().send().await;
        if OK.matches(&exchange) {
            upstream.expect_received(&exchange);
            eprintln!("[listen change + /open/] seen on the old port after {}", ms(changed_at.elapsed()));
            break;
        }
        assert!(
            changed_at.elapsed() < DEADLINE && polls < MAX_POLLS,
            "no 200 on the old port within {}\nlast exchange:\n{exchange}\n{}",
            ms(changed_at.elapsed()),
            serve.transcript()
        );
        tokio::time::sleep(POLL_EVERY).await;
    }
    let warned = serve.wait_until(DEADLINE, |s| s.count("listen address changed") >= 1).await;
    assert!(warned, "no warning that the listen change needs a restart\n{}", serve.transcript());
    check(
        Call::new(addr, http::Method::GET, "/api/items").header("x-api-key", &alice.secret),
        OK,
        "alice on the old port",
    )
    .await;
}

/// A key file of several megabytes is read by several threads in blocks, never whole
/// (`config::keystream`): every key must be there as the whole-file reader would make it, and a
/// file with a duplicate near its end must still be refused with the duplicate's line, keeping
/// the running keys.
#[tokio::test]
async fn a_large_key_file_loads_in_blocks_and_its_errors_still_name_the_line() {
    const KEYS: usize = 30_000;
    let upstream = RecordingUpstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let bulk: Vec<Key> = (0..KEYS)
        .map(|i| {
            let key = Key::new(
                &format!("bulk{i:05}"),
                "bulk",
                &format!("secret-of-bulk-{i}-0123456789abcdef"),
                &["read"],
            );
            // A few keys with extras, spread across the file.
            if i % 1000 == 999 { key.meta(&[("tenant", &format!("t{i}"))]) } else { key }
        })
        .collect();
    let text = keys_toml(&bulk);
    assert!(text.len() > 4 << 20, "{} bytes: too small to be read by several threads", text.len());
    let config = write_plain(dir.path(), &private_config(&upstream).gateway_toml(), &text);
    let mut serve = Process::serve(&config);
    let addr = serve.listening_addr().await;
    let call = |secret: &str| Call::new(addr, http::Method::GET, "/api/items").header("x-api-key", secret);
    for i in [0, KEYS / 2, KEYS - 2, KEYS - 1] {
        let exchange = check(call(&bulk[i].secret), OK, &format!("bulk key {i}")).await;
        let saw = upstream.expect_received(&exchange);
        assert_eq!(saw.header("x-keygate-key-id"), Some(bulk[i].id.as_str()), "{exchange}");
        assert_eq!(saw.header("x-keygate-key-name"), Some("bulk"), "{exchange}");
        let tenant = (i % 1000 == 999).then(|| format!("t{i}"));
        assert_eq!(saw.header("x-keygate-meta-tenant"), tenant.as_deref(), "{exchange}");
    }
    check(call("secret-of-nobody-0123456789abcdef"), INVALID, "an unknown key").await;

    // The first key's id again, at the very end, after a new key.
    let newcomer = key("newcomer");
    let twin = Key::new(&bulk[0].id, "twin", "secret-of-the-twin-0123456789abcdef", &["read"]);
    let bad = format!("{text}\n{}\n{}", newcomer.to_toml(), twin.to_toml());
    let twin_id_at = bad.rfind(&format!("id = \"{}\"", twin.id)).expect("the twin's id line");
    let twin_line = bad[..twin_id_at].matches('\n').count() + 1;
    let keys_path = dir.path().join("keys.toml");
    rename_over(&keys_path, &bad);
    let refused = serve.wait_until(DEADLINE, |s| s.count("reload failed") >= 1).await;
    let reported =
        serve.all_lines().any(|l| l.contains(&format!("keys.toml:{twin_line}:")) && l.contains("duplicate"));
    assert!(refused && reported, "no failed reload naming keys.toml:{twin_line}\n{}", serve.transcript());
    check(call(&bulk[0].secret), OK, "the first key after the refused file").await;
    check(call(&twin.secret), INVALID, "the twin of the refused file").await;
    check(call(&newcomer.secret), INVALID, "the new key of the refused file").await;

    rename_over(&keys_path, &format!("{text}\n{}", newcomer.to_toml()));
    let reloaded = serve.wait_until(DEADLINE, |s| s.count("configuration reloaded") >= 1).await;
    assert!(reloaded, "the valid file was not loaded\n{}", serve.transcript());
    check(call(&newcomer.secret), OK, "the new key").await;
    check(call(&bulk[KEYS - 1].secret), OK, "the last bulk key after the reload").await;
}

// ---------------------------------------------------------------------------------------------
// 8. Reloads under continuous traffic
// ---------------------------------------------------------------------------------------------

/// What one client saw: how many requests, and every one that was not a 200 from upstream.
#[derive(Default)]
struct ClientLog {
    probes: Vec<String>,
    failures: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_continuous_traffic_never_fail_a_stable_key() {
    const CHANGES: usize = 32;
    const CLIENTS: usize = 4;
    const TRAFFIC_LIMIT: Duration = Duration::from_secs(20);
    const MAX_REQUESTS_PER_CLIENT: usize = 50_000;

    let stable = key("stable");
    let others: Vec<Key> = (0..CHANGES).map(|i| key(&format!("other{i:02}"))).collect();
    let t = Fixture::plain(std::slice::from_ref(&stable)).await;
    check(t.with(&stable)(), OK, "before any change").await;

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (call, stop) = (t.with(&stable), Arc::clone(&stop));
            tokio::spawn(async move {
                let started = Instant::now();
                let mut log = ClientLog::default();
                while !stop.load(Ordering::Relaxed)
                    && started.elapsed() < TRAFFIC_LIMIT
                    && log.probes.len() < MAX_REQUESTS_PER_CLIENT
                {
                    match call().try_send().await {
                        Ok(exchange) if OK.matches(&exchange) => log.probes.push(exchange.probe),
                        Ok(exchange) => log.failures.push(exchange.to_string()),
                        Err(error) => log.failures.push(error),
                    }
                }
                log
            })
        })
        .collect();

    let mut latencies = Vec::with_capacity(CHANGES);
    for (i, other) in others.iter().enumerate() {
        // Each change adds `other` and drops the previous one; the stable key stays.
        let text = keys_toml(&[stable.clone(), other.clone()]);
        let before = t.gateway.status();
        let (how, changed_at) = if i % 2 == 0 {
            let at = Instant::now();
            rename_over(&t.keys_path(), &text);
            ("rename over", at)
        } else {
            let at = Instant::now();
            write_in_place(&t.keys_path(), &text);
            ("in-place write", at)
        };
        let change = format!("change {i} ({how}) adding {}", other.id);
        let bumped = format!("{change}: generation bump");
        wait_for_status(&t.gateway, |s| s.generation > before.generation, changed_at, &bumped).await;
        let latency = t.wait_for(other, OK, changed_at, &change).await;
        if i > 0 {
            check(t.with(&others[i - 1])(), INVALID, &format!("{change}: the previous key is gone")).await;
        }
        latencies.push(latency);
    }
    stop.store(true, Ordering::Relaxed);

    let mut total = 0;
    let mut failures = Vec::new();
    let mut probes = Vec::new();
    for client in clients {
        let log = client.await.expect("client task");
        total += log.probes.len() + log.failures.len();
        failures.extend(log.failures);
        probes.extend(log.probes);
    }
    let status = t.gateway.status();
    let slowest = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "[traffic] {total} requests by {CLIENTS} clients over {CHANGES} reloads; slowest reload seen after {}; {status:?}",
        ms(slowest)
    );
    assert!(
        failures.is_empty(),
        "{} of {total} requests with the stable key did not get a 200 from upstream; first ones:\n{}",
        failures.len(),
        failures.iter().take(3).cloned().collect::<Vec<_>>().join("\n---\n")
    );
    assert!(probes.len() >= CLIENTS, "the clients sent almost nothing: {}", probes.len());
    let upstream_saw: HashSet<String> = t
        .upstream
        .requests()
        .iter()
        .filter_map(|r| r.header(support::PROBE_HEADER).map(str::to_owned))
        .collect();
    let missing: Vec<&String> = probes.iter().filter(|p| !upstream_saw.contains(*p)).collect();
    assert!(
        missing.is_empty(),
        "{} answered requests never reached the upstream: {missing:?}",
        missing.len()
    );
    assert_eq!(status.failures, 0, "no reload should have failed: {status:?}");
}

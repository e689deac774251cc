//! Hot reload: file events (and SIGHUP) → debounce → [`config::load`] off the request path →
//! atomic swap. An invalid configuration leaves the running snapshot in place.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, Snapshot};
use crate::proxy::Gateway;

/// After an event, wait for this much quiet before reading: editors and `keygate keys` write in
/// bursts (temp file, rename, chmod), and a burst should cost one reload, not five.
const QUIET: Duration = Duration::from_millis(75);
/// ... but never wait longer than this after the first event of a burst, so a file that is
/// rewritten non-stop is still picked up well within a second.
const MAX_DELAY: Duration = Duration::from_millis(400);

/// The outcome of reloads so far, for `/status`, metrics and tests.
#[derive(Debug)]
pub struct ReloadStatus {
    inner: Mutex<StatusInner>,
}

#[derive(Debug, Default, Clone)]
struct StatusInner {
    generation: u64,
    successes: u64,
    failures: u64,
    last_error: Option<String>,
}

/// A copy of the reload status at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusView {
    pub generation: u64,
    pub successes: u64,
    pub failures: u64,
    pub last_error: Option<String>,
}

impl Default for ReloadStatus {
    fn default() -> Self {
        Self { inner: Mutex::new(StatusInner { generation: 1, ..StatusInner::default() }) }
    }
}

impl ReloadStatus {
    /// Generation 1 is the configuration loaded at start.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn view(&self) -> StatusView {
        let inner = self.inner.lock().map(|g| g.clone()).unwrap_or_default();
        StatusView {
            generation: inner.generation,
            successes: inner.successes,
            failures: inner.failures,
            last_error: inner.last_error,
        }
    }

    fn record(&self, result: Result<(), String>) {
        // A poisoned lock only means another thread panicked mid-update of plain counters.
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(()) => {
                inner.generation += 1;
                inner.successes += 1;
                inner.last_error = None;
            }
            Err(error) => {
                inner.failures += 1;
                inner.last_error = Some(error);
            }
        }
    }
}

/// What a reload did when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// A new snapshot is in force.
    Applied,
    /// The files kept changing; nothing was read into force. Try again shortly.
    Unsettled,
}

/// How long the files must stay unchanged before and while they are read: a writer pausing
/// mid-write for less than this is never read half-way.
const SETTLE: Duration = Duration::from_millis(20);
/// How long to wait for the files to settle before giving the round up.
const SETTLE_BUDGET: Duration = Duration::from_millis(1500);

/// Whether a reload is one of the attempts `keygate_config_reloads_total` and `/status` count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// A file event or SIGHUP.
    Counted,
    /// keygate's own write through the key API, put in force before its answer; the file
    /// watcher sees the same write and counts it, once.
    Uncounted,
}

/// Loads the configuration again from the running snapshot's path and swaps it in if valid.
/// Blocking: call it from a blocking thread.
pub fn reload_now(gateway: &Gateway) -> Result<Reloaded, config::ConfigErrors> {
    reload(gateway, Attempt::Counted)
}

/// [`reload_now`], counted as `attempt` says.
pub fn reload(gateway: &Gateway, attempt: Attempt) -> Result<Reloaded, config::ConfigErrors> {
    let current = gateway.snapshot();
    let started = Instant::now();
    // Half a key file can be valid TOML that merely lacks keys, so a file must be at rest
    // (size, mtime and inode unchanged) for SETTLE before it is read and until the read ends.
    let result = loop {
        if started.elapsed() > SETTLE_BUDGET {
            tracing::debug!("configuration files still changing; reload postponed");
            return Ok(Reloaded::Unsettled);
        }
        let before = fingerprint(&current.config_path, &current.keys_path);
        std::thread::sleep(SETTLE);
        if fingerprint(&current.config_path, &current.keys_path) != before {
            continue;
        }
        let result = config::load(&current.config_path);
        let keys_path = result.as_ref().map_or(&current.keys_path, |new| &new.keys_path);
        // A key file moved to a new path (keys_file edited) has no earlier fingerprint.
        if *keys_path != current.keys_path || before == fingerprint(&current.config_path, keys_path) {
            break result;
        }
    };
    let result = result
        .and_then(|new| refuse_truncated(&current, new))
        .and_then(|new| refuse_tls_off(&current, new))
        .and_then(|new| refuse_store_change(&current, new));
    match result {
        Ok(snapshot) => {
            warn_about_restart(&current, &snapshot);
            let summary = snapshot.summary(SystemTime::now());
            gateway.replace(snapshot);
            if attempt == Attempt::Counted {
                gateway.reload_status().record(Ok(()));
            }
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "configuration reloaded: {summary}"
            );
            Ok(Reloaded::Applied)
        }
        Err(errors) => {
            for error in &errors.0 {
                tracing::error!("reload failed, keeping the running configuration: {error}");
            }
            if attempt == Attempt::Counted {
                gateway.reload_status().record(Err(errors.to_string()));
            }
            Err(errors)
        }
    }
}

/// An empty key file where keys were is far more likely a writer caught between truncate and
/// write than an operator revoking everything at once; refuse it rather than reject every key.
/// A file with any content (`# no keys`) removes all keys deliberately.
fn refuse_truncated(current: &Snapshot, new: Snapshot) -> Result<Snapshot, config::ConfigErrors> {
    let empty = std::fs::metadata(&new.keys_path).is_ok_and(|m| m.len() == 0);
    if empty && new.keys.is_empty() && !current.keys.is_empty() {
        let message = "the key file is empty (a write in progress?); keeping the running keys. \
                       Write a comment such as '# no keys' to remove every key on purpose";
        return Err(config::ConfigError::whole_file(&new.keys_path, message).into());
    }
    Ok(new)
}

/// The listener was started with TLS and will keep speaking it; a snapshot without a
/// certificate would fail every new handshake, so it is refused until a restart.
fn refuse_tls_off(current: &Snapshot, new: Snapshot) -> Result<Snapshot, config::ConfigErrors> {
    if current.tls.is_some() && new.tls.is_none() {
        let message = "tls_cert and tls_key were removed: turning TLS off needs a restart";
        return Err(config::ConfigError::whole_file(&new.config_path, message).into());
    }
    Ok(new)
}

/// The key store is followed (Redis) or watched (the file) from the start; switching between
/// them while running would leave the table with nobody keeping it current.
fn refuse_store_change(current: &Snapshot, new: Snapshot) -> Result<Snapshot, config::ConfigErrors> {
    if current.key_source.kind() != new.key_source.kind() {
        let message = format!(
            "[auth] store changed from {:?} to {:?}: that needs a restart",
            current.key_source.kind(),
            new.key_source.kind()
        );
        return Err(config::ConfigError::whole_file(&new.config_path, message).into());
    }
    Ok(new)
}

/// What identifies a file's content cheaply: size, modification time, inode (following links).
type Fingerprint = [Option<(u64, Option<SystemTime>, u64)>; 2];

fn fingerprint(config: &Path, keys: &Path) -> Fingerprint {
    let stat = |path: &Path| {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some((meta.len(), meta.modified().ok(), inode))
    };
    [stat(config), stat(keys)]
}

fn warn_about_restart(old: &Snapshot, new: &Snapshot) {
    if old.server.listen != new.server.listen {
        tracing::warn!(
            running = %old.server.listen,
            configured = %new.server.listen,
            "listen address changed: it takes effect only after a restart"
        );
    }
    if old.tls.is_none() && new.tls.is_some() {
        tracing::warn!("turning TLS on takes effect only after a restart; certificates reload live");
    }
    if old.admin.as_ref().map(|a| a.listen) != new.admin.as_ref().map(|a| a.listen) {
        tracing::warn!("admin listen address changed: it takes effect only after a restart");
    }
    if old.store.describe() != new.store.describe() {
        tracing::warn!(
            running = %old.store.describe(),
            configured = %new.store.describe(),
            "[state] or [cluster] changed: where counts are kept changes only after a restart"
        );
    }
}

/// The files a snapshot depends on, and how to recognise events about them.
#[derive(Debug, PartialEq, Eq)]
struct WatchSet {
    dirs: BTreeSet<PathBuf>,
    names: BTreeSet<OsString>,
}

impl WatchSet {
    /// Folders, not files, are watched: editors and `mv` replace a file's inode, and Kubernetes
    /// swaps a `..data` symlink next to it. Both the path as configured and the file it
    /// resolves to (through symlinks) are covered.
    fn for_snapshot(snapshot: &Snapshot) -> Self {
        let mut set = Self { dirs: BTreeSet::new(), names: BTreeSet::new() };
        let certs = snapshot.tls.iter().flat_map(|t| [&t.cert_path, &t.key_path]);
        for path in [&snapshot.config_path, &snapshot.keys_path].into_iter().chain(certs) {
            set.add(path);
            if let Ok(real) = std::fs::canonicalize(path) {
                set.add(&real);
            }
        }
        set
    }

    fn add(&mut self, path: &Path) {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        self.dirs.insert(dir);
        if let Some(name) = path.file_name() {
            self.names.insert(name.to_os_string());
        }
    }

    fn concerns(&self, event: &notify::Event) -> bool {
        // Reading the files ourselves produces access events: reacting to them would loop.
        if matches!(event.kind, notify::EventKind::Access(_)) {
            return false;
        }
        event.paths.iter().any(|p| {
            p.file_name().is_some_and(|name| {
                // `..data`, `..2026_11_22_…`: the Kubernetes atomic-writer's swap.
                self.names.contains(name) || name.to_string_lossy().starts_with("..")
            })
        })
    }
}

/// Keeps the file watcher alive; dropping it stops watching.
pub struct ReloadHandle {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReloadHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts watching the gateway's files and listening for SIGHUP; reloads on either.
pub fn spawn(gateway: Arc<Gateway>) -> Result<ReloadHandle, notify::Error> {
    let (tx, rx) = mpsc::unbounded_channel::<notify::Event>();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) => {
            let _ = tx.send(event);
        }
        Err(error) => tracing::warn!(%error, "file watch error"),
    })?;
    let mut watching = Watching { watcher, set: None };
    watching.update(&gateway.snapshot());
    // Installed now, not inside the task, so a SIGHUP right after start-up is never fatal.
    let hangups = hangup_signals();
    let task = tokio::spawn(run(gateway, rx, watching, hangups));
    Ok(ReloadHandle { task })
}

struct Watching {
    watcher: RecommendedWatcher,
    set: Option<WatchSet>,
}

impl Watching {
    /// Watches the folders the snapshot's files live in now; called before every reload so a
    /// change made while loading is still seen.
    fn update(&mut self, snapshot: &Snapshot) {
        let set = WatchSet::for_snapshot(snapshot);
        if self.set.as_ref() == Some(&set) {
            return;
        }
        if let Some(old) = &self.set {
            for dir in old.dirs.difference(&set.dirs) {
                let _ = self.watcher.unwatch(dir);
            }
        }
        for dir in &set.dirs {
            if self.set.as_ref().is_some_and(|old| old.dirs.contains(dir)) {
                continue;
            }
            if let Err(error) = self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), %error, "cannot watch folder; use SIGHUP to reload");
            }
        }
        self.set = Some(set);
    }
}

async fn run(
    gateway: Arc<Gateway>,
    mut events: mpsc::UnboundedReceiver<notify::Event>,
    mut watching: Watching,
    mut hangups: Hangups,
) {
    loop {
        let triggered = tokio::select! {
            event = events.recv() => match event {
                Some(event) => watching.set.as_ref().is_some_and(|s| s.concerns(&event)),
                None => return,
            },
            () = next_hangup(&mut hangups) => {
                tracing::info!("SIGHUP: reloading");
                true
            }
        };
        if !triggered {
            continue;
        }
        reload_when_settled(&gateway, &mut events, &mut watching).await;
    }
}

/// Debounces, then reloads until a reload is applied or fails; an unsettled round (the files
/// kept changing) is retried without waiting for another event.
async fn reload_when_settled(
    gateway: &Arc<Gateway>,
    events: &mut mpsc::UnboundedReceiver<notify::Event>,
    watching: &mut Watching,
) {
    loop {
        debounce(events).await;
        // Re-watch first (a symlink may now resolve elsewhere), then load: any write after
        // this point produces a new event and another reload.
        watching.update(&gateway.snapshot());
        let reloading = Arc::clone(gateway);
        let outcome = tokio::task::spawn_blocking(move || reload_now(&reloading)).await;
        watching.update(&gateway.snapshot());
        if !matches!(outcome, Ok(Ok(Reloaded::Unsettled))) {
            return;
        }
    }
}

/// Waits until no event has arrived for [`QUIET`], or [`MAX_DELAY`] has passed.
async fn debounce(events: &mut mpsc::UnboundedReceiver<notify::Event>) {
    let deadline = tokio::time::Instant::now() + MAX_DELAY;
    loop {
        let quiet_until = (tokio::time::Instant::now() + QUIET).min(deadline);
        match tokio::time::timeout_at(quiet_until, events.recv()).await {
            Ok(Some(_)) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = Option<()>;

fn hangup_signals() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGHUP");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

async fn next_hangup(hangups: &mut Hangups) {
    #[cfg(unix)]
    if let Some(signal) = hangups
        && signal.recv().await.is_some()
    {
        return;
    }
    let _ = hangups;
    std::future::pending::<()>().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(keys: &str) -> (tempfile::TempDir, Gateway) {
        let dir = tempfile::tempdir().unwrap();
        let config = "[server]\nlisten = \"127.0.0.1:0\"\n[auth]\nkeys_file = \"keys.toml\"\n";
        std::fs::write(dir.path().join("keygate.toml"), config).unwrap();
        std::fs::write(dir.path().join("keys.toml"), keys).unwrap();
        let gateway = Gateway::new(config::load(&dir.path().join("keygate.toml")).unwrap());
        (dir, gateway)
    }

    const ONE_KEY: &str = "[[keys]]\nid = \"a\"\nname = \"n\"\nhash = \"sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";

    #[test]
    fn a_truncated_key_file_keeps_the_running_keys_but_a_commented_one_empties_them() {
        let (dir, gateway) = setup(ONE_KEY);
        std::fs::write(dir.path().join("keys.toml"), "").unwrap();
        let error = reload_now(&gateway).unwrap_err().to_string();
        assert!(error.contains("empty"), "{error}");
        assert_eq!(gateway.snapshot().keys.len(), 1);
        let status = gateway.reload_status().view();
        assert_eq!((status.generation, status.failures), (1, 1));

        std::fs::write(dir.path().join("keys.toml"), "# no keys\n").unwrap();
        reload_now(&gateway).unwrap();
        assert_eq!(gateway.snapshot().keys.len(), 0);
        let status = gateway.reload_status().view();
        assert_eq!((status.generation, status.successes, status.last_error), (2, 1, None));
    }

    #[test]
    fn invalid_files_keep_the_snapshot_and_record_the_error() {
        let (dir, gateway) = setup(ONE_KEY);
        std::fs::write(dir.path().join("keys.toml"), format!("{ONE_KEY}oops\n")).unwrap();
        assert!(reload_now(&gateway).is_err());
        assert_eq!(gateway.snapshot().keys.len(), 1);
        let error = gateway.reload_status().view().last_error.unwrap();
        assert!(error.contains("keys.toml:5:"), "{error}");
    }

    #[test]
    fn events_are_recognised_by_file_name_or_kubernetes_prefix() {
        let (dir, gateway) = setup(ONE_KEY);
        let set = WatchSet::for_snapshot(&gateway.snapshot());
        let event = |kind, name: &str| notify::Event::new(kind).add_path(dir.path().join(name));
        let modify = notify::EventKind::Modify(notify::event::ModifyKind::Any);
        assert!(set.concerns(&event(modify, "keys.toml")));
        assert!(set.concerns(&event(modify, "..data")));
        assert!(!set.concerns(&event(modify, "other.toml")));
        let access = notify::EventKind::Access(notify::event::AccessKind::Any);
        assert!(!set.concerns(&event(access, "keys.toml")), "our own reads must not trigger reloads");
    }
}

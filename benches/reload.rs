//! Hot reload at scale, measured on the real release binary: start-up time, reload time and
//! memory at 10k, 100k and 1M keys, and how long a key file change takes to reach requests.
//!
//! `cargo bench --bench reload`               10k, 100k and 1M keys; 50 file changes
//! `cargo bench --bench reload -- --quick`    10k and 100k keys; 10 file changes
//!
//! Everything runs in a temporary folder and on 127.0.0.1 only: a tiny upstream thread, one
//! `keygate serve` child per key count (killed on drop), and a raw keep-alive HTTP/1.1 client.
//! Every wait is bounded by a deadline, every loop by a count.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// Key counts of the full run and of `--quick`.
const FULL_SIZES: &[usize] = &[10_000, 100_000, 1_000_000];
const QUICK_SIZES: &[usize] = &[10_000, 100_000];
/// File changes for the write→effect measurement.
const FULL_CHANGES: usize = 50;
const QUICK_CHANGES: usize = 10;
/// SIGHUP reloads per key count; the median is reported.
const RELOADS: usize = 3;

/// How often the client asks whether the new key works yet.
const POLL_EVERY: Duration = Duration::from_millis(2);
/// A change not in effect this long after the write counts as a miss (the spec promises 1 s).
const EFFECT_DEADLINE: Duration = Duration::from_secs(3);
/// After a change took effect: how long to keep reading the log, to count the reloads (and
/// failed reloads) that one change caused. Longer than keygate's debounce (75 ms quiet,
/// 400 ms at most), so the next change never merges with this one.
const SETTLE: Duration = Duration::from_millis(500);
/// Generous bounds for a million keys on a slow machine; exceeding one is a failure.
const START_DEADLINE: Duration = Duration::from_secs(180);
const RELOAD_DEADLINE: Duration = Duration::from_secs(120);
/// Any single exchange with the gateway or the upstream.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

fn main() {
    // Cargo passes `--bench` to harness = false benches; anything but `--quick` is ignored.
    let quick = std::env::args().any(|a| a == "--quick");
    let (sizes, changes) = if quick { (QUICK_SIZES, QUICK_CHANGES) } else { (FULL_SIZES, FULL_CHANGES) };
    let binary = Path::new(env!("CARGO_BIN_EXE_keygate"));
    println!("keygate reload benchmark{}: {}", if quick { " (--quick)" } else { "" }, binary.display());
    println!("machine: {}; load average {}", machine(), load_average());

    let upstream = Upstream::start();
    let mut rows = Vec::new();
    let mut effect = None;
    let mut notes = Vec::new();
    for &count in sizes {
        let dir = tempfile::tempdir().expect("cannot create a temporary folder");
        let started = Instant::now();
        let file_bytes = write_keys_file(&dir.path().join("keys.toml"), count);
        write_config(dir.path(), upstream.addr);
        eprintln!("[{count} keys] key file written ({} MiB) in {:?}", file_bytes >> 20, started.elapsed());

        let mut gateway = Gateway::start(binary, dir.path());
        let row = measure_size(&mut gateway, count, file_bytes);
        eprintln!("[{count} keys] start {:?}, reload {:?}", row.startup, row.reload_signal);
        rows.push(row);
        // The write→effect runs on the smallest gateway: it measures the reload path (events,
        // debounce, swap), and a small file keeps the load itself from dominating.
        if effect.is_none() {
            effect = Some(write_to_effect(&mut gateway, dir.path(), count, changes));
        }
        notes.extend(gateway.noteworthy.iter().map(|line| format!("[{count} keys] {line}")));
        // Dropping the gateway kills it before its folder goes away.
    }

    print_table(&rows);
    println!("load average at the end: {} (other work on the machine skews the timings)", load_average());
    if let Some(effect) = effect {
        effect.print();
    }
    if !notes.is_empty() {
        println!("warnings and errors keygate logged:");
        for note in notes.iter().take(20) {
            println!("  {note}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

fn write_config(dir: &Path, upstream: SocketAddr) {
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n\n[auth]\nkeys_file = \"keys.toml\"\n\n\
         [[routes]]\nprefix = \"/\"\nupstream = \"http://{upstream}\"\n"
    );
    fs::write(dir.join("keygate.toml"), config).expect("cannot write keygate.toml");
}

/// The key text of base key `i` (ids from 1).
fn base_key(i: usize) -> String {
    format!("bench-key-{i}")
}

/// The key text of the key that change `c` adds; it never collides with a base key.
fn added_key(c: usize) -> String {
    format!("bench-added-key-{c}")
}

/// `sha256:<64 lower-case hex>`, formatted by hand: `write!` per byte is slow at a million keys.
fn hash_field(key: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for byte in digest.iter() {
        out.push(HEX[usize::from(byte >> 4)] as char);
        out.push(HEX[usize::from(byte & 0xf)] as char);
    }
    out
}

/// One entry in the plain form (one `field = value` a line) that keygate's fast reader takes.
fn write_entry(out: &mut impl Write, id: &str, key: &str) -> io::Result<()> {
    let tail = &key[key.len().saturating_sub(6)..];
    write!(
        out,
        "[[keys]]\nid = \"{id}\"\nname = \"customer-{id}\"\nhash = \"{}\"\ntail = \"{tail}\"\n\
         scopes = [\"read\", \"write\"]\ncreated_at = 2026-11-22T10:00:00Z\nexpires_at = 2036-11-22T10:00:00Z\n\n",
        hash_field(key)
    )
}

fn write_base_entries(out: &mut impl Write, count: usize) -> io::Result<()> {
    for i in 1..=count {
        write_entry(out, &format!("k{i:07}"), &base_key(i))?;
    }
    Ok(())
}

/// Writes `count` base keys; returns the file's size in bytes.
fn write_keys_file(path: &Path, count: usize) -> u64 {
    let file = File::create(path).expect("cannot create keys.toml");
    let mut out = BufWriter::with_capacity(1 << 20, file);
    write_base_entries(&mut out, count).and_then(|()| out.flush()).expect("cannot write keys.toml");
    fs::metadata(path).expect("keys.toml vanished").len()
}

/// The whole key file after change `c`: the keys of changes `c`, `c - 1`, …, 1 first, then the
/// base keys. New keys go in front, so every change rewrites the file from its first byte
/// rather than appending to it.
fn changed_keys_file(base: &[u8], c: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(base.len() + c * 256);
    for added in (1..=c).rev() {
        write_entry(&mut out, &format!("added{added:04}"), &added_key(added)).expect("writing to a Vec");
    }
    out.extend_from_slice(base);
    out
}

// ---------------------------------------------------------------------------------------------
// The gateway under test
// ---------------------------------------------------------------------------------------------

/// One line keygate wrote to stderr, stamped when the bench read it.
struct LogLine {
    at: Instant,
    text: String,
}

/// A running `keygate serve`; killed on drop.
struct Gateway {
    child: Child,
    logs: Receiver<LogLine>,
    addr: SocketAddr,
    /// Spawn → "listening on" logged.
    startup: Duration,
    /// The last lines seen, for error messages.
    recent: VecDeque<String>,
    /// WARN / ERROR lines, reported at the end.
    noteworthy: Vec<String>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn start(binary: &Path, dir: &Path) -> Self {
        let spawned = Instant::now();
        let mut child = Command::new(binary)
            .args(["serve", "-c", "keygate.toml"])
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("KEYGATE_LOG_FORMAT")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let logs = read_logs(child.stderr.take().expect("stderr is piped"));
        let mut gateway = Self {
            child,
            logs,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            startup: Duration::ZERO,
            recent: VecDeque::new(),
            noteworthy: Vec::new(),
        };
        let line = gateway.wait_for("listening on ", START_DEADLINE);
        gateway.startup = line.at - spawned;
        let addr = line.text.split("listening on ").nth(1).and_then(|rest| rest.split_whitespace().next());
        gateway.addr = addr
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in the line {:?}", line.text));
        gateway
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a log line containing `needle`; panics with the recent log if it does not come.
    fn wait_for(&mut self, needle: &str, limit: Duration) -> LogLine {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(line) => {
                    let found = line.text.contains(needle);
                    self.remember(&line.text);
                    if found {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => self.fail(&format!("no {needle:?} within {limit:?}")),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    self.fail(&format!("keygate exited ({status}) while waiting for {needle:?}"))
                }
            }
        }
    }

    /// Every line logged until `until`.
    fn lines_until(&mut self, until: Instant) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(line) = self.logs.recv_timeout(until.saturating_duration_since(Instant::now())) {
            self.remember(&line.text);
            lines.push(line.text);
        }
        lines
    }

    fn remember(&mut self, text: &str) {
        if (text.contains(" WARN ") || text.contains(" ERROR ")) && self.noteworthy.len() < 100 {
            self.noteworthy.push(text.to_string());
        }
        if self.recent.len() == 20 {
            self.recent.pop_front();
        }
        self.recent.push_back(text.to_string());
    }

    fn fail(&self, what: &str) -> ! {
        let recent: Vec<&str> = self.recent.iter().map(String::as_str).collect();
        panic!("{what}; keygate's last log lines:\n  {}", recent.join("\n  "))
    }

    /// SIGHUP through `kill`: the bench has no libc binding of its own.
    fn sighup(&self) {
        let status =
            Command::new("kill").args(["-HUP", &self.pid().to_string()]).status().expect("cannot run kill");
        assert!(status.success(), "kill -HUP {} failed: {status}", self.pid());
    }

    fn memory(&self) -> Memory {
        Memory::of(self.pid())
    }
}

/// Reads keygate's stderr on a thread until it closes (the child exited or was killed).
/// Access events are dropped here: the poller makes hundreds and none of them is needed.
fn read_logs(stderr: ChildStderr) -> Receiver<LogLine> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let at = Instant::now();
            let text = strip_ansi(&line);
            if text.contains("keygate::access") {
                continue;
            }
            if tx.send(LogLine { at, text }).is_err() {
                break;
            }
        }
    });
    rx
}

/// `NO_COLOR` should already keep colours out; this makes the parsing independent of it.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters… final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `elapsed_ms=<n>` from a "configuration reloaded" line.
fn elapsed_ms(line: &str) -> Option<u64> {
    let rest = line.split("elapsed_ms=").nth(1)?;
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

#[derive(Clone, Copy, Default)]
struct Memory {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> Self {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/status: {e}"));
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Self { rss_kib: field("VmRSS:"), hwm_kib: field("VmHWM:") }
    }
}

// ---------------------------------------------------------------------------------------------
// Start-up and reload at one key count
// ---------------------------------------------------------------------------------------------

/// One SIGHUP reload: signal → log line, the load as keygate logged it, and the RSS after it
/// (to tell memory that keeps growing from memory the allocator keeps after the first reload).
struct ReloadSample {
    signal_to_log: Duration,
    load_ms: u64,
    rss_kib: u64,
}

struct SizeRow {
    keys: usize,
    file_bytes: u64,
    startup: Duration,
    after_start: Memory,
    /// Medians over [`RELOADS`].
    reload_signal: Duration,
    reload_load_ms: u64,
    reload_samples: Vec<ReloadSample>,
    after_reloads: Memory,
}

fn measure_size(gateway: &mut Gateway, keys: usize, file_bytes: u64) -> SizeRow {
    let after_start = gateway.memory();
    check_key(gateway.addr, &base_key(keys), 200, "the last base key after start-up");
    let mut samples = Vec::with_capacity(RELOADS);
    for _ in 0..RELOADS {
        // Nothing else is going on: the log holds only what this reload writes.
        gateway.lines_until(Instant::now());
        let signalled = Instant::now();
        gateway.sighup();
        let line = gateway.wait_for("configuration reloaded", RELOAD_DEADLINE);
        let load = elapsed_ms(&line.text).unwrap_or_else(|| panic!("no elapsed_ms in {:?}", line.text));
        let rss_kib = gateway.memory().rss_kib;
        samples.push(ReloadSample { signal_to_log: line.at - signalled, load_ms: load, rss_kib });
    }
    check_key(gateway.addr, &base_key(keys), 200, "the last base key after the reloads");
    let after_reloads = gateway.memory();
    let reload_signal = median(samples.iter().map(|s| s.signal_to_log).collect());
    let mut loads: Vec<u64> = samples.iter().map(|s| s.load_ms).collect();
    loads.sort_unstable();
    SizeRow {
        keys,
        file_bytes,
        startup: gateway.startup,
        after_start,
        reload_signal,
        reload_load_ms: loads[loads.len() / 2],
        reload_samples: samples,
        after_reloads,
    }
}

fn check_key(addr: SocketAddr, key: &str, expected: u16, what: &str) {
    let status = Client::new(addr).get(key).unwrap_or_else(|e| panic!("{what}: request failed: {e}"));
    assert_eq!(status, expected, "{what}: expected {expected}, got {status}");
}

// ---------------------------------------------------------------------------------------------
// Write → effect
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum WriteKind {
    /// Write `keys.toml.tmp`, rename it over `keys.toml` (editors, `keygate keys`).
    Rename,
    /// Truncate `keys.toml` and write the whole content with one `write_all`.
    InPlace,
}

#[derive(Default)]
struct EffectStats {
    base_keys: usize,
    rename: Vec<Duration>,
    in_place: Vec<Duration>,
    misses: usize,
    /// Reloads logged (succeeded / failed) while changes were made.
    reloads: usize,
    failed_reloads: usize,
    /// Loads logged by file-triggered reloads, in ms.
    loads_ms: Vec<u64>,
    /// Answers other than 401 (not yet) or 200 (in effect) while polling.
    unexpected: Vec<String>,
    /// A base key refused after a change: a reload that lost keys.
    lost_keys: usize,
}

/// `changes` times: add a key with a whole new file, and poll until the gateway accepts it.
fn write_to_effect(gateway: &mut Gateway, dir: &Path, base_keys: usize, changes: usize) -> EffectStats {
    let mut base = Vec::new();
    write_base_entries(&mut base, base_keys).expect("writing to a Vec");
    let keys_path = dir.join("keys.toml");
    let tmp_path = dir.join("keys.toml.tmp");
    let mut client = Client::new(gateway.addr);
    let mut stats = EffectStats { base_keys, ..EffectStats::default() };
    for c in 1..=changes {
        let key = added_key(c);
        let before = client.get(&key).expect("request before the change failed");
        assert_eq!(before, 401, "change {c}: the new key works before it was written");
        let content = changed_keys_file(&base, c);
        let kind = if c % 2 == 1 { WriteKind::Rename } else { WriteKind::InPlace };
        gateway.lines_until(Instant::now());

        let written_at = match kind {
            WriteKind::Rename => {
                fs::write(&tmp_path, &content).expect("cannot write keys.toml.tmp");
                let at = Instant::now();
                fs::rename(&tmp_path, &keys_path).expect("cannot rename over keys.toml");
                at
            }
            WriteKind::InPlace => {
                let at = Instant::now();
                let mut file = File::create(&keys_path).expect("cannot truncate keys.toml");
                file.write_all(&content).expect("cannot rewrite keys.toml");
                at
            }
        };
        match poll_until_accepted(&mut client, &key, written_at, &mut stats.unexpected) {
            Some(latency) if kind == WriteKind::Rename => stats.rename.push(latency),
            Some(latency) => stats.in_place.push(latency),
            None => stats.misses += 1,
        }

        // Count what this change made keygate do, then check nothing was lost with it.
        for line in gateway.lines_until(Instant::now() + SETTLE) {
            if line.contains("configuration reloaded") {
                stats.reloads += 1;
                stats.loads_ms.extend(elapsed_ms(&line));
            } else if line.contains("reload failed") {
                stats.failed_reloads += 1;
            }
        }
        if client.get(&base_key(base_keys)).ok() != Some(200) {
            stats.lost_keys += 1;
        }
    }
    stats
}

/// Asks every [`POLL_EVERY`] until `key` is accepted; the latency from `written_at`, or `None`
/// past [`EFFECT_DEADLINE`].
fn poll_until_accepted(
    client: &mut Client,
    key: &str,
    written_at: Instant,
    unexpected: &mut Vec<String>,
) -> Option<Duration> {
    let deadline = written_at + EFFECT_DEADLINE;
    let max_polls = EFFECT_DEADLINE.as_millis() / POLL_EVERY.as_millis() + 10;
    let mut next = Instant::now();
    for _ in 0..max_polls {
        match client.get(key) {
            Ok(200) => return Some(written_at.elapsed()),
            Ok(401) => {}
            Ok(status) => unexpected.push(format!("status {status}")),
            Err(error) => unexpected.push(format!("request error: {error}")),
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        next += POLL_EVERY;
        if let Some(wait) = next.checked_duration_since(now) {
            thread::sleep(wait);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// A keep-alive HTTP/1.1 client on a raw TcpStream
// ---------------------------------------------------------------------------------------------

struct Client {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    fn new(addr: SocketAddr) -> Self {
        Self { addr, conn: None }
    }

    /// `GET /bench` with the key in `x-api-key`; the status code. One retry on a fresh
    /// connection, in case the gateway closed the idle one.
    fn get(&mut self, key: &str) -> io::Result<u16> {
        match self.try_get(key) {
            Ok(status) => Ok(status),
            Err(_) => {
                self.conn = None;
                self.try_get(key)
            }
        }
    }

    fn try_get(&mut self, key: &str) -> io::Result<u16> {
        if self.conn.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            self.conn = Some(BufReader::new(stream));
        }
        let conn = self.conn.as_mut().expect("connected above");
        let request = format!("GET /bench HTTP/1.1\r\nhost: {}\r\nx-api-key: {key}\r\n\r\n", self.addr);
        conn.get_mut().write_all(request.as_bytes())?;
        let (status, keep_alive) = read_response(conn)?;
        if !keep_alive {
            self.conn = None;
        }
        Ok(status)
    }
}

/// Reads one response (status line, headers, body by content-length or chunked); returns the
/// status and whether the connection stays open.
fn read_response(conn: &mut BufReader<TcpStream>) -> io::Result<(u16, bool)> {
    let status_line = read_line(conn)?;
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let (mut length, mut chunked, mut keep_alive) = (0usize, false, true);
    for _ in 0..200 {
        let line = read_line(conn)?;
        if line.is_empty() {
            if chunked {
                skip_chunked(conn)?;
            } else {
                io::copy(&mut conn.by_ref().take(length as u64), &mut io::sink())?;
            }
            return Ok((status, keep_alive));
        }
        let Some((name, value)) = line.split_once(':') else { continue };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_ascii_lowercase());
        match name.as_str() {
            "content-length" => length = value.parse().map_err(|_| invalid(format!("bad length {value}")))?,
            "transfer-encoding" => chunked = value.contains("chunked"),
            "connection" => keep_alive = !value.contains("close"),
            _ => {}
        }
    }
    Err(invalid("more than 200 header lines".into()))
}

fn skip_chunked(conn: &mut BufReader<TcpStream>) -> io::Result<()> {
    for _ in 0..10_000 {
        let size_line = read_line(conn)?;
        let size_text = size_line.split(';').next().unwrap_or("").trim();
        let size =
            usize::from_str_radix(size_text, 16).map_err(|_| invalid(format!("bad chunk {size_line:?}")))?;
        if size == 0 {
            // Trailers, up to the blank line.
            for _ in 0..200 {
                if read_line(conn)?.is_empty() {
                    return Ok(());
                }
            }
            return Err(invalid("endless trailers".into()));
        }
        io::copy(&mut conn.by_ref().take(size as u64 + 2), &mut io::sink())?;
    }
    Err(invalid("more than 10000 chunks".into()))
}

/// One CRLF-terminated line without its terminator; EOF is an error.
fn read_line(conn: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    if conn.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

// ---------------------------------------------------------------------------------------------
// The upstream: answers every request with 200 "ok"
// ---------------------------------------------------------------------------------------------

struct Upstream {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(conn) = conn {
                    thread::spawn(move || serve_upstream(conn));
                }
            }
        });
        Self { addr, stop }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Keep-alive: answers request after request until the peer closes or idles out.
fn serve_upstream(conn: TcpStream) {
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    let _ = conn.set_read_timeout(Some(Duration::from_secs(60)));
    let _ = conn.set_nodelay(true);
    let Ok(mut writer) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    for _ in 0..1_000_000 {
        let mut length = 0u64;
        loop {
            let Ok(line) = read_line(&mut reader) else { return };
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        if io::copy(&mut reader.by_ref().take(length), &mut io::sink()).is_err()
            || writer.write_all(RESPONSE).is_err()
        {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------------------------

fn machine() -> String {
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|v| v.1.trim()))
        .unwrap_or("unknown CPU");
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0.0, |kib| kib as f64 / (1024.0 * 1024.0));
    format!("{cores} cores (nproc), {model}, {memory_gib:.1} GiB memory")
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    let loadavg = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    loadavg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

/// Nearest-rank percentile of sorted `values` (with 50 values, p99 is the maximum).
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn print_table(rows: &[SizeRow]) {
    println!();
    println!(
        "{:>9}  {:>10}  {:>11}  {:>15}  {:>18}  {:>12}  {:>17}  {:>10}",
        "keys",
        "file",
        "startup",
        "rss_after_start",
        "reload(signal→log)",
        "reload(load)",
        "rss_after_reloads",
        "peak_rss"
    );
    for row in rows {
        println!(
            "{:>9}  {:>10}  {:>11}  {:>15}  {:>18}  {:>12}  {:>17}  {:>10}",
            row.keys,
            mib(row.file_bytes / 1024),
            ms(row.startup),
            mib(row.after_start.rss_kib),
            ms(row.reload_signal),
            format!("{} ms", row.reload_load_ms),
            mib(row.after_reloads.rss_kib),
            mib(row.after_reloads.hwm_kib),
        );
    }
    println!(
        "(reload: median of {RELOADS} SIGHUPs; signal→log includes forking `kill` and keygate's debounce)"
    );
    for row in rows {
        let mut samples = String::new();
        for sample in &row.reload_samples {
            let (signal, load, rss) = (ms(sample.signal_to_log), sample.load_ms, mib(sample.rss_kib));
            let _ = write!(samples, "  {signal} / {load} ms / {rss};");
        }
        println!(
            "  {:>9} keys: peak RSS after start {}; each reload signal→log / load / RSS after:{samples}",
            row.keys,
            mib(row.after_start.hwm_kib)
        );
    }
}

impl EffectStats {
    fn print(&self) {
        let mut all: Vec<Duration> = self.rename.iter().chain(&self.in_place).copied().collect();
        all.sort_unstable();
        let changes = all.len() + self.misses;
        println!();
        if all.is_empty() {
            println!(
                "write→effect over {changes} changes: every change missed the {EFFECT_DEADLINE:?} deadline"
            );
        } else {
            println!(
                "write→effect over {changes} changes ({} keys): median {}, p99 {} (nearest rank), max {}, misses {}",
                self.base_keys,
                ms(percentile(&all, 50.0)),
                ms(percentile(&all, 99.0)),
                ms(*all.last().expect("not empty")),
                self.misses
            );
        }
        for (name, samples) in [("rename", &self.rename), ("in-place", &self.in_place)] {
            let mut sorted = samples.clone();
            sorted.sort_unstable();
            if let (Some(min), Some(max)) = (sorted.first(), sorted.last()) {
                println!(
                    "  {name:>8}: {} changes, min {}, median {}, max {}",
                    sorted.len(),
                    ms(*min),
                    ms(percentile(&sorted, 50.0)),
                    ms(*max)
                );
            }
        }
        let mut loads = self.loads_ms.clone();
        loads.sort_unstable();
        let load = loads.get(loads.len() / 2).map_or("-".into(), |l| format!("{l} ms"));
        println!(
            "  reloads logged: {} ok, {} failed (median load {load}); base keys lost after a change: {}",
            self.reloads, self.failed_reloads, self.lost_keys
        );
        if !self.unexpected.is_empty() {
            println!(
                "  unexpected answers while polling ({}): {:?}",
                self.unexpected.len(),
                &self.unexpected[..5.min(self.unexpected.len())]
            );
        }
    }
}

//! Counters shared by every replica through one Redis (`[cluster]`): a token bucket and a quota
//! count per subject, both decided by one Lua script in one round trip; usage written in
//! batches; replicas registered with a heartbeat.
//!
//! Redis is never in a request's way. [`Mode`] is the store's state as a type: `Shared` while
//! Redis answers, `Fallback` from the first failed or slow call until a probe finds it again.
//! In `Fallback` a request is decided in this process — a bucket of `rate / replicas`, the
//! quota as Redis last reported it plus what this process counted since — and those local
//! counts are added to Redis when it is back. The switch happens in [`Shared::fall_back`] and
//! [`Shared::recover`] only, each logged once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use dashmap::DashMap;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::memory::Memory;
use super::usage::Cell;
use super::{
    Admission, Ask, ClusterSettings, ClusterStatus, Counters, Pending, Refusal, StoreStatus, Usage, Verdict,
};
use crate::keys::RateLimit;
use crate::quota::{Period, Window};
use crate::ratelimit::Bucket;

/// Decides a batch of N requests of one subject as if they came one after the other: each
/// takes a token and counts against the quota, both or neither, on Redis's own clock (so
/// replicas with skewed clocks share one bucket). The bucket is one string `"<tokens> <ms>"`,
/// the fewest commands per call (the script's cost is what limited requests pay). KEYS:
/// bucket, quota count. ARGV: capacity (0: no rate limit), refill period in ms, quota limit
/// (0: no quota), when the quota count expires, N. Returns {admitted, why the rest are
/// refused (1: quota, 0: rate limit), tokens left, quota used}: the first `admitted` of the N
/// pass. The rate limit is judged first, so a request that finds no token is rate limited
/// even when the quota is used up too; one that finds a token the quota refuses spends none.
const ADMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local capacity = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local n = tonumber(ARGV[5])
local tokens = 0
local whole = n
if capacity > 0 then
  tokens = capacity
  local b = redis.call('GET', KEYS[1])
  if b then
    local left, at = string.match(b, '^(%S+) (%d+)$')
    left = tonumber(left)
    at = tonumber(at)
    if left and at then
      tokens = left
      if now > at then tokens = math.min(capacity, tokens + (now - at) * capacity / period) end
    end
  end
  whole = math.max(0, math.floor(tokens))
end
local admitted = math.min(n, whole)
local used = 0
local limit = tonumber(ARGV[3])
if limit > 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
  admitted = math.max(0, math.min(admitted, limit - used))
  if admitted > 0 then
    used = redis.call('INCRBY', KEYS[2], admitted)
    if used == admitted then redis.call('EXPIREAT', KEYS[2], ARGV[4]) end
  end
end
local rest_over_quota = 0
if whole > admitted then rest_over_quota = 1 end
if capacity > 0 then
  tokens = tokens - admitted
  redis.call('SET', KEYS[1], tostring(tokens) .. ' ' .. now, 'PX', period * 2)
end
return {admitted, rest_over_quota, tostring(tokens), used}
";

/// Adds a batch of usage: for each key KEYS[i], ARGV holds (last used, period field, requests).
/// The last use only ever moves forward, whichever replica writes last; a new period's count
/// replaces the last one's.
const USAGE: &str = r"
for i, key in ipairs(KEYS) do
  local last = tonumber(ARGV[i * 3 - 2])
  local current = tonumber(redis.call('HGET', key, 'last') or '0')
  if last > current then redis.call('HSET', key, 'last', last) end
  local field = ARGV[i * 3 - 1]
  local n = tonumber(ARGV[i * 3])
  -- Only the current period's count is kept: a key used for years holds one field, not one a day.
  local previous = redis.call('HGET', key, 'period')
  if previous and previous ~= field then redis.call('HDEL', key, previous) end
  redis.call('HSET', key, 'period', field)
  if n > 0 then redis.call('HINCRBY', key, field, n) end
  redis.call('EXPIRE', key, 34560000)
end
return 1
";

/// Registers this replica (ARGV[1]) for ARGV[2] seconds and counts those alive.
const HEARTBEAT: &str = r"
local now = tonumber(redis.call('TIME')[1])
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) * 4)
return redis.call('ZCARD', KEYS[1])
";

/// How long a replica counts as alive after its last heartbeat.
const REPLICA_TTL_SECS: u64 = 10;
/// How often the supervisor looks: probes Redis in an outage, writes usage and heartbeats.
const TICK: Duration = Duration::from_millis(500);
/// Usage and heartbeats go out every this many ticks.
const WRITE_EVERY_TICKS: u32 = 2;
/// Keys per usage batch: one script call each.
const USAGE_BATCH: usize = 500;

/// The script call for one subject and its limits in the current quota period: requests
/// asking the same call queue in one [`Lane`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Call {
    bucket_key: Vec<u8>,
    quota_key: Vec<u8>,
    capacity: u32,
    period_ms: u64,
    limit: u64,
    expire_at: u64,
    subject: Box<[u8]>,
    window: Option<Window>,
}

/// Requests waiting for one call, and whether a driver is sending them.
#[derive(Default)]
struct Lane {
    queue: Mutex<LaneQueue>,
}

#[derive(Default)]
struct LaneQueue {
    running: bool,
    waiting: Vec<tokio::sync::oneshot::Sender<Answer>>,
}

/// What one script call decided for a batch.
#[derive(Debug, Clone, Copy)]
struct Batch {
    admitted: u64,
    /// Whether the requests after the admitted ones found a token but no quota left.
    rest_over_quota: bool,
    tokens: f64,
}

/// One request's share of a batch's decision.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Admitted {
        tokens_left: f64,
    },
    QuotaExceeded,
    RateLimited {
        tokens: f64,
    },
    /// Redis failed: the request is decided in this process.
    Undecided,
}

/// Which counts decide a request now.
enum Mode {
    /// Redis answers: every limited request asks it.
    Shared(ConnectionManager),
    /// Redis is out of reach (or not reached yet): decided here until a probe succeeds.
    Fallback,
}

pub struct Shared {
    settings: ClusterSettings,
    mode: ArcSwap<Mode>,
    /// The connection, kept through outages: it reconnects by itself.
    connection: Mutex<Option<ConnectionManager>>,
    /// Buckets and quota counts for the fallback, and this process's usage.
    local: Memory,
    /// Each subject's quota count as Redis last reported it.
    last_seen: DashMap<Box<[u8]>, (Window, u64)>,
    /// Requests waiting for Redis, by the call that decides them.
    lanes: DashMap<Call, Arc<Lane>>,
    /// This store, for the lane drivers it spawns.
    me: Weak<Self>,
    replicas: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    replica_id: String,
    admit: redis::Script,
    usage: redis::Script,
    heartbeat: redis::Script,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    /// Connects (bounded by a second or `timeout`, whichever is longer) and starts the
    /// supervisor. An unreachable Redis is not an error: the store starts in fallback.
    pub async fn start(settings: ClusterSettings) -> Arc<Self> {
        let mut id = [0u8; 8];
        // Without OS randomness the id is the pid: unique on this machine, enough for a count.
        let replica_id = match getrandom::fill(&mut id) {
            Ok(()) => id.iter().map(|b| format!("{b:02x}")).collect(),
            Err(_) => format!("pid{}", std::process::id()),
        };
        let shared = Arc::new_cyclic(|me| Self {
            settings,
            mode: ArcSwap::from_pointee(Mode::Fallback),
            connection: Mutex::new(None),
            local: Memory::default(),
            last_seen: DashMap::new(),
            lanes: DashMap::new(),
            me: me.clone(),
            replicas: AtomicU64::new(1),
            errors: AtomicU64::new(0),
            last_error: Mutex::new(Some("not connected yet".to_string())),
            replica_id,
            admit: redis::Script::new(ADMIT),
            usage: redis::Script::new(USAGE),
            heartbeat: redis::Script::new(HEARTBEAT),
        });
        if shared.probe().await {
            tracing::info!(redis = %shared.settings.display, "connected to Redis: counters are shared");
        } else {
            let error = lock(&shared.last_error).clone().unwrap_or_default();
            tracing::warn!(
                redis = %shared.settings.display, %error,
                "Redis is not reachable: limits and quotas are counted in this process until it is"
            );
        }
        tokio::spawn(supervise(Arc::downgrade(&shared)));
        shared
    }

    fn key(&self, parts: &[&[u8]]) -> Vec<u8> {
        let mut key = self.settings.namespace.as_bytes().to_vec();
        for part in parts {
            key.extend_from_slice(part);
        }
        key
    }

    /// One failed or slow call: counted always, and the first of an outage switches the mode
    /// and logs the one warning.
    fn fall_back(&self, seen: &Arc<Mode>, error: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(error.clone());
        let previous = self.mode.compare_and_swap(seen, Arc::new(Mode::Fallback));
        if Arc::ptr_eq(&previous, seen) && matches!(**seen, Mode::Shared(_)) {
            tracing::warn!(
                redis = %self.settings.display, %error,
                replicas = self.replicas.load(Ordering::Relaxed),
                "Redis failed: limits fall back to rate / replicas in this process and quotas are counted here until it is back"
            );
        }
    }

    /// Decides in this process: a bucket of `rate / replicas`, the quota on top of what Redis
    /// last reported for this period.
    fn decide_locally(&self, ask: &Ask<'_>) -> Verdict {
        let replicas = u32::try_from(self.replicas.load(Ordering::Relaxed).max(1)).unwrap_or(u32::MAX);
        let rate = ask.rate.map(|r| RateLimit { tokens: (r.tokens / replicas).max(1), period: r.period });
        let used_elsewhere = match ask.quota {
            Some(quota) => {
                let window = quota.period.window(ask.now);
                self.last_seen
                    .get(&*ask.subject.name())
                    .filter(|seen| seen.0 == window)
                    .map_or(0, |seen| seen.1)
            }
            None => 0,
        };
        self.local.decide(&Ask { rate, ..*ask }, used_elsewhere)
    }

    /// The script call that decides `ask`, as the lane it queues in.
    fn call_for(&self, ask: &Ask<'_>) -> Call {
        let name = ask.subject.name();
        let window = ask.quota.map(|q| q.period.window(ask.now));
        let start = window.map_or(0, |w| w.start).to_string();
        let (capacity, period_ms) = ask
            .rate
            .map_or((0, 1), |r| (r.tokens, u64::try_from(r.period.as_millis()).unwrap_or(u64::MAX).max(1)));
        // A count outlives its period by a day, so a replica with a slow clock still finds it.
        let (limit, expire_at) = match (ask.quota, window) {
            (Some(q), Some(w)) => (q.limit, w.end.saturating_add(86_400)),
            _ => (0, 0),
        };
        Call {
            bucket_key: self.key(&[b":{", &name, b"}:bucket"]),
            quota_key: self.key(&[b":{", &name, b"}:quota:", start.as_bytes()]),
            capacity,
            period_ms,
            limit,
            expire_at,
            subject: name,
            window,
        }
    }

    /// One script call for `n` requests waiting in one lane.
    async fn decide_batch(
        &self,
        mut connection: ConnectionManager,
        call: &Call,
        n: usize,
    ) -> Result<Batch, String> {
        let (admitted, rest_over_quota, tokens, used): (u64, u8, String, u64) = self
            .admit
            .key(&call.bucket_key)
            .key(&call.quota_key)
            .arg(call.capacity)
            .arg(call.period_ms)
            .arg(call.limit)
            .arg(call.expire_at)
            .arg(n)
            .invoke_async(&mut connection)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(window) = call.window {
            self.last_seen.insert(call.subject.clone(), (window, used));
        }
        Ok(Batch { admitted, rest_over_quota: rest_over_quota == 1, tokens: tokens.parse().unwrap_or(0.0) })
    }

    /// Sends a lane's waiting requests to Redis, one script call per batch, until none wait.
    /// A batch is the requests that arrived while the previous call was out: one round trip
    /// decides them all, so Redis and this process do one call's work per batch instead of
    /// per request, and the decisions are those of the requests taken one by one.
    async fn drive(self: Arc<Self>, call: Call, lane: Arc<Lane>) {
        loop {
            let waiting = {
                let mut queue = lock(&lane.queue);
                if queue.waiting.is_empty() {
                    queue.running = false;
                    return;
                }
                std::mem::take(&mut queue.waiting)
            };
            let mode = self.mode.load_full();
            let batch = match &*mode {
                Mode::Fallback => None,
                Mode::Shared(connection) => {
                    let asked = self.decide_batch(connection.clone(), &call, waiting.len());
                    match tokio::time::timeout(self.settings.timeout, asked).await {
                        Ok(Ok(batch)) => Some(batch),
                        Ok(Err(error)) => {
                            self.fall_back(&mode, error);
                            None
                        }
                        Err(_) => {
                            self.fall_back(&mode, format!("no answer within {:?}", self.settings.timeout));
                            None
                        }
                    }
                }
            };
            for (i, waiter) in (0u64..).zip(waiting) {
                let answer = match batch {
                    None => Answer::Undecided,
                    Some(b) if i < b.admitted => {
                        Answer::Admitted { tokens_left: b.tokens + (b.admitted - 1 - i) as f64 }
                    }
                    Some(b) if b.rest_over_quota => Answer::QuotaExceeded,
                    Some(b) => Answer::RateLimited { tokens: b.tokens },
                };
                // A request whose client left meanwhile has nobody listening: nothing to do.
                let _ = waiter.send(answer);
            }
        }
    }

    /// Asks Redis through the subject's lane: joins the batch being gathered, and starts the
    /// lane's driver when none runs.
    async fn ask_redis(&self, ask: &Ask<'_>) -> Verdict {
        let call = self.call_for(ask);
        let window = call.window;
        let existing = self.lanes.get(&call).map(|lane| Arc::clone(&lane));
        let lane = existing.unwrap_or_else(|| Arc::clone(&self.lanes.entry(call.clone()).or_default()));
        let (sender, answer) = tokio::sync::oneshot::channel();
        let start = {
            let mut queue = lock(&lane.queue);
            queue.waiting.push(sender);
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            match self.me.upgrade() {
                Some(me) => {
                    tokio::spawn(me.drive(call, lane));
                }
                // The store is being dropped with the gateway: nobody will ask Redis.
                None => return self.decide_locally(ask),
            }
        }
        match (answer.await, ask.rate) {
            (Ok(Answer::Admitted { tokens_left }), rate) => {
                Ok(rate.map(|rate| Bucket::holding(tokens_left, ask.instant).quota(rate)))
            }
            (Ok(Answer::RateLimited { tokens }), Some(rate)) => {
                Err(Refusal::RateLimited(Bucket::holding(tokens, ask.instant).exceeded(rate)))
            }
            (Ok(Answer::QuotaExceeded | Answer::RateLimited { .. }), _) => {
                Err(Refusal::QuotaExceeded { retry_after_secs: window.map_or(1, |w| w.secs_left(ask.now)) })
            }
            // Redis failed or the driver is gone (runtime shutting down): decided here.
            (Ok(Answer::Undecided) | Err(_), _) => self.decide_locally(ask),
        }
    }

    /// Whether Redis answers now; on the first answer after an outage, resumes shared counting.
    async fn probe(&self) -> bool {
        let timeout = self.settings.timeout.max(Duration::from_secs(1));
        let existing = lock(&self.connection).clone();
        let mut connection = match existing {
            Some(connection) => connection,
            None => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let connected = tokio::time::timeout(
                    timeout,
                    self.settings.client.get_connection_manager_with_config(config),
                )
                .await;
                match connected {
                    Ok(Ok(connection)) => {
                        *lock(&self.connection) = Some(connection.clone());
                        connection
                    }
                    Ok(Err(error)) => return self.probe_failed(error.to_string()),
                    Err(_) => return self.probe_failed("connecting timed out".to_string()),
                }
            }
        };
        let ping = redis::cmd("PING");
        match tokio::time::timeout(self.settings.timeout, ping.query_async::<String>(&mut connection)).await {
            Ok(Ok(_)) => {
                self.recover(connection).await;
                true
            }
            Ok(Err(error)) => {
                // A connection that keeps failing is replaced: the next probe dials afresh.
                *lock(&self.connection) = None;
                self.probe_failed(error.to_string())
            }
            Err(_) => self.probe_failed(format!("no answer within {:?}", self.settings.timeout)),
        }
    }

    fn probe_failed(&self, error: String) -> bool {
        self.errors.fetch_add(1, Ordering::Relaxed);
        *lock(&self.last_error) = Some(error);
        false
    }

    /// Redis answers again: the quota counted here meanwhile goes to Redis, then requests ask
    /// Redis again and the local buckets are forgotten.
    async fn recover(&self, mut connection: ConnectionManager) {
        let unsaved = self.local.take_unsaved_quotas();
        if !unsaved.is_empty() {
            let mut pipe = redis::pipe();
            for (subject, cell) in &unsaved {
                let key = self.key(&[b":{", subject, b"}:quota:", cell.window.start.to_string().as_bytes()]);
                pipe.cmd("INCRBY").arg(&key).arg(cell.unsaved).ignore();
                pipe.cmd("EXPIREAT").arg(&key).arg(cell.window.end.saturating_add(86_400)).ignore();
            }
            let sent =
                tokio::time::timeout(self.settings.timeout * 4, pipe.query_async::<()>(&mut connection))
                    .await;
            if !matches!(sent, Ok(Ok(()))) {
                for (subject, cell) in unsaved {
                    self.local.return_unsaved_quota(&subject, cell.window, cell.unsaved);
                }
                self.probe_failed("could not hand the local quota counts back".to_string());
                return;
            }
        }
        self.local.clear_limits();
        self.last_seen.clear();
        let previous = self.mode.swap(Arc::new(Mode::Shared(connection)));
        *lock(&self.last_error) = None;
        if matches!(*previous, Mode::Fallback) && !unsaved.is_empty() {
            tracing::info!(redis = %self.settings.display, subjects = unsaved.len(), "Redis is back: shared counting resumed, local quota counts added");
        } else if matches!(*previous, Mode::Fallback) {
            tracing::info!(redis = %self.settings.display, "Redis is reachable: shared counting");
        }
    }

    /// Heartbeat and usage, while shared. A failure here starts an outage like any other.
    async fn write_out(&self) {
        let mode = self.mode.load_full();
        let Mode::Shared(connection) = &*mode else { return };
        let mut connection = connection.clone();
        let registry = self.key(&[b":replicas"]);
        let mut heartbeat = self.heartbeat.prepare_invoke();
        heartbeat.key(registry).arg(&self.replica_id).arg(REPLICA_TTL_SECS);
        match tokio::time::timeout(self.settings.timeout * 4, heartbeat.invoke_async::<u64>(&mut connection))
            .await
        {
            Ok(Ok(n)) => self.replicas.store(n.max(1), Ordering::Relaxed),
            Ok(Err(error)) => return self.fall_back(&mode, error.to_string()),
            Err(_) => return self.fall_back(&mode, "heartbeat timed out".to_string()),
        }
        let cells = self.local.usage.take_unsaved();
        for batch in cells.chunks(USAGE_BATCH) {
            let mut call = self.usage.prepare_invoke();
            for (id, cell) in batch {
                call.key(self.key(&[b":usage:", id.as_bytes()]));
                call.arg(cell.last_used).arg(format!("p:{}", cell.window.start)).arg(cell.unsaved);
            }
            let sent =
                tokio::time::timeout(self.settings.timeout * 4, call.invoke_async::<i64>(&mut connection))
                    .await;
            if !matches!(sent, Ok(Ok(_))) {
                for (id, cell) in batch {
                    self.local.usage.return_unsaved(id, cell.window, cell.unsaved);
                }
                let error = match sent {
                    Ok(Err(error)) => error.to_string(),
                    _ => "writing usage timed out".to_string(),
                };
                return self.fall_back(&mode, error);
            }
        }
    }

    /// Leaves the replica registry, so the others' fallback share grows at once.
    async fn deregister(&self) {
        if let Mode::Shared(connection) = &**self.mode.load() {
            let mut connection = connection.clone();
            let mut command = redis::cmd("ZREM");
            command.arg(self.key(&[b":replicas"])).arg(&self.replica_id);
            let _ =
                tokio::time::timeout(self.settings.timeout * 4, command.query_async::<i64>(&mut connection))
                    .await;
        }
    }
}

async fn supervise(shared: Weak<Shared>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n: u32 = 0;
    loop {
        tick.tick().await;
        // The store is gone when the gateway is.
        let Some(shared) = shared.upgrade() else { return };
        n = n.wrapping_add(1);
        let shared_now = matches!(**shared.mode.load(), Mode::Shared(_));
        if !shared_now {
            shared.probe().await;
        } else if n.is_multiple_of(WRITE_EVERY_TICKS) {
            shared.write_out().await;
        }
        // Lanes of subjects nobody asks for now, and of quota periods gone by, are let go; a
        // request that still holds one finishes through it.
        shared.lanes.retain(|_, lane| {
            let queue = lock(&lane.queue);
            queue.running || !queue.waiting.is_empty()
        });
    }
}

impl Counters for Shared {
    fn admit<'a>(&'a self, ask: Ask<'a>) -> Admission<'a> {
        match &**self.mode.load() {
            Mode::Fallback => Admission::Decided(Some(self.decide_locally(&ask))),
            Mode::Shared(_) => Admission::Asking(Box::pin(async move { self.ask_redis(&ask).await })),
        }
    }

    fn record(&self, key_id: &[u8], period: Period, now: SystemTime) {
        self.local.usage.record(key_id, period, now);
    }

    fn usage<'a>(
        &'a self,
        keys: &'a [(String, Period)],
        now: SystemTime,
    ) -> Pending<'a, Result<Vec<Usage>, String>> {
        Box::pin(async move {
            let connection = lock(&self.connection).clone();
            match connection {
                Some(mut connection) => {
                    query_usage(&mut connection, &self.settings, keys, now, self.settings.timeout * 20).await
                }
                None => Err("Redis is not reachable".to_string()),
            }
        })
    }

    fn status(&self) -> StoreStatus {
        StoreStatus {
            kind: "cluster",
            cluster: Some(ClusterStatus {
                connected: matches!(**self.mode.load(), Mode::Shared(_)),
                replicas: self.replicas.load(Ordering::Relaxed),
                last_error: lock(&self.last_error).clone(),
            }),
            cluster_errors: self.errors.load(Ordering::Relaxed),
        }
    }

    fn flush(&self) -> Pending<'_, ()> {
        Box::pin(async move {
            self.write_out().await;
            self.deregister().await;
        })
    }
}

async fn query_usage(
    connection: &mut ConnectionManager,
    settings: &ClusterSettings,
    keys: &[(String, Period)],
    now: SystemTime,
    timeout: Duration,
) -> Result<Vec<Usage>, String> {
    let mut pipe = redis::pipe();
    let mut windows = Vec::with_capacity(keys.len());
    for (id, period) in keys {
        let window = period.window(now);
        let mut key = settings.namespace.as_bytes().to_vec();
        key.extend_from_slice(b":usage:");
        key.extend_from_slice(id.as_bytes());
        pipe.cmd("HMGET").arg(key).arg("last").arg(format!("p:{}", window.start));
        windows.push(window);
    }
    let rows: Vec<(Option<u64>, Option<u64>)> = tokio::time::timeout(timeout, pipe.query_async(connection))
        .await
        .map_err(|_| "Redis did not answer in time".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .zip(windows)
        .map(|((last, used), window)| {
            Cell { last_used: last.unwrap_or(0), window, used: used.unwrap_or(0), unsaved: 0, touched: false }
                .usage(now)
        })
        .collect())
}

/// Reads usage from Redis without a running gateway (for `keygate keys list`).
pub async fn read_usage(
    settings: &ClusterSettings,
    keys: &[(String, Period)],
    now: SystemTime,
) -> Result<Vec<Usage>, String> {
    let timeout = settings.timeout.max(Duration::from_secs(2));
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    let mut connection =
        tokio::time::timeout(timeout, settings.client.get_connection_manager_with_config(config))
            .await
            .map_err(|_| format!("Redis at {} did not answer in time", settings.display))?
            .map_err(|e| format!("Redis at {}: {e}", settings.display))?;
    query_usage(&mut connection, settings, keys, now, timeout).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn outages_start_once_and_decide_locally_at_rate_over_replicas() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            // Nothing listens on port 1: the store starts in fallback, and says why.
            let client = redis::Client::open("redis://127.0.0.1:1/").unwrap();
            let settings = ClusterSettings {
                client,
                display: "redis://127.0.0.1:1/".into(),
                namespace: "t".into(),
                timeout: Duration::from_millis(50),
            };
            let shared = Shared::start(settings).await;
            let status = shared.status();
            let cluster = status.cluster.unwrap();
            assert!(!cluster.connected);
            assert!(cluster.last_error.is_some());
            assert!(status.cluster_errors >= 1);
            shared.replicas.store(2, Ordering::Relaxed);
            let ask = Ask {
                subject: super::super::Subject::Key(b"k"),
                rate: Some(RateLimit { tokens: 4, period: Duration::from_secs(60) }),
                quota: None,
                now: SystemTime::now(),
                instant: Instant::now(),
            };
            // 4 per minute over 2 replicas: 2 here.
            assert!(shared.admit(ask).await.is_ok());
            assert!(shared.admit(ask).await.is_ok());
            assert!(matches!(shared.admit(ask).await, Err(Refusal::RateLimited(_))));
        });
    }
}

//! API keys: the presented key as a secret, the generated key format, and the hashed key table.

pub mod cluster;
pub mod lifecycle;
pub mod store;

use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hashbrown::HashTable;
use http::HeaderValue;
use sha2::{Digest, Sha256};

use crate::counters::Subject;
use crate::quota::{Period, QuotaLimit};

/// A key as presented by a client. Its `Debug` and `Display` never show it, so it cannot reach
/// a log line by accident.
#[derive(Clone, Copy)]
pub struct PresentedKey<'a>(&'a str);

impl<'a> PresentedKey<'a> {
    pub fn new(key: &'a str) -> Self {
        Self(key)
    }

    /// The plaintext, for hashing and the checksum only.
    pub fn expose(&self) -> &'a str {
        self.0
    }
}

impl fmt::Debug for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresentedKey(<redacted>)")
    }
}

impl fmt::Display for PresentedKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The SHA-256 of a key: what the key file stores and the table is keyed by.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    pub fn of(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses the key file's `sha256:<64 lowercase hex>` form.
    pub fn parse(text: &str) -> Option<Self> {
        let hex = text.strip_prefix("sha256:")?;
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(hex.as_bytes().chunks_exact(2)) {
            *byte = (hex_digit(pair[0])? << 4) | hex_digit(pair[1])?;
        }
        Some(Self(out))
    }
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl fmt::Display for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `sha256:<hex>` of a key, as stored in the key file.
pub fn hash_key(key: &str) -> String {
    KeyHash::of(key).to_string()
}

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const ID_ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
const ID_LEN: usize = 8;
const SECRET_LEN: usize = 32;
const CHECKSUM_LEN: usize = 6;
/// What follows `<prefix>_` in a generated key: `<id>_<secret><checksum>`.
pub const KEY_BODY_LEN: usize = ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;

/// Draws `len` characters of `alphabet` from the OS CSPRNG, without modulo bias.
/// `len` characters of base62, each drawn from OS randomness without bias.
pub fn random_base62(len: usize) -> Result<String, getrandom::Error> {
    random_chars(BASE62, len)
}

fn random_chars(alphabet: &[u8], len: usize) -> Result<String, getrandom::Error> {
    // Bytes at or above the largest multiple of the alphabet size are redrawn.
    let limit = (256 / alphabet.len() * alphabet.len()) as u16;
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        getrandom::fill(&mut buf)?;
        for &b in &buf {
            if u16::from(b) < limit && out.len() < len {
                out.push(char::from(alphabet[usize::from(b) % alphabet.len()]));
            }
        }
    }
    Ok(out)
}

/// A new key id: 8 characters of `[0-9a-z]`.
pub fn generate_id() -> Result<String, getrandom::Error> {
    random_chars(ID_ALPHABET, ID_LEN)
}

/// The base62 CRC32 of a key's body: checked on every request presenting a key of keygate's
/// format, so it is an array, never an allocation.
fn checksum(body: &str) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(body.as_bytes());
    let mut digits = [b'0'; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    digits
}

/// Whether a byte is in [`ID_ALPHABET`]: a range test, where searching the alphabet cost a
/// refused flood of made-up keys 7 % of its time.
fn is_id_char(b: &u8) -> bool {
    b.is_ascii_digit() || b.is_ascii_lowercase()
}

/// Makes a new key `<prefix>_<id>_<32 base62 secret><6 base62 CRC32 checksum>`; returns (id, key).
pub fn generate(prefix: &str) -> Result<(String, String), getrandom::Error> {
    let id = generate_id()?;
    let secret = random_chars(BASE62, SECRET_LEN)?;
    let mut key = format!("{prefix}_{id}_{secret}");
    key.extend(checksum(&key).map(char::from));
    Ok((id, key))
}

/// Whether a presented key may be looked up: a key that claims keygate's format (it starts
/// with `<prefix>_`) must have that exact shape and a valid checksum; any other key is a
/// legacy or imported key and is looked up by hash as usual.
pub fn plausible(key: &str, prefix: &str) -> bool {
    let Some(rest) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) else {
        return true;
    };
    let bytes = rest.as_bytes();
    if bytes.len() != ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN
        || bytes[ID_LEN] != b'_'
        || !bytes[..ID_LEN].iter().all(is_id_char)
        || !bytes[ID_LEN + 1..].iter().all(u8::is_ascii_alphanumeric)
    {
        return false;
    }
    let split = key.len() - CHECKSUM_LEN;
    checksum(&key[..split]) == key.as_bytes()[split..]
}

/// The shortest key `keys import` accepts: anything shorter is guessable, not a secret.
pub const MIN_IMPORTED_KEY_LEN: usize = 16;

/// The shortest key whose tail is stored: six characters of a shorter key would give away a
/// quarter of it or more.
pub const MIN_LEN_FOR_TAIL: usize = 24;

/// The last six characters of a key, stored to help humans recognise it; `None` for a key too
/// short to show any part of.
pub fn tail(key: &str) -> Option<&str> {
    if key.chars().count() < MIN_LEN_FOR_TAIL {
        return None;
    }
    let start = key.char_indices().rev().nth(5).map_or(0, |(i, _)| i);
    Some(&key[start..])
}

/// A key's scopes, shared by every key holding the same set.
#[derive(Debug)]
pub struct ScopeSet {
    sorted: Box<[Box<str>]>,
    all: bool,
    header: HeaderValue,
}

impl ScopeSet {
    /// `scopes` must already be valid header text; the config validates that.
    pub fn new(mut scopes: Vec<String>) -> Result<Self, http::header::InvalidHeaderValue> {
        scopes.sort();
        scopes.dedup();
        let header = HeaderValue::from_str(&scopes.join(","))?;
        let all = scopes.iter().any(|s| s == "*");
        Ok(Self { sorted: scopes.into_iter().map(String::into_boxed_str).collect(), all, header })
    }

    pub fn holds(&self, scope: &str) -> bool {
        self.all || self.sorted.binary_search_by(|s| (**s).cmp(scope)).is_ok()
    }

    /// The sorted, comma-separated scopes, ready for `x-keygate-scopes`.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.sorted.iter().map(|s| &**s)
    }
}

/// `N/s`, `N/m` or `N/h`: a bucket of N tokens refilled at N per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub tokens: u32,
    pub period: Duration,
}

impl RateLimit {
    pub fn parse(text: &str) -> Option<Self> {
        let (n, unit) = text.trim().split_once('/')?;
        let tokens: u32 = n.trim().parse().ok().filter(|&n| n > 0)?;
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return None,
        };
        Some(Self { tokens, period })
    }
}

/// One key of the table: everything the request path needs, already in its final form.
/// Cloning shares the scope set, networks and consumer.
///
/// A million of these are held at once, and every byte here costs a megabyte there: what most
/// keys have sits inline, what few keys have sits behind one pointer (see [`KeyExtras`]).
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub hash: KeyHash,
    pub id: HeaderValue,
    pub name: HeaderValue,
    pub scopes: Arc<ScopeSet>,
    expires_at: Deadline,
    /// `None` for a key with none of the extras, which is most keys.
    extras: Option<Box<KeyExtras>>,
}

/// An optional instant in 8 bytes where `Option<SystemTime>` takes 16: nanoseconds since the
/// Unix epoch, [`Deadline::NONE`] for none. That range ends in 2262: a later instant is kept as
/// the range's last nanosecond but one (still an instant, not none), which no process running
/// before then can tell apart from the instant itself; one before 1678 as 1678.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Deadline(i64);

impl Deadline {
    const NONE: Self = Self(i64::MAX);

    fn new(at: Option<SystemTime>) -> Self {
        at.map_or(Self::NONE, |at| Self(unix_nanos(at).min(i64::MAX - 1)))
    }

    fn get(self) -> Option<SystemTime> {
        let magnitude = Duration::from_nanos(self.0.unsigned_abs());
        match self {
            Self::NONE => None,
            Self(n) if n < 0 => SystemTime::UNIX_EPOCH.checked_sub(magnitude),
            Self(_) => SystemTime::UNIX_EPOCH.checked_add(magnitude),
        }
    }

    /// Whether `now` is at or after the instant.
    fn passed_by(self, now: SystemTime) -> bool {
        self != Self::NONE && self.0 <= unix_nanos(now)
    }
}

/// Nanoseconds since the Unix epoch, saturating at the ends of `i64`.
fn unix_nanos(at: SystemTime) -> i64 {
    match at.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// The fields few keys have: revocation, limits, identity extras and address lists.
#[derive(Debug, Clone, Default)]
pub struct KeyExtras {
    pub revoked_at: Option<SystemTime>,
    pub rate_limit: Option<RateLimit>,
    /// `x-keygate-meta-<name>` headers, names and values ready to send.
    pub meta: Box<[(http::HeaderName, HeaderValue)]>,
    /// `None`: any client address; else only addresses inside one of these networks.
    pub allowed_ips: Option<Arc<[ipnet::IpNet]>>,
    pub quota: Option<QuotaLimit>,
    /// Shared by every key naming the same consumer: one bucket, one quota.
    pub consumer: Option<Arc<Consumer>>,
}

impl KeyExtras {
    fn is_empty(&self) -> bool {
        self.revoked_at.is_none()
            && self.rate_limit.is_none()
            && self.meta.is_empty()
            && self.allowed_ips.is_none()
            && self.quota.is_none()
            && self.consumer.is_none()
    }
}

/// A consumer: the account several keys (a rotated pair, say) belong to.
#[derive(Debug, PartialEq, Eq)]
pub struct Consumer {
    /// Ready for `x-keygate-consumer`.
    pub name: HeaderValue,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Active,
    Expired,
    Revoked,
}

impl KeyEntry {
    pub fn new(
        hash: KeyHash,
        id: HeaderValue,
        name: HeaderValue,
        scopes: Arc<ScopeSet>,
        expires_at: Option<SystemTime>,
        extras: KeyExtras,
    ) -> Self {
        let extras = (!extras.is_empty()).then(|| Box::new(extras));
        Self { hash, id, name, scopes, expires_at: Deadline::new(expires_at), extras }
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at.get()
    }

    pub fn revoked_at(&self) -> Option<SystemTime> {
        self.extras.as_ref().and_then(|e| e.revoked_at)
    }

    pub fn rate_limit(&self) -> Option<RateLimit> {
        self.extras.as_ref().and_then(|e| e.rate_limit)
    }

    /// `x-keygate-meta-<name>` headers, names and values ready to send.
    pub fn meta(&self) -> &[(http::HeaderName, HeaderValue)] {
        self.extras.as_ref().map_or(&[], |e| &e.meta)
    }

    /// `None`: any client address; else only addresses inside one of these networks.
    pub fn allowed_ips(&self) -> Option<&[ipnet::IpNet]> {
        self.extras.as_ref().and_then(|e| e.allowed_ips.as_deref())
    }

    pub fn quota(&self) -> Option<QuotaLimit> {
        self.extras.as_ref().and_then(|e| e.quota)
    }

    pub fn consumer(&self) -> Option<&Consumer> {
        self.extras.as_ref().and_then(|e| e.consumer.as_deref())
    }

    /// Whose bucket and quota this key spends.
    pub fn subject(&self) -> Subject<'_> {
        match self.consumer() {
            Some(consumer) => Subject::Consumer(consumer.name.as_bytes()),
            None => Subject::Key(self.id.as_bytes()),
        }
    }

    /// The period its usage is counted in: its quota's, else the calendar month.
    pub fn usage_period(&self) -> Period {
        self.quota().map_or(Period::Month, |q| q.period)
    }

    /// Judged against `now` on every request, so a key expires on time without a reload.
    pub fn state_at(&self, now: SystemTime) -> KeyState {
        if self.revoked_at().is_some_and(|t| t <= now) {
            KeyState::Revoked
        } else if self.expires_at.passed_by(now) {
            KeyState::Expired
        } else {
            KeyState::Active
        }
    }

    /// Whether the key may be used by a client at `ip` (already unmapped from `::ffff:a.b.c.d`,
    /// see `proxy::client`).
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        self.allowed_ips().is_none_or(|nets| nets.iter().any(|net| net.contains(&ip)))
    }
}

/// Header values of many keys (ids, names) packed into shared buffers of [`ARENA_BYTES`]:
/// one allocation per few hundred keys instead of one per value, each at least 8 bytes and
/// rounded up to the allocator's size class. Clones, as the request path makes for the
/// identity headers, count on the buffer they share; a value of its own buffer would make
/// one more allocation (a shared count) the first time it is cloned.
#[derive(Debug, Default)]
pub struct HeaderArena {
    free: bytes::BytesMut,
}

/// Small enough that few keys share a buffer's count (and its cache line, when two workers
/// clone values of neighbouring keys), large enough that its own overhead is nothing.
const ARENA_BYTES: usize = 4096;

impl HeaderArena {
    pub fn value(&mut self, text: &str) -> Result<HeaderValue, http::header::InvalidHeaderValue> {
        if self.free.capacity() < text.len() {
            self.free = bytes::BytesMut::with_capacity(ARENA_BYTES.max(text.len()));
        }
        self.free.extend_from_slice(text.as_bytes());
        HeaderValue::from_maybe_shared(self.free.split().freeze())
    }
}

/// Entries in file order, kept in runs of at most [`RUN_LEN`]: a run never grows past that,
/// so a million entries are never copied into a larger buffer (which would hold them twice at
/// the peak of a load), and runs read in parallel join without moving an entry.
#[derive(Debug, Default)]
pub struct Entries {
    runs: Vec<Vec<KeyEntry>>,
}

/// Entries per run; positions in the index are 16 bits of run and 16 bits of offset.
const POSITION_BITS: u32 = 16;
const RUN_LEN: usize = 1 << POSITION_BITS;
/// The most runs a table indexes. Entries past them (some four billion keys, hundreds of
/// gigabytes in memory) are not indexed; the loader refuses such a file. One run short of
/// what 16 bits count, so that a position plus one still fits in 32 bits (see [`Index`]).
const MAX_RUNS: usize = (1 << (32 - POSITION_BITS)) - 1;

impl Entries {
    pub fn push(&mut self, entry: KeyEntry) {
        match self.runs.last_mut() {
            // Doubling stops at RUN_LEN, a power of two: a full run has no spare capacity.
            Some(run) if run.len() < RUN_LEN => run.push(entry),
            _ => self.runs.push(vec![entry]),
        }
    }

    /// Puts `other`'s entries after these, without moving them.
    pub fn append(&mut self, other: Entries) {
        self.runs.extend(other.runs.into_iter().filter(|run| !run.is_empty()));
    }

    pub fn len(&self) -> usize {
        self.runs.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.iter().all(Vec::is_empty)
    }

    pub fn iter(&self) -> impl Iterator<Item = &KeyEntry> {
        self.runs.iter().flatten()
    }

    /// More entries than a table can index.
    pub fn too_many(&self) -> bool {
        self.runs.len() > MAX_RUNS
    }
}

impl FromIterator<KeyEntry> for Entries {
    fn from_iter<I: IntoIterator<Item = KeyEntry>>(iter: I) -> Self {
        let mut entries = Self::default();
        iter.into_iter().for_each(|e| entries.push(e));
        entries
    }
}

/// The in-memory key table, keyed by SHA-256.
///
/// Entries live in runs (each entry holding its own hash), in file order. The [`Index`] holds
/// four bytes per slot, so that a lookup reads one cache line of it and then the entry: with
/// a million keys neither is in any cache, and each further dependent read (a separate control
/// byte, then a separate slot, as in a SwissTable) cost a memory round trip and a TLB miss.
#[derive(Debug, Default)]
pub struct KeyTable {
    entries: Entries,
    index: Index,
    len: usize,
}

/// Open addressing with linear probing over `u32` slots, at most half full. A slot holds the
/// entry's position plus one in its low `position_bits` (0: empty) and, in the bits above,
/// a tag cut from bytes 8..12 of the key's SHA-256, which rules out all but one in 2^tag_bits
/// of the other entries a probe passes without reading them (at a million keys, 11 bits). The
/// home slot comes from bytes 0..8. Half full, a probe for a key that is not there (a flood of
/// unknown keys) stops at an empty slot after two or three slots, mostly in the same line.
///
/// SHA-256 outputs are uniformly distributed: attacker-chosen keys cannot lengthen probe
/// sequences, which depend only on the stored keys, and those come from the key file.
#[derive(Debug)]
struct Index {
    slots: Vec<u32>,
    /// Enough bits for the largest position plus one: 16 per run offset plus those of the run.
    position_bits: u32,
}

impl Default for Index {
    fn default() -> Self {
        Self::with_capacity(0, 0)
    }
}

impl Index {
    fn with_capacity(len: usize, runs: usize) -> Self {
        // Twice the length, so at least one slot is always empty and every probe ends. Zeroed
        // memory comes from the allocator as untouched pages: building writes only the slots
        // it fills.
        let slots = len.saturating_mul(2).max(2).next_power_of_two();
        // The largest position plus one is `runs << POSITION_BITS` at most: under 2^32, since
        // `runs <= MAX_RUNS`.
        let largest = (runs.min(MAX_RUNS) as u64) << POSITION_BITS;
        Self { slots: vec![0; slots], position_bits: 64 - largest.leading_zeros() }
    }

    fn home(&self, hash: &KeyHash) -> usize {
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.0[..8]);
        // Truncation is the point: the low bits pick the slot.
        (u64::from_le_bytes(first) as usize) & (self.slots.len() - 1)
    }

    /// The bits of a slot that hold the position plus one.
    fn position_mask(&self) -> u32 {
        u32::MAX.checked_shr(32 - self.position_bits).unwrap_or(0)
    }

    fn tag(&self, hash: &KeyHash) -> u32 {
        let bits = u32::from_le_bytes([hash.0[8], hash.0[9], hash.0[10], hash.0[11]]);
        // With 32 position bits (some four billion keys) there is no room for a tag: every
        // entry a probe passes is read.
        bits.checked_shl(self.position_bits).unwrap_or(0)
    }

    /// The position of the entry with `hash`, judged by `is`, else None.
    fn find(&self, hash: &KeyHash, is: impl Fn(u32) -> bool) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let positions = self.position_mask();
        let tag = self.tag(hash);
        let mut i = self.home(hash);
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return None;
            }
            let position = (slot & positions).wrapping_sub(1);
            if slot & !positions == tag && is(position) {
                return Some(position);
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds a position that [`Index::find`] did not find: one of the `runs` the index was made
    /// for, in a table with at most half as many entries as slots.
    fn insert(&mut self, hash: &KeyHash, position: u32) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        while self.slots[i] != 0 {
            i = (i + 1) & mask;
        }
        self.slots[i] = self.tag(hash) | (position + 1);
    }
}

/// Two entries of a key table that may not coexist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Duplicate {
    /// (later, earlier) positions in file order with the same hash.
    Hash(usize, usize),
    /// (later, earlier) positions in file order with the same id.
    Id(usize, usize),
}

impl KeyTable {
    /// Builds a table from entries in file order. Duplicated hashes or ids are reported with
    /// their file-order positions; such a table is for reporting only, since a key file with
    /// duplicates is refused. See [`Entries::too_many`].
    pub fn build(entries: Entries) -> (Self, Vec<Duplicate>) {
        let runs = &entries.runs;
        let len = entries.len();
        let mut duplicates = Vec::new();
        // Ids must be unique too; checked with a throw-away index over the same entries.
        let mut ids: HashTable<u32> = HashTable::with_capacity(len);
        let id_hash = |id: &[u8]| {
            let mut hasher = std::hash::DefaultHasher::new();
            id.hash(&mut hasher);
            hasher.finish()
        };
        let mut index = Index::with_capacity(len, runs.len());
        let at = |slot: u32| &runs[(slot >> POSITION_BITS) as usize][(slot as usize) & (RUN_LEN - 1)];
        // Each run's first position in file order, for reporting duplicates.
        let first_position: Vec<usize> =
            runs.iter().scan(0, |next, run| Some(std::mem::replace(next, *next + run.len()))).collect();
        let file_position =
            |slot: u32| first_position[(slot >> POSITION_BITS) as usize] + (slot as usize & (RUN_LEN - 1));
        let mut position = 0;
        for (r, run) in runs.iter().enumerate().take(MAX_RUNS) {
            for (offset, entry) in run.iter().enumerate() {
                // In range: r < MAX_RUNS (the `take` above), offset < RUN_LEN (`push`).
                let slot = ((r as u32) << POSITION_BITS) | offset as u32;
                let id_slot = id_hash(entry.id.as_bytes());
                if let Some(&earlier) = ids.find(id_slot, |&i| at(i).id == entry.id) {
                    duplicates.push(Duplicate::Id(position, file_position(earlier)));
                } else if let Some(earlier) = index.find(&entry.hash, |i| at(i).hash == entry.hash) {
                    duplicates.push(Duplicate::Hash(position, file_position(earlier)));
                } else {
                    index.insert(&entry.hash, slot);
                    ids.insert_unique(id_slot, slot, |&i| id_hash(at(i).id.as_bytes()));
                }
                position += 1;
            }
        }
        drop(ids);
        (Self { entries, index, len }, duplicates)
    }

    pub fn get(&self, hash: &KeyHash) -> Option<&KeyEntry> {
        self.locate(hash).map(|(_, entry)| entry)
    }

    /// The entry for `hash` and its position in this table, by which [`Self::at`] finds it
    /// again without hashing: what a request that waits keeps instead of a borrow.
    pub fn locate(&self, hash: &KeyHash) -> Option<(u32, &KeyEntry)> {
        let slot = self.index.find(hash, |i| self.at(i).is_some_and(|e| e.hash == *hash))?;
        Some((slot, self.at(slot)?))
    }

    /// The entry at a position [`Self::locate`] gave.
    pub fn at(&self, slot: u32) -> Option<&KeyEntry> {
        self.entries.runs.get((slot >> POSITION_BITS) as usize)?.get(slot as usize & (RUN_LEN - 1))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn entries(&self) -> impl Iterator<Item = &KeyEntry> {
        self.entries.iter()
    }

    /// The next table: this one with the entries of `removed` ids gone and `put` in place of
    /// the entries with the same ids (new ids go last). Built from memory, so one change
    /// costs a copy of the table, never a read of the whole store. Duplicates are returned
    /// as [`KeyTable::build`] reports them.
    pub fn changed(&self, put: Vec<KeyEntry>, removed: &[String]) -> (Self, Vec<Duplicate>) {
        let at: std::collections::HashMap<Vec<u8>, usize> =
            put.iter().enumerate().map(|(i, e)| (e.id.as_bytes().to_vec(), i)).collect();
        let removed: std::collections::HashSet<&[u8]> = removed.iter().map(|r| r.as_bytes()).collect();
        let mut put: Vec<Option<KeyEntry>> = put.into_iter().map(Some).collect();
        let mut next = Entries::default();
        for entry in self.entries() {
            if removed.contains(entry.id.as_bytes()) {
                continue;
            }
            match at.get(entry.id.as_bytes()) {
                Some(&i) => {
                    if let Some(entry) = put[i].take() {
                        next.push(entry);
                    }
                }
                None => next.push(entry.clone()),
            }
        }
        put.into_iter().flatten().for_each(|e| next.push(e));
        Self::build(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_expiry_past_2262_is_still_an_expiry() {
        // Found by fuzz/config_load: `expires_at = 4072-11-22T10:00:00Z` read back as none.
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(3_200_000_000_000 / 1000 * 64);
        let deadline = Deadline::new(Some(far));
        assert!(deadline.get().is_some(), "a far expiry is kept");
        assert!(!deadline.passed_by(SystemTime::now()));
        assert_eq!(Deadline::new(None).get(), None);
        let past = SystemTime::UNIX_EPOCH - Duration::from_secs(400 * 365 * 86_400);
        assert!(Deadline::new(Some(past)).passed_by(SystemTime::now()), "a far past one has passed");
    }

    #[test]
    fn hash_round_trips_through_text() {
        let text = hash_key("test");
        assert_eq!(text, "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08");
        assert_eq!(KeyHash::parse(&text), Some(KeyHash::of("test")));
        assert_eq!(KeyHash::parse("sha256:9F86"), None);
        assert_eq!(KeyHash::parse(&text.to_uppercase()), None);
        assert_eq!(KeyHash::parse(&text.replace("sha256:", "md5:")), None);
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let (id, key) = generate("kg").unwrap();
        assert_eq!(id.len(), 8);
        assert!(id.bytes().all(|b| ID_ALPHABET.contains(&b)));
        assert!(key.starts_with(&format!("kg_{id}_")));
        assert_eq!(key.len(), "kg_".len() + 8 + 1 + 32 + 6);
        assert!(plausible(&key, "kg"));
        assert_ne!(generate("kg").unwrap().1, key, "keys come from randomness");
    }

    #[test]
    fn a_forged_checksum_or_shape_is_implausible() {
        let (_, key) = generate("kg").unwrap();
        let mut forged = key.clone().into_bytes();
        let last = forged.len() - 1;
        forged[last] = if forged[last] == b'A' { b'B' } else { b'A' };
        assert!(!plausible(std::str::from_utf8(&forged).unwrap(), "kg"));
        assert!(!plausible(&key[..key.len() - 1], "kg"));
        assert!(!plausible("kg_short", "kg"));
        assert!(!plausible(&format!("{key}x"), "kg"));
        // Keys that do not claim keygate's format are looked up as they are.
        assert!(plausible("legacy-key-123", "kg"));
        assert!(plausible(&key, "other"));
    }

    #[test]
    fn checksum_is_zero_padded_base62_crc32() {
        assert_eq!(&checksum(""), b"000000");
        let c = checksum("kg_abc");
        assert_eq!(c.len(), 6);
        let value =
            c.iter().fold(0u64, |acc, &b| acc * 62 + BASE62.iter().position(|&x| x == b).unwrap() as u64);
        assert_eq!(value, u64::from(crc32fast::hash(b"kg_abc")));
    }

    #[test]
    fn id_chars_are_the_id_alphabet() {
        let accepted: Vec<u8> = (0..=255u8).filter(is_id_char).collect();
        assert_eq!(accepted, ID_ALPHABET);
    }

    #[test]
    fn presented_key_never_prints() {
        let key = PresentedKey::new("kg_secret");
        assert_eq!(format!("{key} {key:?}"), "<redacted> PresentedKey(<redacted>)");
    }

    #[test]
    fn scope_sets_sort_and_match() {
        let set = ScopeSet::new(vec!["write".into(), "read".into(), "read".into()]).unwrap();
        assert_eq!(set.header(), "read,write");
        assert!(set.holds("read") && set.holds("write") && !set.holds("admin"));
        let all = ScopeSet::new(vec!["*".into()]).unwrap();
        assert!(all.holds("admin"));
    }

    #[test]
    fn rate_limits_parse() {
        assert_eq!(
            RateLimit::parse("100/s"),
            Some(RateLimit { tokens: 100, period: Duration::from_secs(1) })
        );
        assert_eq!(RateLimit::parse("5/h").map(|r| r.period), Some(Duration::from_secs(3600)));
        for bad in ["0/s", "x/s", "10/d", "10", "-1/s"] {
            assert_eq!(RateLimit::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn an_entry_without_extras_stays_small() {
        // A million keys are held at once: each byte here is a megabyte of resident memory.
        assert!(std::mem::size_of::<KeyEntry>() <= 136, "{}", std::mem::size_of::<KeyEntry>());
        let scopes = Arc::new(ScopeSet::new(vec!["read".into()]).unwrap());
        let id = HeaderValue::from_static("a");
        let plain = KeyEntry::new(
            KeyHash::of("k"),
            id.clone(),
            id.clone(),
            Arc::clone(&scopes),
            None,
            KeyExtras::default(),
        );
        assert!(plain.extras.is_none(), "no extras, no box");
        assert!(plain.meta().is_empty() && plain.consumer().is_none() && plain.allowed_ips().is_none());
        let extras = KeyExtras { quota: QuotaLimit::parse("5/day"), ..KeyExtras::default() };
        let limited = KeyEntry::new(KeyHash::of("k"), id.clone(), id, scopes, None, extras);
        assert_eq!(limited.usage_period(), Period::Day);
        assert_eq!(limited.rate_limit(), None);
    }

    #[test]
    fn entries_keep_file_order_across_runs() {
        let scopes = Arc::new(ScopeSet::new(vec![]).unwrap());
        let entry = |i: usize| {
            let id = HeaderValue::from_str(&i.to_string()).unwrap();
            KeyEntry::new(
                KeyHash::of(&i.to_string()),
                id.clone(),
                id,
                Arc::clone(&scopes),
                None,
                KeyExtras::default(),
            )
        };
        let ids = |table: &KeyTable| -> Vec<usize> {
            table.entries().map(|e| e.id.to_str().unwrap().parse().unwrap()).collect()
        };
        // Two readers' worth, the first ending in a part-filled run, then more after both.
        let last = 2 * RUN_LEN + 10;
        let mut entries: Entries = (0..RUN_LEN + 3).map(entry).collect();
        entries.append((RUN_LEN + 3..last).map(entry).collect());
        entries.push(entry(last));
        let (table, duplicates) = KeyTable::build(entries);
        assert!(duplicates.is_empty());
        assert_eq!(table.len(), last + 1);
        assert_eq!(ids(&table), (0..=last).collect::<Vec<_>>());
        for i in [0, RUN_LEN - 1, RUN_LEN, RUN_LEN + 3, last] {
            assert_eq!(table.get(&KeyHash::of(&i.to_string())).unwrap().id, i.to_string().as_str());
        }

        let (changed, duplicates) = table.changed(vec![entry(5), entry(last + 1)], &["7".to_string()]);
        assert!(duplicates.is_empty());
        assert_eq!(changed.len(), last + 1);
        assert!(changed.get(&KeyHash::of("7")).is_none() && changed.get(&KeyHash::of("5")).is_some());
        let expected: Vec<usize> = (0..=last + 1).filter(|&i| i != 7).collect();
        assert_eq!(ids(&changed), expected);

        let mut doubled: Entries = (0..3).map(entry).collect();
        doubled.push(entry(1));
        assert_eq!(KeyTable::build(doubled).1, vec![Duplicate::Id(3, 1)]);
        let mut same_hash = entry(2);
        same_hash.id = HeaderValue::from_static("other");
        let mut doubled: Entries = (0..3).map(entry).collect();
        doubled.push(same_hash);
        assert_eq!(KeyTable::build(doubled).1, vec![Duplicate::Hash(3, 2)]);
        for absent in ["absent", "-1", &(last + 2).to_string()] {
            assert!(table.get(&KeyHash::of(absent)).is_none(), "{absent}");
        }
        assert!(KeyTable::default().get(&KeyHash::of("0")).is_none(), "an empty table finds nothing");
    }

    #[test]
    fn the_index_finds_every_position_whatever_its_tag_width() {
        let hashes: Vec<KeyHash> = (0..1000).map(|i| KeyHash::of(&i.to_string())).collect();
        // One run: 17 position bits, 15 of tag; every run: 32 position bits, no tag at all.
        for runs in [1, 16, MAX_RUNS] {
            let mut index = Index::with_capacity(hashes.len(), runs);
            let top = ((runs as u32 - 1) << POSITION_BITS) | (RUN_LEN as u32 - 1);
            let position = |i: usize| top - i as u32;
            for (i, hash) in hashes.iter().enumerate() {
                assert_eq!(index.find(hash, |p| p == position(i)), None);
                index.insert(hash, position(i));
            }
            for (i, hash) in hashes.iter().enumerate() {
                let at = index.find(hash, |p| p == position(i));
                assert_eq!(at, Some(position(i)), "runs {runs}, key {i}");
            }
            // The entry check has the last word, and a probe always ends.
            assert_eq!(index.find(&KeyHash::of("absent"), |_| false), None);
        }
    }

    #[test]
    fn deadlines_keep_the_instant_to_the_nanosecond() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_795_000_000, 123_456_789);
        let deadline = Deadline::new(Some(at));
        assert_eq!(deadline.get(), Some(at));
        assert!(deadline.passed_by(at), "rejected from this instant on");
        assert!(!deadline.passed_by(at - Duration::from_nanos(1)));
        let before_1970 = SystemTime::UNIX_EPOCH - Duration::from_secs(86_400);
        assert_eq!(Deadline::new(Some(before_1970)).get(), Some(before_1970));
        assert!(Deadline::new(Some(before_1970)).passed_by(SystemTime::UNIX_EPOCH));
        assert_eq!(Deadline::new(None).get(), None);
        assert!(!Deadline::new(None).passed_by(at));
        let year_2300 = SystemTime::UNIX_EPOCH + Duration::from_secs(10_413_792_000);
        assert!(!Deadline::new(Some(year_2300)).passed_by(at), "past 2262: as good as never");
    }

    #[test]
    fn arena_values_share_buffers() {
        let mut arena = HeaderArena::default();
        let a = arena.value("k0000001").unwrap();
        let b = arena.value("customer-k0000001").unwrap();
        assert_eq!((a.to_str().unwrap(), b.to_str().unwrap()), ("k0000001", "customer-k0000001"));
        assert_eq!(b.as_bytes().as_ptr(), a.as_bytes()[8..].as_ptr(), "packed into one buffer");
        let long = "x".repeat(ARENA_BYTES + 1);
        assert_eq!(arena.value(&long).unwrap(), long.as_str(), "a value larger than a buffer gets its own");
        assert!(arena.value("bad\r\nvalue").is_err());
        drop(arena);
        assert_eq!(a.clone(), "k0000001", "values outlive the arena");
    }

    #[test]
    fn tail_is_the_last_six_characters() {
        assert_eq!(tail("abcdefghijklmnopqrstuvwxyz"), Some("uvwxyz"));
        assert_eq!(tail("abcdefghijklmnopqrstuvw"), None, "23 characters: no tail");
        assert_eq!(tail("abc"), None);
    }
}

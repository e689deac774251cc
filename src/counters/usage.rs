//! Per-key usage as a process sees it: the last use and the requests of the current period,
//! plus what has not been written to the store yet. Every store keeps one of these.

use std::borrow::Borrow;
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::time::SystemTime;

use dashmap::DashMap;

use crate::quota::{Period, Window, epoch_secs, from_epoch_secs};

/// What `keys list`, `/usage` and the key API show about a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct Usage {
    #[serde(serialize_with = "rfc3339")]
    pub last_used_at: Option<SystemTime>,
    /// Requests in the current quota period (for a key without a quota: this UTC month).
    pub used: u64,
}

fn rfc3339<S: serde::Serializer>(at: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match at {
        Some(at) => s.serialize_str(&timestamp(*at)),
        None => s.serialize_none(),
    }
}

/// RFC 3339 in UTC, whole seconds.
pub fn timestamp(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(from_epoch_secs(epoch_secs(at)));
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// One key's usage. `unsaved` requests and `touched` are what the store has not seen yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    pub last_used: u64,
    pub window: Window,
    pub used: u64,
    pub unsaved: u64,
    pub touched: bool,
}

impl Cell {
    /// Usage as of `now`: a period that has ended counts nothing.
    pub fn usage(&self, now: SystemTime) -> Usage {
        let current = epoch_secs(now) < self.window.end;
        Usage {
            last_used_at: (self.last_used > 0).then(|| from_epoch_secs(self.last_used)),
            used: if current { self.used } else { 0 },
        }
    }
}

/// A key id as the usage map holds it: inline when short (generated ids are 8 characters), so
/// that finding a key's cell compares bytes in the map's own slot instead of following a
/// pointer to a separate allocation, a cache miss per request once many keys are in use.
#[derive(Debug, Clone)]
enum UsageId {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Boxed(Box<[u8]>),
}

/// With the length byte and the tag, an inline id takes the 24 bytes of a boxed one's slot.
const INLINE_ID: usize = 22;

impl UsageId {
    fn new(id: &[u8]) -> Self {
        match u8::try_from(id.len()) {
            Ok(len) if id.len() <= INLINE_ID => {
                let mut bytes = [0; INLINE_ID];
                bytes[..id.len()].copy_from_slice(id);
                Self::Inline { len, bytes }
            }
            _ => Self::Boxed(Box::from(id)),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            Self::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Self::Boxed(bytes) => bytes,
        }
    }
}

// Hash and equality are those of the bytes, as `Borrow<[u8]>` requires: the map is searched
// with a `&[u8]`.
impl Hash for UsageId {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl PartialEq for UsageId {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for UsageId {}

impl Borrow<[u8]> for UsageId {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

/// A quick hash for key ids (a multiply per 8 bytes and a final mix) where the map's default,
/// SipHash, costs more than the rest of the count. Flooding is not a concern: only ids of keys
/// from the key store, already verified, reach the map.
#[derive(Debug, Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 59));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    /// murmur3's finaliser: the map takes its shard from the high bits and its slot from the
    /// low ones, so every input bit must reach both.
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        z = (z ^ (z >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        z ^ (z >> 33)
    }
}

impl IdHasher {
    fn mix(&mut self, word: u64) {
        self.0 = (self.0 ^ word).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
}

#[derive(Debug, Default)]
pub struct UsageLog {
    cells: DashMap<UsageId, Cell, BuildHasherDefault<IdHasher>>,
}

impl UsageLog {
    pub fn record(&self, key_id: &[u8], period: Period, now: SystemTime) {
        let secs = epoch_secs(now);
        // The common case: a known key inside its period, with no allocation and no calendar.
        if let Some(mut cell) = self.cells.get_mut(key_id)
            && secs < cell.window.end
            && secs >= cell.window.start
        {
            cell.used += 1;
            cell.unsaved += 1;
            cell.last_used = cell.last_used.max(secs);
            cell.touched = true;
            return;
        }
        // Ids that are not text never come from a key file; they are not counted.
        let Ok(id) = std::str::from_utf8(key_id) else { return };
        let window = period.window(now);
        let mut cell = self.cells.entry(UsageId::new(id.as_bytes())).or_insert(Cell {
            last_used: 0,
            window,
            used: 0,
            unsaved: 0,
            touched: false,
        });
        if cell.window != window {
            // A new period: what the old one had is history (a store that had not seen it yet
            // loses at most one flush interval of it).
            *cell = Cell { last_used: cell.last_used, window, used: 0, unsaved: 0, touched: false };
        }
        cell.used += 1;
        cell.unsaved += 1;
        cell.last_used = cell.last_used.max(secs);
        cell.touched = true;
    }

    pub fn get(&self, key_id: &str) -> Option<Cell> {
        self.cells.get(key_id.as_bytes()).map(|c| *c)
    }

    /// Puts back what a store holds (at start): never lowers what this process already counted.
    pub fn restore(&self, key_id: &str, stored: Cell) {
        let mut cell = self.cells.entry(UsageId::new(key_id.as_bytes())).or_insert(Cell {
            unsaved: 0,
            touched: false,
            ..stored
        });
        if cell.window == stored.window {
            cell.used = cell.used.max(stored.used);
        }
        cell.last_used = cell.last_used.max(stored.last_used);
    }

    /// Every cell with something the store has not seen, marked as seen.
    pub fn take_unsaved(&self) -> Vec<(Box<str>, Cell)> {
        let mut out = Vec::new();
        for mut entry in self.cells.iter_mut() {
            // Every id in the map was text when it was put there (`record`, `restore`).
            if entry.touched
                && let Ok(id) = std::str::from_utf8(entry.key().as_bytes())
            {
                out.push((Box::from(id), *entry.value()));
                entry.unsaved = 0;
                entry.touched = false;
            }
        }
        out
    }

    /// Gives back requests that could not be written, so the next flush tries again.
    pub fn return_unsaved(&self, key_id: &str, window: Window, unsaved: u64) {
        if let Some(mut cell) = self.cells.get_mut(key_id.as_bytes())
            && cell.window == window
        {
            cell.unsaved += unsaved;
            cell.touched = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn counts_per_period_and_resets_at_the_boundary() {
        let log = UsageLog::default();
        let before: SystemTime = datetime!(2026-11-30 23:59:58 UTC).into();
        let after: SystemTime = datetime!(2026-12-01 00:00:01 UTC).into();
        log.record(b"a", Period::Month, before);
        log.record(b"a", Period::Month, before);
        assert_eq!(log.get("a").unwrap().usage(before).used, 2);
        // Read after the month ended, the old count is no longer "this period".
        assert_eq!(log.get("a").unwrap().usage(after).used, 0);
        log.record(b"a", Period::Month, after);
        let cell = log.get("a").unwrap();
        assert_eq!((cell.used, cell.unsaved), (1, 1));
        assert_eq!(cell.usage(after).last_used_at, Some(from_epoch_secs(epoch_secs(after))));
        let unsaved = log.take_unsaved();
        assert_eq!(unsaved.len(), 1);
        assert!(log.take_unsaved().is_empty(), "taken once");
    }

    #[test]
    fn short_and_long_ids_are_counted_apart() {
        let log = UsageLog::default();
        let now: SystemTime = datetime!(2026-11-29 12:00 UTC).into();
        let long = "an-id-longer-than-twenty-two-bytes";
        for id in ["k1", "k1x", long, "", &long[..22], &long[..23]] {
            log.record(id.as_bytes(), Period::Month, now);
        }
        log.record(long.as_bytes(), Period::Month, now);
        assert_eq!(log.get(long).map(|c| c.used), Some(2));
        for id in ["k1", "k1x", "", &long[..22], &long[..23]] {
            assert_eq!(log.get(id).map(|c| c.used), Some(1), "{id}");
        }
        assert_eq!(log.get("k"), None);
        let taken: Vec<Box<str>> = log.take_unsaved().into_iter().map(|(id, _)| id).collect();
        assert_eq!(taken.len(), 6);
        assert!(taken.iter().any(|id| &**id == long) && taken.iter().any(|id| id.is_empty()));
    }
}

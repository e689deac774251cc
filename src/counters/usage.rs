//! Per-key usage as a process sees it: the last use and the requests of the current period,
//! plus what has not been written to the store yet. Every store keeps one of these.

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

#[derive(Debug, Default)]
pub struct UsageLog {
    cells: DashMap<Box<str>, Cell>,
}

impl UsageLog {
    pub fn record(&self, key_id: &[u8], period: Period, now: SystemTime) {
        let Ok(id) = std::str::from_utf8(key_id) else { return };
        let secs = epoch_secs(now);
        // The common case: a known key inside its period, with no allocation and no calendar.
        if let Some(mut cell) = self.cells.get_mut(id)
            && secs < cell.window.end
            && secs >= cell.window.start
        {
            cell.used += 1;
            cell.unsaved += 1;
            cell.last_used = cell.last_used.max(secs);
            cell.touched = true;
            return;
        }
        let window = period.window(now);
        let mut cell = self.cells.entry(Box::from(id)).or_insert(Cell {
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
        self.cells.get(key_id).map(|c| *c)
    }

    /// Puts back what a store holds (at start): never lowers what this process already counted.
    pub fn restore(&self, key_id: &str, stored: Cell) {
        let mut cell =
            self.cells.entry(Box::from(key_id)).or_insert(Cell { unsaved: 0, touched: false, ..stored });
        if cell.window == stored.window {
            cell.used = cell.used.max(stored.used);
        }
        cell.last_used = cell.last_used.max(stored.last_used);
    }

    /// Every cell with something the store has not seen, marked as seen.
    pub fn take_unsaved(&self) -> Vec<(Box<str>, Cell)> {
        let mut out = Vec::new();
        for mut entry in self.cells.iter_mut() {
            if entry.touched {
                out.push((entry.key().clone(), *entry.value()));
                entry.unsaved = 0;
                entry.touched = false;
            }
        }
        out
    }

    /// Gives back requests that could not be written, so the next flush tries again.
    pub fn return_unsaved(&self, key_id: &str, window: Window, unsaved: u64) {
        if let Some(mut cell) = self.cells.get_mut(key_id)
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
}

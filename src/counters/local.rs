//! Counters that survive a restart on one machine (`[state] path`): decided in memory as
//! without `[state]`, and written to an embedded redb database file off the request path,
//! every [`FLUSH_EVERY`] and at shutdown, so a crash loses at most that much.
//!
//! redb: pure Rust (no C toolchain, no separate daemon), ACID with crash-safe commits, and it
//! lets `keygate keys list` read the file while the gateway writes it (single-writer mode).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use redb::{Builder, ConcurrencyMode, Database, ReadableDatabase, TableDefinition};

use super::memory::{Memory, QuotaCell};
use super::usage::Cell;
use super::{Admission, Ask, Counters, Pending, StoreStatus, Usage};
use crate::quota::{Period, Window};

/// Subject → (period start, period end, requests), seconds since the epoch.
const QUOTAS: TableDefinition<&[u8], (u64, u64, u64)> = TableDefinition::new("quotas");
/// Key id → (last used, period start, period end, requests).
const USAGE: TableDefinition<&str, (u64, u64, u64, u64)> = TableDefinition::new("usage");

/// How often counts are written: SPEC §7 allows a crash to lose at most 5 s.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);

pub struct Local {
    memory: Memory,
    db: Arc<Database>,
    path: PathBuf,
    /// One flush at a time: the timer's and the shutdown's must not interleave.
    flushing: tokio::sync::Mutex<()>,
}

fn builder() -> Builder {
    let mut builder = Builder::new();
    builder.set_concurrency_mode(ConcurrencyMode::SingleWriter);
    builder
}

fn describe(path: &Path, error: impl std::fmt::Display) -> String {
    format!("[state] path {}: {error}", path.display())
}

impl Local {
    /// Opens (or creates) the file, loads what it holds, and starts the flush timer.
    pub fn open(path: &Path) -> Result<Arc<Self>, String> {
        let db = builder().create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                describe(path, "already open in another process (one keygate per state file)")
            }
            e => describe(path, e),
        })?;
        let local = Arc::new(Self {
            memory: Memory::default(),
            db: Arc::new(db),
            path: path.to_path_buf(),
            flushing: tokio::sync::Mutex::new(()),
        });
        local.load().map_err(|e| describe(path, e))?;
        let weak = Arc::downgrade(&local);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + FLUSH_EVERY, FLUSH_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // The store is gone when the gateway is: nothing more to write.
                let Some(local) = weak.upgrade() else { return };
                local.write_out().await;
            }
        });
        Ok(local)
    }

    fn load(&self) -> Result<(), redb::Error> {
        let read = self.db.begin_read()?;
        match read.open_table(QUOTAS) {
            Ok(table) => {
                for row in redb::ReadableTable::iter(&table)? {
                    let (subject, value) = row?;
                    let (start, end, used) = value.value();
                    let window = Window { start, end };
                    self.memory.restore_quota(
                        subject.value(),
                        QuotaCell { window, used, unsaved: 0, touched: false },
                    );
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        match read.open_table(USAGE) {
            Ok(table) => {
                for row in redb::ReadableTable::iter(&table)? {
                    let (id, value) = row?;
                    let (last_used, start, end, used) = value.value();
                    let cell =
                        Cell { last_used, window: Window { start, end }, used, unsaved: 0, touched: false };
                    self.memory.usage.restore(id.value(), cell);
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Writes every count that changed since the last write, in one transaction, on a
    /// blocking thread (a commit waits for the disk).
    async fn write_out(&self) {
        let _one = self.flushing.lock().await;
        let quotas = self.memory.take_unsaved_quotas();
        let usage = self.memory.usage.take_unsaved();
        if quotas.is_empty() && usage.is_empty() {
            return;
        }
        let db = Arc::clone(&self.db);
        let rows = (quotas, usage);
        let written = tokio::task::spawn_blocking(move || {
            let result = write_rows(&db, &rows.0, &rows.1);
            (rows, result)
        })
        .await;
        match written {
            Ok((_, Ok(()))) => {}
            Ok(((quotas, usage), Err(error))) => {
                tracing::warn!(path = %self.path.display(), %error, "could not write usage and quota counts; will retry");
                for (subject, cell) in quotas {
                    self.memory.return_unsaved_quota(&subject, cell.window, cell.unsaved);
                }
                for (id, cell) in usage {
                    self.memory.usage.return_unsaved(&id, cell.window, cell.unsaved);
                }
            }
            Err(error) => tracing::warn!(%error, "the state writer stopped"),
        }
    }
}

fn write_rows(
    db: &Database,
    quotas: &[(Box<[u8]>, QuotaCell)],
    usage: &[(Box<str>, Cell)],
) -> Result<(), redb::Error> {
    let write = db.begin_write()?;
    {
        let mut table = write.open_table(QUOTAS)?;
        for (subject, cell) in quotas {
            table.insert(&**subject, (cell.window.start, cell.window.end, cell.used))?;
        }
        let mut table = write.open_table(USAGE)?;
        for (id, cell) in usage {
            table.insert(&**id, (cell.last_used, cell.window.start, cell.window.end, cell.used))?;
        }
    }
    write.commit()?;
    Ok(())
}

impl Counters for Local {
    fn admit<'a>(&'a self, ask: Ask<'a>) -> Admission<'a> {
        Admission::Decided(Some(self.memory.decide(&ask, 0)))
    }

    fn record(&self, key_id: &[u8], period: Period, now: SystemTime) {
        self.memory.usage.record(key_id, period, now);
    }

    fn usage<'a>(
        &'a self,
        keys: &'a [(String, Period)],
        now: SystemTime,
    ) -> Pending<'a, Result<Vec<Usage>, String>> {
        Box::pin(std::future::ready(Ok(self.memory.usage_now(keys, now))))
    }

    fn status(&self) -> StoreStatus {
        StoreStatus { kind: "state", cluster: None, cluster_errors: 0 }
    }

    fn flush(&self) -> Pending<'_, ()> {
        Box::pin(self.write_out())
    }
}

/// Reads usage from the file, also while a gateway has it open.
pub fn read_usage(path: &Path, keys: &[(String, Period)], now: SystemTime) -> Result<Vec<Usage>, String> {
    if !path.exists() {
        return Ok(vec![Usage::default(); keys.len()]);
    }
    let db = builder().open_read_only(path).map_err(|e| describe(path, e))?;
    let read = db.begin_read().map_err(|e| describe(path, e))?;
    let table = match read.open_table(USAGE) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![Usage::default(); keys.len()]),
        Err(e) => return Err(describe(path, e)),
    };
    keys.iter()
        .map(|(id, _)| {
            let row = redb::ReadableTable::get(&table, id.as_str()).map_err(|e| describe(path, e))?;
            Ok(row.map_or_else(Usage::default, |row| {
                let (last_used, start, end, used) = row.value();
                Cell { last_used, window: Window { start, end }, used, unsaved: 0, touched: false }.usage(now)
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Subject;
    use crate::quota::QuotaLimit;
    use std::time::Instant;

    #[tokio::test]
    async fn counts_survive_reopening_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keygate.state");
        let quota = Some(QuotaLimit { limit: 2, period: Period::Day });
        let now = SystemTime::now();
        let ask = Ask { subject: Subject::Key(b"k1"), rate: None, quota, now, instant: Instant::now() };
        {
            let local = Local::open(&path).unwrap();
            assert!(local.admit(ask).await.is_ok());
            local.record(b"k1", Period::Day, now);
            local.flush().await;
            let read = read_usage(&path, &[("k1".into(), Period::Day)], now).unwrap();
            assert_eq!(read[0].used, 1, "readable while the writer has it open");
        }
        let local = Local::open(&path).unwrap();
        assert!(local.admit(ask).await.is_ok());
        assert!(local.admit(ask).await.is_err(), "the first run's request still counts");
        let usage = local.usage(&[("k1".into(), Period::Day)], now).await.unwrap();
        assert_eq!(usage[0].used, 1);
        assert!(usage[0].last_used_at.is_some());
    }
}

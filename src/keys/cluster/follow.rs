//! A replica following the cluster key store: load the whole table, then apply each change
//! from the stream, in order, to the table in memory; resume after a disconnect from the
//! last change applied.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{Change, Names, Position};
use crate::counters::ClusterSettings;
use crate::keys::{KeyEntry, KeyTable};
use crate::proxy::Gateway;

/// How long one read waits for a change; also how soon a dead connection is noticed.
const BLOCK: Duration = Duration::from_millis(1000);
/// A call may take this long beyond the block before the connection is given up.
const SLACK: Duration = Duration::from_secs(2);
/// Changes applied together (one new table for all of them).
const BATCH: usize = 1000;
/// Between attempts to reach Redis again.
const RETRY: Duration = Duration::from_millis(250);

/// Starts following on its own thread (blocking Redis calls, off the runtime). The gateway
/// stays not-ready until the first whole load.
pub fn spawn(gateway: Arc<Gateway>, settings: ClusterSettings) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("keygate-keys".to_string())
        .spawn(move || follow(&gateway, &settings))?;
    Ok(())
}

/// How the follower stands with Redis: logged once per outage, not once per retry.
struct Outage {
    since: Option<String>,
}

impl Outage {
    fn failed(&mut self, settings: &ClusterSettings, error: &str) {
        if self.since.is_none() {
            tracing::warn!(
                redis = %settings.display, %error,
                "key store: Redis is out of reach; serving the keys already loaded until it is back"
            );
        }
        self.since = Some(error.to_string());
    }

    fn recovered(&mut self, settings: &ClusterSettings) {
        if self.since.take().is_some() {
            tracing::info!(redis = %settings.display, "key store: Redis is back; catching up on changes");
        }
    }
}

fn follow(gateway: &Gateway, settings: &ClusterSettings) {
    let names = Names::new(&settings.namespace);
    let mut position: Option<Position> = None;
    let mut outage = Outage { since: None };
    while !gateway.is_draining() {
        let mut connection = match super::connect(settings, BLOCK + SLACK) {
            Ok(connection) => connection,
            Err(error) => {
                outage.failed(settings, &error);
                std::thread::sleep(RETRY);
                continue;
            }
        };
        // Resuming needs our last change still in the stream: a Redis that restarted empty or
        // a stream trimmed past us means changes we can no longer read.
        let resumable = match position.take() {
            Some(at) => match super::still_there(&mut connection, &names, &at) {
                Ok(true) => Some(at),
                Ok(false) => {
                    tracing::warn!(
                        seq = at.seq,
                        "key store: the last change applied is no longer in Redis; loading every key again"
                    );
                    None
                }
                Err(error) => {
                    outage.failed(settings, &error.to_string());
                    position = Some(at);
                    std::thread::sleep(RETRY);
                    continue;
                }
            },
            None => None,
        };
        let mut at = match resumable {
            Some(at) => at,
            None => match super::load(&mut connection, &names) {
                Ok((table, at)) => {
                    outage.recovered(settings);
                    tracing::info!(
                        keys = table.len(),
                        seq = at.seq,
                        "key store: loaded every key from Redis"
                    );
                    gateway.replace_keys(Arc::new(table));
                    gateway.set_keys_seq(at.seq);
                    gateway.set_keys_ready();
                    at
                }
                Err(error) => {
                    outage.failed(settings, &error);
                    std::thread::sleep(RETRY);
                    continue;
                }
            },
        };
        loop {
            match super::read_changes(&mut connection, &names, &at.stream_id, BLOCK, BATCH) {
                Ok(changes) => {
                    outage.recovered(settings);
                    match apply(gateway, &names, &at, changes) {
                        Ok(next) => {
                            gateway.set_keys_seq(next.seq);
                            at = next;
                        }
                        Err(error) => {
                            // A gap (the stream was trimmed past us) or an entry that does not
                            // validate: only a whole load is sure to be right.
                            tracing::warn!(%error, "key store: loading every key again");
                            position = None;
                            break;
                        }
                    }
                }
                Err(error) => {
                    outage.failed(settings, &error.to_string());
                    position = Some(at);
                    break;
                }
            }
            if gateway.is_draining() {
                return;
            }
        }
        std::thread::sleep(RETRY.min(Duration::from_millis(50)));
    }
}

/// Applies changes that follow `at`, as one new table; the position after them.
fn apply(gateway: &Gateway, names: &Names, at: &Position, changes: Vec<Change>) -> Result<Position, String> {
    let Some(last) = changes.last() else { return Ok(at.clone()) };
    let next = Position { stream_id: last.stream_id.clone(), seq: last.seq };
    // Each change sets whole entries by id, so a run of them comes down to the last word on
    // each id, in order.
    let mut net: HashMap<Vec<u8>, Option<KeyEntry>> = HashMap::new();
    let mut order: Vec<Vec<u8>> = Vec::new();
    let mut expected = at.seq;
    for change in changes {
        if change.seq <= expected {
            // Already in what was loaded (a load overlaps the changes after its position).
            continue;
        }
        if change.seq != expected + 1 {
            return Err(format!("change {} follows change {expected}: some were missed", change.seq));
        }
        expected = change.seq;
        let table = super::table_of(names, &change.put)?;
        for entry in table.entries() {
            let id = entry.id.as_bytes().to_vec();
            if net.insert(id.clone(), Some(entry.clone())).is_none() {
                order.push(id);
            }
        }
        for id in change.removed {
            let id = id.into_bytes();
            if net.insert(id.clone(), None).is_none() {
                order.push(id);
            }
        }
    }
    if order.is_empty() {
        return Ok(next);
    }
    let mut put = Vec::new();
    let mut removed = Vec::new();
    for id in order {
        match net.remove(&id) {
            Some(Some(entry)) => put.push(entry),
            Some(None) => removed.push(String::from_utf8_lossy(&id).into_owned()),
            None => {}
        }
    }
    let changed = (put.len(), removed.len());
    let (table, duplicates): (KeyTable, _) = gateway.snapshot().keys.changed(put, &removed);
    if !duplicates.is_empty() {
        return Err(format!("{} duplicate id or hash after a change", duplicates.len()));
    }
    gateway.replace_keys(Arc::new(table));
    tracing::debug!(put = changed.0, removed = changed.1, seq = next.seq, "key store: changes applied");
    Ok(next)
}

//! Keys kept in Redis (`[auth] store = "cluster"`): one hash per key, an index, and a stream
//! of changes that every replica follows.
//!
//! Layout under the namespace `ns`:
//! - `ns:keys:entry:<id>`: a hash with the fields of a keys.toml entry, each value written as
//!   TOML value text (`"billing"`, `["read"]`, `2026-11-22T10:00:00Z`), so an entry reads back
//!   through exactly the validation a key file gets;
//! - `ns:keys:index`: a sorted set of ids in the order they were added (`keys list` order);
//! - `ns:keys:hashes`: key hash → id, so one key is never stored under two ids;
//! - `ns:keys:seq`: the number of the last change; `ns:keys:changes`: a stream with one entry
//!   per change (`seq`, `put`: the new entries as key-file text, `removed`: ids).
//!
//! Every write is one script call: the entries, the index and the stream change together or
//! not at all, and a change's number is one more than the one before, so a replica that sees
//! a gap knows it missed something and loads the whole table again.

pub mod follow;

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use redis::Connection;
use toml_edit::{DocumentMut, Item};

use crate::config;
use crate::counters::ClusterSettings;
use crate::keys::KeyTable;

/// One entry as (field, TOML value text) pairs.
pub type Fields = Vec<(String, String)>;

/// Stream entries kept: a replica further behind than this loads the whole table again.
const STREAM_MAX: usize = 10_000;
/// Entries per script call when copying a key file in.
const COPY_BATCH: usize = 1000;
/// Times an edit is tried when other writers keep getting in first.
const EDIT_ATTEMPTS: usize = 10;
/// Entries read per pipeline when loading the whole table.
const LOAD_BATCH: usize = 1000;
/// Key-file field order, as `keys create` writes them; unknown fields go last (and fail
/// validation, as they would in a file).
const FIELD_ORDER: [&str; 13] = [
    "id",
    "name",
    "hash",
    "tail",
    "scopes",
    "created_at",
    "expires_at",
    "revoked_at",
    "rate_limit",
    "quota",
    "consumer",
    "meta",
    "allowed_ips",
];

/// The one write: checks, then puts and removes entries and appends the change. `ARGV[2]` is
/// the change number the writer read (an edit: refused if another came in between) or `copy`
/// (entries already there with the same hash are skipped, other clashes refuse the batch).
const APPLY: &str = r#"
local ns = ARGV[1]
local mode = ARGV[2]
local change = cjson.decode(ARGV[3])
local seq_key = ns .. ':keys:seq'
local current = tonumber(redis.call('GET', seq_key) or '0')
if mode ~= 'copy' and tonumber(mode) ~= current then
  return {'stale', tostring(current)}
end
local hashes = ns .. ':keys:hashes'
local index = ns .. ':keys:index'
local prefix = ns .. ':keys:entry:'
local puts = {}
local skipped = 0
local conflicts = {}
for _, e in ipairs(change.put) do
  local old = redis.call('HGET', prefix .. e.id, 'hash')
  local owner = redis.call('HGET', hashes, e.hash)
  if mode == 'copy' then
    if old == '\"' .. e.hash .. '\"' then
      skipped = skipped + 1
    elseif old or (owner and owner ~= e.id) then
      table.insert(conflicts, e.id)
    else
      table.insert(puts, e)
    end
  elseif owner and owner ~= e.id then
    table.insert(conflicts, e.id)
  else
    table.insert(puts, e)
  end
end
if #conflicts > 0 then
  table.insert(conflicts, 1, 'conflict')
  return conflicts
end
local removed = {}
for _, id in ipairs(change.removed) do
  local old = redis.call('HGET', prefix .. id, 'hash')
  if old then
    local bare = string.sub(old, 2, -2)
    if redis.call('HGET', hashes, bare) == id then redis.call('HDEL', hashes, bare) end
    redis.call('DEL', prefix .. id)
    redis.call('ZREM', index, id)
    table.insert(removed, id)
  end
end
local texts = {}
for _, e in ipairs(puts) do
  local key = prefix .. e.id
  local old = redis.call('HGET', key, 'hash')
  if old then
    local bare = string.sub(old, 2, -2)
    if bare ~= e.hash and redis.call('HGET', hashes, bare) == e.id then redis.call('HDEL', hashes, bare) end
  end
  redis.call('DEL', key)
  redis.call('HSET', key, unpack(e.fields))
  redis.call('HSET', hashes, e.hash, e.id)
  if not redis.call('ZSCORE', index, e.id) then
    redis.call('ZADD', index, redis.call('INCR', ns .. ':keys:order'), e.id)
  end
  table.insert(texts, e.text)
end
if #puts == 0 and #removed == 0 then
  return {'done', tostring(current), tostring(skipped)}
end
local seq = redis.call('INCR', seq_key)
redis.call('XADD', ns .. ':keys:changes', 'MAXLEN', '~', ARGV[4], '*',
  'seq', seq, 'put', table.concat(texts), 'removed', table.concat(removed, ' '))
return {'done', tostring(seq), tostring(skipped)}
"#;

/// Where a reader stands in the stream of changes: the last stream id and change number it
/// has applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub stream_id: String,
    pub seq: u64,
}

/// One change read from the stream.
#[derive(Debug, Clone)]
pub struct Change {
    pub stream_id: String,
    pub seq: u64,
    /// The new entries, as key-file text.
    pub put: String,
    pub removed: Vec<String>,
}

/// The Redis names of one namespace's key store.
#[derive(Debug, Clone)]
pub struct Names {
    ns: String,
}

impl Names {
    pub fn new(namespace: &str) -> Self {
        Self { ns: namespace.to_string() }
    }

    fn entry(&self, id: &str) -> String {
        format!("{}:keys:entry:{id}", self.ns)
    }

    fn index(&self) -> String {
        format!("{}:keys:index", self.ns)
    }

    fn hashes(&self) -> String {
        format!("{}:keys:hashes", self.ns)
    }

    fn seq(&self) -> String {
        format!("{}:keys:seq", self.ns)
    }

    pub fn changes(&self) -> String {
        format!("{}:keys:changes", self.ns)
    }

    /// What validation errors name as the "file": where the entries came from.
    fn origin(&self) -> String {
        format!("redis {}:keys", self.ns)
    }
}

/// Opens a blocking connection whose every call is bounded by `timeout`.
pub fn connect(settings: &ClusterSettings, timeout: Duration) -> Result<Connection, String> {
    let connection = settings
        .client
        .get_connection_with_timeout(timeout)
        .map_err(|e| format!("cannot reach Redis at {}: {e}", settings.display))?;
    connection
        .set_read_timeout(Some(timeout))
        .and_then(|()| connection.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("Redis at {}: {e}", settings.display))?;
    Ok(connection)
}

/// The blocking timeout the command line uses: generous, since a person is waiting anyway.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

fn redis_error(settings: &ClusterSettings) -> impl Fn(redis::RedisError) -> String + '_ {
    move |e| format!("Redis at {}: {e}", settings.display)
}

/// Sorts fields into key-file order.
fn ordered(mut fields: Fields) -> Fields {
    let rank = |name: &str| FIELD_ORDER.iter().position(|f| *f == name).unwrap_or(FIELD_ORDER.len());
    fields.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then_with(|| a.0.cmp(&b.0)));
    fields
}

/// One entry as key-file text.
pub fn render(fields: &Fields) -> String {
    let mut text = String::from("[[keys]]\n");
    for (name, value) in fields {
        text.push_str(name);
        text.push_str(" = ");
        text.push_str(value);
        text.push('\n');
    }
    text
}

fn field<'f>(fields: &'f Fields, name: &str) -> Option<&'f str> {
    fields.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// A TOML string value's text, unquoted (ids and hashes never need escapes; they are checked).
fn unquoted(value: &str) -> String {
    value.trim_matches('"').trim_matches('\'').to_string()
}

/// Every entry in index order, and the position of the last change they include. Entries are
/// read in batches, not atomically: a change that lands meanwhile is both (perhaps) in what
/// was read and after the position, and applying it again sets the entries it names to what
/// they already are.
pub fn read_all(connection: &mut Connection, names: &Names) -> redis::RedisResult<(Vec<Fields>, Position)> {
    let last: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
        .arg(names.changes())
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(connection)?;
    let position = match last.first() {
        Some((id, fields)) => {
            let seq =
                fields.chunks(2).find(|p| p[0] == "seq").and_then(|p| p.get(1)?.parse().ok()).unwrap_or(0);
            Position { stream_id: id.clone(), seq }
        }
        None => {
            let seq: Option<u64> = redis::cmd("GET").arg(names.seq()).query(connection)?;
            Position { stream_id: "0-0".to_string(), seq: seq.unwrap_or(0) }
        }
    };
    let ids: Vec<String> = redis::cmd("ZRANGE").arg(names.index()).arg(0).arg(-1).query(connection)?;
    let mut entries = Vec::with_capacity(ids.len());
    for batch in ids.chunks(LOAD_BATCH) {
        let mut pipe = redis::pipe();
        for id in batch {
            pipe.cmd("HGETALL").arg(names.entry(id));
        }
        let found: Vec<Vec<(String, String)>> = pipe.query(connection)?;
        entries.extend(found.into_iter().filter(|f| !f.is_empty()).map(ordered));
    }
    Ok((entries, position))
}

/// Entries' key-file text as a validated table, exactly as a key file would load.
pub fn table_of(names: &Names, text: &str) -> Result<KeyTable, String> {
    config::check_keys(Path::new(&names.origin()), text).map_err(|e| e.to_string())
}

/// The whole table and where it stands: what a replica loads at start.
pub fn load(connection: &mut Connection, names: &Names) -> Result<(KeyTable, Position), String> {
    let (entries, position) = read_all(connection, names).map_err(|e| e.to_string())?;
    let text: String = entries.iter().map(render).collect();
    Ok((table_of(names, &text)?, position))
}

/// Whether the change at `at` is still in the stream (an empty stream at change 0 counts).
pub fn still_there(connection: &mut Connection, names: &Names, at: &Position) -> redis::RedisResult<bool> {
    if at.stream_id == "0-0" {
        let seq: Option<u64> = redis::cmd("GET").arg(names.seq()).query(connection)?;
        return Ok(seq.unwrap_or(0) >= at.seq);
    }
    let found: Vec<(String, Vec<String>)> =
        redis::cmd("XRANGE").arg(names.changes()).arg(&at.stream_id).arg(&at.stream_id).query(connection)?;
    Ok(!found.is_empty())
}

/// Changes after `from`, waiting up to `block` for the first one.
pub fn read_changes(
    connection: &mut Connection,
    names: &Names,
    from: &str,
    block: Duration,
    count: usize,
) -> redis::RedisResult<Vec<Change>> {
    type Reply = Option<Vec<(String, Vec<(String, Vec<String>)>)>>;
    let reply: Reply = redis::cmd("XREAD")
        .arg("COUNT")
        .arg(count)
        .arg("BLOCK")
        .arg(block.as_millis() as u64)
        .arg("STREAMS")
        .arg(names.changes())
        .arg(from)
        .query(connection)?;
    let mut changes = Vec::new();
    for (_, entries) in reply.unwrap_or_default() {
        for (stream_id, fields) in entries {
            let get = |name: &str| {
                fields.chunks(2).find(|p| p[0] == name).and_then(|p| p.get(1)).cloned().unwrap_or_default()
            };
            changes.push(Change {
                seq: get("seq").parse().unwrap_or(0),
                put: get("put"),
                removed: get("removed").split_whitespace().map(str::to_string).collect(),
                stream_id,
            });
        }
    }
    Ok(changes)
}

/// What one script call should do.
#[derive(Debug, Default, serde::Serialize)]
struct Payload {
    put: Vec<PutEntry>,
    removed: Vec<String>,
}

#[derive(Debug, serde::Serialize)]
struct PutEntry {
    id: String,
    hash: String,
    /// Field, value, field, value… as `HSET` takes them.
    fields: Vec<String>,
    text: String,
}

impl PutEntry {
    fn new(fields: &Fields) -> Self {
        Self {
            id: field(fields, "id").map(unquoted).unwrap_or_default(),
            hash: field(fields, "hash").map(unquoted).unwrap_or_default(),
            fields: fields.iter().flat_map(|(n, v)| [n.clone(), v.clone()]).collect(),
            text: render(fields),
        }
    }
}

/// How one script call ended.
enum Applied {
    /// `seq`: the change number after the write.
    Done {
        seq: u64,
        skipped: u64,
    },
    Stale,
    Conflict(Vec<String>),
}

fn apply(
    connection: &mut Connection,
    names: &Names,
    mode: &str,
    payload: &Payload,
) -> Result<Applied, String> {
    let json = serde_json::to_string(payload).map_err(|e| e.to_string())?;
    let reply: Vec<String> = redis::Script::new(APPLY)
        .arg(&names.ns)
        .arg(mode)
        .arg(json)
        .arg(STREAM_MAX)
        .invoke(connection)
        .map_err(|e| format!("the change was not written: {e}"))?;
    match reply.first().map(String::as_str) {
        Some("done") => Ok(Applied::Done {
            seq: reply.get(1).and_then(|s| s.parse().ok()).unwrap_or(0),
            skipped: reply.get(2).and_then(|s| s.parse().ok()).unwrap_or(0),
        }),
        Some("stale") => Ok(Applied::Stale),
        Some("conflict") => Ok(Applied::Conflict(reply[1..].to_vec())),
        _ => Err(format!("unexpected answer from the key store script: {reply:?}")),
    }
}

/// One entry of an edited document as fields, each value as TOML text (a `[keys.meta]`
/// sub-table written by hand becomes the inline table it stands for).
fn fields_of(table: &toml_edit::Table) -> Fields {
    let fields = table
        .iter()
        .filter_map(|(name, item)| {
            let value = match item {
                Item::Value(v) => v.clone(),
                Item::Table(t) => toml_edit::Value::InlineTable(t.clone().into_inline_table()),
                _ => return None,
            };
            Some((name.to_string(), value.decorated("", "").to_string()))
        })
        .collect();
    ordered(fields)
}

/// Why [`ClusterKeys::edit`] wrote nothing, besides what the edit itself refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EditError {
    /// Redis cannot be reached or kept changing: the same edit may succeed later.
    Unavailable(String),
    /// The edited keys would not load (or hold a key twice): it will never succeed.
    Invalid(String),
}

impl From<EditError> for String {
    fn from(error: EditError) -> Self {
        match error {
            EditError::Unavailable(message) | EditError::Invalid(message) => message,
        }
    }
}

/// The key store in Redis as the command line uses it: read as one key-file document, so
/// `keys create|import|revoke|delete|rotate` run the very lifecycle code they run on a file.
pub struct ClusterKeys {
    settings: ClusterSettings,
    names: Names,
    connection: Connection,
}

impl ClusterKeys {
    pub fn open(settings: &ClusterSettings) -> Result<Self, String> {
        let connection = connect(settings, COMMAND_TIMEOUT)?;
        Ok(Self { names: Names::new(&settings.namespace), settings: settings.clone(), connection })
    }

    /// Every entry as one document, and the change number it reflects. Read until two reads
    /// of the number around it agree, so the document is one consistent state.
    fn snapshot(&mut self) -> Result<(DocumentMut, Vec<Fields>, u64), String> {
        for _ in 0..10 {
            let before: Option<u64> = redis::cmd("GET")
                .arg(self.names.seq())
                .query(&mut self.connection)
                .map_err(redis_error(&self.settings))?;
            let (entries, _) =
                read_all(&mut self.connection, &self.names).map_err(redis_error(&self.settings))?;
            let after: Option<u64> = redis::cmd("GET")
                .arg(self.names.seq())
                .query(&mut self.connection)
                .map_err(redis_error(&self.settings))?;
            if before == after {
                let text: String = entries.iter().map(render).collect();
                let doc = text.parse().map_err(|e| format!("the keys in Redis do not read back: {e}"))?;
                return Ok((doc, entries, after.unwrap_or(0)));
            }
        }
        Err("the keys in Redis kept changing while being read; try again".to_string())
    }

    /// Every entry, read as a key-file document (for `keys list`).
    pub fn document(&mut self) -> Result<DocumentMut, String> {
        self.snapshot().map(|(doc, _, _)| doc)
    }

    /// Applies `change` to the store read as a document, checks the result as a replica will
    /// load it, and writes what changed as one change. If another change came in meanwhile,
    /// nothing is written and `change` runs again on the newer keys (the counterpart of the
    /// key file's lock: concurrent runs lose nothing). Returns the change number that holds
    /// the edit (the one read, when there was nothing to write), so a caller can wait for a
    /// replica to have applied it.
    pub fn edit<T, E: From<EditError>>(
        &mut self,
        mut change: impl FnMut(&mut DocumentMut) -> Result<T, E>,
    ) -> Result<(T, u64), E> {
        for _ in 0..EDIT_ATTEMPTS {
            let (mut doc, before, seq) = self.snapshot().map_err(EditError::Unavailable)?;
            let out = change(&mut doc)?;
            let payload = self.payload(&doc, &before).map_err(EditError::Invalid)?;
            if payload.put.is_empty() && payload.removed.is_empty() {
                return Ok((out, seq));
            }
            match apply(&mut self.connection, &self.names, &seq.to_string(), &payload)
                .map_err(EditError::Unavailable)?
            {
                Applied::Done { seq, .. } => return Ok((out, seq)),
                Applied::Stale => continue,
                Applied::Conflict(ids) => {
                    return Err(EditError::Invalid(format!(
                        "the same key is already stored under another id; nothing was written: {}",
                        ids.join(", ")
                    ))
                    .into());
                }
            }
        }
        Err(EditError::Unavailable(
            "the keys in Redis kept changing while this change was made; nothing was written; try again"
                .to_string(),
        )
        .into())
    }

    /// What turns the keys as read (`before`) into `doc`, validated as a whole first.
    fn payload(&self, doc: &DocumentMut, before: &[Fields]) -> Result<Payload, String> {
        table_of(&self.names, &doc.to_string())
            .map_err(|e| format!("the change would make the keys invalid, so nothing was written:\n{e}"))?;
        let after: Vec<Fields> = doc
            .get("keys")
            .and_then(Item::as_array_of_tables)
            .map(|keys| keys.iter().map(fields_of).collect())
            .unwrap_or_default();
        let id_of = |f: &Fields| field(f, "id").map(unquoted).unwrap_or_default();
        let old: HashMap<String, &Fields> = before.iter().map(|f| (id_of(f), f)).collect();
        let new_ids: std::collections::HashSet<String> = after.iter().map(id_of).collect();
        Ok(Payload {
            put: after.iter().filter(|f| old.get(&id_of(f)) != Some(f)).map(PutEntry::new).collect(),
            removed: old.keys().filter(|id| !new_ids.contains(*id)).cloned().collect(),
        })
    }

    /// Copies entries in (hashes only, as read from a key file): an entry whose id and hash
    /// are already here is skipped; any id or key stored differently is an error listing
    /// them all, and then nothing is written. Returns (copied, skipped).
    pub fn copy(&mut self, entries: &[Fields]) -> Result<(u64, u64), String> {
        let conflicts = self.conflicts(entries)?;
        if !conflicts.is_empty() {
            return Err(conflicts_message(&conflicts));
        }
        let progress = std::io::stderr().is_terminal() && entries.len() > COPY_BATCH;
        let (mut copied, mut skipped) = (0u64, 0u64);
        for batch in entries.chunks(COPY_BATCH) {
            let payload = Payload { put: batch.iter().map(PutEntry::new).collect(), removed: Vec::new() };
            match apply(&mut self.connection, &self.names, "copy", &payload)? {
                Applied::Done { skipped: s, .. } => {
                    skipped += s;
                    copied += batch.len() as u64 - s;
                }
                // Another writer stored a clashing entry after the check above.
                Applied::Conflict(ids) => return Err(conflicts_message(&ids)),
                Applied::Stale => return Err("unexpected: a copy was refused as stale".to_string()),
            }
            if progress {
                let done = copied + skipped;
                let total = entries.len();
                let width = 30 * done as usize / total.max(1);
                eprint!("\r[{}{}] {done}/{total} keys", "#".repeat(width), " ".repeat(30 - width));
                let _ = std::io::stderr().flush();
            }
        }
        if progress {
            eprintln!();
        }
        Ok((copied, skipped))
    }

    /// Ids of `entries` that clash with what is stored: the id holds another key, or the key
    /// is stored under another id.
    fn conflicts(&mut self, entries: &[Fields]) -> Result<Vec<String>, String> {
        let mut conflicts = Vec::new();
        for batch in entries.chunks(COPY_BATCH) {
            let mut pipe = redis::pipe();
            for entry in batch {
                let put = PutEntry::new(entry);
                pipe.cmd("HGET").arg(self.names.entry(&put.id)).arg("hash");
                pipe.cmd("HGET").arg(self.names.hashes()).arg(&put.hash);
            }
            let found: Vec<Option<String>> =
                pipe.query(&mut self.connection).map_err(redis_error(&self.settings))?;
            for (entry, pair) in batch.iter().zip(found.chunks(2)) {
                let put = PutEntry::new(entry);
                let stored_hash = pair[0].as_deref().map(unquoted);
                let owner = pair.get(1).cloned().flatten();
                let clash = stored_hash.is_some_and(|h| h != put.hash) || owner.is_some_and(|o| o != put.id);
                if clash {
                    conflicts.push(put.id);
                }
            }
        }
        Ok(conflicts)
    }
}

fn conflicts_message(ids: &[String]) -> String {
    format!(
        "{} entr{} clash with keys already in the store (the id holds another key, or the key is stored under another id); nothing was copied:\n  {}",
        ids.len(),
        if ids.len() == 1 { "y" } else { "ies" },
        ids.join("\n  ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_render_in_key_file_order_and_read_back_from_a_document() {
        let fields = ordered(vec![
            ("scopes".into(), "[\"read\"]".into()),
            ("hash".into(), format!("\"{}\"", crate::keys::hash_key("k"))),
            ("id".into(), "\"a1\"".into()),
            ("name".into(), "\"n\"".into()),
        ]);
        assert_eq!(fields[0].0, "id");
        let text = render(&fields);
        let doc: DocumentMut = text.parse().unwrap();
        let table = doc["keys"].as_array_of_tables().unwrap().get(0).unwrap();
        assert_eq!(fields_of(table), fields);
        let by_hand: DocumentMut = format!("{text}[keys.meta]\ntenant = \"x\"\n").parse().unwrap();
        let table = by_hand["keys"].as_array_of_tables().unwrap().get(0).unwrap();
        assert_eq!(field(&fields_of(table), "meta"), Some("{ tenant = \"x\" }"));
        assert!(table_of(&Names::new("kg"), &text).is_ok());
    }
}

//! `keygate keys …`: the key lifecycle from the command line. Keys go to stdout alone (so
//! `KEY=$(keygate keys create …)` works); everything meant for people goes to stderr.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::config::{self, KeySource};
use crate::keys::cluster::{self, ClusterKeys};
use crate::keys::lifecycle::{self, Grant, KeyView};
use crate::keys::store::{self, KeyStore};
use crate::keys::{self, RateLimit};
use crate::quota::{Period, QuotaLimit};

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key, add its hash to the key file, print the key: the only time it is shown
    Create(GrantArgs),
    /// Store the hash of an existing key read from stdin; print its new id
    Import(GrantArgs),
    /// List keys: id, name, tail, scopes, created, expires, status
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key now (SELECTOR: id, else name, else tail)
    Revoke { selector: String },
    /// Remove a key from the file
    Delete { selector: String },
    /// Make a successor key (same name, scopes, rate limit); the old one expires after the grace
    Rotate {
        selector: String,
        #[arg(long, default_value = "24h", value_name = "DURATION")]
        grace: String,
        /// The new key's expiry; default: the old key's lifetime, counted from now
        #[arg(long, value_name = "WHEN")]
        expires: Option<String>,
    },
    /// Read a key on stdin, print sha256:<hex>
    Hash,
    /// Copy every entry of a key file into the configured store (hashes only); entries
    /// already there are skipped, so it can run again
    Copy {
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
    },
}

/// What a new key holds, as `create` and `import` take it.
#[derive(Debug, clap::Args)]
pub struct GrantArgs {
    #[arg(long)]
    name: String,
    /// A scope the key holds (repeatable); "*" holds every scope
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// A duration from now (90d, 12h), an RFC 3339 instant, or "never"
    #[arg(long, value_name = "WHEN")]
    expires: Option<String>,
    /// N/s, N/m or N/h
    #[arg(long = "rate-limit", value_name = "RATE")]
    rate_limit: Option<String>,
    /// N/day or N/month (UTC calendar periods)
    #[arg(long, value_name = "QUOTA")]
    quota: Option<String>,
    /// The consumer this key belongs to: its keys share one rate-limit bucket and one quota
    #[arg(long, value_name = "NAME")]
    consumer: Option<String>,
}

type Outcome = Result<(), String>;

pub fn run(config_path: &Path, command: KeysCommand) -> Outcome {
    let now = OffsetDateTime::now_utc();
    match command {
        KeysCommand::Create(args) => {
            let grant = grant(args, now)?;
            let (id, key) = edit(config_path, |doc, prefix| {
                let (id, key) = unused_key(doc, prefix)?;
                lifecycle::append(doc, &id, &keys::hash_key(&key), keys::tail(&key), &grant, now)
                    .map_err(|e| e.to_string())?;
                Ok((id, key))
            })?;
            eprintln!("created key {id} ({}) {}; it is shown only this once", grant.name, describe(&grant));
            println!("{key}");
        }
        KeysCommand::Import(args) => {
            let grant = grant(args, now)?;
            let key = read_stdin_key()?;
            if key.chars().count() < keys::MIN_IMPORTED_KEY_LEN {
                return Err(format!(
                    "the key on stdin is shorter than {} characters: a key that short can be guessed; make a new one with `keygate keys create`",
                    keys::MIN_IMPORTED_KEY_LEN
                ));
            }
            let hash = keys::hash_key(&key);
            let id = edit(config_path, |doc, _| {
                if let Some(existing) = lifecycle::id_of_hash(doc, &hash) {
                    return Err(lifecycle::LifecycleError::AlreadyPresent(existing).to_string());
                }
                let id = unused_id(doc)?;
                lifecycle::append(doc, &id, &hash, keys::tail(&key), &grant, now)
                    .map_err(|e| e.to_string())?;
                Ok(id)
            })?;
            eprintln!("imported key {id} ({}) {}", grant.name, describe(&grant));
            println!("{id}");
        }
        KeysCommand::List { json } => {
            let doc = match config::key_source_of(config_path).map_err(|e| e.to_string())?.0 {
                KeySource::File(keys_path) => store::read_document(&keys_path).map_err(|e| e.to_string())?,
                KeySource::Cluster(settings) => ClusterKeys::open(&settings)?.document()?,
            };
            let mut views = lifecycle::views(&doc, now);
            let with_usage = add_usage(config_path, &mut views)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&views).map_err(|e| e.to_string())?);
            } else {
                print!("{}", table(&views, with_usage));
            }
        }
        KeysCommand::Revoke { selector } => {
            let (id, changed) = edit(config_path, |doc, _| {
                let index = lifecycle::select(doc, &selector).map_err(|e| e.to_string())?;
                let id = lifecycle::views(doc, now).swap_remove(index).id;
                Ok((id, lifecycle::revoke(doc, index, now).map_err(|e| e.to_string())?))
            })?;
            if changed {
                eprintln!("revoked key {id}");
            } else {
                eprintln!("key {id} was already revoked");
            }
        }
        KeysCommand::Delete { selector } => {
            let (id, name) = edit(config_path, |doc, _| {
                let index = lifecycle::select(doc, &selector).map_err(|e| e.to_string())?;
                lifecycle::remove(doc, index).map_err(|e| e.to_string())
            })?;
            eprintln!("deleted key {id} ({name})");
        }
        KeysCommand::Rotate { selector, grace, expires } => {
            let grace = config::parse_duration_text(&grace).or_else(|e| match grace.trim() {
                "0" | "0s" => Ok(std::time::Duration::ZERO),
                _ => Err(format!("--grace: {e}")),
            })?;
            let new_expiry = expires.as_deref().map(|e| parse_expiry(e, now)).transpose()?;
            let (old_id, old_end, new_id, key) = edit(config_path, |doc, prefix| {
                let index = lifecycle::select(doc, &selector).map_err(|e| e.to_string())?;
                let old_id = lifecycle::views(doc, now).swap_remove(index).id;
                let mut grant = lifecycle::successor_grant(doc, index, now).map_err(|e| e.to_string())?;
                if let Some(expiry) = new_expiry {
                    grant.expires_at = expiry;
                }
                let end = lifecycle::expire(doc, index, now + grace).map_err(|e| e.to_string())?;
                let (new_id, key) = unused_key(doc, prefix)?;
                lifecycle::append(doc, &new_id, &keys::hash_key(&key), keys::tail(&key), &grant, now)
                    .map_err(|e| e.to_string())?;
                Ok((old_id, end, new_id, key))
            })?;
            eprintln!(
                "rotated: new key {new_id}; old key {old_id} ends at {}; the new key is shown only this once",
                lifecycle::timestamp(old_end)
            );
            println!("{key}");
        }
        KeysCommand::Hash => println!("{}", keys::hash_key(&read_stdin_key()?)),
        KeysCommand::Copy { from } => {
            let entries = config::key_file_entries(&from).map_err(|e| e.to_string())?;
            let (copied, skipped) = match config::key_source_of(config_path).map_err(|e| e.to_string())?.0 {
                KeySource::Cluster(settings) => ClusterKeys::open(&settings)?.copy(&entries)?,
                KeySource::File(_) => edit(config_path, |doc, _| copy_into_document(doc, &entries))?,
            };
            eprintln!("copied {copied}, skipped {skipped} (already there) from {}", from.display());
        }
    }
    Ok(())
}

/// `keys copy` into a key file: the same rules as into Redis (same id and hash: skipped; an
/// id or key stored differently: an error listing them, and nothing written).
fn copy_into_document(
    doc: &mut toml_edit::DocumentMut,
    entries: &[cluster::Fields],
) -> Result<(u64, u64), String> {
    let value = |table: &toml_edit::Table, name: &str| {
        table.get(name).and_then(toml_edit::Item::as_str).map(str::to_string)
    };
    let field = |fields: &cluster::Fields, name: &str| {
        fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let existing = doc.get("keys").and_then(toml_edit::Item::as_array_of_tables);
    let mut by_id = std::collections::HashMap::new();
    let mut by_hash = std::collections::HashMap::new();
    for table in existing.into_iter().flat_map(|keys| keys.iter()) {
        let (id, hash) = (value(table, "id").unwrap_or_default(), value(table, "hash").unwrap_or_default());
        by_id.insert(id.clone(), hash.clone());
        by_hash.insert(hash, id);
    }
    let (mut conflicts, mut fresh, mut skipped) = (Vec::new(), Vec::new(), 0);
    for fields in entries {
        let (id, hash) = (field(fields, "id"), field(fields, "hash"));
        match (by_id.get(&id), by_hash.get(&hash)) {
            (Some(stored), _) if *stored == hash => skipped += 1,
            (Some(_), _) | (None, Some(_)) => conflicts.push(id),
            (None, None) => fresh.push(fields),
        }
    }
    if !conflicts.is_empty() {
        return Err(format!(
            "{} entries clash with keys already in the store (the id holds another key, or the key is stored under another id); nothing was copied:\n  {}",
            conflicts.len(),
            conflicts.join("\n  ")
        ));
    }
    let keys = doc
        .entry("keys")
        .or_insert(toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()))
        .as_array_of_tables_mut()
        .ok_or("the key file's `keys` is not a list of [[keys]] tables")?;
    for fields in &fresh {
        let one: toml_edit::DocumentMut = cluster::render(fields).parse().map_err(|e| format!("{e}"))?;
        let table =
            one.get("keys").and_then(toml_edit::Item::as_array_of_tables).and_then(|k| k.get(0)).cloned();
        let mut table = table.ok_or("an entry did not read back")?;
        table.decor_mut().set_prefix("\n");
        keys.push(table);
    }
    Ok((fresh.len() as u64, skipped))
}

/// Locks the key file, applies `change`, checks the result as the gateway would load it, and
/// only then writes it (atomically). A failure anywhere leaves the file as it was. With the
/// cluster store, the same change runs on the keys read from Redis ([`ClusterKeys::edit`]).
fn edit<T>(
    config_path: &Path,
    mut change: impl FnMut(&mut toml_edit::DocumentMut, &str) -> Result<T, String>,
) -> Result<T, String> {
    let (keys_path, prefix) = match config::key_source_of(config_path).map_err(|e| e.to_string())? {
        (KeySource::File(path), prefix) => (path, prefix),
        (KeySource::Cluster(settings), prefix) => {
            return ClusterKeys::open(&settings)?.edit(|doc| change(doc, &prefix));
        }
    };
    let store = KeyStore::lock(&keys_path).map_err(|e| e.to_string())?;
    let mut doc = store.read().map_err(|e| e.to_string())?;
    let out = change(&mut doc, &prefix)?;
    let text = doc.to_string();
    config::check_keys(store.path(), &text)
        .map_err(|e| format!("the change would make the key file invalid, so nothing was written:\n{e}"))?;
    store.write(&text).map_err(|e| e.to_string())?;
    Ok(out)
}

fn unused_id(doc: &toml_edit::DocumentMut) -> Result<String, String> {
    let taken = lifecycle::ids(doc);
    for _ in 0..16 {
        let id = keys::generate_id().map_err(|e| format!("no OS randomness: {e}"))?;
        if !taken.contains(&id) {
            return Ok(id);
        }
    }
    Err("could not find an unused key id".to_string())
}

fn unused_key(doc: &toml_edit::DocumentMut, prefix: &str) -> Result<(String, String), String> {
    let taken = lifecycle::ids(doc);
    for _ in 0..16 {
        let (id, key) = keys::generate(prefix).map_err(|e| format!("no OS randomness: {e}"))?;
        if !taken.contains(&id) {
            return Ok((id, key));
        }
    }
    Err("could not find an unused key id".to_string())
}

fn grant(args: GrantArgs, now: OffsetDateTime) -> Result<Grant, String> {
    let GrantArgs { name, scopes, expires, rate_limit, quota, consumer } = args;
    if name.trim().is_empty() || name.chars().any(char::is_control) {
        return Err("--name must be non-empty text without control characters".to_string());
    }
    for scope in &scopes {
        if !config::valid_scope(scope) {
            return Err(format!("--scope {scope:?} must be a name without spaces, commas or quotes"));
        }
    }
    if let Some(rate) = &rate_limit
        && RateLimit::parse(rate).is_none()
    {
        return Err(format!("--rate-limit {rate:?} must be N/s, N/m or N/h with N > 0"));
    }
    if let Some(q) = &quota
        && QuotaLimit::parse(q).is_none()
    {
        return Err(format!("--quota {q:?} must be N/day or N/month with N > 0"));
    }
    if let Some(c) = &consumer
        && (c.trim().is_empty() || c.len() > 128 || c.chars().any(char::is_control))
    {
        return Err("--consumer must be 1 to 128 bytes of text without control characters".to_string());
    }
    let expires_at = expires.map(|e| parse_expiry(&e, now)).transpose()?.flatten();
    Ok(Grant { name, scopes, expires_at, rate_limit, quota, consumer, ..Grant::default() })
}

/// `never`, a duration from now, or an RFC 3339 instant.
fn parse_expiry(text: &str, now: OffsetDateTime) -> Result<Option<OffsetDateTime>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    if let Ok(after) = config::parse_duration_text(text) {
        let after =
            time::Duration::try_from(after).map_err(|_| format!("--expires {text:?} is too far away"))?;
        return Ok(Some(now + after));
    }
    OffsetDateTime::parse(text, &Rfc3339)
        .map(Some)
        .map_err(|_| format!("--expires {text:?} must be a duration (90d), an RFC 3339 instant, or never"))
}

fn read_stdin_key() -> Result<String, String> {
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .map_err(|e| format!("cannot read the key from stdin: {e}"))?;
    let key = input.trim();
    if key.is_empty() {
        return Err("no key on stdin".to_string());
    }

    Ok(key.to_string())
}

fn describe(grant: &Grant) -> String {
    let scopes = if grant.scopes.is_empty() { "no scopes".to_string() } else { grant.scopes.join(",") };
    let expires = grant
        .expires_at
        .map_or("never expires".to_string(), |at| format!("expires {}", lifecycle::timestamp(at)));
    format!("[{scopes}], {expires}")
}

/// Fills in last use and requests this period from the configured store; false when usage
/// is kept only in a running gateway's memory (no [state] or [cluster]).
fn add_usage(config_path: &Path, views: &mut [KeyView]) -> Result<bool, String> {
    let settings = config::store_of(config_path).map_err(|e| e.to_string())?;
    if !settings.persistent() {
        return Ok(false);
    }
    let keys: Vec<(String, Period)> = views
        .iter()
        .map(|v| {
            let period = v.quota.as_deref().and_then(QuotaLimit::parse).map_or(Period::Month, |q| q.period);
            (v.id.clone(), period)
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    // The key list matters more than its usage columns: a store out of reach costs only those.
    let usage =
        match runtime.block_on(crate::counters::read_usage(&settings, &keys, std::time::SystemTime::now())) {
            Ok(usage) => usage.unwrap_or_default(),
            Err(error) => {
                eprintln!("warning: usage not shown: {error}");
                return Ok(false);
            }
        };
    for (view, usage) in views.iter_mut().zip(usage) {
        view.last_used_at = Some(usage.last_used_at.map(crate::counters::usage_timestamp));
        view.used = Some(usage.used);
    }
    Ok(true)
}

/// An aligned table, one key a line; LAST USED and USED (for keys with a quota: `n/limit`)
/// when usage is kept.
fn table(views: &[KeyView], with_usage: bool) -> String {
    let mut header: Vec<String> =
        ["ID", "NAME", "TAIL", "SCOPES", "CREATED", "EXPIRES", "STATUS"].map(String::from).to_vec();
    if with_usage {
        header.extend(["LAST USED", "USED"].map(String::from));
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            let mut row = vec![
                v.id.clone(),
                v.name.clone(),
                v.tail.clone(),
                if v.scopes.is_empty() { "-".to_string() } else { v.scopes.join(",") },
                v.created.clone().unwrap_or_else(|| "-".into()),
                v.expires.clone().unwrap_or_else(|| "never".into()),
                v.status.to_string(),
            ];
            if with_usage {
                row.push(v.last_used_at.clone().flatten().unwrap_or_else(|| "never".into()));
                row.push(match (&v.quota, v.used) {
                    (Some(quota), Some(used)) => {
                        let limit = quota.split('/').next().unwrap_or("").trim();
                        format!("{used}/{limit}")
                    }
                    // SPEC §4: USED is for keys with a quota; --json has every key's count.
                    _ => "-".into(),
                });
            }
            row
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, &w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

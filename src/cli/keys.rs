//! `keygate keys …`: the key lifecycle from the command line. Keys go to stdout alone (so
//! `KEY=$(keygate keys create …)` works); everything meant for people goes to stderr.

use std::io::Read;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use time::OffsetDateTime;

use crate::audit::AuditLog;
use crate::config::{self, KeySource};
use crate::keys;
use crate::keys::cluster::{self, ClusterKeys};
use crate::keys::lifecycle::{self, Grant, GrantRequest, KeyView};
use crate::keys::store::{self, KeyChange, Locked, Rotation, Secret};
use crate::quota::Period;

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
    if let KeysCommand::Hash = command {
        println!("{}", keys::hash_key(&read_stdin_key()?));
        return Ok(());
    }
    let store = store::of_config(config_path).map_err(|e| e.to_string())?;
    let audit = AuditLog::of_config(config_path);
    // Every change is audited as made by "cli"; the API names its admin token instead.
    let record = |change: &KeyChange| audit.record("cli", change);
    match command {
        KeysCommand::Create(args) => {
            let grant = args.into_request().check(now)?;
            let change = store.create(&grant, now).map_err(|e| e.to_string())?;
            record(&change);
            eprintln!(
                "created key {} ({}) {}; it is shown only this once",
                change.key.id,
                grant.name,
                describe(&grant)
            );
            println!("{}", change.secret.as_ref().map(Secret::expose).unwrap_or_default());
        }
        KeysCommand::Import(args) => {
            let grant = args.into_request().check(now)?;
            let key = read_stdin_key()?;
            if key.chars().count() < keys::MIN_IMPORTED_KEY_LEN {
                return Err(format!(
                    "the key on stdin is shorter than {} characters: a key that short can be guessed; make a new one with `keygate keys create`",
                    keys::MIN_IMPORTED_KEY_LEN
                ));
            }
            let change = store.import(&key, &grant, now).map_err(|e| e.to_string())?;
            record(&change);
            eprintln!("imported key {} ({}) {}", change.key.id, grant.name, describe(&grant));
            println!("{}", change.key.id);
        }
        KeysCommand::List { json } => {
            let mut views = store.list(now).map_err(|e| e.to_string())?;
            let with_usage = add_usage(config_path, &mut views)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&views).map_err(|e| e.to_string())?);
            } else {
                print!("{}", table(&views, with_usage));
            }
        }
        KeysCommand::Revoke { selector } => {
            let change = store.revoke(&selector, now).map_err(|e| e.to_string())?;
            if change.changed {
                record(&change);
                eprintln!("revoked key {}", change.key.id);
            } else {
                eprintln!("key {} was already revoked", change.key.id);
            }
        }
        KeysCommand::Delete { selector } => {
            let change = store.delete(&selector, now).map_err(|e| e.to_string())?;
            record(&change);
            eprintln!("deleted key {} ({})", change.key.id, change.key.name);
        }
        KeysCommand::Rotate { selector, grace, expires } => {
            let grace = lifecycle::parse_grace(&grace).map_err(|e| format!("--{e}"))?;
            let expires_at = expires
                .as_deref()
                .map(|e| lifecycle::parse_expiry(e, now))
                .transpose()
                .map_err(|e| format!("--{e}"))?;
            let change =
                store.rotate(&selector, &Rotation { grace, expires_at }, now).map_err(|e| e.to_string())?;
            record(&change);
            let old = change.replaced.as_ref();
            eprintln!(
                "rotated: new key {}; old key {} ends at {}; the new key is shown only this once",
                change.key.id,
                old.map_or("?", |v| v.id.as_str()),
                old.and_then(|v| v.expires.as_deref()).unwrap_or("?"),
            );
            println!("{}", change.secret.as_ref().map(Secret::expose).unwrap_or_default());
        }
        KeysCommand::Hash => {}
        KeysCommand::Copy { from } => {
            let entries = config::key_file_entries(&from).map_err(|e| e.to_string())?;
            let (copied, skipped) = match config::key_source_of(config_path).map_err(|e| e.to_string())?.0 {
                KeySource::Cluster(settings) => ClusterKeys::open(&settings)?.copy(&entries)?,
                KeySource::File(keys_path) => copy_into_file(&keys_path, &entries)?,
            };
            eprintln!("copied {copied}, skipped {skipped} (already there) from {}", from.display());
        }
    }
    Ok(())
}

impl GrantArgs {
    fn into_request(self) -> GrantRequest {
        let GrantArgs { name, scopes, expires, rate_limit, quota, consumer } = self;
        GrantRequest { name, scopes, expires, rate_limit, quota, consumer, ..GrantRequest::default() }
    }
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

/// `keys copy` into a key file: locked, checked as the gateway would load it, and written
/// atomically, or not at all. (Copies keep ids and hashes as they are, which the store's
/// create/import cannot, so this is the one write that does not go through [`store::KeyStore`].)
fn copy_into_file(keys_path: &Path, entries: &[cluster::Fields]) -> Result<(u64, u64), String> {
    let lock = Locked::lock(keys_path).map_err(|e| e.to_string())?;
    let mut doc = lock.read().map_err(|e| e.to_string())?;
    let counts = copy_into_document(&mut doc, entries)?;
    let text = doc.to_string();
    config::check_keys(lock.path(), &text)
        .map_err(|e| format!("the change would make the key file invalid, so nothing was written:\n{e}"))?;
    lock.write(&text).map_err(|e| e.to_string())?;
    Ok(counts)
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
    let keys: Vec<(String, Period)> = views.iter().map(|v| (v.id.clone(), v.usage_period())).collect();
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

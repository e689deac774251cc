//! What `keygate keys` does to the key file's entries: add, find, revoke, expire, remove and
//! describe them, on a toml_edit document so everything else in the file stays as written.

use std::str::FromStr;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use toml_edit::{Array, ArrayOfTables, DocumentMut, Item, Table, value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LifecycleError {
    #[error("no key matches {0:?} (by id, name or tail)")]
    NotFound(String),
    #[error("{selector:?} matches {} keys; use the id:\n{}", candidates.len(), candidates.join("\n"))]
    Ambiguous { selector: String, candidates: Vec<String> },
    #[error("the key file must list keys as [[keys]] tables to be edited")]
    Layout,
    #[error("this key is already in the key file, as id {0}")]
    AlreadyPresent(String),
}

/// A key's state as `keys list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub tail: String,
    pub scopes: Vec<String>,
    pub created: Option<String>,
    pub expires: Option<String>,
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    /// Filled in by `keys list` when usage is kept ([state] or [cluster]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_at: Option<Option<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    // Not in `keys list --json` (its fields are fixed); the `/keys` API shows them.
    #[serde(skip)]
    pub revoked: Option<String>,
    #[serde(skip)]
    pub rate_limit: Option<String>,
    #[serde(skip)]
    pub meta: Vec<(String, String)>,
    #[serde(skip)]
    pub allowed_ips: Vec<String>,
}

impl KeyView {
    /// The period the key's usage is counted in: its quota's, else the calendar month.
    pub fn usage_period(&self) -> crate::quota::Period {
        self.quota
            .as_deref()
            .and_then(crate::quota::QuotaLimit::parse)
            .map_or(crate::quota::Period::Month, |q| q.period)
    }
}

/// What a new key holds besides its secret.
#[derive(Debug, Clone, Default)]
pub struct Grant {
    pub name: String,
    pub scopes: Vec<String>,
    pub expires_at: Option<OffsetDateTime>,
    pub rate_limit: Option<String>,
    /// `meta` entries, written as an inline table when there are any.
    pub meta: Vec<(String, String)>,
    /// `allowed_ips` networks; empty means the field is left out (any address).
    pub allowed_ips: Vec<String>,
    pub quota: Option<String>,
    pub consumer: Option<String>,
}

/// How long a rotated key stays valid when no grace is given (SPEC §4).
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A new key's fields as people write them (`keygate keys create` flags, `POST /keys` JSON),
/// before [`GrantRequest::check`] makes a [`Grant`] of them.
#[derive(Debug, Clone, Default)]
pub struct GrantRequest {
    pub name: String,
    pub scopes: Vec<String>,
    /// A duration from now (`90d`), an RFC 3339 instant, or `never`.
    pub expires: Option<String>,
    pub rate_limit: Option<String>,
    pub quota: Option<String>,
    pub consumer: Option<String>,
    pub meta: Vec<(String, String)>,
    pub allowed_ips: Vec<String>,
}

impl GrantRequest {
    /// Checks every field as the key file's loader does (the same code: the grant is written
    /// as a one-entry key file and loaded), with a message naming the field.
    pub fn check(self, now: OffsetDateTime) -> Result<Grant, String> {
        let GrantRequest { name, scopes, expires, rate_limit, quota, consumer, meta, allowed_ips } = self;
        if name.trim().is_empty() || name.chars().any(char::is_control) {
            return Err("name must be non-empty text without control characters".to_string());
        }
        for scope in &scopes {
            if !crate::config::valid_scope(scope) {
                return Err(format!("scope {scope:?} must be a name without spaces, commas or quotes"));
            }
        }
        if let Some(rate) = &rate_limit
            && crate::keys::RateLimit::parse(rate).is_none()
        {
            return Err(format!("rate_limit {rate:?} must be N/s, N/m or N/h with N > 0"));
        }
        if let Some(q) = &quota
            && crate::quota::QuotaLimit::parse(q).is_none()
        {
            return Err(format!("quota {q:?} must be N/day or N/month with N > 0"));
        }
        if let Some(c) = &consumer
            && (c.trim().is_empty() || c.len() > 128 || c.chars().any(char::is_control))
        {
            return Err("consumer must be 1 to 128 bytes of text without control characters".to_string());
        }
        let expires_at = expires.map(|e| parse_expiry(&e, now)).transpose()?.flatten();
        let grant = Grant { name, scopes, expires_at, rate_limit, meta, allowed_ips, quota, consumer };
        let mut doc = DocumentMut::new();
        append(&mut doc, "new", &format!("sha256:{}", "0".repeat(64)), None, &grant, now)
            .map_err(|e| e.to_string())?;
        crate::config::check_keys(std::path::Path::new("request"), &doc.to_string())
            .map_err(|errors| errors.0.into_iter().map(|e| e.message).collect::<Vec<_>>().join("; "))?;
        Ok(grant)
    }
}

/// `never`, a duration from now, or an RFC 3339 instant.
pub fn parse_expiry(text: &str, now: OffsetDateTime) -> Result<Option<OffsetDateTime>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("never") {
        return Ok(None);
    }
    if let Ok(after) = crate::config::parse_duration_text(text) {
        let after =
            time::Duration::try_from(after).map_err(|_| format!("expires {text:?} is too far away"))?;
        return now.checked_add(after).map(Some).ok_or_else(|| format!("expires {text:?} is too far away"));
    }
    OffsetDateTime::parse(text, &Rfc3339)
        .map(Some)
        .map_err(|_| format!("expires {text:?} must be a duration (90d), an RFC 3339 instant, or never"))
}

/// A rotation's grace: a duration, or `0` to end the old key at once.
pub fn parse_grace(text: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration_text(text).or_else(|e| match text.trim() {
        "0" | "0s" => Ok(std::time::Duration::ZERO),
        _ => Err(format!("grace: {e}")),
    })
}

/// A time as the key file writes it: RFC 3339, whole seconds, UTC.
pub fn timestamp(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC).replace_nanosecond(0).unwrap_or(at);
    at.format(&Rfc3339).unwrap_or_default()
}

fn datetime_item(at: OffsetDateTime) -> Item {
    match toml_edit::Datetime::from_str(&timestamp(at)) {
        Ok(datetime) => value(datetime),
        Err(_) => value(timestamp(at)),
    }
}

fn keys(doc: &DocumentMut) -> Option<&ArrayOfTables> {
    doc.get("keys").and_then(Item::as_array_of_tables)
}

fn keys_mut(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables, LifecycleError> {
    if !doc.contains_key("keys") {
        doc.insert("keys", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    doc.get_mut("keys").and_then(Item::as_array_of_tables_mut).ok_or(LifecycleError::Layout)
}

fn text<'t>(table: &'t Table, field: &str) -> &'t str {
    table.get(field).and_then(Item::as_str).unwrap_or("")
}

fn instant(table: &Table, field: &str) -> Option<OffsetDateTime> {
    let datetime = table.get(field)?.as_datetime()?;
    OffsetDateTime::parse(&datetime.to_string(), &Rfc3339).ok()
}

/// The ids already in the file, so a new one can be checked against them.
pub fn ids(doc: &DocumentMut) -> Vec<String> {
    keys(doc).map(|k| k.iter().map(|t| text(t, "id").to_string()).collect()).unwrap_or_default()
}

/// The id of the entry with this hash, if any.
pub fn id_of_hash(doc: &DocumentMut, hash: &str) -> Option<String> {
    keys(doc)?.iter().find(|t| text(t, "hash") == hash).map(|t| text(t, "id").to_string())
}

/// Finds one entry: by id, else by name, else by tail. Several matches at the first level
/// that has any is an error listing them, so nothing is changed by mistake.
pub fn select(doc: &DocumentMut, selector: &str) -> Result<usize, LifecycleError> {
    select_in(&views(doc, OffsetDateTime::UNIX_EPOCH), selector)
}

/// [`select`] over keys as any store lists them.
pub fn select_in(views: &[KeyView], selector: &str) -> Result<usize, LifecycleError> {
    let fields: [fn(&KeyView) -> &str; 3] = [|v| &v.id, |v| &v.name, |v| &v.tail];
    for field in fields {
        let matches: Vec<usize> = (0..views.len()).filter(|&i| field(&views[i]) == selector).collect();
        match matches.as_slice() {
            [] => continue,
            [one] => return Ok(*one),
            many => {
                let candidates = many
                    .iter()
                    .map(|&i| {
                        let v = &views[i];
                        format!("  id={} name={} tail={}", v.id, v.name, v.tail)
                    })
                    .collect();
                return Err(LifecycleError::Ambiguous { selector: selector.to_string(), candidates });
            }
        }
    }
    Err(LifecycleError::NotFound(selector.to_string()))
}

/// Appends a key entry (hash only: the key itself is never written).
pub fn append(
    doc: &mut DocumentMut,
    id: &str,
    hash: &str,
    tail: Option<&str>,
    grant: &Grant,
    now: OffsetDateTime,
) -> Result<(), LifecycleError> {
    let mut table = Table::new();
    table.insert("id", value(id));
    table.insert("name", value(grant.name.as_str()));
    table.insert("hash", value(hash));
    if let Some(tail) = tail {
        table.insert("tail", value(tail));
    }
    let mut scopes = Array::new();
    for scope in &grant.scopes {
        scopes.push(scope.as_str());
    }
    table.insert("scopes", value(scopes));
    table.insert("created_at", datetime_item(now));
    if let Some(at) = grant.expires_at {
        table.insert("expires_at", datetime_item(at));
    }
    if let Some(rate) = &grant.rate_limit {
        table.insert("rate_limit", value(rate.as_str()));
    }
    if !grant.meta.is_empty() {
        let mut meta = toml_edit::InlineTable::new();
        for (name, text) in &grant.meta {
            meta.insert(name, text.as_str().into());
        }
        table.insert("meta", value(meta));
    }
    if !grant.allowed_ips.is_empty() {
        table.insert("allowed_ips", value(grant.allowed_ips.iter().map(String::as_str).collect::<Array>()));
    }
    if let Some(quota) = &grant.quota {
        table.insert("quota", value(quota.as_str()));
    }
    if let Some(consumer) = &grant.consumer {
        table.insert("consumer", value(consumer.as_str()));
    }
    // Comments in a file with no entries yet are the document's trailing text; they belong
    // above the first entry, not below it.
    let leading = doc.trailing().as_str().unwrap_or("").to_string();
    let keys = keys_mut(doc)?;
    let first = keys.is_empty();
    // Later entries get a blank line before them, as a person would write them.
    table.decor_mut().set_prefix(if first { leading } else { "\n".to_string() });
    keys.push(table);
    if first {
        doc.set_trailing("");
    }
    Ok(())
}

fn table_mut(doc: &mut DocumentMut, index: usize) -> Result<&mut Table, LifecycleError> {
    keys_mut(doc)?.get_mut(index).ok_or(LifecycleError::Layout)
}

/// Sets `revoked_at = now`; an entry revoked earlier keeps its first revocation time.
pub fn revoke(doc: &mut DocumentMut, index: usize, now: OffsetDateTime) -> Result<bool, LifecycleError> {
    let table = table_mut(doc, index)?;
    if instant(table, "revoked_at").is_some_and(|at| at <= now) {
        return Ok(false);
    }
    table.insert("revoked_at", datetime_item(now));
    Ok(true)
}

/// Ends a key at `at` (keeping an earlier end it already had); returns the end in force.
pub fn expire(
    doc: &mut DocumentMut,
    index: usize,
    at: OffsetDateTime,
) -> Result<OffsetDateTime, LifecycleError> {
    let table = table_mut(doc, index)?;
    let end = instant(table, "expires_at").map_or(at, |current| current.min(at));
    table.insert("expires_at", datetime_item(end));
    Ok(end)
}

pub fn remove(doc: &mut DocumentMut, index: usize) -> Result<(String, String), LifecycleError> {
    let keys = keys_mut(doc)?;
    if index >= keys.len() {
        return Err(LifecycleError::Layout);
    }
    let table = keys.remove(index);
    // The first entry's leading text also holds the file's own header: that part stays, in
    // front of the next entry's own comment. Text after the last blank line is the removed
    // entry's own comment and goes with it; without a blank line, nothing can tell them apart
    // and all of it stays.
    let leading = table.decor().prefix().and_then(|p| p.as_str()).unwrap_or("").to_string();
    let header = match leading.trim_end_matches('\n').rfind("\n\n") {
        Some(end) => leading[..end + 2].to_string(),
        None => leading,
    };
    if index == 0 && !header.trim().is_empty() {
        match keys.get_mut(0) {
            Some(next) => {
                let own =
                    next.decor().prefix().and_then(|p| p.as_str()).unwrap_or("").trim_start_matches('\n');
                let joined = format!("{header}{own}");
                next.decor_mut().set_prefix(joined);
            }
            None => doc.set_trailing(header),
        }
    }
    // An empty key file reads as a write caught half way (the gateway keeps its old keys), so
    // a file whose last key was deleted says so in words.
    if doc.to_string().trim().is_empty() {
        doc.set_trailing("# no keys: the last one was deleted with `keygate keys delete`\n");
    }
    Ok((text(&table, "id").to_string(), text(&table, "name").to_string()))
}

/// What a rotation carries over: name, scopes, rate limit, quota, consumer, meta, allowed_ips, and the old key's lifetime
/// (created → expires) applied from now, when it had one.
pub fn successor_grant(
    doc: &DocumentMut,
    index: usize,
    now: OffsetDateTime,
) -> Result<Grant, LifecycleError> {
    let table = keys(doc).and_then(|k| k.get(index)).ok_or(LifecycleError::Layout)?;
    let scopes = table
        .get("scopes")
        .and_then(Item::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let lifetime = match (instant(table, "created_at"), instant(table, "expires_at")) {
        (Some(created), Some(expires)) if expires > created => Some(expires - created),
        _ => None,
    };
    Ok(Grant {
        name: text(table, "name").to_string(),
        scopes,
        expires_at: lifetime.map(|l| now + l),
        rate_limit: table.get("rate_limit").and_then(Item::as_str).map(str::to_string),
        meta: table
            .get("meta")
            .and_then(Item::as_table_like)
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.to_string(), v.as_str()?.to_string()))).collect())
            .unwrap_or_default(),
        allowed_ips: table
            .get("allowed_ips")
            .and_then(Item::as_array)
            .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
            .unwrap_or_default(),
        // The successor spends the same quota: a rotated pair never gets twice the limit.
        quota: table.get("quota").and_then(Item::as_str).map(str::to_string),
        consumer: table.get("consumer").and_then(Item::as_str).map(str::to_string),
    })
}

/// Every entry as `keys list` shows it, in file order.
pub fn views(doc: &DocumentMut, now: OffsetDateTime) -> Vec<KeyView> {
    let Some(keys) = keys(doc) else { return Vec::new() };
    keys.iter()
        .map(|t| {
            let revoked = instant(t, "revoked_at").is_some_and(|at| at <= now);
            let expired = instant(t, "expires_at").is_some_and(|at| at <= now);
            let scopes = t
                .get("scopes")
                .and_then(Item::as_array)
                .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            KeyView {
                id: text(t, "id").to_string(),
                name: text(t, "name").to_string(),
                tail: text(t, "tail").to_string(),
                scopes,
                created: instant(t, "created_at").map(timestamp),
                expires: instant(t, "expires_at").map(timestamp),
                status: if revoked {
                    "revoked"
                } else if expired {
                    "expired"
                } else {
                    "active"
                },
                quota: t.get("quota").and_then(Item::as_str).map(str::to_string),
                consumer: t.get("consumer").and_then(Item::as_str).map(str::to_string),
                last_used_at: None,
                used: None,
                revoked: instant(t, "revoked_at").map(timestamp),
                rate_limit: t.get("rate_limit").and_then(Item::as_str).map(str::to_string),
                meta: t
                    .get("meta")
                    .and_then(Item::as_table_like)
                    .map(|m| {
                        m.iter().filter_map(|(k, v)| Some((k.to_string(), v.as_str()?.to_string()))).collect()
                    })
                    .unwrap_or_default(),
                allowed_ips: t
                    .get("allowed_ips")
                    .and_then(Item::as_array)
                    .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
                    .unwrap_or_default(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:00:00 UTC);

    fn doc_with(names: &[(&str, &str, &str)]) -> DocumentMut {
        let mut doc: DocumentMut = "# my keys\n".parse().unwrap();
        for (id, name, tail) in names {
            let grant = Grant { name: name.to_string(), scopes: vec!["read".into()], ..Grant::default() };
            append(&mut doc, id, "sha256:00", Some(tail), &grant, NOW).unwrap();
        }
        doc
    }

    #[test]
    fn selectors_go_id_then_name_then_tail_and_refuse_ambiguity() {
        let doc = doc_with(&[("a1", "sync", "AAAAAA"), ("b2", "sync", "BBBBBB"), ("c3", "a1x", "a1")]);
        assert_eq!(select(&doc, "a1"), Ok(0), "an id wins over a tail");
        assert_eq!(select(&doc, "BBBBBB"), Ok(1));
        assert_eq!(select(&doc, "a1x"), Ok(2));
        match select(&doc, "sync") {
            Err(LifecycleError::Ambiguous { candidates, .. }) => assert_eq!(candidates.len(), 2),
            other => panic!("{other:?}"),
        }
        assert_eq!(select(&doc, "nope"), Err(LifecycleError::NotFound("nope".into())));
    }

    #[test]
    fn appended_entries_keep_the_file_and_read_back() {
        let doc = doc_with(&[("a1", "sync", "AAAAAA")]);
        let text = doc.to_string();
        assert!(text.starts_with("# my keys\n[[keys]]\nid = \"a1\""), "{text}");
        assert!(text.contains("created_at = 2026-11-22T10:00:00Z"), "{text}");
        let views = views(&doc, NOW);
        assert_eq!(views[0].status, "active");
        assert_eq!(views[0].scopes, ["read"]);
    }

    #[test]
    fn removing_keeps_the_header_comment_and_never_leaves_an_empty_file() {
        let mut doc = doc_with(&[("a1", "one", "AAAAAA"), ("b2", "two", "BBBBBB")]);
        remove(&mut doc, 0).unwrap();
        assert!(doc.to_string().starts_with("# my keys\n[[keys]]\nid = \"b2\""), "{doc}");
        let mut commented: DocumentMut =
            "# header\n\n# first's own\n[[keys]]\nid = \"a\"\n\n# second's own\n[[keys]]\nid = \"b\"\n"
                .parse()
                .unwrap();
        remove(&mut commented, 0).unwrap();
        assert_eq!(commented.to_string(), "# header\n\n# second's own\n[[keys]]\nid = \"b\"\n");
        remove(&mut doc, 0).unwrap();
        let text = doc.to_string();
        assert!(text.starts_with("# my keys\n") && !text.contains("[[keys]]"), "{text}");
        let mut bare = doc_with(&[]);
        bare.set_trailing("");
        let grant = Grant { name: "x".into(), ..Grant::default() };
        append(&mut bare, "c3", "sha256:00", Some("CCCCCC"), &grant, NOW).unwrap();
        remove(&mut bare, 0).unwrap();
        assert!(bare.to_string().starts_with("# no keys"), "{bare}");
    }

    #[test]
    fn revoke_expire_and_rotation_grants() {
        let mut doc = doc_with(&[("a1", "sync", "AAAAAA")]);
        assert!(revoke(&mut doc, 0, NOW).unwrap());
        assert!(!revoke(&mut doc, 0, NOW + time::Duration::hours(1)).unwrap(), "first revocation stands");
        assert_eq!(views(&doc, NOW)[0].status, "revoked");

        let mut doc: DocumentMut = "".parse().unwrap();
        let grant = Grant {
            name: "sync".into(),
            consumer: Some("acme".into()),
            quota: Some("10/day".into()),
            ..Grant::default()
        };
        append(&mut doc, "a1", "sha256:00", Some("AAAAAA"), &grant, NOW).unwrap();
        let later = NOW + time::Duration::days(1);
        assert_eq!(expire(&mut doc, 0, later).unwrap(), later);
        assert_eq!(expire(&mut doc, 0, later + time::Duration::days(1)).unwrap(), later, "earlier end kept");
        let grant = successor_grant(&doc, 0, later).unwrap();
        assert_eq!(grant.name, "sync");
        assert_eq!((grant.consumer.as_deref(), grant.quota.as_deref()), (Some("acme"), Some("10/day")));
        assert_eq!(grant.expires_at, Some(later + time::Duration::days(1)), "same lifetime from now");
        assert_eq!(remove(&mut doc, 0).unwrap(), ("a1".to_string(), "sync".to_string()));
        assert!(views(&doc, NOW).is_empty());
    }

    #[test]
    fn rotation_keeps_meta_and_allowed_ips() {
        let mut doc = doc_with(&[]);
        let grant = Grant {
            name: "edge".into(),
            meta: vec![("tenant".into(), "acme".into()), ("plan".into(), "pro".into())],
            allowed_ips: vec!["203.0.113.0/24".into(), "2001:db8::/32".into()],
            ..Grant::default()
        };
        append(&mut doc, "a1", "sha256:00", Some("AAAAAA"), &grant, NOW).unwrap();
        let text = doc.to_string();
        assert!(text.contains("meta = { tenant = \"acme\", plan = \"pro\" }"), "{text}");
        assert!(text.contains("allowed_ips = [\"203.0.113.0/24\", \"2001:db8::/32\"]"), "{text}");
        let successor = successor_grant(&doc, 0, NOW).unwrap();
        assert_eq!(successor.meta, grant.meta);
        assert_eq!(successor.allowed_ips, grant.allowed_ips);
        // Written by hand as a sub-table, meta is carried over just the same.
        let by_hand: DocumentMut =
            "[[keys]]\nid = \"b\"\nname = \"n\"\n[keys.meta]\ntenant = \"x\"\n".parse().unwrap();
        assert_eq!(
            successor_grant(&by_hand, 0, NOW).unwrap().meta,
            [("tenant".to_string(), "x".to_string())]
        );
    }
}

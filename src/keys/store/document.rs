//! The key changes as edits of one key-file document: every store reads its keys as such a
//! document, runs these, and writes back what changed, so the file and Redis make keys the
//! same way.

use time::OffsetDateTime;
use toml_edit::DocumentMut;

use super::{Action, KeyChange, Rotation, Secret, StoreError};
use crate::keys::{
    self,
    lifecycle::{self, Grant, KeyView, LifecycleError},
};

pub fn create(
    doc: &mut DocumentMut,
    prefix: &str,
    grant: &Grant,
    now: OffsetDateTime,
) -> Result<KeyChange, StoreError> {
    let (id, key) = unused_key(doc, prefix)?;
    lifecycle::append(doc, &id, &keys::hash_key(key.expose()), keys::tail(key.expose()), grant, now)?;
    let index = lifecycle::select(doc, &id)?;
    Ok(KeyChange::new(Action::Create, view_at(doc, index, now)?).with_secret(key))
}

pub fn import(
    doc: &mut DocumentMut,
    key: &str,
    grant: &Grant,
    now: OffsetDateTime,
) -> Result<KeyChange, StoreError> {
    let hash = keys::hash_key(key);
    if let Some(existing) = lifecycle::id_of_hash(doc, &hash) {
        return Err(LifecycleError::AlreadyPresent(existing).into());
    }
    let id = unused_id(doc)?;
    lifecycle::append(doc, &id, &hash, keys::tail(key), grant, now)?;
    let index = lifecycle::select(doc, &id)?;
    Ok(KeyChange::new(Action::Import, view_at(doc, index, now)?))
}

pub fn revoke(doc: &mut DocumentMut, selector: &str, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
    let index = lifecycle::select(doc, selector)?;
    let changed = lifecycle::revoke(doc, index, now)?;
    let mut change = KeyChange::new(Action::Revoke, view_at(doc, index, now)?);
    change.changed = changed;
    Ok(change)
}

pub fn rotate(
    doc: &mut DocumentMut,
    prefix: &str,
    selector: &str,
    rotation: &Rotation,
    now: OffsetDateTime,
) -> Result<KeyChange, StoreError> {
    let grace = time::Duration::try_from(rotation.grace)
        .map_err(|_| StoreError::Invalid("the grace period is too long".to_string()))?;
    let index = lifecycle::select(doc, selector)?;
    let mut grant = lifecycle::successor_grant(doc, index, now)?;
    if let Some(expiry) = rotation.expires_at {
        grant.expires_at = expiry;
    }
    lifecycle::expire(doc, index, now + grace)?;
    let (id, key) = unused_key(doc, prefix)?;
    lifecycle::append(doc, &id, &keys::hash_key(key.expose()), keys::tail(key.expose()), &grant, now)?;
    let new_index = lifecycle::select(doc, &id)?;
    let mut change = KeyChange::new(Action::Rotate, view_at(doc, new_index, now)?).with_secret(key);
    change.replaced = Some(view_at(doc, index, now)?);
    Ok(change)
}

pub fn delete(doc: &mut DocumentMut, selector: &str, now: OffsetDateTime) -> Result<KeyChange, StoreError> {
    let index = lifecycle::select(doc, selector)?;
    let key = view_at(doc, index, now)?;
    lifecycle::remove(doc, index)?;
    Ok(KeyChange::new(Action::Delete, key))
}

fn unused_id(doc: &DocumentMut) -> Result<String, StoreError> {
    let taken = lifecycle::ids(doc);
    for _ in 0..16 {
        let id = keys::generate_id().map_err(no_randomness)?;
        if !taken.contains(&id) {
            return Ok(id);
        }
    }
    Err(StoreError::Unavailable("could not find an unused key id".to_string()))
}

fn unused_key(doc: &DocumentMut, prefix: &str) -> Result<(String, Secret), StoreError> {
    let taken = lifecycle::ids(doc);
    for _ in 0..16 {
        let (id, key) = keys::generate(prefix).map_err(no_randomness)?;
        if !taken.contains(&id) {
            return Ok((id, Secret::new(key)));
        }
    }
    Err(StoreError::Unavailable("could not find an unused key id".to_string()))
}

fn no_randomness(error: getrandom::Error) -> StoreError {
    StoreError::Unavailable(format!("no OS randomness: {error}"))
}

/// The entry at `index` as it reads now.
fn view_at(doc: &DocumentMut, index: usize, now: OffsetDateTime) -> Result<KeyView, StoreError> {
    let mut views = lifecycle::views(doc, now);
    if index >= views.len() {
        return Err(LifecycleError::Layout.into());
    }
    Ok(views.swap_remove(index))
}

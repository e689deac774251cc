//! The audit log: one JSON line per key change — who (the admin token's name, or `cli`), what,
//! which key — appended to `[admin] audit_log` and emitted on the `keygate::audit` target.
//! Never the key itself: only its id and name.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use time::OffsetDateTime;

use crate::keys::lifecycle::timestamp;
use crate::keys::store::KeyChange;

/// Mode of an audit log keygate creates: who changed which key is the operators' business.
const NEW_FILE_MODE: u32 = 0o600;

#[derive(Debug, Clone, Default)]
pub struct AuditLog {
    path: Option<PathBuf>,
}

impl AuditLog {
    /// Lines go to `path` (when set) and always to the `keygate::audit` tracing target.
    pub fn new(path: Option<PathBuf>) -> Self {
        Self { path }
    }

    /// The audit log `keygate.toml` names; a config that cannot be read names none (the
    /// command that needs it reports that config error itself).
    pub fn of_config(config_path: &Path) -> Self {
        let path = crate::config::admin_of(config_path).ok().flatten().and_then(|admin| admin.audit_log);
        Self { path }
    }

    /// Records one change made with the token named `token`. A log file that cannot be
    /// written is reported, but the change it describes has happened and stands.
    pub fn record(&self, token: &str, change: &KeyChange) {
        let line = line(token, change, OffsetDateTime::now_utc());
        tracing::info!(
            target: "keygate::audit",
            token,
            action = change.action.as_str(),
            key_id = %change.key.id,
            key_name = %change.key.name,
            "key {}",
            change.action.as_str()
        );
        if let Some(path) = &self.path
            && let Err(error) = append(path, &line)
        {
            tracing::error!(path = %path.display(), %error, "cannot write the audit log");
        }
    }
}

fn line(token: &str, change: &KeyChange, now: OffsetDateTime) -> String {
    let mut line = serde_json::json!({
        "time": timestamp(now),
        "token": token,
        "action": change.action.as_str(),
        "key_id": change.key.id,
        "key_name": change.key.name,
    });
    if let (Some(old), Some(object)) = (&change.replaced, line.as_object_mut()) {
        object.insert("replaced_key_id".to_string(), serde_json::Value::from(old.id.as_str()));
    }
    line.to_string()
}

/// One `write` of a whole line on an `O_APPEND` file: lines from the gateway and from
/// `keygate keys` runs never interleave.
fn append(path: &Path, line: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().append(true).create(true).mode(NEW_FILE_MODE).open(path)?;
    file.write_all(format!("{line}\n").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::store::{Action, Secret};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_line_names_the_change_but_never_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let view = crate::keys::lifecycle::views(
            &"[[keys]]\nid = \"a1\"\nname = \"sync\"\nhash = \"sha256:00\"\n".parse().unwrap(),
            OffsetDateTime::now_utc(),
        )
        .remove(0);
        let change = KeyChange::new(Action::Create, view).with_secret(Secret::new("kg_secret_value".into()));
        let log = AuditLog::new(Some(path.clone()));
        log.record("ops", &change);
        log.record("cli", &change);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(!text.contains("kg_secret_value"), "{text}");
        let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["token"], "ops");
        assert_eq!(first["action"], "create");
        assert_eq!(first["key_id"], "a1");
        assert_eq!(first["key_name"], "sync");
        assert!(first["time"].as_str().is_some_and(|t| t.ends_with('Z')));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }
}

//! Fuzzes the configuration loader with arbitrary text, as a key file and as keygate.toml:
//! it never panics, every refusal names a place in the file, and what it accepts agrees with
//! the `toml` crate entry for entry (the key file's fast plain-form reader must never read a
//! file differently from the general parser).
//!
//! Input: the file's text (UTF-8; other inputs are skipped).
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use keygate::config::{ConfigErrors, check_keys, load};
use keygate::keys::KeyHash;
use libfuzzer_sys::fuzz_target;

/// A refusal says why, and every error about `file` points into its `text`, so that
/// `keygate check` can say where.
fn assert_located(errors: &ConfigErrors, file: &Path, text: &str) {
    assert!(!errors.0.is_empty(), "{} refused without saying why\n{text:?}", file.display());
    let lines = text.split('\n').count();
    for error in errors.0.iter().filter(|e| e.file == file && e.line != 0) {
        assert!(error.line <= lines && error.column >= 1, "error outside the file: {error}\n{text:?}");
    }
}

fn array_len(table: &toml::Table, name: &str) -> usize {
    table.get(name).and_then(toml::Value::as_array).map_or(0, Vec::len)
}

fn check_key_file(text: &str) {
    let table = match check_keys(Path::new("keys.toml"), text) {
        Ok(table) => table,
        Err(errors) => {
            let only_keys = errors.0.iter().all(|e| e.file == Path::new("keys.toml"));
            assert!(only_keys, "an error names another file: {errors}");
            assert_located(&errors, Path::new("keys.toml"), text);
            return;
        }
    };
    let parsed = match toml::from_str::<toml::Table>(text) {
        Ok(parsed) => parsed,
        Err(error) => panic!("keygate accepted a key file that is not TOML: {}\n{text:?}", error.message()),
    };
    let entries = parsed.get("keys").and_then(toml::Value::as_array).cloned().unwrap_or_default();
    assert_eq!(table.len(), entries.len(), "keygate and the toml crate count different entries\n{text:?}");
    // Entry for entry, the table holds what the TOML says.
    for entry in &entries {
        let field = |name: &str| entry.get(name).and_then(toml::Value::as_str).unwrap_or_default();
        let Some(hash) = KeyHash::parse(field("hash")) else {
            panic!("accepted an entry whose hash the toml crate reads as {:?}\n{text:?}", field("hash"));
        };
        let Some(key) = table.get(&hash) else {
            panic!("the table lacks the entry with hash {}\n{text:?}", field("hash"));
        };
        assert_eq!(key.id.as_bytes(), field("id").as_bytes(), "id differs\n{text:?}");
        assert_eq!(key.name.as_bytes(), field("name").as_bytes(), "name differs\n{text:?}");
        let mut want: Vec<&str> = entry
            .get("scopes")
            .and_then(toml::Value::as_array)
            .map(|a| a.iter().filter_map(toml::Value::as_str).collect())
            .unwrap_or_default();
        want.sort_unstable();
        want.dedup();
        let mut got: Vec<&str> = key.scopes.iter().collect();
        got.sort_unstable();
        got.dedup();
        assert_eq!(got, want, "scopes differ\n{text:?}");
        assert_eq!(
            key.expires_at().is_some(),
            entry.get("expires_at").is_some(),
            "expires_at differs\n{text:?}"
        );
        assert_eq!(
            key.revoked_at().is_some(),
            entry.get("revoked_at").is_some(),
            "revoked_at differs\n{text:?}"
        );
        assert_eq!(
            key.rate_limit().is_some(),
            entry.get("rate_limit").is_some(),
            "rate_limit differs\n{text:?}"
        );
    }
}

/// A folder holding the example key file, where each input is written as keygate.toml.
fn config_path() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temp dir: {e}"));
        let keys = include_str!("../../config/keys.toml");
        std::fs::write(dir.path().join("keys.toml"), keys).unwrap_or_else(|e| panic!("write keys.toml: {e}"));
        let path = dir.path().join("keygate.toml");
        (dir, path)
    });
    path
}

fn check_gateway_file(text: &str) {
    // Without a `server` table keygate.toml fails where the toml crate does, which the key
    // file half already covers; skipping the file write keeps the fuzzer fast.
    if !text.contains("server") {
        return;
    }
    // The operator is trusted with file paths; keep the fuzzer from reading devices that never
    // end (keys_file = "/dev/zero") or block (a FIFO), which would only measure the machine.
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    let path = config_path();
    if let Err(e) = std::fs::write(path, text) {
        panic!("write keygate.toml: {e}");
    }
    match load(path) {
        Ok(snapshot) => {
            let parsed = match toml::from_str::<toml::Table>(text) {
                Ok(parsed) => parsed,
                Err(error) => {
                    panic!("keygate accepted a config that is not TOML: {}\n{text:?}", error.message())
                }
            };
            assert_eq!(snapshot.routes.len(), array_len(&parsed, "routes"), "route count differs\n{text:?}");
            assert!(snapshot.server.max_header_bytes >= 1024, "max_header_bytes below its floor\n{text:?}");
            assert!(snapshot.server.h2_max_concurrent_streams >= 1, "no h2 streams allowed\n{text:?}");
            assert!(!snapshot.server.header_read_timeout.is_zero(), "zero header_read_timeout\n{text:?}");
        }
        Err(errors) => assert_located(&errors, path, text),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    check_key_file(text);
    check_gateway_file(text);
});

//! The key file read straight from disk, in blocks and in parallel, never holding its whole
//! text: how `serve` and every reload load a valid key file in the plain form.
//!
//! At a million keys the text is some 130 MB, as much again as the table made from it, and a
//! reload holds the running table besides; reading it block by block keeps only a block per
//! thread. This path only ever succeeds: a file that is not plain, has an error or a duplicate,
//! or changes size while read gives `None`, and the caller reads it whole the ordinary way,
//! which decides and reports exactly as before (with line and column).

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::error::SourceFile;
use super::{KeyValidator, PARALLEL_ABOVE, keyfile, reader_threads};
use crate::keys::{Entries, KeyTable};

/// Bytes read at a time by one thread. Large enough that syscalls do not matter, small enough
/// to be nothing beside the table.
const BLOCK: usize = 1 << 20;

/// Where entries start: a cut there never splits one.
const ENTRY_START: &[u8] = b"\n[[keys]]";

/// The table of a valid plain key file, or `None` when it must be read the ordinary way.
pub fn load(path: &Path) -> Option<KeyTable> {
    load_with(path, |size| if size > PARALLEL_ABOVE as u64 { reader_threads() } else { 1 })
}

/// [`load`] with `threads(file size)` readers.
fn load_with(path: &Path, threads: impl Fn(u64) -> usize) -> Option<KeyTable> {
    let file = File::open(path).ok()?;
    let size = file.metadata().ok()?.len();
    let threads = threads(size);
    let ranges = split(&file, size, threads)?;
    let parts: Vec<Option<Entries>> = if ranges.len() == 1 {
        ranges.into_iter().map(|range| read_range(&file, path, range)).collect()
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> =
                ranges.into_iter().map(|range| scope.spawn(|| read_range(&file, path, range))).collect();
            handles.into_iter().map(|h| h.join().ok().flatten()).collect()
        })
    };
    let mut entries = Entries::default();
    for part in parts {
        entries.append(part?);
    }
    if entries.too_many() {
        return None;
    }
    let (table, duplicates) = KeyTable::build(entries);
    duplicates.is_empty().then_some(table)
}

/// About `n` ranges covering `0..size`, each starting at an entry (or the file's start).
fn split(file: &File, size: u64, n: usize) -> Option<Vec<Range<u64>>> {
    let mut starts = vec![0];
    for i in 1..n as u64 {
        let last = starts.last().copied().unwrap_or(0);
        let guess = (size * i / n as u64).max(last);
        if let Some(start) = next_entry_start(file, guess, size)? {
            starts.push(start);
        }
    }
    starts.dedup();
    let ends = starts.iter().skip(1).copied().chain([size]);
    Some(starts.iter().copied().zip(ends).map(|(start, end)| start..end).collect())
}

/// The offset of the first `[[keys]]` line at or after `from` that follows a newline.
fn next_entry_start(file: &File, from: u64, size: u64) -> Option<Option<u64>> {
    let mut window = vec![0; 64 << 10];
    let mut at = from;
    while at < size {
        let len = window.len().min((size - at) as usize);
        file.read_exact_at(&mut window[..len], at).ok()?;
        if let Some(i) = memchr::memmem::find(&window[..len], ENTRY_START) {
            return Some(Some(at + i as u64 + 1));
        }
        if at + len as u64 >= size {
            break;
        }
        // Overlap by the pattern's length less one, so a pattern across two windows is found.
        at += (len - (ENTRY_START.len() - 1)) as u64;
    }
    Some(None)
}

/// Reads and validates the entries of `range`, one block at a time; `None` at the first thing
/// that is not a valid plain entry.
fn read_range(file: &File, path: &Path, range: Range<u64>) -> Option<Entries> {
    let mut validator = KeyValidator::default();
    let mut entries = Entries::default();
    // Unparsed bytes, from an entry start (or the range's start) up to `at`.
    let mut pending: Vec<u8> = Vec::with_capacity(BLOCK);
    let mut at = range.start;
    while at < range.end {
        let len = BLOCK.min((range.end - at) as usize);
        let old = pending.len();
        pending.resize(old + len, 0);
        // A file cut shorter while read fails here; the whole read then reports what is left.
        file.read_exact_at(&mut pending[old..], at).ok()?;
        at += len as u64;
        let cut = if at == range.end {
            pending.len()
        } else {
            match memchr::memmem::rfind(&pending, ENTRY_START) {
                Some(i) => i + 1,
                // One entry longer than a block: read on until it ends.
                None => continue,
            }
        };
        let text = std::str::from_utf8(&pending[..cut]).ok()?;
        let mut source = SourceFile::new(path, text);
        let mut valid = true;
        let read = keyfile::read(text, 0..text.len(), |key| {
            if valid {
                match validator.validate(&mut source, key) {
                    Some(parsed) => entries.push(parsed.entry),
                    None => valid = false,
                }
            }
        });
        if read.is_err() || !valid || !source.errors.is_empty() {
            return None;
        }
        pending.drain(..cut);
    }
    Some(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: usize) -> String {
        // Every tenth key with the extras, the rest as `genkeys.py` writes them.
        let extras = if i.is_multiple_of(10) {
            "created_at = 2026-11-22T10:00:00Z\nmeta = { tenant = \"t\" }\nquota = \"5/day\"\n"
        } else {
            ""
        };
        format!(
            "[[keys]]\nid = \"k{i}\"\nname = \"n\"\nhash = \"{}\"\nscopes = [\"read\"]\n{extras}\n",
            crate::keys::hash_key(&format!("key-{i}"))
        )
    }

    #[test]
    fn splits_start_at_entries_and_cover_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let text: String = (0..500).map(entry).collect();
        std::fs::write(&path, &text).unwrap();
        let file = File::open(&path).unwrap();
        for n in [1, 2, 3, 7, 8, 600] {
            let ranges = split(&file, text.len() as u64, n).unwrap();
            assert_eq!(ranges.first().map(|r| r.start), Some(0));
            assert_eq!(ranges.last().map(|r| r.end), Some(text.len() as u64));
            for pair in ranges.windows(2) {
                assert_eq!(pair[0].end, pair[1].start);
                assert!(text[pair[1].start as usize..].starts_with("[[keys]]"), "{n}");
            }
        }
    }

    #[test]
    fn a_valid_file_loads_and_anything_else_is_left_to_the_whole_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        // Entries cut across blocks, in several ranges.
        let text: String = (0..(3 * BLOCK / 120)).map(entry).collect();
        std::fs::write(&path, &text).unwrap();
        let table = load_with(&path, |_| 3).unwrap();
        assert_eq!(table.len(), 3 * BLOCK / 120);
        let first = table.get(&crate::keys::KeyHash::of("key-0")).unwrap();
        assert_eq!((first.id.to_str().unwrap(), first.meta().len()), ("k0", 1));
        assert!(first.quota().is_some());
        assert!(table.get(&crate::keys::KeyHash::of("key-1")).unwrap().meta().is_empty());
        assert!(table.get(&crate::keys::KeyHash::of(&format!("key-{}", 3 * BLOCK / 120 - 1))).is_some());

        for broken in [
            format!("{text}{}", entry(0)),                                   // a duplicate
            format!("{text}[[keys]]\nid = \"x\"\n"),                         // a half-written entry
            format!("{text}[[keys]]\nid = \"\"\"x\"\"\"\n"),                 // not plain
            text.replacen("scopes = [\"read\"]", "scopes = [\"re ad\"]", 1), // invalid
            format!("\u{feff}{text}"),                                       // a BOM: for TOML to judge
        ] {
            std::fs::write(&path, &broken).unwrap();
            assert!(load_with(&path, |_| 3).is_none());
        }
        std::fs::write(&path, [&text.as_bytes()[..100], b"\xff", &text.as_bytes()[100..]].concat()).unwrap();
        assert!(load(&path).is_none(), "not UTF-8");
        assert!(load(&dir.path().join("missing.toml")).is_none());
    }
}

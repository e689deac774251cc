//! A fast reader for the key file's plain form: `[[keys]]` headers and one `field = value` per
//! line, with simple strings, one-line string arrays, one-line inline tables of bare keys and
//! simple strings (`meta`), date-times and comments. That is what
//! `keygate keys` and the examples write, and it reads a million keys in about a second where a
//! general TOML parser needs many seconds and gigabytes.
//!
//! It never decides anything the TOML parser would decide differently: on the first line
//! outside this form it stops, and the caller hands the file (or the failing entry) to the
//! full parser.

use std::collections::BTreeMap;
use std::ops::Range;
use std::str::FromStr;

use toml::Spanned;
use toml::value::Datetime;

use super::file::KeyFile;

/// Where the plain form ended: the byte offset of the `[[keys]]` entry that left it (or of the
/// line, before any entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotPlain {
    pub entry_start: usize,
}

/// Reads every entry in `range` of `text` (which must start at an entry or the file's start),
/// handing each to `each` in file order. Spans are offsets in the whole `text`.
pub fn read(text: &str, range: Range<usize>, mut each: impl FnMut(KeyFile)) -> Result<(), NotPlain> {
    let mut current: Option<Partial> = None;
    let mut offset = range.start;
    for raw_line in text[range].split_inclusive('\n') {
        let line_start = offset;
        offset += raw_line.len();
        // Only CR LF ends a line; a lone CR (even at the very end) is TOML's to refuse, and the
        // control-byte check below hands it over.
        let line = match raw_line.strip_suffix('\n') {
            Some(line) => line.strip_suffix('\r').unwrap_or(line),
            None => raw_line,
        };
        let entry_start = current.as_ref().map_or(line_start, |p| p.start);
        let not_plain = NotPlain { entry_start };
        // TOML allows no control characters but tab outside strings, and none in our strings.
        if line.bytes().any(|b| (b < 0x20 && b != b'\t') || b == 0x7f) {
            return Err(not_plain);
        }
        let trimmed = line.trim_start_matches([' ', '\t']);
        let indent = line.len() - trimmed.len();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix("[[keys]]") {
            if !only_comment(rest) {
                return Err(not_plain);
            }
            if let Some(done) = current.take() {
                each(done.finish().ok_or(not_plain)?);
            }
            current = Some(Partial::new(line_start));
            continue;
        }
        let Some(partial) = current.as_mut() else { return Err(not_plain) };
        let value_base = line_start + indent;
        if !partial.field(trimmed, value_base) {
            return Err(not_plain);
        }
    }
    if let Some(done) = current.take() {
        let entry_start = done.start;
        each(done.finish().ok_or(NotPlain { entry_start })?);
    }
    Ok(())
}

fn only_comment(rest: &str) -> bool {
    let rest = rest.trim_start_matches([' ', '\t']);
    rest.is_empty() || rest.starts_with('#')
}

/// One entry being read; a field seen twice is not plain (TOML rejects it, let it say so).
#[derive(Default)]
struct Partial {
    start: usize,
    id: Option<Spanned<String>>,
    name: Option<Spanned<String>>,
    hash: Option<Spanned<String>>,
    tail: Option<Spanned<String>>,
    scopes: Option<Vec<Spanned<String>>>,
    created_at: Option<Spanned<Datetime>>,
    expires_at: Option<Spanned<Datetime>>,
    revoked_at: Option<Spanned<Datetime>>,
    rate_limit: Option<Spanned<String>>,
    meta: Option<Spanned<BTreeMap<String, Spanned<String>>>>,
    allowed_ips: Option<Spanned<Vec<Spanned<String>>>>,
    quota: Option<Spanned<String>>,
    consumer: Option<Spanned<String>>,
}

enum Value {
    Text(Spanned<String>),
    List(Spanned<Vec<Spanned<String>>>),
    Table(Spanned<BTreeMap<String, Spanned<String>>>),
    Date(Spanned<Datetime>),
}

impl Partial {
    fn new(start: usize) -> Self {
        Self { start, ..Self::default() }
    }

    /// Reads `field = value [# comment]`; `base` is the offset of `line` in the file.
    fn field(&mut self, line: &str, base: usize) -> bool {
        let Some((key, rest)) = line.split_once('=') else { return false };
        let key = key.trim_end_matches([' ', '\t']);
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return false;
        }
        let value_text = rest.trim_start_matches([' ', '\t']);
        let value_base = base + (line.len() - value_text.len());
        let Some(value) = parse_value(value_text, value_base) else { return false };
        fn put<T>(slot: &mut Option<T>, value: T) -> bool {
            slot.replace(value).is_none()
        }
        match (key, value) {
            ("id", Value::Text(v)) => put(&mut self.id, v),
            ("name", Value::Text(v)) => put(&mut self.name, v),
            ("hash", Value::Text(v)) => put(&mut self.hash, v),
            ("tail", Value::Text(v)) => put(&mut self.tail, v),
            ("rate_limit", Value::Text(v)) => put(&mut self.rate_limit, v),
            ("scopes", Value::List(v)) => put(&mut self.scopes, v.into_inner()),
            ("allowed_ips", Value::List(v)) => put(&mut self.allowed_ips, v),
            ("meta", Value::Table(v)) => put(&mut self.meta, v),
            ("quota", Value::Text(v)) => put(&mut self.quota, v),
            ("consumer", Value::Text(v)) => put(&mut self.consumer, v),
            ("created_at", Value::Date(v)) => put(&mut self.created_at, v),
            ("expires_at", Value::Date(v)) => put(&mut self.expires_at, v),
            ("revoked_at", Value::Date(v)) => put(&mut self.revoked_at, v),
            _ => false,
        }
    }

    fn finish(self) -> Option<KeyFile> {
        Some(KeyFile {
            id: self.id?,
            name: self.name?,
            hash: self.hash?,
            tail: self.tail,
            scopes: self.scopes.unwrap_or_default(),
            created_at: self.created_at,
            expires_at: self.expires_at,
            revoked_at: self.revoked_at,
            rate_limit: self.rate_limit,
            meta: self.meta,
            allowed_ips: self.allowed_ips,
            quota: self.quota,
            consumer: self.consumer,
        })
    }
}

/// A string without escapes: `"…"` or `'…'`. Returns it and the rest of the text.
fn simple_string(text: &str, base: usize) -> Option<(Spanned<String>, &str)> {
    let quote = text.chars().next().filter(|&c| c == '"' || c == '\'')?;
    let body = &text[1..];
    let end = body.find(quote)?;
    let value = &body[..end];
    // Escapes and multi-line strings are for the full parser.
    if (quote == '"' && value.contains('\\')) || (end == 0 && body[1..].starts_with(quote)) {
        return None;
    }
    let span: Range<usize> = base..base + end + 2;
    Some((Spanned::new(span, value.to_string()), &body[end + 1..]))
}

fn parse_value(text: &str, base: usize) -> Option<Value> {
    if text.starts_with(['"', '\'']) {
        let (value, rest) = simple_string(text, base)?;
        return only_comment(rest).then_some(Value::Text(value));
    }
    if let Some(mut rest) = text.strip_prefix('[') {
        let mut items = Vec::new();
        loop {
            rest = rest.trim_start_matches([' ', '\t']);
            if let Some(after) = rest.strip_prefix(']') {
                let span = base..base + (text.len() - after.len());
                return only_comment(after).then_some(Value::List(Spanned::new(span, items)));
            }
            let item_base = base + (text.len() - rest.len());
            let (item, after) = simple_string(rest, item_base)?;
            items.push(item);
            rest = after.trim_start_matches([' ', '\t']);
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with(']') {
                return None;
            }
        }
    }
    if let Some(mut rest) = text.strip_prefix('{') {
        // `{ name = "value", … }` with bare names; anything fancier (quoted or dotted names,
        // a trailing comma, nested values) is the full parser's.
        let mut table = BTreeMap::new();
        rest = rest.trim_start_matches([' ', '\t']);
        if !rest.starts_with('}') {
            loop {
                let name_len =
                    rest.bytes().take_while(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-').count();
                if name_len == 0 {
                    return None;
                }
                let name = &rest[..name_len];
                rest = rest[name_len..].trim_start_matches([' ', '\t']).strip_prefix('=')?;
                rest = rest.trim_start_matches([' ', '\t']);
                let (value, after) = simple_string(rest, base + (text.len() - rest.len()))?;
                if table.insert(name.to_string(), value).is_some() {
                    return None;
                }
                rest = after.trim_start_matches([' ', '\t']);
                match rest.strip_prefix(',') {
                    Some(after) => rest = after.trim_start_matches([' ', '\t']),
                    None => break,
                }
            }
        }
        let after = rest.strip_prefix('}')?;
        let span = base..base + (text.len() - after.len());
        return only_comment(after).then_some(Value::Table(Spanned::new(span, table)));
    }
    // A date-time runs to a comment or the end of the line.
    let end = text.find('#').unwrap_or(text.len());
    let token = text[..end].trim_end_matches([' ', '\t']);
    if token.is_empty() || !token.starts_with(|c: char| c.is_ascii_digit()) {
        return None;
    }
    let datetime = Datetime::from_str(token).ok()?;
    Some(Value::Date(Spanned::new(base..base + token.len(), datetime)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::KeysFile;

    fn fast(text: &str) -> Result<Vec<KeyFile>, NotPlain> {
        let mut out = Vec::new();
        read(text, 0..text.len(), |k| out.push(k))?;
        Ok(out)
    }

    /// Compares every field and span with what the TOML parser makes of the same text.
    fn same_as_toml(text: &str) {
        let ours = fast(text).unwrap_or_else(|e| panic!("not plain at {e:?}: {text}"));
        let theirs: KeysFile = toml::from_str(text).unwrap();
        assert_eq!(ours.len(), theirs.keys.len());
        for (a, b) in ours.iter().zip(theirs.keys.iter().map(|k| k.get_ref())) {
            assert_eq!(format!("{a:?}"), format!("{b:?}"), "{text}");
        }
    }

    #[test]
    fn plain_files_read_exactly_as_toml_reads_them() {
        same_as_toml("");
        same_as_toml("# only a comment\n\n");
        same_as_toml(concat!(
            "# keys\n[[keys]]\nid = \"a1\"\nname = \"billing sync #1\" # note\n",
            "hash = \"sha256:00\"\ntail = 'Zc81Qa'\nscopes = [\"read\", 'write',]\n",
            "created_at = 2026-11-22T10:00:00Z\nexpires_at = 2027-02-20T10:00:00.5+02:00 # x\n",
            "  revoked_at=2026-12-01 08:00:00Z\r\nrate_limit = \"100/s\"\n",
            "quota = \"1000/month\" # billed\nconsumer = 'acme'\n\n",
            "[[keys]] # second\nid = \"b\"\nname = \"\"\nhash = \"h\"\nscopes = []\n",
            "meta = { tenant = \"acme\", plan='pro',x-y = \"\" } # m\n",
            "allowed_ips = [\"203.0.113.0/24\", '2001:db8::/32'] # a\n",
            "[[keys]]\nid = \"c\"\nname = \"c\"\nhash = \"h\"\nmeta = {}\nallowed_ips = []\n",
        ));
    }

    #[test]
    fn anything_else_is_left_to_the_toml_parser() {
        let entry = "[[keys]]\nid = \"a\"\nname = \"n\"\nhash = \"h\"\n";
        for extra in [
            "name2 = \"x\"\n",
            "id = \"again\"\n",
            "tail = \"a\\u0041\"\n",
            "tail = \"\"\"multi\"\"\"\n",
            "scopes = [\n\"read\"]\n",
            "scopes = \"read\"\n",
            "tail = 5\n",
            "tail = \"a\" \"b\"\n",
            "\"tail\" = \"a\"\n",
            "expires_at = \"2027-01-01T00:00:00Z\"\n",
            "expires_at = 2027-13-01T00:00:00Z\n",
            "[other]\n",
            "meta = { a = \"1\", }\n",
            "meta = { \"a\" = \"1\" }\n",
            "meta = { a.b = \"1\" }\n",
            "meta = { a = \"1\", a = \"2\" }\n",
            "meta = { a = 1 }\n",
            "meta = { a = \"1\"\n",
            "meta = \"x\"\n",
            "allowed_ips = \"10.0.0.0/8\"\n",
            "tail = \"a\u{1}\"\n",
        ] {
            let text = format!("{entry}{extra}");
            assert_eq!(fast(&text).unwrap_err(), NotPlain { entry_start: 0 }, "{extra}");
        }
        assert!(fast("id = \"top-level\"\n").is_err());
        assert!(fast("\r").is_err(), "a lone CR at the end is not plain");
        assert!(fast(&format!("{entry}tail = \"x\"\r")).is_err());
        assert!(fast("[[keys]]\nid = \"a\"\n").is_err(), "missing fields");
        let second = format!("{entry}{entry}bad line\n");
        assert_eq!(fast(&second).unwrap_err().entry_start, entry.len());
    }
}

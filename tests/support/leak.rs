//! Looking for a key, or any piece of one, where it must never appear (logs, answers, metrics,
//! what the upstream saw), and making keys that must be refused.

/// How long a piece of a key may be before it counts as a leak.
const PIECE: usize = 8;

/// The length of a generated key's public head, `<prefix>_<8-character id>_`, which may appear
/// anywhere (the id is public); 0 for a key of another shape, all of which is secret.
pub fn public_len(key: &str) -> usize {
    match key.splitn(3, '_').collect::<Vec<_>>().as_slice() {
        [prefix, id, rest] if id.len() == 8 && !rest.is_empty() => prefix.len() + 1 + id.len() + 1,
        _ => 0,
    }
}

/// The first 8-character piece of `key` that `text` contains, ignoring pieces that lie wholly
/// in the key's public head; a key shorter than 8 characters is looked for whole.
pub fn leaked_piece<'k>(text: &str, key: &'k str) -> Option<&'k str> {
    if key.len() < PIECE {
        return text.contains(key).then_some(key);
    }
    let public = public_len(key);
    (0..=key.len() - PIECE)
        .filter(|&i| i + PIECE > public)
        .map(|i| &key[i..i + PIECE])
        .find(|piece| text.contains(piece))
}

/// One line per `lines` entry that holds a piece of one of `secrets`, saying which.
pub fn leaks<'a>(lines: impl IntoIterator<Item = &'a String>, secrets: &[String]) -> Vec<String> {
    let mut found = Vec::new();
    for line in lines {
        for secret in secrets {
            if let Some(piece) = leaked_piece(line, secret) {
                found.push(format!("piece {piece:?} of key {secret:?} in: {line}"));
            }
        }
    }
    found
}

/// A generated key with the last character of its checksum changed: keygate's shape, a
/// checksum that fails, so it must be refused before any lookup.
pub fn tampered(key: &str) -> String {
    let mut out = key.to_owned();
    let last = out.pop().expect("a non-empty key");
    out.push(if last == 'A' { 'B' } else { 'A' });
    out
}

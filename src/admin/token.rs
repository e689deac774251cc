//! Admin tokens: making one (`keygate admin token`) and recognising a presented one against
//! the configured hashes without the time taken saying how close a guess came.

use sha2::{Digest, Sha256};

use crate::config::AdminToken;
use crate::keys::KeyHash;

/// A new admin token's prefix: tells a reader (and a secret scanner) what it is.
const PREFIX: &str = "kga_";
/// 43 base62 characters: over 256 bits of OS randomness.
const RANDOM_LEN: usize = 43;

/// A new admin token, and the `[admin] tokens` entry that admits it.
pub fn generate(name: &str) -> Result<(String, String), getrandom::Error> {
    let token = format!("{PREFIX}{}", crate::keys::random_base62(RANDOM_LEN)?);
    let line = format!(
        "{{ name = {}, hash = \"{}\" }}",
        toml_edit::Value::from(name),
        crate::keys::hash_key(&token)
    );
    Ok((token, line))
}

/// The name of the configured token that `authorization` (`Bearer <token>`) presents, if any.
///
/// Every configured digest is compared in full, with no early exit, so the time taken does
/// not depend on how many leading bytes of a guess were right or on which token matched.
pub fn verify<'t>(tokens: &'t [AdminToken], authorization: Option<&[u8]>) -> Option<&'t str> {
    let value = std::str::from_utf8(authorization?).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    if token.is_empty() {
        return None;
    }
    let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut found = None;
    for configured in tokens {
        let KeyHash(digest) = configured.hash;
        let difference = digest.iter().zip(&presented).fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // black_box keeps the optimiser from turning the fold into an early-exit comparison.
        if std::hint::black_box(difference) == 0 {
            found = Some(configured.name.as_str());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_is_admitted_by_its_line_and_nothing_else() {
        let (token, line) = generate("ops").unwrap();
        assert!(token.starts_with("kga_") && token.len() == 4 + RANDOM_LEN, "{token}");
        let hash = line.split('"').nth(3).unwrap();
        assert!(line.starts_with("{ name = \"ops\", hash = \"sha256:"), "{line}");
        let tokens = vec![
            AdminToken { name: "other".into(), hash: KeyHash::of("something else") },
            AdminToken { name: "ops".into(), hash: KeyHash::parse(hash).unwrap() },
        ];
        let header = format!("Bearer {token}");
        assert_eq!(verify(&tokens, Some(header.as_bytes())), Some("ops"));
        assert_eq!(verify(&tokens, Some(format!("bearer  {token} ").as_bytes())), Some("ops"));
        assert_eq!(verify(&tokens, Some(token.as_bytes())), None, "no scheme");
        assert_eq!(verify(&tokens, Some(format!("Basic {token}").as_bytes())), None);
        assert_eq!(verify(&tokens, Some(b"Bearer kga_wrong")), None);
        assert_eq!(verify(&tokens, Some(b"Bearer ")), None);
        assert_eq!(verify(&tokens, None), None);
        assert_eq!(verify(&[], Some(header.as_bytes())), None);
    }
}

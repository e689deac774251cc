//! The host a request names (`Host` or the target's authority): accepted only in the one form
//! that every parser reads the same way, `host[:port]`, so routing and the upstream never
//! disagree about which host was meant.
//!
//! Why so strict: parsers split odd values differently. nginx and Express take the port after
//! the *first* colon, others after the last; WHATWG URL parsers read `a.example:@b.example` as
//! user info plus `b.example`. A value any of them could read two ways is refused (400), and
//! what goes upstream is the parsed value, never the raw one.

use http::HeaderValue;

/// A validated `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHost {
    /// The whole `host[:port]`, as sent (it is already in the one accepted form).
    pub value: HeaderValue,
    /// Where the name ends in `value`, before any port and one trailing dot.
    name_end: usize,
}

impl RequestHost {
    /// The host name for route matching: no port, no trailing dot, case as sent (matching
    /// ignores case). An IPv6 literal keeps its brackets.
    pub fn name(&self) -> &str {
        // `value` came from a `&str` in `parse`; a non-text value is impossible here.
        self.value.to_str().map_or("", |text| &text[..self.name_end])
    }
}

/// Why a host value was refused; the text is the 400's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostError(pub &'static str);

/// Parses a `Host` value or an authority into `host[:port]`.
///
/// Accepted: a name of letters, digits, `-`, `.`, `_` and `~` (RFC 3986 unreserved, no
/// percent-encoding), or an IPv6 literal in brackets; then optionally `:` and 1–5 digits up to
/// 65535. Refused: empty, user info (`@`), a second `:` outside brackets, any other character.
pub fn parse(raw: &[u8]) -> Result<RequestHost, HostError> {
    if let Some(name_end) = common_form(raw) {
        let value =
            HeaderValue::from_bytes(raw).map_err(|_| HostError("the Host is not a valid header value"))?;
        return Ok(RequestHost { value, name_end });
    }
    parse_any(raw)
}

/// [`parse`] for a `Host` header: the same rules, and an accepted value is shared, not copied.
pub fn parse_header(value: &HeaderValue) -> Result<RequestHost, HostError> {
    match common_form(value.as_bytes()) {
        Some(name_end) => Ok(RequestHost { value: value.clone(), name_end }),
        None => parse_any(value.as_bytes()),
    }
}

/// The forms nearly every request uses — `name.example[:port]` whose last label starts with a
/// letter, or a dotted quad `a.b.c.d[:port]` — recognised in one pass over the bytes, with where
/// the name ends. `None` means "not one of these", not "refused": [`parse_any`] then decides.
/// Every value this accepts, `parse_any` accepts with the same `name_end` (tested below).
fn common_form(raw: &[u8]) -> Option<usize> {
    // Every request pays for this: a few tight passes over a short value, no allocation.
    let name_end = raw.iter().position(|&b| b == b':').unwrap_or(raw.len());
    let (name, port) = raw.split_at(name_end);
    if let Some(port) = port.strip_prefix(b":")
        && !small_decimal(port, 5, 65535)
    {
        return None;
    }
    // The last label decides which form it must be. None: an empty name or a trailing dot.
    let last = name.iter().rposition(|&b| b == b'.').map_or(0, |dot| dot + 1);
    match name.get(last) {
        Some(first) if first.is_ascii_alphabetic() => {
            // Letters, digits and `-`, in labels that are never empty.
            let mut previous = b'.';
            for &b in name {
                let fine = if b == b'.' { previous != b'.' } else { b.is_ascii_alphanumeric() || b == b'-' };
                if !fine {
                    return None;
                }
                previous = b;
            }
            Some(name_end)
        }
        Some(_) => dotted_quad(name).then_some(name_end),
        None => None,
    }
}

/// `a.b.c.d`: four decimal parts 0–255 without leading zeros, the one spelling of an IPv4
/// address that every parser reads alike.
fn dotted_quad(name: &[u8]) -> bool {
    let mut parts = 0;
    for part in name.split(|&b| b == b'.') {
        parts += 1;
        if parts > 4 || (part.len() > 1 && part[0] == b'0') || !small_decimal(part, 3, 255) {
            return false;
        }
    }
    parts == 4
}

/// 1 to `max_len` decimal digits, with a value of at most `max`.
fn small_decimal(digits: &[u8], max_len: usize, max: u32) -> bool {
    if digits.is_empty() || digits.len() > max_len {
        return false;
    }
    let mut number = 0u32;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return false;
        }
        number = number * 10 + u32::from(digit - b'0');
    }
    number <= max
}

/// The full rules of [`parse`], for every form.
fn parse_any(raw: &[u8]) -> Result<RequestHost, HostError> {
    let text = std::str::from_utf8(raw).map_err(|_| HostError("the Host is not text"))?;
    if text.is_empty() {
        return Err(HostError("the Host is empty"));
    }
    if text.contains('@') {
        return Err(HostError("the Host carries user info"));
    }
    let (name, port) = if let Some(rest) = text.strip_prefix('[') {
        let close = rest.find(']').ok_or(HostError("the Host has an unclosed IPv6 literal"))?;
        let literal = &rest[..close];
        // Only the canonical spelling (RFC 5952, as WHATWG serialises it): `[0::1]` and `[::1]`
        // are one address that a route table would see as two names.
        match literal.parse::<std::net::Ipv6Addr>() {
            // Dotted forms (`::ffff:1.2.3.4`) WHATWG prints in hex: refused as well.
            Ok(address) if address.to_string() == literal.to_ascii_lowercase() && !literal.contains('.') => {}
            Ok(_) => return Err(HostError("the Host's IPv6 literal is not in its canonical form")),
            Err(_) => return Err(HostError("the Host has an invalid IPv6 literal")),
        }
        let after = &rest[close + 1..];
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port),
            None if after.is_empty() => None,
            None => return Err(HostError("the Host has characters after its IPv6 literal")),
        };
        (&text[..close + 2], port)
    } else {
        match text.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (text, None),
        }
    };
    if let Some(port) = port {
        let digits = !port.is_empty() && port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit());
        if !digits || port.parse::<u32>().map_or(true, |p| p > 65535) {
            return Err(HostError("the Host has an invalid port"));
        }
    }
    if !name.starts_with('[') {
        if name.is_empty() {
            return Err(HostError("the Host has an empty name"));
        }
        if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')) {
            return Err(HostError("the Host has a character no host name may carry"));
        }
    }
    let name_end = name.strip_suffix('.').map_or(name.len(), str::len);
    if name_end == 0 {
        return Err(HostError("the Host has an empty name"));
    }
    if !name.starts_with('[') && name[..name_end].split('.').any(str::is_empty) {
        return Err(HostError("the Host has an empty label"));
    }
    if !name.starts_with('[') && !plain_or_dotted_quad(&name[..name_end]) {
        return Err(HostError("the Host is a number that parsers read as different addresses"));
    }
    let value = HeaderValue::from_str(text).map_err(|_| HostError("the Host is not a valid header value"))?;
    Ok(RequestHost { value, name_end })
}

/// WHATWG URL parsers read a name whose last label is a number (`127.1`, `0x7f.1`, `2130706433`,
/// `010.0.0.1`) as an IPv4 address, each in its own way; other parsers keep it as a name. Only
/// the one unambiguous spelling of an address passes: four decimal parts 0–255 without leading
/// zeros.
fn plain_or_dotted_quad(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    let numeric = !last.is_empty()
        && (last.bytes().all(|b| b.is_ascii_digit())
            || last
                .strip_prefix("0x")
                .or_else(|| last.strip_prefix("0X"))
                .is_some_and(|hex| hex.bytes().all(|b| b.is_ascii_hexdigit())));
    if !numeric {
        return true;
    }
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() == 4
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 3
                && p.bytes().all(|b| b.is_ascii_digit())
                && (p.len() == 1 || !p.starts_with('0'))
                && p.parse::<u16>().is_ok_and(|n| n <= 255)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(raw: &str) -> Result<String, HostError> {
        parse(raw.as_bytes()).map(|h| h.name().to_string())
    }

    #[test]
    fn accepted_forms() {
        assert_eq!(name("Example.com").unwrap(), "Example.com");
        assert_eq!(name("example.com:8080").unwrap(), "example.com");
        assert_eq!(name("example.com.").unwrap(), "example.com");
        assert_eq!(name("example.com.:80").unwrap(), "example.com");
        assert_eq!(name("[::1]").unwrap(), "[::1]");
        assert_eq!(name("[::1]:443").unwrap(), "[::1]");
        assert_eq!(name("127.0.0.1:1").unwrap(), "127.0.0.1");
        assert_eq!(name("0.0.0.0").unwrap(), "0.0.0.0");
        assert_eq!(name("a1.example.123abc").unwrap(), "a1.example.123abc");
        assert_eq!(parse(b"a.example:65535").unwrap().value, "a.example:65535");
    }

    #[test]
    fn the_common_forms_agree_with_the_full_rules() {
        let mut samples: Vec<String> = Vec::new();
        let names = [
            "example.com",
            "Example.COM",
            "a",
            "a-b.c",
            "x1.y2.z3",
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "256.0.0.1",
            "01.2.3.4",
            "1.2.3",
            "1.2.3.4.5",
            "a.123",
            "a.0x10",
            "0x7f",
            "a..b",
            ".a",
            "a.",
            "",
            "-a.example",
            "a_b.example",
            "a~b",
            "1a.example",
            "a.1b",
            "999.1.1.1",
            "1.2.3.04",
        ];
        for name in names {
            for port in ["", ":", ":0", ":80", ":65535", ":65536", ":123456", ":8a", ":+1", ":80:1"] {
                samples.push(format!("{name}{port}"));
            }
        }
        for raw in &samples {
            if let Some(end) = common_form(raw.as_bytes()) {
                let full =
                    parse_any(raw.as_bytes()).unwrap_or_else(|e| panic!("{raw:?}: fast yes, full {e:?}"));
                assert_eq!(full.name_end, end, "{raw:?}");
                assert_eq!(parse(raw.as_bytes()).unwrap(), full, "{raw:?}");
            } else {
                assert_eq!(parse(raw.as_bytes()).ok(), parse_any(raw.as_bytes()).ok(), "{raw:?}");
            }
        }
        let header = HeaderValue::from_static("api.example:8443");
        assert_eq!(parse_header(&header).unwrap().name(), "api.example");
    }

    #[test]
    fn every_short_value_the_common_form_takes_the_full_rules_take_alike() {
        // Every string of up to five of these bytes: each edge of the one-pass scan (empty
        // labels, a leading zero, a port, a stray byte) within reach.
        let alphabet = b"0125a.:-_";
        let mut value = Vec::new();
        let mut taken = 0;
        for len in 0..=5u32 {
            for mut n in 0..alphabet.len().pow(len) {
                value.clear();
                for _ in 0..len {
                    value.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                if let Some(end) = common_form(&value) {
                    taken += 1;
                    let full =
                        parse_any(&value).unwrap_or_else(|e| panic!("{value:?}: fast yes, full {e:?}"));
                    assert_eq!(full.name_end, end, "{value:?}");
                }
            }
        }
        assert!(taken > 1000, "only {taken} values took the common form");
    }

    #[test]
    fn two_way_values_are_refused() {
        for raw in [
            "",
            ":80",
            ".",
            "admin.example.com:1:2",
            "a.example:@b.example",
            "user@b.example",
            "a.example:",
            "a.example:123456",
            "a.example:65536",
            "a.example:+80",
            "a.example: 80",
            "a example",
            "a.example/x",
            "a.example\\b",
            "a%2eexample",
            "a.example?x",
            "a.example#x",
            "[::1",
            "[::1]x",
            "[::1]:",
            "[not-v6]",
            "::1",
            "a,b",
            "127.1",
            "0x7f.0.0.1",
            "2130706433",
            "010.0.0.1",
            "1.2.3.256",
            "a.0x10",
            "a.123",
            "..",
            ".a",
            "a..b",
            "a.example..",
            "[0::1]",
            "[::0001]",
            "[::ffff:1.2.3.4]",
        ] {
            assert!(parse(raw.as_bytes()).is_err(), "{raw:?} must be refused");
        }
        assert!(parse(b"caf\xc3\xa9.example").is_err());
    }
}

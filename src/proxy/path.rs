//! Request-path normalisation: the one form of a path that keygate both routes on and forwards,
//! so the upstream never sees a path that keygate would have routed differently.

/// Why a path was refused; each becomes a 400 `bad_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    NotAbsolute,
    InvalidPercentEncoding,
    EncodedSlash,
    Backslash,
    ControlCharacter,
    DotSegmentParameters,
    AboveRoot,
}

impl PathError {
    pub fn reason(self) -> &'static str {
        match self {
            Self::NotAbsolute => "the path must start with '/'",
            Self::InvalidPercentEncoding => "the path has invalid percent-encoding",
            Self::EncodedSlash => "the path has an encoded slash or backslash",
            Self::Backslash => "the path has a backslash",
            Self::ControlCharacter => "the path has a control character",
            Self::DotSegmentParameters => "the path has a dot-segment with parameters",
            Self::AboveRoot => "the path climbs above the root",
        }
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalises a request path (without its query): percent-encoded unreserved characters are
/// decoded (once), repeated slashes merged, dot-segments resolved (RFC 3986 §5.2.4). Other
/// percent-encodings are kept, with upper-case hex so that one resource has one spelling.
///
/// Ordering matters: decoding comes first so that `%2e%2e` is resolved as the `..` that a
/// decoding upstream would see; it happens exactly once so that `%252e` stays `%252e`.
pub fn normalize(raw: &str, allow_encoded_slashes: bool) -> Result<String, PathError> {
    if already_normal(raw.as_bytes()) {
        return Ok(raw.to_string());
    }
    let bytes = raw.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex_value),
                    bytes.get(i + 2).copied().and_then(hex_value),
                ) else {
                    return Err(PathError::InvalidPercentEncoding);
                };
                let value = (hi << 4) | lo;
                if is_unreserved(value) {
                    decoded.push(value);
                } else if (value == b'/' || value == b'\\') && !allow_encoded_slashes {
                    return Err(PathError::EncodedSlash);
                } else if value.is_ascii_control() {
                    // An encoded control byte is as dangerous to a decoding upstream as a raw one.
                    return Err(PathError::ControlCharacter);
                } else {
                    decoded.extend_from_slice(&[b'%', HEX_UPPER[hi as usize], HEX_UPPER[lo as usize]]);
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ if b.is_ascii_control() => return Err(PathError::ControlCharacter),
            _ => {
                decoded.push(b);
                i += 1;
            }
        }
    }

    // Segments after the leading '/'; an empty, "." or ".." last segment leaves a trailing slash.
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded[1..].split(|&b| b == b'/') {
        trailing_slash = false;
        match segment {
            b"" | b"." => trailing_slash = true,
            b".." => {
                if kept.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing_slash = true;
            }
            // `..;x` is `..` to Tomcat and Jetty but an ordinary name to us: refuse it.
            s if s.starts_with(b".;") || s.starts_with(b"..;") => {
                return Err(PathError::DotSegmentParameters);
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &kept {
        out.push('/');
        // Only ASCII was added to text that was UTF-8, so each segment is still UTF-8.
        out.push_str(std::str::from_utf8(segment).map_err(|_| PathError::InvalidPercentEncoding)?);
    }
    if kept.is_empty() || trailing_slash {
        out.push('/');
    }
    Ok(out)
}

/// The common case, checked in one pass: nothing to decode, merge or resolve. Conservative:
/// any segment starting with a dot takes the full path.
fn already_normal(raw: &[u8]) -> bool {
    let Some((&b'/', rest)) = raw.split_first() else { return false };
    if rest.iter().any(|&b| b == b'%' || b == b'\\' || b.is_ascii_control()) {
        return false;
    }
    let mut segments = rest.split(|&b| b == b'/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || segment.first() == Some(&b'.') {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(p: &str) -> Result<String, PathError> {
        normalize(p, false)
    }

    #[test]
    fn normal_form() {
        let cases = [
            ("/", "/"),
            ("//", "/"),
            ("/a/b", "/a/b"),
            ("/a//b///c", "/a/b/c"),
            ("/a/./b", "/a/b"),
            ("/a/b/../c", "/a/c"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/a/b/", "/a/b/"),
            ("/public/../private", "/private"),
            ("/%7euser/%41", "/~user/A"),
            ("/public/%2e%2e/private", "/private"),
            ("/public/%2E./private", "/private"),
            ("/%252e%252e/x", "/%252e%252e/x"),
            ("/a%20b", "/a%20b"),
            ("/a%c3%a9", "/a%C3%A9"),
            ("/a;b/c", "/a;b/c"),
            ("/...", "/..."),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refusals() {
        let cases = [
            ("", PathError::NotAbsolute),
            ("*", PathError::NotAbsolute),
            ("/..", PathError::AboveRoot),
            ("/a/../..", PathError::AboveRoot),
            ("/%2e%2e/x", PathError::AboveRoot),
            ("/public%2fprivate", PathError::EncodedSlash),
            ("/public%2Fprivate", PathError::EncodedSlash),
            ("/public%5cprivate", PathError::EncodedSlash),
            ("/public\\..\\private", PathError::Backslash),
            ("/a%zz", PathError::InvalidPercentEncoding),
            ("/a%2", PathError::InvalidPercentEncoding),
            ("/a%", PathError::InvalidPercentEncoding),
            ("/a%00", PathError::ControlCharacter),
            ("/a%0a", PathError::ControlCharacter),
            ("/a\u{1}", PathError::ControlCharacter),
            ("/public/..;/private", PathError::DotSegmentParameters),
            ("/public/.;x/private", PathError::DotSegmentParameters),
            ("/public/%2e%2e;/private", PathError::DotSegmentParameters),
        ];
        for (input, want) in cases {
            assert_eq!(norm(input), Err(want), "{input}");
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_one() {
        for path in ["/", "/a", "/a/b/", "/a//b", "//", "/.x", "/a/.", "/a%41", "/a/b..c", "/a;b", "/~x/y-z_"]
        {
            if already_normal(path.as_bytes()) {
                assert_eq!(normalize(path, false).as_deref(), Ok(path), "{path}");
            }
        }
        assert!(already_normal(b"/a/b/") && already_normal(b"/") && already_normal(b"/a/b..c"));
        assert!(!already_normal(b"/a//b") && !already_normal(b"/.x") && !already_normal(b"a"));
    }

    #[test]
    fn encoded_slashes_can_be_allowed() {
        assert_eq!(normalize("/a%2fb/%5C", true).as_deref(), Ok("/a%2Fb/%5C"));
    }
}

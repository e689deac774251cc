//! keygate's HTTP/1.1 client codec (RFC 9112): the request head and its body framing on the way
//! to a plain-`http://` upstream, and the response head and body framing on the way back. No
//! I/O here: [`pool`](super::pool) moves the bytes.

use std::mem::MaybeUninit;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};

use super::forward::Added;

/// The most a response head (with any interim 1xx heads before it) may take: hyper's client
/// default read buffer, which is what upstreams were held to before this codec.
pub const MAX_HEAD: usize = 8192 + 4096 * 100;
/// The most fields a response head or a trailer section may have (hyper's client default).
pub const MAX_HEADERS: usize = 100;
/// The most a chunk-size line with its (ignored) extensions may take.
const MAX_CHUNK_LINE: usize = 4096;
/// The most a trailer section may take.
const MAX_TRAILERS: usize = 64 * 1024;

/// What an upstream did wrong. Never carries a header value: one could hold a key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("the upstream's response head is malformed")]
    MalformedHead,
    #[error("the upstream's response head exceeds {MAX_HEAD} bytes or {MAX_HEADERS} fields")]
    HeadTooLarge,
    #[error("the upstream's response has an invalid content-length")]
    InvalidContentLength,
    #[error("the upstream's HTTP/1.0 response has a transfer-encoding")]
    TransferEncodingOnHttp10,
    #[error("the upstream's chunked body is malformed")]
    MalformedChunk,
    #[error("the upstream's chunk size overflows")]
    ChunkTooLarge,
    #[error("the upstream's response trailers are malformed or too large")]
    MalformedTrailers,
    #[error("the upstream closed the connection in the middle of a response head")]
    IncompleteHead,
    #[error("the upstream closed the connection before the end of a response body")]
    IncompleteBody,
}

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// How the request body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body goes out (and the body, if any, is not read).
    None,
    /// `content-length`, with the bytes still to send.
    Length(u64),
    Chunked,
}

/// Writes the request head, the client's fields and then keygate's `added` ones, into `out`,
/// and says how its body goes out. The framing follows
/// hyper's client, which upstreams saw before this codec: an empty body gets no framing header
/// (a client's own `content-length: 0` stays); a client's valid `content-length` is kept; an
/// exact size gets `content-length`; an unknown one `transfer-encoding: chunked`, except on
/// GET, HEAD and CONNECT, which are sent without their body.
pub fn encode_head(
    parts: &Parts,
    added: &Added,
    body_empty: bool,
    exact: Option<u64>,
    out: &mut BytesMut,
) -> RequestFraming {
    let headers = &parts.headers;
    // Only a body needs its framing looked up: most requests have none.
    let (has_te, client_length) = if body_empty {
        (false, None)
    } else {
        (headers.contains_key(TRANSFER_ENCODING), content_length(headers).ok().flatten())
    };
    let framing = if body_empty {
        RequestFraming::None
    } else if has_te {
        // The pipeline allows only `chunked` from a client and strips it as hop-by-hop; were
        // one left, the body is chunked, and it says so once.
        RequestFraming::Chunked
    } else if let Some(len) = client_length {
        RequestFraming::Length(len)
    } else if let Some(len) = exact {
        RequestFraming::Length(len)
    } else if matches!(parts.method, Method::GET | Method::HEAD | Method::CONNECT) {
        RequestFraming::None
    } else {
        RequestFraming::Chunked
    };
    // A content-length keygate writes itself replaces any the client sent (it was invalid);
    // a chunked body carries none.
    let own_length = !body_empty && !has_te && client_length.is_none();
    let skip_length = framing == RequestFraming::Chunked || (own_length && exact.is_some());

    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    // Room for a usual head at once; `out` is usually a connection's recycled buffer that has it.
    out.reserve(1024);
    out.put_slice(parts.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(target.as_bytes());
    out.put_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        if *name == TRANSFER_ENCODING || (skip_length && *name == CONTENT_LENGTH) {
            continue;
        }
        put_field(out, name, value);
    }
    // keygate's own (`Host` among them): the pipeline removed every client field of their names.
    for (name, value) in added.iter() {
        put_field(out, name, value);
    }
    match framing {
        RequestFraming::Chunked => out.put_slice(b"transfer-encoding: chunked\r\n"),
        RequestFraming::Length(len) if skip_length => {
            out.put_slice(b"content-length: ");
            put_decimal(out, len);
            out.put_slice(b"\r\n");
        }
        RequestFraming::Length(_) | RequestFraming::None => {}
    }
    out.put_slice(b"\r\n");
    framing
}

/// Appends one chunk of a chunked body.
pub fn encode_chunk(data: &[u8], out: &mut BytesMut) {
    out.reserve(data.len() + 20);
    put_hex(out, data.len() as u64);
    out.put_slice(b"\r\n");
    out.put_slice(data);
    out.put_slice(b"\r\n");
}

/// The last chunk of a chunked body, with no trailers: an HTTP/1 upstream gets none.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// One `name: value` line of a head (requests here, responses in the server's loop).
pub(crate) fn put_field(out: &mut impl BufMut, name: &HeaderName, value: &HeaderValue) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

pub(crate) fn put_decimal(out: &mut impl BufMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

pub(crate) fn put_hex(out: &mut impl BufMut, mut n: u64) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.put_slice(&digits[at..]);
}

// ---------------------------------------------------------------------------------------------
// Response heads
// ---------------------------------------------------------------------------------------------

/// How a response's body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Everything until the upstream closes.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub response: Response<()>,
    pub framing: Framing,
    /// The connection may carry another request once this response is read whole.
    pub keep_alive: bool,
}

/// Parses the final response head at the start of `buf`, skipping interim 1xx heads; the head
/// is taken off `buf`, which keeps what follows. `Ok(None)`: more bytes are needed.
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Error> {
    loop {
        let Some(end) = head_end(buf) else {
            if buf.len() >= MAX_HEAD {
                return Err(Error::HeadTooLarge);
            }
            // Not all there yet; garbage is still refused now rather than waited on.
            return match parse(buf, &mut [const { MaybeUninit::uninit() }; MAX_HEADERS]) {
                Ok((httparse::Status::Partial, _)) => Ok(None),
                Err(error) => Err(error),
                Ok((httparse::Status::Complete(_), _)) => Err(Error::MalformedHead),
            };
        };
        if end > MAX_HEAD {
            return Err(Error::HeadTooLarge);
        }
        // Taken off first and frozen, so the field values below share its bytes instead of
        // copying them.
        let head = buf.split_to(end).freeze();
        let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let parsed = match parse(&head, &mut fields)? {
            (httparse::Status::Complete(len), parsed) if len == end => parsed,
            _ => return Err(Error::MalformedHead),
        };
        let code = parsed.code.unwrap_or(0);
        // Interim answers (100 Continue, 103 Early Hints) are not relayed; the final one follows.
        if (100..200).contains(&code) && code != 101 {
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|_| Error::MalformedHead)?;
        let version = if parsed.version == Some(0) { Version::HTTP_10 } else { Version::HTTP_11 };
        let mut response = Response::new(());
        *response.status_mut() = status;
        *response.version_mut() = version;
        let headers = response.headers_mut();
        headers.reserve(parsed.headers.len());
        // What framing and reuse depend on, noted on the way so no field is looked up again.
        let mut facts = Facts::default();
        for field in parsed.headers.iter() {
            let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Error::MalformedHead)?;
            if name == CONTENT_LENGTH {
                facts.length = facts.length.and_then(|found| add_length(found, field.value));
            } else if name == TRANSFER_ENCODING {
                facts.transfer_encoding = true;
                facts.chunked = last_token_is(field.value, b"chunked");
            } else if name == CONNECTION {
                let mut only_ours = true;
                for token in field.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if token.eq_ignore_ascii_case(b"close") {
                        facts.close = true;
                    } else if token.eq_ignore_ascii_case(b"keep-alive") {
                        facts.keep_alive = true;
                    } else {
                        only_ours = false;
                    }
                }
                // A `Connection` naming other fields stays, for the pipeline to remove those.
                if only_ours {
                    continue;
                }
            }
            // Fields about this connection end here (RFC 9110 §7.6.1); the pipeline would
            // remove them anyway, at the cost of a lookup each.
            if name != CONNECTION && super::forward::is_hop_by_hop(&name) {
                continue;
            }
            let value = HeaderValue::from_maybe_shared(head.slice_ref(field.value))
                .map_err(|_| Error::MalformedHead)?;
            headers.append(name, value);
        }
        let (framing, mut keep_alive) = framing(&facts, status, version, head_request)?;
        if framing == Framing::Chunked && facts.length != Ok(None) {
            // Both: chunked wins (RFC 9112 §6.3 item 3), and the length goes so that nobody
            // downstream reads it.
            headers.remove(CONTENT_LENGTH);
        }
        keep_alive &=
            if version == Version::HTTP_10 { facts.keep_alive && !facts.close } else { !facts.close };
        return Ok(Some(Head { response, framing, keep_alive }));
    }
}

/// The fields of a response head that decide its framing and the connection's reuse.
struct Facts {
    /// The one length all `content-length` values agree on; `Err` if any is invalid.
    length: Result<Option<u64>, ()>,
    transfer_encoding: bool,
    /// `chunked` is the last coding of the last `transfer-encoding` field.
    chunked: bool,
    close: bool,
    keep_alive: bool,
}

impl Default for Facts {
    fn default() -> Self {
        Self { length: Ok(None), transfer_encoding: false, chunked: false, close: false, keep_alive: false }
    }
}

fn parse<'h, 'b>(
    buf: &'b [u8],
    fields: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<(httparse::Status<usize>, httparse::Response<'h, 'b>), Error> {
    let mut parsed = httparse::Response::new(&mut []);
    match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut parsed, buf, fields) {
        Ok(status) => Ok((status, parsed)),
        Err(httparse::Error::TooManyHeaders) => Err(Error::HeadTooLarge),
        Err(_) => Err(Error::MalformedHead),
    }
}

/// Where the head at the start of `buf` ends: just past its first empty line (`\r\n` or, as
/// httparse also accepts, a bare `\n`).
fn head_end(buf: &[u8]) -> Option<usize> {
    // Line by line: a head has a handful, and this costs less than a substring search.
    memchr::memchr_iter(b'\n', buf).find_map(|at| match buf.get(at + 1) {
        Some(b'\n') => Some(at + 2),
        Some(b'\r') if buf.get(at + 2) == Some(&b'\n') => Some(at + 3),
        _ => None,
    })
}

/// The body framing and whether it lets the connection be reused.
fn framing(
    facts: &Facts,
    status: StatusCode,
    version: Version,
    head_request: bool,
) -> Result<(Framing, bool), Error> {
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // Nobody asked for an upgrade on this path: whatever follows is not HTTP/1.1.
        return Ok((Framing::Empty, false));
    }
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok((Framing::Empty, true));
    }
    if facts.transfer_encoding {
        if version == Version::HTTP_10 {
            return Err(Error::TransferEncodingOnHttp10);
        }
        if !facts.chunked {
            return Ok((Framing::Close, false));
        }
        // A connection whose peer framed a message two ways is not trusted again.
        return Ok((Framing::Chunked, facts.length == Ok(None)));
    }
    match facts.length {
        Ok(Some(len)) => Ok((Framing::Length(len), true)),
        Ok(None) => Ok((Framing::Close, false)),
        Err(()) => Err(Error::InvalidContentLength),
    }
}

/// The one length all `content-length` values agree on, `None` without any, `Err` if any is
/// not a plain decimal number or two differ.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    headers.get_all(CONTENT_LENGTH).iter().try_fold(None, |found, value| add_length(found, value.as_bytes()))
}

/// `found` with the lengths of one `content-length` value (a list, possibly) added.
pub(crate) fn add_length(mut found: Option<u64>, value: &[u8]) -> Result<Option<u64>, ()> {
    for item in value.split(|&b| b == b',') {
        let item = item.trim_ascii();
        if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let mut len: u64 = 0;
        for &digit in item {
            len = len.checked_mul(10).and_then(|l| l.checked_add(u64::from(digit - b'0'))).ok_or(())?;
        }
        if found.is_some_and(|seen| seen != len) {
            return Err(());
        }
        found = Some(len);
    }
    Ok(found)
}

fn last_token_is(value: &[u8], token: &[u8]) -> bool {
    value.rsplit(|&b| b == b',').next().is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(token))
}

// ---------------------------------------------------------------------------------------------
// Response bodies
// ---------------------------------------------------------------------------------------------

/// What the next bytes of a response body gave.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body is complete.
    End,
    /// More bytes are needed.
    More,
}

/// Cuts a response body out of the connection's read buffer.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Close,
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk, with this many bytes left.
    ChunkData(u64),
    /// Expecting the CRLF after a chunk's data.
    ChunkEnd,
    /// After the last chunk: the trailer section.
    Trailers,
    Done,
}

impl Decoder {
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(len) => State::Length(len),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Self { state }
    }

    pub fn is_end(&self) -> bool {
        self.state == State::Done
    }

    /// The body bytes still to come, when the framing says.
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(len) => Some(len),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Marks the body as failed: nothing more is read from it.
    pub fn abandon(&mut self) {
        self.state = State::Done;
    }

    /// Takes the next piece of body out of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Error> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(left) | State::ChunkData(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(left).map_or(buf.len(), |left| left.min(buf.len()));
                    let left = left - take as u64;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkSize => {
                    let Some(size) = chunk_size(buf)? else { return Ok(Decoded::More) };
                    self.state = if size == 0 { State::Trailers } else { State::ChunkData(size) };
                }
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::MalformedChunk);
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => return trailers(buf).map(|found| self.after_trailers(found)),
            }
        }
    }

    fn after_trailers(&mut self, found: Option<Option<HeaderMap>>) -> Decoded {
        match found {
            None => Decoded::More,
            Some(trailers) => {
                self.state = State::Done;
                trailers.map_or(Decoded::End, Decoded::Trailers)
            }
        }
    }

    /// The upstream closed the connection: the end of a close-delimited body, else an error.
    pub fn eof(&mut self) -> Result<Decoded, Error> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(Decoded::End)
            }
            _ => Err(Error::IncompleteBody),
        }
    }
}

/// Takes a chunk-size line (`1a;ext=1\r\n`) off `buf`: the size, or `None` if it is not all
/// there yet.
fn chunk_size(buf: &mut BytesMut) -> Result<Option<u64>, Error> {
    let Some(newline) = memchr::memchr(b'\n', buf) else {
        return if buf.len() > MAX_CHUNK_LINE { Err(Error::MalformedChunk) } else { Ok(None) };
    };
    if newline > MAX_CHUNK_LINE {
        return Err(Error::MalformedChunk);
    }
    // Strict CRLF: a bare LF is where parsers disagree, and disagreement is how smuggling works.
    let line = match buf[..newline].split_last() {
        Some((b'\r', line)) => line,
        _ => return Err(Error::MalformedChunk),
    };
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Error::MalformedChunk);
    }
    let mut size: u64 = 0;
    for &digit in &line[..digits] {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => digit - b'A' + 10,
        };
        if size > u64::MAX >> 4 {
            return Err(Error::ChunkTooLarge);
        }
        size = (size << 4) | u64::from(value);
    }
    // Whatever follows the size is an extension (ignored): optional blanks, then `;`.
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') || rest.contains(&b'\r') {
        return Err(Error::MalformedChunk);
    }
    buf.advance(newline + 1);
    Ok(Some(size))
}

/// Takes the trailer section after the last chunk off `buf`: `Some(None)` when it is empty,
/// `Some(Some(fields))`, or `None` if it is not all there yet.
fn trailers(buf: &mut BytesMut) -> Result<Option<Option<HeaderMap>>, Error> {
    if buf.len() < 2 {
        return Ok(None);
    }
    if buf.starts_with(b"\r\n") {
        buf.advance(2);
        return Ok(Some(None));
    }
    let Some(end) = memchr::memmem::find(buf, b"\r\n\r\n") else {
        return if buf.len() > MAX_TRAILERS { Err(Error::MalformedTrailers) } else { Ok(None) };
    };
    let len = end + 4;
    if len > MAX_TRAILERS {
        return Err(Error::MalformedTrailers);
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let parsed = match httparse::parse_headers(&buf[..len], &mut fields) {
        Ok(httparse::Status::Complete((_, parsed))) => parsed,
        _ => return Err(Error::MalformedTrailers),
    };
    let mut map = HeaderMap::with_capacity(parsed.len());
    for field in parsed {
        let name = HeaderName::from_bytes(field.name.as_bytes()).map_err(|_| Error::MalformedTrailers)?;
        let value = HeaderValue::from_bytes(field.value).map_err(|_| Error::MalformedTrailers)?;
        map.append(name, value);
    }
    buf.advance(len);
    Ok(Some(Some(map)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn decode_all(framing: Framing, wire: &[u8]) -> Result<(Vec<u8>, Option<HeaderMap>, BytesMut), Error> {
        let mut decoder = Decoder::new(framing);
        let mut buf = BytesMut::from(wire);
        let (mut body, mut trailers) = (Vec::new(), None);
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(data) => body.extend_from_slice(&data),
                Decoded::Trailers(t) => trailers = Some(t),
                Decoded::End => return Ok((body, trailers, buf)),
                Decoded::More => return Err(Error::IncompleteBody),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers_and_keep_what_follows() {
        let wire = b"5;name=value\r\nhello\r\nA\r\n, world!!!\r\n0\r\nx-sum: 7\r\n\r\nNEXT";
        let (body, trailers, rest) = decode_all(Framing::Chunked, wire).unwrap();
        assert_eq!(body, b"hello, world!!!");
        assert_eq!(trailers.unwrap()["x-sum"], "7");
        assert_eq!(&rest[..], b"NEXT");
        let (body, trailers, _) = decode_all(Framing::Chunked, b"0\r\n\r\n").unwrap();
        assert!(body.is_empty() && trailers.is_none());
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for (wire, error) in [
            (&b"5\r\nhelloXX0\r\n\r\n"[..], Error::MalformedChunk),
            (b"5\nhello\r\n0\r\n\r\n", Error::MalformedChunk),
            (b"g\r\n", Error::MalformedChunk),
            (b"-1\r\n", Error::MalformedChunk),
            (b"5 x\r\nhello\r\n", Error::MalformedChunk),
            (b"10000000000000000\r\n", Error::ChunkTooLarge),
        ] {
            assert_eq!(decode_all(Framing::Chunked, wire).unwrap_err(), error, "{}", wire.escape_ascii());
        }
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let head = |wire: &str, head_request: bool| parse_head(&mut BytesMut::from(wire), head_request);
        let framing = |wire: &str| head(wire, false).map(|h| h.map(|h| (h.framing, h.keep_alive)));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"),
            Ok(Some((Framing::Length(5), true)))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\nContent-Length: 5, 5\r\n\r\n"),
            Ok(Some((Framing::Length(5), true)))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n").unwrap_err(),
            Error::InvalidContentLength
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n").unwrap_err(),
            Error::InvalidContentLength
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n"),
            Ok(Some((Framing::Chunked, false)))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"),
            Ok(Some((Framing::Close, false)))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Ok(Some((Framing::Close, false))));
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\ncontent-length: 9\r\n\r\n"),
            Ok(Some((Framing::Empty, true)))
        );
        assert_eq!(
            framing(
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nlink: x\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            ),
            Ok(Some((Framing::Length(0), false)))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"),
            Ok(Some((Framing::Length(1), false)))
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: keep-alive\r\n\r\n"),
            Ok(Some((Framing::Length(1), true)))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\ncontent-length: 1\r\n"), Ok(None));
        assert_eq!(
            framing("HTTP/1.1 200 OK\ncontent-length: 1\n\r\n\r\n\r\n"),
            Ok(Some((Framing::Length(1), true)))
        );
        assert_eq!(
            framing("HTTP/1.1 200 OK\ncontent-length: 1\n\n\r\n\r\n"),
            Ok(Some((Framing::Length(1), true)))
        );
        let hop = head(
            "HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n",
            false,
        );
        assert_eq!(
            hop.unwrap().unwrap().response.headers().keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            ["x-a", "content-length"]
        );
        let named = head("HTTP/1.1 200 OK\r\nconnection: x-a\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n", false);
        assert!(
            named.unwrap().unwrap().response.headers().contains_key("connection"),
            "kept for the pipeline to remove x-a"
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n", true).unwrap().unwrap().framing,
            Framing::Empty
        );
    }

    #[test]
    fn request_heads_are_framed_as_hypers_client_frames_them() {
        let encode = |method: &str, headers: &[(&str, &str)], empty: bool, exact: Option<u64>| {
            let mut builder = http::Request::builder().method(method).uri("/p?q=1");
            for (name, value) in headers {
                builder = builder.header(*name, *value);
            }
            let (parts, ()) = builder.body(()).unwrap().into_parts();
            let mut out = BytesMut::new();
            let mut added = Added::default();
            added.push(http::header::HOST, HeaderValue::from_static("up"));
            let framing = encode_head(&parts, &added, empty, exact, &mut out);
            (framing, String::from_utf8(out.to_vec()).unwrap())
        };
        let (framing, wire) = encode("GET", &[("accept", "*/*")], true, Some(0));
        assert_eq!(
            (framing, wire.as_str()),
            (RequestFraming::None, "GET /p?q=1 HTTP/1.1\r\naccept: */*\r\nhost: up\r\n\r\n")
        );
        let (framing, wire) = encode("POST", &[("content-length", "3")], false, Some(3));
        assert_eq!(
            (framing, wire.as_str()),
            (RequestFraming::Length(3), "POST /p?q=1 HTTP/1.1\r\ncontent-length: 3\r\nhost: up\r\n\r\n")
        );
        let (framing, wire) = encode("POST", &[], false, Some(12));
        assert_eq!(
            (framing, wire.as_str()),
            (RequestFraming::Length(12), "POST /p?q=1 HTTP/1.1\r\nhost: up\r\ncontent-length: 12\r\n\r\n")
        );
        let (framing, wire) = encode("PUT", &[], false, None);
        assert_eq!(
            (framing, wire.as_str()),
            (
                RequestFraming::Chunked,
                "PUT /p?q=1 HTTP/1.1\r\nhost: up\r\ntransfer-encoding: chunked\r\n\r\n"
            )
        );
        assert_eq!(encode("GET", &[], false, None).0, RequestFraming::None);
        let mut chunk = BytesMut::new();
        encode_chunk(&[7u8; 26], &mut chunk);
        assert!(chunk.starts_with(b"1a\r\n") && chunk.ends_with(b"\r\n"));
    }
}

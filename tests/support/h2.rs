//! A raw HTTP/2 client for tests: frames written and read by hand (RFC 9113 §4.1) over TCP or
//! TLS, header blocks sent as HPACK literals exactly as given — so the malformed blocks a client
//! library refuses to build go out too — and the server's header blocks decoded with loona-hpack.
//!
//! Every read has a deadline, and "the server closed the connection" ([`Ended::Closed`]) is never
//! confused with "nothing came in time" ([`Ended::TimedOut`]): a hung gateway must not pass for
//! one that refused.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::IO_TIMEOUT;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

// Frame types (RFC 9113 §6).
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

// Flags.
pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

// SETTINGS parameters.
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

// Error codes (RFC 9113 §7).
pub const NO_ERROR: u32 = 0x0;
pub const PROTOCOL_ERROR: u32 = 0x1;
pub const STREAM_CLOSED: u32 = 0x5;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const COMPRESSION_ERROR: u32 = 0x9;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// The default SETTINGS_INITIAL_WINDOW_SIZE and SETTINGS_MAX_FRAME_SIZE.
pub const DEFAULT_WINDOW: usize = 65_535;
pub const DEFAULT_MAX_FRAME: usize = 16_384;

/// An error code's name, for messages.
pub fn error_name(code: u32) -> String {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| format!("{code:#x}"), |n| n.to_string())
}

fn frame_name(kind: u8) -> String {
    const NAMES: [&str; 10] = [
        "DATA",
        "HEADERS",
        "PRIORITY",
        "RST_STREAM",
        "SETTINGS",
        "PUSH_PROMISE",
        "PING",
        "GOAWAY",
        "WINDOW_UPDATE",
        "CONTINUATION",
    ];
    NAMES.get(usize::from(kind)).map_or_else(|| format!("type {kind:#x}"), |n| n.to_string())
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// One frame: the 9-byte header (24-bit length, type, flags, 31-bit stream id), then the payload.
pub fn frame(kind: u8, flags: u8, stream_id: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).ok().filter(|n| *n < 1 << 24).expect("frame payload under 16 MiB");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK integer (RFC 7541 §5.1): `first` holds the representation's high bits, the value
/// goes in the low `prefix_bits` bits and continues in 7-bit groups.
pub fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u32, value: usize) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    let mut rest = value - max;
    while rest >= 128 {
        out.push((rest % 128) as u8 | 0x80);
        rest /= 128;
    }
    out.push(rest as u8);
}

/// A header block of "literal without indexing, new name" fields, no Huffman (RFC 7541 §6.2.2):
/// exactly these bytes, in this order, nothing checked — upper-case names, CR LF, duplicate
/// pseudo-headers all go out as given. No dynamic table entry is made, so blocks are independent.
pub fn literal_block<N: AsRef<[u8]>, V: AsRef<[u8]>>(fields: &[(N, V)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        let (name, value) = (name.as_ref(), value.as_ref());
        out.push(0x00);
        hpack_int(&mut out, 0x00, 7, name.len());
        out.extend_from_slice(name);
        hpack_int(&mut out, 0x00, 7, value.len());
        out.extend_from_slice(value);
    }
    out
}

/// A header block as a HEADERS frame followed by CONTINUATION frames of at most `max_frame`
/// bytes each; END_HEADERS on the last, END_STREAM (on HEADERS) if `end_stream`.
pub fn header_frames(stream_id: u32, block: &[u8], end_stream: bool, max_frame: usize) -> Vec<u8> {
    let chunks: Vec<&[u8]> = if block.is_empty() { vec![block] } else { block.chunks(max_frame).collect() };
    let mut out = Vec::new();
    for (i, chunk) in chunks.iter().enumerate() {
        let kind = if i == 0 { HEADERS } else { CONTINUATION };
        let mut flags = if i == 0 && end_stream { END_STREAM } else { 0 };
        if i + 1 == chunks.len() {
            flags |= END_HEADERS;
        }
        out.extend(frame(kind, flags, stream_id, chunk));
    }
    out
}

pub fn settings_frame(settings: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = settings
        .iter()
        .flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
        .collect();
    frame(SETTINGS, 0, 0, &payload)
}

pub fn window_update(stream_id: u32, increment: u32) -> Vec<u8> {
    frame(WINDOW_UPDATE, 0, stream_id, &(increment & 0x7fff_ffff).to_be_bytes())
}

pub fn rst_stream(stream_id: u32, code: u32) -> Vec<u8> {
    frame(RST_STREAM, 0, stream_id, &code.to_be_bytes())
}

/// A request's header fields, owned, in the order given.
pub type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// `:method`, `:scheme`, `:authority`, `:path`, then `extra`: a well-formed request.
pub fn request_fields(
    scheme: &str,
    authority: &str,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
) -> Fields {
    let mut fields: Fields = vec![
        (b":method".to_vec(), method.as_bytes().to_vec()),
        (b":scheme".to_vec(), scheme.as_bytes().to_vec()),
        (b":authority".to_vec(), authority.as_bytes().to_vec()),
        (b":path".to_vec(), path.as_bytes().to_vec()),
    ];
    fields.extend(extra.iter().map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec())));
    fields
}

// ---------------------------------------------------------------------------------------------
// Decoding
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream_id: u32,
    pub payload: Vec<u8>,
    /// The decoded header block, on the HEADERS or CONTINUATION frame that ended it.
    pub fields: Option<Vec<(Vec<u8>, Vec<u8>)>>,
}

impl Frame {
    /// The error code of a RST_STREAM (first 4 bytes) or GOAWAY (after the last stream id).
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let bytes = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// A GOAWAY's last stream id.
    pub fn last_stream_id(&self) -> Option<u32> {
        let bytes = self.payload.get(..4).filter(|_| self.kind == GOAWAY)?;
        Some(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) & 0x7fff_ffff)
    }

    /// SETTINGS parameters: 6-byte (id, value) pairs.
    pub fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|p| (u16::from_be_bytes([p[0], p[1]]), u32::from_be_bytes([p[2], p[3], p[4], p[5]])))
            .collect()
    }

    pub fn is(&self, kind: u8) -> bool {
        self.kind == kind
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// The `:status` of a decoded response header block.
    pub fn status(&self) -> Option<u16> {
        let fields = self.fields.as_ref()?;
        let (_, value) = fields.iter().find(|(name, _)| name == b":status")?;
        std::str::from_utf8(value).ok()?.parse().ok()
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} flags {:#x} stream {} ({} bytes)",
            frame_name(self.kind),
            self.flags,
            self.stream_id,
            self.payload.len()
        )?;
        if let Some(code) = self.error_code() {
            write!(f, " {}", error_name(code))?;
        }
        if let Some(fields) = &self.fields {
            for (name, value) in fields {
                write!(f, " | {}: {}", name.escape_ascii(), value.escape_ascii())?;
            }
        }
        Ok(())
    }
}

/// Why no frame came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// The server closed or reset the connection.
    Closed,
    /// The connection is open but nothing came before the deadline.
    TimedOut,
}

/// What the server did about one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response header block with this status.
    Response(u16),
    /// RST_STREAM with this code.
    Reset(u32),
    /// GOAWAY with this code, leaving the stream unprocessed or ending the connection in error.
    GoAway(u32),
    /// The connection closed without a word about the stream.
    Closed,
    /// Nothing about the stream before the deadline: the server neither answered nor refused.
    TimedOut,
}

impl Outcome {
    /// A stream or connection error with one of `codes` (any code if empty), or a close: the
    /// server refused the stream. A timeout is never a refusal.
    pub fn is_error(&self, codes: &[u32]) -> bool {
        match self {
            Self::Closed => true,
            Self::Reset(code) | Self::GoAway(code) => codes.is_empty() || codes.contains(code),
            Self::Response(_) | Self::TimedOut => false,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Response(status) => write!(f, "a response with status {status}"),
            Self::Reset(code) => write!(f, "RST_STREAM {}", error_name(*code)),
            Self::GoAway(code) => write!(f, "GOAWAY {}", error_name(*code)),
            Self::Closed => f.write_str("the connection closed"),
            Self::TimedOut => f.write_str("nothing (timed out)"),
        }
    }
}

/// One stream's response as it arrived.
#[derive(Clone, Debug, Default)]
pub struct Response {
    pub status: Option<u16>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub ended: bool,
    pub reset: Option<u32>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Ended with END_STREAM or reset.
    pub fn finished(&self) -> bool {
        self.ended || self.reset.is_some()
    }

    /// The `error` field of a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        let json: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        json.get("error")?.as_str().map(str::to_owned)
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(code) = self.reset {
            return write!(f, "reset with {}", error_name(code));
        }
        let Some(status) = self.status else { return f.write_str("no response") };
        write!(f, "{status} {:?} body {}", self.headers, super::preview(&self.body, 200))?;
        if !self.ended {
            f.write_str(" (not ended)")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The connection
// ---------------------------------------------------------------------------------------------

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A client connection driven by hand: nothing is read until a test asks for the next frame.
/// Reading answers the server's SETTINGS and PINGs, decodes every header block in order (to
/// keep the HPACK table in step), and files HEADERS, DATA and RST_STREAM under [`responses`].
///
/// [`responses`]: Conn::responses
pub struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
    /// A header block still waiting for its END_HEADERS: stream id and bytes so far.
    block: Option<(u32, Vec<u8>)>,
    next_stream: u32,
    /// The connection ended (read 0, or an error reading or writing).
    pub closed: bool,
    /// The server's GOAWAY: last stream id, code, debug data.
    pub goaway: Option<(u32, u32, Vec<u8>)>,
    pub remote_settings: Vec<(u16, u32)>,
    settings_acked: bool,
    pub pings_acked: u32,
    pub responses: BTreeMap<u32, Response>,
    /// Send WINDOW_UPDATE for every DATA received, so responses flow whatever their size.
    pub auto_window: bool,
    /// Every frame read, for failure messages.
    pub transcript: String,
}

impl Conn {
    /// Cleartext with prior knowledge: the preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_with(addr, None, &[]).await
    }

    /// Over TLS (ALPN h2, server name `localhost`) when `tls` is given, else cleartext; the
    /// preface carries `settings`. Fails the test if ALPN does not choose h2.
    pub async fn connect_with(
        addr: SocketAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
        settings: &[(u16, u32)],
    ) -> Self {
        let tcp = tokio::time::timeout(IO_TIMEOUT, TcpStream::connect(addr))
            .await
            .unwrap_or_else(|_| panic!("connect to {addr}: timed out"))
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let io: Box<dyn Io> = match tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = ServerName::try_from("localhost").expect("server name");
                let stream = tokio::time::timeout(
                    IO_TIMEOUT,
                    tokio_rustls::TlsConnector::from(config).connect(name, tcp),
                )
                .await
                .unwrap_or_else(|_| panic!("TLS handshake with {addr}: timed out"))
                .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
                let alpn =
                    stream.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned());
                assert_eq!(alpn.as_deref(), Some("h2"), "ALPN must choose h2");
                Box::new(stream)
            }
        };
        let mut conn = Self {
            io,
            buf: Vec::new(),
            decoder: loona_hpack::Decoder::new(),
            block: None,
            next_stream: 1,
            closed: false,
            goaway: None,
            remote_settings: Vec::new(),
            settings_acked: false,
            pings_acked: 0,
            responses: BTreeMap::new(),
            auto_window: true,
            transcript: String::new(),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(settings_frame(settings));
        conn.send(&hello).await;
        conn
    }

    /// The next client stream id: 1, 3, 5, …
    pub fn stream_id(&mut self) -> u32 {
        let id = self.next_stream;
        self.next_stream += 2;
        id
    }

    /// Writes `bytes`; `Err` says whether the connection was closed or the write could not
    /// finish within [`IO_TIMEOUT`] (the server stopped reading).
    pub async fn try_send(&mut self, bytes: &[u8]) -> Result<(), Ended> {
        if self.closed {
            return Err(Ended::Closed);
        }
        match tokio::time::timeout(IO_TIMEOUT, self.io.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => {
                self.closed = true;
                Err(Ended::Closed)
            }
            Err(_) => Err(Ended::TimedOut),
        }
    }

    /// Writes `bytes`; fails the test if they cannot be written.
    #[track_caller]
    pub fn send<'a>(&'a mut self, bytes: &'a [u8]) -> impl std::future::Future<Output = ()> + 'a {
        let caller = std::panic::Location::caller();
        async move {
            if let Err(ended) = self.try_send(bytes).await {
                panic!("{caller}: could not write {} bytes: {ended:?}\n{}", bytes.len(), self.transcript);
            }
        }
    }

    /// Sends a request's header block (HEADERS + CONTINUATION as needed) and, if given, its body
    /// in one DATA frame; registers the stream for [`responses`](Self::responses).
    pub async fn request<N: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        fields: &[(N, V)],
        body: Option<&[u8]>,
    ) -> u32 {
        let stream_id = self.stream_id();
        let mut bytes = header_frames(stream_id, &literal_block(fields), body.is_none(), DEFAULT_MAX_FRAME);
        if let Some(body) = body {
            bytes.extend(frame(DATA, END_STREAM, stream_id, body));
        }
        self.responses.insert(stream_id, Response::default());
        self.send(&bytes).await;
        stream_id
    }

    /// The next frame, reading until `deadline`.
    pub async fn next_frame(&mut self, deadline: Instant) -> Result<Frame, Ended> {
        loop {
            if let Some(frame) = self.parse_buffered() {
                self.absorb(&frame).await;
                return Ok(frame);
            }
            if self.closed {
                return Err(Ended::Closed);
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.io.read(&mut chunk)).await {
                Err(_) => return Err(Ended::TimedOut),
                Ok(Ok(0) | Err(_)) => {
                    self.closed = true;
                    let _ = writeln!(self.transcript, "  connection closed");
                }
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn parse_buffered(&mut self) -> Option<Frame> {
        if self.buf.len() < 9 {
            return None;
        }
        let len = usize::from(self.buf[0]) << 16 | usize::from(self.buf[1]) << 8 | usize::from(self.buf[2]);
        if self.buf.len() < 9 + len {
            return None;
        }
        let head: Vec<u8> = self.buf.drain(..9).collect();
        let payload: Vec<u8> = self.buf.drain(..len).collect();
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut frame = Frame { kind: head[3], flags: head[4], stream_id, payload, fields: None };
        if frame.is(HEADERS) || frame.is(CONTINUATION) {
            // keygate's server never pads or sends priority; a block is HEADERS + CONTINUATIONs.
            let (_, block) = self.block.get_or_insert_with(|| (stream_id, Vec::new()));
            block.extend_from_slice(&frame.payload);
            if frame.has(END_HEADERS) {
                let (_, block) = self.block.take().unwrap_or_default();
                let fields = self.decoder.decode(&block).unwrap_or_else(|e| {
                    panic!("cannot decode the server's header block: {e:?}\n{}", self.transcript)
                });
                frame.fields = Some(fields);
            }
        }
        let _ = writeln!(self.transcript, "  got {frame:?}");
        Some(frame)
    }

    /// What reading a frame implies: acknowledgements, window updates, the response record.
    async fn absorb(&mut self, frame: &Frame) {
        match frame.kind {
            SETTINGS if frame.has(ACK) => self.settings_acked = true,
            SETTINGS => {
                self.remote_settings.extend(frame.settings());
                let _ = self.try_send(&frame_ack(SETTINGS, &[])).await;
            }
            PING if frame.has(ACK) => self.pings_acked += 1,
            PING => {
                let _ = self.try_send(&frame_ack(PING, &frame.payload)).await;
            }
            GOAWAY => {
                let code = frame.error_code().unwrap_or(NO_ERROR);
                let debug = frame.payload.get(8..).unwrap_or_default().to_vec();
                self.goaway = Some((frame.last_stream_id().unwrap_or(0), code, debug));
            }
            RST_STREAM => {
                if let Some(response) = self.responses.get_mut(&frame.stream_id) {
                    response.reset = frame.error_code();
                }
            }
            HEADERS | CONTINUATION => {
                let ends = frame.is(HEADERS) && frame.has(END_STREAM);
                if let Some(response) = self.responses.get_mut(&frame.stream_id) {
                    if let Some(fields) = &frame.fields {
                        // The first block is the response head; a later one, trailers.
                        if response.status.is_none() {
                            response.status = frame.status();
                            response.headers = fields
                                .iter()
                                .map(|(n, v)| {
                                    (
                                        String::from_utf8_lossy(n).into_owned(),
                                        String::from_utf8_lossy(v).into_owned(),
                                    )
                                })
                                .collect();
                        }
                    }
                    response.ended |= ends;
                }
            }
            DATA => {
                let mut ended = frame.has(END_STREAM);
                if let Some(response) = self.responses.get_mut(&frame.stream_id) {
                    response.body.extend_from_slice(&frame.payload);
                    response.ended |= ended;
                } else {
                    ended = true;
                }
                if self.auto_window && !frame.payload.is_empty() {
                    let n = u32::try_from(frame.payload.len()).unwrap_or(u32::MAX);
                    let mut update = window_update(0, n);
                    if !ended {
                        update.extend(window_update(frame.stream_id, n));
                    }
                    let _ = self.try_send(&update).await;
                }
            }
            _ => {}
        }
    }

    /// Reads the server's SETTINGS (its first frame, RFC 9113 §3.4) and waits for its ACK of
    /// ours, after which the server applies them; returns the server's settings.
    pub async fn handshake(&mut self) -> Vec<(u16, u32)> {
        let deadline = Instant::now() + IO_TIMEOUT;
        let first = self
            .next_frame(deadline)
            .await
            .unwrap_or_else(|e| panic!("no SETTINGS from the server: {e:?}\n{}", self.transcript));
        assert!(
            first.is(SETTINGS) && !first.has(ACK),
            "the server's first frame must be SETTINGS: {first:?}"
        );
        while !self.settings_acked {
            if let Err(e) = self.next_frame(deadline).await {
                panic!("no SETTINGS ACK from the server: {e:?}\n{}", self.transcript);
            }
        }
        first.settings()
    }

    /// The last value the server gave for setting `id`.
    pub fn remote_setting(&self, id: u16) -> Option<u32> {
        self.remote_settings.iter().rev().find(|(i, _)| *i == id).map(|(_, v)| *v)
    }

    /// Reads until the server answers, resets or refuses `stream_id`, or leaves. A GOAWAY that
    /// still covers the stream with NO_ERROR (a graceful one) is not an answer.
    pub async fn outcome(&mut self, stream_id: u32, deadline: Instant) -> Outcome {
        loop {
            let frame = match self.next_frame(deadline).await {
                Ok(frame) => frame,
                Err(Ended::Closed) => return Outcome::Closed,
                Err(Ended::TimedOut) => return Outcome::TimedOut,
            };
            if frame.is(GOAWAY) {
                let code = frame.error_code().unwrap_or(NO_ERROR);
                if code != NO_ERROR || frame.last_stream_id().unwrap_or(0) < stream_id {
                    return Outcome::GoAway(code);
                }
            } else if frame.stream_id == stream_id {
                if frame.is(RST_STREAM) {
                    return Outcome::Reset(frame.error_code().unwrap_or(NO_ERROR));
                }
                if frame.fields.is_some() {
                    return frame.status().map_or(Outcome::Closed, Outcome::Response);
                }
            }
        }
    }

    /// Reads frames until `done(self)` holds, the connection ends or `deadline` passes; returns
    /// `done(self)`.
    pub async fn wait_until(&mut self, deadline: Instant, done: impl Fn(&Self) -> bool) -> bool {
        while !done(self) {
            if self.next_frame(deadline).await.is_err() {
                break;
            }
        }
        done(self)
    }

    /// Reads frames until `deadline`; returns how the reading ended (a close, or the deadline).
    /// For checking that something does *not* happen for a while.
    pub async fn read_until(&mut self, deadline: Instant) -> Ended {
        loop {
            if let Err(ended) = self.next_frame(deadline).await {
                return ended;
            }
        }
    }

    /// The first frame for which `wanted` holds, or how reading ended first.
    pub async fn wait_for(
        &mut self,
        deadline: Instant,
        wanted: impl Fn(&Frame) -> bool,
    ) -> Result<Frame, Ended> {
        loop {
            let frame = self.next_frame(deadline).await?;
            if wanted(&frame) {
                return Ok(frame);
            }
        }
    }

    /// One request, read until its response has ended (or was reset, or the connection ended,
    /// or [`IO_TIMEOUT`] passed).
    pub async fn get<N: AsRef<[u8]>, V: AsRef<[u8]>>(
        &mut self,
        fields: &[(N, V)],
        body: Option<&[u8]>,
    ) -> Response {
        let stream_id = self.request(fields, body).await;
        self.wait_until(Instant::now() + IO_TIMEOUT, |c| c.responses[&stream_id].finished()).await;
        self.responses[&stream_id].clone()
    }

    /// Whether the server answers a PING on this connection within [`IO_TIMEOUT`].
    pub async fn ping_answered(&mut self) -> bool {
        let before = self.pings_acked;
        if self.try_send(&frame(PING, 0, 0, b"keygate!")).await.is_err() {
            return false;
        }
        self.wait_until(Instant::now() + IO_TIMEOUT, |c| c.pings_acked > before).await
    }
}

fn frame_ack(kind: u8, payload: &[u8]) -> Vec<u8> {
    frame(kind, ACK, 0, payload)
}

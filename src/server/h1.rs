//! keygate's own HTTP/1.1 server path, for the requests that make up nearly all of an API's
//! traffic and all of a key-guessing flood: a request head with no body.
//!
//! hyper's server is built for every case at once: a dispatcher polling a service and a body
//! channel for each request, and a head encoder that looks at every field of a response. Here
//! a connection is one loop: read a head, parse it, hand it to the gateway, write the answer
//! (issue 17: about 600 fewer instructions per refused request, 1,400 per proxied one). The moment a request is anything else (it has a body, asks for
//! an upgrade or `100-continue`, is `CONNECT`, or the bytes are HTTP/2's preface) the
//! connection, with every byte read and not yet served, goes to hyper for the rest of its
//! life. So each of those cases, the request smuggling ones above all, keeps hyper's
//! behaviour unchanged; what this path answers is written the way hyper writes it (`date`,
//! the framing fields, `connection`). A head that cannot be parsed, or is too large, gets
//! keygate's own JSON 400 or 431 here (hyper's were empty), and the connection is closed.

use std::future::poll_fn;
use std::io;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Body;
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Answer;
use super::idle::Activity;
use crate::error::GatewayError;
use crate::proxy::forward::{ClientInfo, RequestBody, X_REQUEST_ID};
use crate::proxy::h1::{add_length, put_decimal, put_field, put_hex};
use crate::proxy::{Gateway, ProxyBody};

/// The most fields a request head may have (hyper's limit too); beyond it, 431.
const MAX_FIELDS: usize = 100;
/// hyper's limit on a request target (it answers 414 beyond it).
const MAX_TARGET: usize = u16::MAX as usize - 1;
/// The longest a refused client's remaining bytes are read and discarded (see [`linger`]).
const LINGER: std::time::Duration = std::time::Duration::from_secs(1);
/// The start of HTTP/2's connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// Body bytes gathered before they are written out.
const WRITE_CHUNK: usize = 64 * 1024;
/// A body frame this large is written from where it is rather than copied into the gathered
/// bytes.
const DIRECT_WRITE: usize = 16 * 1024;
/// What a connection's write buffer may keep between responses; a larger one, grown for one
/// big answer, is given back.
const KEPT_OUT: usize = 16 * 1024;

/// What became of the connection.
pub(super) enum Served {
    /// It is over: closed by the client, by an error, or after its last response.
    Closed,
    /// The rest of it is hyper's, starting with these bytes, read and not served.
    Handoff(Bytes),
}

/// What one connection's loop needs.
pub(super) struct Serving<'a> {
    pub gateway: &'a Arc<Gateway>,
    pub client: &'a Arc<ClientInfo>,
    pub activity: &'a Activity,
    /// Set when the server drains: the loop finishes the request under way and closes.
    pub draining: &'a AtomicBool,
    /// A head not whole within this many bytes is refused (431).
    pub head_limit: usize,
}

/// Serves requests on `io` until the connection ends or needs hyper.
pub(super) async fn serve<IO>(io: &mut IO, cx: Serving<'_>) -> Served
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = BytesMut::with_capacity(8 * 1024);
    let mut out = Vec::with_capacity(4 * 1024);
    loop {
        // The next request head.
        let (request, facts) = loop {
            if !buf.is_empty() {
                let refusal = match parse(&mut buf) {
                    Parsed::Request(request, facts) => break (request, facts),
                    Parsed::Partial if buf.len() < cx.head_limit => None,
                    Parsed::Partial | Parsed::TooLarge => Some(GatewayError::HeadersTooLarge),
                    Parsed::Malformed => Some(GatewayError::BadRequest("its head cannot be parsed")),
                    Parsed::Other => return Served::Handoff(buf.freeze()),
                };
                if let Some(error) = refusal {
                    // Nothing after a head that cannot be read can be trusted to start the next.
                    let response = cx.gateway.refuse_head(&error);
                    let (parts, body) = response.into_parts();
                    let closing = Facts { keep_alive: false, trailers: false };
                    let apart = held_apart(&body);
                    let framing =
                        encode_head(parts, &body, apart, &Method::GET, Version::HTTP_11, closing, &mut out);
                    if write_body(io, body, &framing, &mut out).await.is_ok() {
                        linger(io, &mut buf).await;
                    }
                    return Served::Closed;
                }
            }
            // Between requests a drain closes the connection at once, as hyper's does.
            let read = poll_fn(|task| {
                if cx.draining.load(Ordering::Relaxed) {
                    return Poll::Ready(Ok(0));
                }
                read_more(io, task, &mut buf)
            });
            match read.await {
                Ok(0) | Err(_) => return Served::Closed,
                Ok(_) => {}
            }
        };
        let method = request.method().clone();
        let version = request.version();

        let exchange = cx.activity.exchange();
        let request = request.map(|()| RequestBody::none(exchange.clone()));
        let answer = Answer {
            handled: cx.gateway.handle(cx.client, request),
            exchange: Some(exchange),
            for_hyper: false,
        };
        let Some(response) = answer_or_hang_up(io, answer, &mut buf, cx.head_limit).await else {
            return Served::Closed;
        };

        let facts = Facts { keep_alive: facts.keep_alive && !cx.draining.load(Ordering::Relaxed), ..facts };
        let (parts, body) = response.into_parts();
        let framing = encode_head(parts, &body, held_apart(body.inner()), &method, version, facts, &mut out);
        let written = write_body(io, body, &framing, &mut out).await;
        if out.capacity() > KEPT_OUT {
            out = Vec::with_capacity(4 * 1024);
        }
        match written {
            Ok(()) if framing.reuse => {}
            Ok(()) => {
                let _ = io.shutdown().await;
                return Served::Closed;
            }
            // Cut short: the client must see an incomplete response, never a complete one.
            Err(_) => return Served::Closed,
        }
    }
}

/// Ends the connection after a refusal: sends the end of the stream, then reads and discards
/// what the client still sends for up to [`LINGER`] (as nginx's lingering close does), so the
/// kernel does not answer those bytes with a reset that would destroy the refusal unread.
async fn linger<IO: AsyncRead + AsyncWrite + Unpin>(io: &mut IO, buf: &mut BytesMut) {
    let _ = io.shutdown().await;
    let discard = async {
        loop {
            buf.clear();
            match poll_fn(|task| read_more(io, task, buf)).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, discard).await;
}

/// Reads what the socket has into `buf`; `Ok(0)` at the end of the stream.
fn read_more<IO: AsyncRead + Unpin>(
    io: &mut IO,
    task: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(8 * 1024);
    }
    tokio_util::io::poll_read_buf(Pin::new(io), task, buf)
}

/// The gateway's answer; `None` if the client hung up first, which drops the request (and with
/// it any upstream exchange), as hyper does. Bytes a client pipelines meanwhile are kept.
async fn answer_or_hang_up<IO: AsyncRead + Unpin>(
    io: &mut IO,
    answer: Answer,
    buf: &mut BytesMut,
    head_limit: usize,
) -> Option<Response<super::idle::ProgressBody<ProxyBody>>> {
    let mut answer = pin!(answer);
    let mut hung_up = false;
    poll_fn(|task| {
        if let Poll::Ready(Ok(response)) = answer.as_mut().poll(task) {
            return Poll::Ready(Some(response));
        }
        // Read until the socket has nothing more, so that its readiness wakes this task.
        while !hung_up && buf.len() < head_limit {
            match read_more(io, task, buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    hung_up = true;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Pending => break,
            }
        }
        Poll::Pending
    })
    .await
}

// Returned once per request and matched at once: boxing the request would cost an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Parsed {
    /// A request this path serves.
    Request(Request<()>, Facts),
    /// The head is not whole yet.
    Partial,
    /// Not a request head (nor HTTP/2's preface): a 400.
    Malformed,
    /// More fields than [`MAX_FIELDS`]: a 431.
    TooLarge,
    /// A request for hyper (see the module's note); `buf` is as it was.
    Other,
}

/// What the fields of a request head say about the connection and the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Facts {
    /// The client lets the connection carry another request.
    pub keep_alive: bool,
    /// The client takes trailer fields (`TE: trailers`).
    pub trailers: bool,
}

/// Parses the request head at the start of `buf`, taking it off when it is one this path
/// serves. (Public for the fuzz target `request_head`.)
pub fn parse(buf: &mut BytesMut) -> Parsed {
    let mut fields = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut parsed,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => return Parsed::TooLarge,
        // HTTP/2's preface reads as a request with a version httparse refuses: the part of it
        // that tells is waited for whole, so that how the bytes arrive decides nothing.
        Err(_) if buf.starts_with(PREFACE) => return Parsed::Other,
        Err(_) if PREFACE.starts_with(buf) => return Parsed::Partial,
        Err(_) => return Parsed::Malformed,
    };
    let (Some(method), Some(target), Some(minor)) = (parsed.method, parsed.path, parsed.version) else {
        return Parsed::Other;
    };
    if target.len() > MAX_TARGET {
        return Parsed::Other;
    }
    let Ok(method) = Method::from_bytes(method.as_bytes()) else { return Parsed::Malformed };
    if method == Method::CONNECT {
        return Parsed::Other;
    }
    let version = if minor == 1 { Version::HTTP_11 } else { Version::HTTP_10 };
    // As hyper decides it: HTTP/1.1 keeps the connection unless a `Connection` says `close`;
    // HTTP/1.0 closes it unless one says `keep-alive`; a `close` anywhere wins.
    let mut facts = Facts { keep_alive: version == Version::HTTP_11, trailers: false };
    let mut close = false;
    // Where each field is in the head, to take its bytes once the head is frozen.
    let mut spans = SmallVec::<[(u32, u32, u32, u32); MAX_FIELDS]>::new();
    let base = buf.as_ptr() as usize;
    let offset = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length")
            || name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
        {
            return Parsed::Other;
        }
        if name.eq_ignore_ascii_case(b"connection") {
            if close || has_token(field.value, b"close") {
                close = true;
                facts.keep_alive = false;
            } else if !facts.keep_alive {
                facts.keep_alive = has_token(field.value, b"keep-alive");
            }
        } else if name.eq_ignore_ascii_case(b"te") {
            facts.trailers |= has_token(field.value, b"trailers");
        }
        let (name_at, value_at) = (offset(name), offset(field.value));
        spans.push((name_at, name_at + name.len() as u32, value_at, value_at + field.value.len() as u32));
    }
    let target_at = offset(target.as_bytes()) as usize;
    let target_span = target_at..target_at + target.len();

    let head = buf.split_to(len).freeze();
    let built = build(&head, method, target_span, version, &spans);
    // A target `http::Uri` refuses, or (never seen: httparse is stricter) a field `http` does.
    let Some(request) = built else { return Parsed::Malformed };
    Parsed::Request(request, facts)
}

/// The request whose head is `head`, sharing its bytes.
fn build(
    head: &Bytes,
    method: Method,
    target: std::ops::Range<usize>,
    version: Version,
    spans: &[(u32, u32, u32, u32)],
) -> Option<Request<()>> {
    let uri = http::Uri::from_maybe_shared(head.slice(target)).ok()?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    for &(name_start, name_end, value_start, value_end) in spans {
        let name = HeaderName::from_bytes(&head[name_start as usize..name_end as usize]).ok()?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(value_start as usize..value_end as usize)).ok()?;
        headers.append(name, value);
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Some(request)
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// How a response body goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Encoder {
    /// Exactly this many bytes more.
    Length(u64),
    Chunked,
    /// Until the connection closes.
    Close,
}

struct Framing {
    encoder: Encoder,
    /// The connection can carry another request once the body is out.
    reuse: bool,
    /// The trailer fields that may follow a chunked body: those its `Trailer` field names,
    /// when the client takes trailers (as hyper's server decides it).
    trailers: Option<Vec<HeaderName>>,
}

/// The fields of keygate's own answer that it holds beside the header map (see
/// [`crate::proxy::reply`]): its request id and fixed fields, written after the map's.
fn held_apart(body: &ProxyBody) -> Option<(&HeaderValue, &[u8])> {
    match body {
        Either::Right(reply) => reply.apart(),
        Either::Left(_) => None,
    }
}

/// Writes the response head into `out` as hyper's server would, and says how its body goes.
fn encode_head(
    parts: http::response::Parts,
    body: &impl Body,
    apart: Option<(&HeaderValue, &[u8])>,
    method: &Method,
    version: Version,
    facts: Facts,
    out: &mut Vec<u8>,
) -> Framing {
    let status = parts.status;
    let headers = parts.headers;
    // What the body says of its length: `None` for an empty one.
    let length = if body.is_end_stream() { None } else { Some(body.size_hint().exact()) };
    let head_only = *method == Method::HEAD;
    let no_content =
        status.is_informational() || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let can_chunk = !head_only && !no_content && version == Version::HTTP_11;

    out.reserve(256 + headers.len() * 48);
    if version == Version::HTTP_11 && status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(if version == Version::HTTP_10 { b"HTTP/1.0 " } else { b"HTTP/1.1 " });
        out.extend_from_slice(status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(status.canonical_reason().unwrap_or("<none>").as_bytes());
        out.extend_from_slice(b"\r\n");
    }

    let mut encoder = None;
    let mut wrote_date = false;
    // What the response's own `Connection` says.
    let (mut says_close, mut says_keep_alive) = (false, false);
    let mut trailers: Option<Vec<HeaderName>> = None;
    for (name, value) in &headers {
        if *name == header::CONTENT_LENGTH {
            // One length goes out, the first; a body without one keeps none but HEAD's.
            if encoder.is_some() {
                continue;
            }
            match length {
                Some(Some(len)) => encoder = Some(Encoder::Length(len)),
                Some(None) => match add_length(None, value.as_bytes()) {
                    Ok(Some(len)) => encoder = Some(Encoder::Length(len)),
                    Ok(None) | Err(()) => continue,
                },
                None if head_only => encoder = Some(Encoder::Length(0)),
                None => continue,
            }
        } else if *name == header::TRANSFER_ENCODING {
            // Framing is this server's to choose (below); a relayed one never stays.
            continue;
        } else if *name == header::CONNECTION {
            says_close |= has_token(value.as_bytes(), b"close");
            says_keep_alive |= has_token(value.as_bytes(), b"keep-alive");
        } else if *name == header::TRAILER {
            if !can_chunk {
                continue;
            }
            if facts.trailers {
                let names = value.to_str().unwrap_or_default().split(',');
                trailers
                    .get_or_insert_default()
                    .extend(names.filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok()));
            }
        } else if *name == header::DATE {
            wrote_date = true;
        }
        put_field(out, name, value);
    }
    drop(headers);
    if let Some((request_id, fixed)) = apart {
        put_field(out, &X_REQUEST_ID, request_id);
        out.extend_from_slice(fixed);
    }
    let mut last = !facts.keep_alive || says_close;
    let encoder = match (encoder, length) {
        _ if head_only || no_content => {
            // No body, whatever the fields say; a length only as they give it (HEAD's).
            if let (None, Some(Some(len))) = (encoder, length)
                && !no_content
            {
                put_length(out, len);
            }
            Encoder::Length(0)
        }
        (Some(encoder), _) => encoder,
        (None, Some(None)) if can_chunk => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            Encoder::Chunked
        }
        (None, Some(None)) => {
            // An HTTP/1.0 client learns the end of the body from the end of the connection.
            last = true;
            Encoder::Close
        }
        (None, None) => {
            out.extend_from_slice(b"content-length: 0\r\n");
            Encoder::Length(0)
        }
        (None, Some(Some(len))) => {
            put_length(out, len);
            Encoder::Length(len)
        }
    };
    // As hyper says it: an HTTP/1.0 client is told the connection stays; an HTTP/1.1 one that
    // it closes.
    if version == Version::HTTP_10 {
        if !last && !says_keep_alive {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    } else if last && !says_close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !wrote_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&date::now());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    let trailers = trailers.filter(|_| encoder == Encoder::Chunked);
    Framing { encoder, reuse: !last, trailers }
}

fn put_length(out: &mut Vec<u8>, len: u64) {
    out.extend_from_slice(b"content-length: ");
    put_decimal(out, len);
    out.extend_from_slice(b"\r\n");
}

/// Whether a field may be sent as a trailer (RFC 9110 §6.5.1, as hyper's list has it).
fn may_trail(name: &HeaderName) -> bool {
    !matches!(
        *name,
        header::AUTHORIZATION
            | header::CACHE_CONTROL
            | header::CONTENT_ENCODING
            | header::CONTENT_LENGTH
            | header::CONTENT_RANGE
            | header::CONTENT_TYPE
            | header::HOST
            | header::MAX_FORWARDS
            | header::SET_COOKIE
            | header::TRAILER
            | header::TRANSFER_ENCODING
            | header::TE
    )
}

/// Writes the head already in `out` and the body after it, gathering what the body has ready
/// into one write.
/// Adds body bytes after what `out` gathers: copied in when small, else written straight
/// from where they are, after what was gathered, with no copy.
async fn put_data<IO: AsyncWrite + Unpin>(io: &mut IO, out: &mut Vec<u8>, data: &[u8]) -> io::Result<()> {
    if data.len() < DIRECT_WRITE {
        out.extend_from_slice(data);
        return Ok(());
    }
    io.write_all(out).await?;
    out.clear();
    io.write_all(data).await
}

async fn write_body<IO, B>(io: &mut IO, body: B, framing: &Framing, out: &mut Vec<u8>) -> io::Result<()>
where
    IO: AsyncWrite + Unpin,
    B: Body<Data = Bytes> + Unpin,
{
    let mut body = pin!(body);
    let mut encoder = framing.encoder;
    let mut done = encoder == Encoder::Length(0);
    while !done {
        // The next frame if it is there now; else what is gathered goes out first.
        let waiting = !out.is_empty();
        let next = poll_fn(|task| match body.as_mut().poll_frame(task) {
            Poll::Ready(frame) => Poll::Ready(Some(frame)),
            Poll::Pending if waiting => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await;
        let Some(frame) = next else {
            io.write_all(out).await?;
            out.clear();
            continue;
        };
        match frame {
            None => {
                match encoder {
                    Encoder::Chunked => out.extend_from_slice(b"0\r\n\r\n"),
                    Encoder::Length(0) | Encoder::Close => {}
                    Encoder::Length(_) => {
                        return Err(io::Error::other("response body shorter than its length"));
                    }
                }
                done = true;
            }
            Some(Err(_)) => return Err(io::Error::other("response body failed")),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => match &mut encoder {
                    Encoder::Length(left) => {
                        let len = data.len() as u64;
                        if len > *left {
                            return Err(io::Error::other("response body longer than its length"));
                        }
                        *left -= len;
                        put_data(io, out, &data).await?;
                        done = *left == 0;
                    }
                    Encoder::Chunked => {
                        if !data.is_empty() {
                            put_hex(out, data.len() as u64);
                            out.extend_from_slice(b"\r\n");
                            put_data(io, out, &data).await?;
                            out.extend_from_slice(b"\r\n");
                        }
                    }
                    Encoder::Close => put_data(io, out, &data).await?,
                },
                Err(frame) => {
                    // Trailers, which only a chunked body can carry, and only those allowed.
                    let allowed = framing.trailers.as_deref().unwrap_or_default();
                    let fields = frame.into_trailers().unwrap_or_default();
                    let mut wrote = false;
                    for (name, value) in
                        fields.iter().filter(|(name, _)| allowed.contains(name) && may_trail(name))
                    {
                        if !wrote {
                            out.extend_from_slice(b"0\r\n");
                            wrote = true;
                        }
                        put_field(out, name, value);
                    }
                    if wrote {
                        out.extend_from_slice(b"\r\n");
                        done = true;
                    }
                }
            },
        }
        if out.len() >= WRITE_CHUNK {
            io.write_all(out).await?;
            out.clear();
        }
    }
    if !out.is_empty() {
        io.write_all(out).await?;
        out.clear();
    }
    Ok(())
}

/// The `date` field's value, formatted once a second per thread (as hyper does), and told
/// from the coarse clock that the idle clocks read too, which costs less than a precise one.
mod date {
    use std::cell::Cell;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    thread_local! {
        /// The text, and the coarse-clock instant until which it is right.
        static CACHED: Cell<([u8; 29], Option<coarsetime::Instant>)> = const { Cell::new(([0; 29], None)) };
    }

    pub fn now() -> [u8; 29] {
        let now = coarsetime::Instant::now_without_cache_update();
        CACHED.with(|cached| {
            let (text, until) = cached.get();
            if until.is_some_and(|until| now < until) {
                return text;
            }
            let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
            let second = UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs());
            let mut text = [b' '; 29];
            let formatted = httpdate::fmt_http_date(second);
            let len = formatted.len().min(text.len());
            text[..len].copy_from_slice(&formatted.as_bytes()[..len]);
            // Right until the next second begins (the coarse clock may see that a tick late).
            let rest = Duration::from_secs(1)
                .saturating_sub(Duration::from_nanos(since_epoch.subsec_nanos().into()));
            cached.set((text, Some(now + coarsetime::Duration::from(rest))));
            text
        })
    }
}

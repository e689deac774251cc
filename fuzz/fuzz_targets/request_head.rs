//! Fuzzes keygate's HTTP/1.1 server head parser (`keygate::server::h1::parse`) on what a client
//! sends: a stream fed in arbitrary pieces never panics, gives the same requests whatever the
//! pieces, takes a head off only when it serves it (a request handed to hyper leaves every
//! byte in place), and never yields a request that framed a body.
//!
//! Input: the first byte picks the piece size (1–64 bytes); the rest is the client's bytes.
#![no_main]

use bytes::BytesMut;
use keygate::server::h1::{Parsed, parse};
use libfuzzer_sys::fuzz_target;

/// What the parser made of a stream: each request it served, then how it stopped.
#[derive(Debug, PartialEq)]
struct Outcome {
    requests: Vec<String>,
    end: &'static str,
}

fn run(stream: &[u8], piece: usize) -> Outcome {
    let mut outcome = Outcome { requests: Vec::new(), end: "partial" };
    let mut buf = BytesMut::new();
    let mut pieces = stream.chunks(piece);
    loop {
        if buf.is_empty() {
            match pieces.next() {
                Some(bytes) => buf.extend_from_slice(bytes),
                None => return outcome,
            }
            continue;
        }
        let before = buf.clone();
        match parse(&mut buf) {
            Parsed::Request(request, facts) => {
                assert!(
                    before.len() > buf.len() && before.ends_with(&buf),
                    "the head was not taken off whole"
                );
                for name in ["content-length", "transfer-encoding", "expect", "upgrade"] {
                    assert!(!request.headers().contains_key(name), "a request with `{name}` was served");
                }
                assert!(request.headers().len() <= 100);
                let fields: Vec<String> = request
                    .headers()
                    .iter()
                    .map(|(n, v)| format!("{n}={}", v.as_bytes().escape_ascii()))
                    .collect();
                outcome.requests.push(format!(
                    "{} {} {:?} {facts:?} {}",
                    request.method(),
                    request.uri(),
                    request.version(),
                    fields.join(";")
                ));
            }
            Parsed::Partial => {
                assert_eq!(buf, before, "a partial head changed the buffer");
                match pieces.next() {
                    Some(bytes) => buf.extend_from_slice(bytes),
                    None => return outcome,
                }
            }
            Parsed::Other => {
                assert_eq!(buf, before, "a request for hyper lost bytes");
                outcome.end = "other";
                return outcome;
            }
            Parsed::Malformed => {
                outcome.end = "malformed";
                return outcome;
            }
            Parsed::TooLarge => {
                outcome.end = "too large";
                return outcome;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else { return };
    let piece = usize::from(first % 64) + 1;
    let whole = run(stream, stream.len().max(1));
    let pieces = run(stream, piece);
    assert_eq!(whole, pieces, "the pieces changed the outcome");
});

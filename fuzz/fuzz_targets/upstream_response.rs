//! Fuzzes keygate's HTTP/1.1 client codec on what an upstream sends back: a response stream
//! fed in arbitrary pieces never panics, a head is taken off only once complete, and a body
//! never yields more than its `content-length` nor more bytes than arrived.
//!
//! Input: the first byte picks the piece size (1–64 bytes; the same stream must decode the
//! same whatever the pieces) and, in its top bit, whether the request was a HEAD; the rest
//! is the bytes the upstream sent, from the start of the response.
#![no_main]

use bytes::BytesMut;
use keygate::proxy::h1::{Decoded, Decoder, Framing, parse_head};
use libfuzzer_sys::fuzz_target;

/// What the codec made of a stream: the head's status and framing, and the body's bytes.
#[derive(Debug, PartialEq)]
struct Outcome {
    status: Option<u16>,
    framing: Option<Framing>,
    body: Vec<u8>,
    ended: bool,
    failed: bool,
}

fn run(stream: &[u8], piece: usize, head_request: bool) -> Outcome {
    let mut outcome = Outcome { status: None, framing: None, body: Vec::new(), ended: false, failed: false };
    let mut buf = BytesMut::new();
    let mut pieces = stream.chunks(piece);
    let head = loop {
        match parse_head(&mut buf, head_request) {
            Ok(Some(head)) => break head,
            Ok(None) => match pieces.next() {
                Some(bytes) => buf.extend_from_slice(bytes),
                None => return outcome,
            },
            Err(_) => {
                outcome.failed = true;
                return outcome;
            }
        }
    };
    outcome.status = Some(head.response.status().as_u16());
    outcome.framing = Some(head.framing);
    let mut decoder = Decoder::new(head.framing);
    loop {
        let step = decoder.decode(&mut buf);
        match step {
            Ok(Decoded::Data(data)) => {
                assert!(!data.is_empty(), "an empty data frame");
                outcome.body.extend_from_slice(&data);
            }
            Ok(Decoded::Trailers(_)) | Ok(Decoded::End) => {
                outcome.ended = true;
                break;
            }
            Ok(Decoded::More) => match pieces.next() {
                Some(bytes) => buf.extend_from_slice(bytes),
                None => {
                    match decoder.eof() {
                        Ok(_) => outcome.ended = true,
                        Err(_) => outcome.failed = true,
                    }
                    break;
                }
            },
            Err(_) => {
                outcome.failed = true;
                break;
            }
        }
    }
    if let Framing::Length(len) = head.framing {
        assert!(outcome.body.len() as u64 <= len, "more body than content-length");
    }
    assert!(outcome.body.len() <= stream.len(), "more body than bytes arrived");
    outcome
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, stream)) = data.split_first() else { return };
    let head_request = first & 0x80 != 0;
    let piece = usize::from(first & 0x3f) + 1;
    let in_pieces = run(stream, piece, head_request);
    // One read or many: the codec must not depend on where the reads happened to end.
    let whole = run(stream, stream.len().max(1), head_request);
    assert_eq!(in_pieces, whole, "the outcome depends on how the bytes were split");
});

"""CONTINUATION flood (CVE-2024-27316 and kin): a HEADERS frame without END_HEADERS followed by
CONTINUATION frames that never end the block, far beyond max_header_bytes. The server must cut
the connection off quickly (GOAWAY or close) instead of buffering, and keep serving new
connections. Also: a header block that does end, but is larger than the server allows, must
not produce a 200."""

import time

from common import (ContinuationFrame, HeadersFrame, RawConn, Report, code_name, parse_args,
                    request_headers, run, server_answers)

FRAME_PAYLOAD = 4096


def flood(args, report, label, frame_payload, limit_bytes):
    conn = RawConn(args)
    conn.handshake()
    stream_id = conn.stream_id()
    first = conn.headers(stream_id, request_headers(args, "/private/flood", args.key, probe="reject-flood"),
                         end_stream=True, end_headers=False)
    conn.send(first)
    started = time.monotonic()
    sent_frames = sent_bytes = 0
    # Literal header fields without indexing, each one whole inside its frame.
    while sent_bytes < limit_bytes and not conn.closed and conn.goaway is None:
        field = conn.block([(f"x-flood-{sent_frames}".encode(), b"a" * (frame_payload - 32))])
        if not conn.try_send(ContinuationFrame(stream_id, data=field)):
            break
        sent_frames += 1
        sent_bytes += len(field)
        # Look for a GOAWAY after each frame: once the server closes, unread data makes the
        # kernel reset the connection and the GOAWAY is lost.
        conn.read_frame(0.002)
    report.log(f"{label}: sent {sent_frames} CONTINUATION frames ({sent_bytes} bytes) in "
               f"{time.monotonic() - started:.2f}s{' until the server closed' if conn.closed else ''}")
    if conn.goaway is not None:
        outcome = f"GOAWAY {code_name(conn.goaway)}"
    else:
        result = conn.outcome(stream_id, timeout=5)
        outcome = str(result) if result.kind in ("goaway", "closed") else None
    elapsed = time.monotonic() - started
    report.check(outcome is not None, f"{label}: GOAWAY or close, got {outcome} after {elapsed:.2f}s")
    report.check(sent_bytes <= 16 * args.max_header_bytes,
                 f"{label}: cut off after {sent_bytes} bytes (at most 16 × max_header_bytes)")
    report.check(elapsed < 5, f"{label}: cut off within 5 s ({elapsed:.2f}s)")
    conn.close()


def oversized_block(args, report):
    """A complete header block, split over CONTINUATION frames, of 3 × max_header_bytes."""
    conn = RawConn(args)
    conn.handshake()
    stream_id = conn.stream_id()
    extra = [(f"x-big-{i}".encode(), b"b" * 1000) for i in range(3 * args.max_header_bytes // 1000)]
    block = conn.block(request_headers(args, "/private/big", args.key, probe="reject-big-block", extra=extra))
    chunks = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    frames = []
    for i, chunk in enumerate(chunks):
        frame = HeadersFrame(stream_id, data=chunk) if i == 0 else ContinuationFrame(stream_id, data=chunk)
        if i == 0:
            frame.flags.add("END_STREAM")
        if i == len(chunks) - 1:
            frame.flags.add("END_HEADERS")
        frames.append(frame)
    conn.try_send(*frames)
    outcome = conn.outcome(stream_id, timeout=5)
    refused = outcome.is_error() or (outcome.kind == "response" and outcome.status == 431)
    report.check(refused, f"a {len(block)}-byte header block → 431, RST_STREAM, GOAWAY or close; got {outcome}")
    conn.close()


def main():
    args = parse_args(__doc__)
    report = Report("continuation_flood", args)
    budget = 64 * args.max_header_bytes
    flood(args, report, "small frames", 256, budget)
    flood(args, report, "4 KiB frames", FRAME_PAYLOAD, budget)
    flood(args, report, "16 KiB frames", 16384, budget)
    oversized_block(args, report)
    server_answers(args, report)
    report.finish()


run(main)

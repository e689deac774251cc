"""Rapid reset (CVE-2023-44487): HEADERS followed at once by RST_STREAM, a thousand times, as
fast as the socket takes them. The server must notice and send GOAWAY (ENHANCE_YOUR_CALM)
or close the connection, rather than keep doing work for streams nobody waits for; and it must
keep serving new connections afterwards."""

import time

from common import (CANCEL, ENHANCE_YOUR_CALM, GoAwayFrame, RawConn, Report, RstStreamFrame, code_name,
                    parse_args, request_headers, run, server_answers)

STREAMS = 1000
BATCH = 100  # pairs per write: an attacker packs them, and the server reads them in one go


def main():
    args = parse_args(__doc__)
    report = Report("rapid_reset", args)
    conn = RawConn(args)
    conn.handshake()

    started = time.monotonic()
    sent = 0
    while sent < STREAMS and not conn.closed and conn.goaway is None:
        frames = []
        for _ in range(BATCH):
            stream_id = conn.stream_id()
            # Unkeyed: a stream the server did accept answers 401 without touching the upstream.
            headers = request_headers(args, "/private/rapid", None, probe="reject-rapid")
            frames.append(conn.headers(stream_id, headers, end_stream=False))
            frames.append(RstStreamFrame(stream_id, error_code=CANCEL))
        if conn.try_send(*frames):
            sent += BATCH
        # Pick up a GOAWAY as soon as it comes: once the server closes, the data it did not
        # read makes the kernel reset the connection, and a GOAWAY not yet read is lost.
        while conn.read_frame(0.001) is not None:
            pass
    report.log(f"sent {sent} HEADERS+RST_STREAM pairs in {time.monotonic() - started:.2f}s")
    if conn.goaway is None and not conn.closed:
        conn.wait_for(lambda frame: isinstance(frame, GoAwayFrame), 5)
    elapsed = time.monotonic() - started
    if conn.goaway is not None:
        report.log(f"GOAWAY {code_name(conn.goaway)} {conn.goaway_debug!r} after {elapsed:.2f}s")
        report.check(conn.goaway == ENHANCE_YOUR_CALM,
                     f"the GOAWAY says ENHANCE_YOUR_CALM (got {code_name(conn.goaway)})")
    else:
        report.check(conn.closed, f"GOAWAY or a closed connection within 5 s (the connection is still open "
                                  f"after {sent} resets)")
        report.log("the server closed the connection (its GOAWAY, if any, was lost to the reset)")
    report.check(sent < STREAMS, f"the server cut the connection off before all {STREAMS} streams "
                                 f"(after {sent})")
    server_answers(args, report)
    report.finish()


run(main)

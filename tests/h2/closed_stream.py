"""Frames for streams that are not open: DATA on a stream that is closed (both sides ended),
DATA on a stream the client already half-closed with END_STREAM, and DATA on a stream that was
never opened. Each is a stream error STREAM_CLOSED or a connection error (RFC 9113 §5.1, §6.1);
none of it may be taken as a request body, and the server keeps serving."""

from common import (PROTOCOL_ERROR, STREAM_CLOSED, DataFrame, GoAwayFrame, RawConn, Report, RstStreamFrame,
                    code_name, parse_args, request_headers, run, server_answers)

ERRORS = {STREAM_CLOSED, PROTOCOL_ERROR}


def reaction(conn, stream_id, timeout=3):
    """The server's RST_STREAM for `stream_id` or GOAWAY, or None if it said nothing."""
    frame = conn.wait_for(lambda f: isinstance(f, GoAwayFrame)
                          or (isinstance(f, RstStreamFrame) and f.stream_id == stream_id), timeout)
    if isinstance(frame, GoAwayFrame):
        return f"GOAWAY {code_name(frame.error_code)}", frame.error_code
    if frame is not None:
        return f"RST_STREAM {code_name(frame.error_code)}", frame.error_code
    if conn.closed:
        return "closed", None
    return None, None


def main():
    args = parse_args(__doc__)
    report = Report("closed_stream", args)

    # Closed: a complete exchange, then DATA on it.
    conn = RawConn(args)
    conn.handshake()
    stream_id = conn.stream_id()
    conn.send(conn.headers(stream_id, request_headers(args, "/private/done", args.key, probe="closed-done")))
    outcome = conn.outcome(stream_id)
    report.check(outcome.kind == "response" and outcome.status == 200, f"the first exchange → 200, got {outcome}")
    conn.drain(0.3)  # the rest of the response
    conn.try_send(DataFrame(stream_id, data=b"x-test-probe: reject-late-data", flags=["END_STREAM"]))
    what, code = reaction(conn, stream_id)
    report.check(what == "closed" or code in ERRORS, f"DATA on a closed stream → STREAM_CLOSED error, got {what}")
    conn.close()

    # Half-closed (remote): the request ended with END_STREAM, the response is still coming.
    conn = RawConn(args)
    conn.handshake()
    stream_id = conn.stream_id()
    headers = request_headers(args, "/private/half", args.key, probe="closed-half",
                              extra=[("x-test-sleep-ms", "1000")])
    conn.send(conn.headers(stream_id, headers))
    conn.try_send(DataFrame(stream_id, data=b"smuggled body", flags=["END_STREAM"]))
    what, code = reaction(conn, stream_id)
    report.check(what == "closed" or code in ERRORS,
                 f"DATA after END_STREAM → STREAM_CLOSED error, got {what}")
    conn.close()

    # Idle: a stream id the client never opened.
    conn = RawConn(args)
    conn.handshake()
    conn.try_send(DataFrame(7, data=b"nobody asked", flags=["END_STREAM"]))
    what, code = reaction(conn, 7)
    report.check(what == "closed" or code in ERRORS, f"DATA on an idle stream → connection error, got {what}")
    conn.close()

    server_answers(args, report)
    report.finish()


run(main)

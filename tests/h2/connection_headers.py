"""Connection-specific header fields (RFC 9113 §8.2.2) make a request malformed: `connection`,
`keep-alive`, `proxy-connection`, `transfer-encoding`, `upgrade`, and `te` other than
`trailers`. Each must end in a stream or connection error of type PROTOCOL_ERROR, never in a
response and never upstream (their probes start with `reject-`). `te: trailers` is allowed."""

from common import PROTOCOL_ERROR, DataFrame, RawConn, Report, parse_args, request_headers, run, server_answers

FORBIDDEN = [
    (b"connection", b"keep-alive"),
    (b"connection", b"close"),
    (b"connection", b"x-keygate-key-id"),
    (b"keep-alive", b"timeout=5"),
    (b"proxy-connection", b"keep-alive"),
    (b"transfer-encoding", b"chunked"),
    (b"transfer-encoding", b"gzip, chunked"),
    (b"upgrade", b"websocket"),
    (b"upgrade", b"h2c"),
    (b"te", b"gzip"),
    (b"te", b"trailers, gzip"),
]


def main():
    args = parse_args(__doc__)
    report = Report("connection_headers", args)

    for i, (name, value) in enumerate(FORBIDDEN):
        conn = RawConn(args)
        conn.handshake()
        stream_id = conn.stream_id()
        probe = f"reject-connhdr-{i}-{name.decode()}"
        headers = request_headers(args, "/private/connhdr", args.key, probe=probe, extra=[(name, value)])
        conn.send(conn.headers(stream_id, headers))
        outcome = conn.outcome(stream_id)
        report.check(outcome.is_error({PROTOCOL_ERROR}),
                     f"{name.decode()}: {value.decode()} → PROTOCOL_ERROR, got {outcome}")
        conn.close()

    # A request with a body announced by transfer-encoding: the DATA must not smuggle a request.
    conn = RawConn(args)
    conn.handshake()
    stream_id = conn.stream_id()
    headers = request_headers(args, "/private/connhdr", args.key, method="POST", probe="reject-connhdr-te-body",
                              extra=[(b"transfer-encoding", b"chunked")])
    smuggled = b"0\r\n\r\nGET /private/smuggled HTTP/1.1\r\nhost: x\r\nx-test-probe: reject-smuggled\r\n\r\n"
    data = DataFrame(stream_id, data=smuggled, flags=["END_STREAM"])
    conn.try_send(conn.headers(stream_id, headers, end_stream=False), data)
    outcome = conn.outcome(stream_id)
    report.check(outcome.is_error({PROTOCOL_ERROR}), f"transfer-encoding with a body → PROTOCOL_ERROR, got {outcome}")
    conn.close()

    # te: trailers is the one value allowed; keygate drops it as hop-by-hop and answers.
    conn = RawConn(args)
    conn.handshake()
    stream_id = conn.stream_id()
    headers = request_headers(args, "/private/te-trailers", args.key, probe="connhdr-te-trailers",
                              extra=[(b"te", b"trailers")])
    conn.send(conn.headers(stream_id, headers))
    outcome = conn.outcome(stream_id)
    report.check(outcome.kind == "response" and outcome.status == 200, f"te: trailers → 200, got {outcome}")
    conn.close()

    server_answers(args, report)
    report.finish()


run(main)

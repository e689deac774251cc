"""Malformed request header blocks (RFC 9113 §8.3): a missing or duplicated pseudo-header, a
pseudo-header after a regular field, an unknown or response pseudo-header, an empty :path, and
upper-case field names must each end in a stream or connection error, never in a response (the
requests carry a valid key, so an accepted one would reach the upstream; their probes start
with `reject-`)."""

from common import COMPRESSION_ERROR, PROTOCOL_ERROR, RawConn, Report, parse_args, run, server_answers


def cases(args):
    authority = f"{args.server_name if args.tls else args.host}:{args.port}".encode()
    scheme = b"https" if args.tls else b"http"
    key = args.key.encode()
    method = (b":method", b"GET")
    sch = (b":scheme", scheme)
    auth = (b":authority", authority)
    path = (b":path", b"/private/pseudo")
    api_key = (b"x-api-key", key)

    def probe(name):
        return (b"x-test-probe", f"reject-pseudo-{name}".encode())

    return [
        ("missing :method", [sch, auth, path, api_key, probe("no-method")]),
        ("missing :scheme", [method, auth, path, api_key, probe("no-scheme")]),
        ("missing :path", [method, sch, auth, api_key, probe("no-path")]),
        ("empty :path", [method, sch, auth, (b":path", b""), api_key, probe("empty-path")]),
        ("duplicate :path", [method, sch, auth, path, (b":path", b"/public/x"), api_key, probe("dup-path")]),
        ("duplicate :method", [method, (b":method", b"POST"), sch, auth, path, api_key, probe("dup-method")]),
        ("duplicate :scheme", [method, sch, sch, auth, path, api_key, probe("dup-scheme")]),
        ("duplicate :authority", [method, sch, auth, (b":authority", b"evil.example"), path, api_key,
                                  probe("dup-authority")]),
        ("pseudo-header after a regular field", [method, sch, auth, api_key, path, probe("late-pseudo")]),
        ("unknown pseudo-header", [method, sch, auth, path, (b":foo", b"bar"), api_key, probe("unknown")]),
        ("response pseudo-header :status", [method, sch, auth, path, (b":status", b"200"), api_key,
                                            probe("status")]),
        ("upper-case field name", [method, sch, auth, path, (b"X-Api-Key", key), probe("upper-key")]),
        ("upper-case field name (other)", [method, sch, auth, path, api_key, (b"X-Custom", b"1"),
                                           probe("upper-other")]),
        ("upper-case pseudo-header", [(b":METHOD", b"GET"), sch, auth, path, api_key, probe("upper-pseudo")]),
        ("field name with a space", [method, sch, auth, path, api_key, (b"x bad", b"1"), probe("space")]),
        ("field value with CR LF", [method, sch, auth, path, api_key, (b"x-inject", b"a\r\nx-api-key: b"),
                                    probe("crlf")]),
        ("CONNECT with :path and :scheme", [(b":method", b"CONNECT"), sch, auth, path, api_key,
                                            probe("connect")]),
    ]


def main():
    args = parse_args(__doc__)
    report = Report("pseudo_headers", args)
    for label, headers in cases(args):
        conn = RawConn(args)
        conn.handshake()
        stream_id = conn.stream_id()
        conn.send(conn.headers(stream_id, headers))
        outcome = conn.outcome(stream_id)
        report.check(outcome.is_error({PROTOCOL_ERROR, COMPRESSION_ERROR}),
                     f"{label} → stream or connection error, got {outcome}")
        conn.close()
    server_answers(args, report)
    report.finish()


run(main)

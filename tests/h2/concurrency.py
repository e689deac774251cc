"""More streams than h2_max_concurrent_streams: the server's SETTINGS advertise the configured
MAX_CONCURRENT_STREAMS, and streams opened beyond it (by a client that ignores the setting) are
refused with RST_STREAM REFUSED_STREAM, or at most queued: never served concurrently beyond the
limit. The connection keeps working afterwards."""

import time

from common import (REFUSED_STREAM, SETTINGS_MAX_CONCURRENT_STREAMS, GoAwayFrame, HeadersFrame, RawConn, Report,
                    RstStreamFrame, code_name, parse_args, request_headers, run)

SLEEP_MS = 1500
EXTRA = 3


def main():
    args = parse_args(__doc__)
    report = Report("concurrency", args)
    conn = RawConn(args)
    settings = conn.handshake()
    advertised = settings.get(SETTINGS_MAX_CONCURRENT_STREAMS)
    report.check(advertised == args.max_streams,
                 f"SETTINGS_MAX_CONCURRENT_STREAMS = {args.max_streams} (got {advertised})")

    total = args.max_streams + EXTRA
    frames = []
    streams = []
    for i in range(total):
        stream_id = conn.stream_id()
        streams.append(stream_id)
        headers = request_headers(args, f"/private/slow{i}", args.key, probe=f"conc-{i}",
                                  extra=[("x-test-sleep-ms", str(SLEEP_MS))])
        frames.append(conn.headers(stream_id, headers))
    started = time.monotonic()
    conn.send(*frames)

    answered = {}  # stream id → seconds after sending
    refused = {}
    deadline = started + SLEEP_MS / 1000 * (total + 2)
    while len(answered) + len(refused) < total and time.monotonic() < deadline:
        frame = conn.read_frame(deadline - time.monotonic())
        if frame is None:
            if conn.closed:
                break
            continue
        if isinstance(frame, GoAwayFrame):
            report.check(False, f"unexpected GOAWAY {code_name(frame.error_code)}")
            break
        if isinstance(frame, RstStreamFrame) and frame.stream_id in streams:
            refused[frame.stream_id] = frame.error_code
        elif isinstance(frame, HeadersFrame) and frame.stream_id in streams:
            answered.setdefault(frame.stream_id, time.monotonic() - started)
    report.log(f"answered: { {s: round(t, 2) for s, t in answered.items()} }; "
               f"reset: { {s: code_name(c) for s, c in refused.items()} }")

    report.check(len(answered) + len(refused) == total, f"every stream answered or refused ({total})")
    report.check(all(code == REFUSED_STREAM for code in refused.values()), "resets are REFUSED_STREAM")
    report.check(len(answered) >= args.max_streams, f"at least {args.max_streams} streams were served")
    # The first wave finishes after SLEEP_MS; anything served concurrently with it finished
    # before the second wave could: at most max_streams responses may come in that first wave.
    first_wave = [t for t in answered.values() if t < 1.9 * SLEEP_MS / 1000]
    report.check(len(first_wave) <= args.max_streams,
                 f"no more than {args.max_streams} served at once (first wave: {len(first_wave)})")
    refused_ids = set(refused)
    report.check(all(s > max(answered, default=0) for s in refused_ids) or not refused_ids,
                 "the refused streams are the excess ones, not earlier streams")

    # The connection still serves a stream within the limit.
    stream_id = conn.stream_id()
    conn.send(conn.headers(stream_id, request_headers(args, "/private/after", args.key, probe="conc-after")))
    outcome = conn.outcome(stream_id)
    report.check(outcome.kind == "response" and outcome.status == 200, f"a later stream → 200, got {outcome}")
    conn.close()
    report.finish()


run(main)

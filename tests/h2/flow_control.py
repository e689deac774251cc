"""Flow control: a response larger than the client's window is sent only as far as the window
allows, stalls (the connection staying healthy) while the window is closed, and is delivered
whole once the client sends WINDOW_UPDATE. A stream opened with an initial window of zero gets
its response headers but no DATA until the window opens."""

import time

from common import SETTINGS_INITIAL_WINDOW_SIZE, Client, Report, parse_args, pattern, request_headers, run

BIG = 300_000
DEFAULT_WINDOW = 65_535


def stalled(client, stream_id, seconds):
    """Pumps for `seconds`; returns how many body bytes arrived meanwhile."""
    before = len(client.responses[stream_id].body)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and client.pump(deadline - time.monotonic()):
        pass
    return len(client.responses[stream_id].body) - before


def ping_answered(client):
    before = client.pings
    client.ping()
    return client.wait(lambda: client.pings > before, timeout=3)


def default_window(args, report):
    client = Client(args, auto_window=False)
    headers = request_headers(args, "/private/big", args.key, probe="flow-default",
                              extra=[("x-test-response-bytes", str(BIG))])
    stream_id = client.send_request(headers)
    response = client.responses[stream_id]
    client.wait(lambda: len(response.body) >= DEFAULT_WINDOW or response.ended, timeout=10)
    report.check(response.status == 200, f"status 200: {response.describe()}")
    report.check(len(response.body) <= DEFAULT_WINDOW,
                 f"no more than the initial window ({DEFAULT_WINDOW}) before WINDOW_UPDATE: {len(response.body)}")
    report.check(not response.ended, "the response is not complete while the window is closed")
    more = stalled(client, stream_id, 1.5)
    report.check(more == 0, f"nothing sent while the window is exhausted (got {more} bytes)")
    report.check(ping_answered(client), "the connection answers PING while the stream is stalled")

    # Open the windows: the connection's and the stream's, by what was consumed plus the rest.
    client.conn.increment_flow_control_window(BIG, stream_id=None)
    client.conn.increment_flow_control_window(BIG, stream_id=stream_id)
    client.flush()
    client.auto_window = True
    client.wait(lambda: response.ended or response.reset is not None, timeout=10)
    report.check(response.ended and len(response.body) == BIG,
                 f"the whole response arrives after WINDOW_UPDATE: {len(response.body)} of {BIG} bytes")
    report.check(bytes(response.body) == pattern(BIG), "the body is intact")
    client.close()


def zero_window(args, report):
    client = Client(args, local_settings={SETTINGS_INITIAL_WINDOW_SIZE: 0}, auto_window=False)
    client.wait(lambda: client.remote_settings_seen, timeout=5)
    headers = request_headers(args, "/private/zero", args.key, probe="flow-zero",
                              extra=[("x-test-response-bytes", "1000")])
    stream_id = client.send_request(headers)
    response = client.responses[stream_id]
    client.wait(lambda: response.status is not None or response.reset is not None, timeout=10)
    report.check(response.status == 200, f"zero window: response headers still arrive: {response.describe()}")
    more = stalled(client, stream_id, 1.5)
    report.check(len(response.body) == 0 and more == 0,
                 f"zero window: no DATA while the stream window is 0 (got {len(response.body)} bytes)")
    report.check(ping_answered(client), "zero window: the connection answers PING")
    second = client.get("/private/other", key=args.key, probe="flow-zero-second", timeout=5)
    report.check(second.status == 200, f"zero window: other streams' headers still flow: {second.describe()}")

    client.conn.increment_flow_control_window(1000, stream_id=stream_id)
    client.flush()
    client.wait(lambda: response.ended or response.reset is not None, timeout=10)
    report.check(response.ended and bytes(response.body) == pattern(1000),
                 f"zero window: DATA arrives once WINDOW_UPDATE opens it: {response.describe()}")
    client.close()


def main():
    args = parse_args(__doc__)
    report = Report("flow_control", args)
    default_window(args, report)
    zero_window(args, report)
    report.finish()


run(main)

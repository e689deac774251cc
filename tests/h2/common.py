"""Shared pieces of the HTTP/2 frame-level conformance scripts (tests/h2/*.py).

Each script connects to a running keygate (cleartext prior knowledge, or TLS with ALPN h2),
sends frames, and exits 0 when keygate behaved, 1 otherwise, printing what it sent and what
came back. tests/h2_frames.rs runs them against an in-process gateway; they also run by hand:

    python3 tests/h2/auth.py --port 8080 --key "$KEY"
    python3 tests/h2/auth.py --port 8443 --tls --ca ca.pem --key "$KEY"

Two ways to talk:
- Client: the `h2` package's state machine, for well-formed exchanges (requests, flow control).
- RawConn: frames built with `hyperframe` and header blocks with `hpack` (both come with h2),
  for what a well-behaved client library refuses to send: malformed header blocks, frames on
  closed streams, floods.

The gateway under test is expected to route `/public/` as a public route and everything else
as a protected route whose upstream echoes the request body, answers `x-test-response-bytes: N`
with N bytes of `i % 251`, and waits `x-test-sleep-ms: N` before answering (the recording
upstream of tests/support). Every request carries `x-test-probe`; a probe that starts with
`reject-` marks a request that must never reach the upstream, which the Rust side checks.
"""

import argparse
import json
import socket
import ssl
import sys
import time

try:
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings
    import hpack
    from hyperframe.frame import (
        ContinuationFrame,
        DataFrame,
        ExtensionFrame,
        Frame,
        GoAwayFrame,
        HeadersFrame,
        PingFrame,
        RstStreamFrame,
        SettingsFrame,
        WindowUpdateFrame,
    )
except ImportError as error:  # pragma: no cover - the message is the point
    print(f"the Python h2 package is missing ({error}): pip install h2", file=sys.stderr)
    sys.exit(2)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
IO_TIMEOUT = 10.0

# RFC 9113 §7 error codes, for messages.
ERROR_CODES = {
    0x0: "NO_ERROR",
    0x1: "PROTOCOL_ERROR",
    0x2: "INTERNAL_ERROR",
    0x3: "FLOW_CONTROL_ERROR",
    0x4: "SETTINGS_TIMEOUT",
    0x5: "STREAM_CLOSED",
    0x6: "FRAME_SIZE_ERROR",
    0x7: "REFUSED_STREAM",
    0x8: "CANCEL",
    0x9: "COMPRESSION_ERROR",
    0xA: "CONNECT_ERROR",
    0xB: "ENHANCE_YOUR_CALM",
    0xC: "INADEQUATE_SECURITY",
    0xD: "HTTP_1_1_REQUIRED",
}
PROTOCOL_ERROR = 0x1
STREAM_CLOSED = 0x5
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6


def code_name(code):
    return ERROR_CODES.get(code, hex(code))


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", action="store_true", help="TLS with ALPN h2 instead of cleartext")
    parser.add_argument("--ca", help="PEM CA file that the server certificate must chain to")
    parser.add_argument("--server-name", default="localhost", help="TLS server name (SNI and check)")
    parser.add_argument("--key", required=True, help="a valid API key (x-api-key) for the protected route")
    parser.add_argument("--max-streams", type=int, default=100, help="the gateway's h2_max_concurrent_streams")
    parser.add_argument("--max-header-bytes", type=int, default=32768, help="the gateway's max_header_bytes")
    return parser.parse_args()


class Report:
    """Collects checks; `finish` prints a summary and exits 0 or 1."""

    def __init__(self, name, args):
        self.name = name
        self.failures = []
        self.started = time.monotonic()
        transport = "TLS (ALPN h2)" if args.tls else "cleartext (prior knowledge)"
        print(f"{name}: {transport} to {args.host}:{args.port}")

    def log(self, message):
        print(f"  [{time.monotonic() - self.started:6.2f}s] {message}")

    def check(self, ok, message):
        self.log(("ok    " if ok else "FAIL  ") + message)
        if not ok:
            self.failures.append(message)
        return ok

    def finish(self):
        if self.failures:
            print(f"{self.name}: {len(self.failures)} failure(s):")
            for failure in self.failures:
                print(f"  - {failure}")
            sys.exit(1)
        print(f"{self.name}: all checks passed")
        sys.exit(0)


def run(main):
    """Runs `main()`; an unexpected exception is a failure, printed, never a pass."""
    try:
        main()
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001 - report anything
        import traceback

        traceback.print_exc()
        print(f"unexpected error: {error!r}")
        sys.exit(1)


def open_socket(args, timeout=IO_TIMEOUT):
    """A connected socket speaking h2: TCP, or TLS that negotiated h2 by ALPN."""
    sock = socket.create_connection((args.host, args.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not args.tls:
        return sock
    context = ssl.create_default_context(cafile=args.ca)
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(sock, server_hostname=args.server_name)
    if tls.selected_alpn_protocol() != "h2":
        raise RuntimeError(f"ALPN chose {tls.selected_alpn_protocol()!r}, not h2")
    return tls


def request_headers(args, path, key=None, method="GET", probe=None, extra=()):
    """A well-formed request header list, as (bytes, bytes) pairs."""
    authority = f"{args.server_name if args.tls else args.host}:{args.port}"
    headers = [
        (b":method", method.encode()),
        (b":scheme", b"https" if args.tls else b"http"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
    ]
    if key is not None:
        headers.append((b"x-api-key", key.encode()))
    if probe is not None:
        headers.append((b"x-test-probe", probe.encode()))
    headers.extend((n if isinstance(n, bytes) else n.encode(), v if isinstance(v, bytes) else v.encode())
                   for n, v in extra)
    return headers


def pattern(n):
    """The body the recording upstream sends for `x-test-response-bytes: n`."""
    return bytes(i % 251 for i in range(n))


# ------------------------------------------------------------------------------------------
# Client: h2's state machine
# ------------------------------------------------------------------------------------------


class Response:
    def __init__(self, stream_id):
        self.stream_id = stream_id
        self.headers = {}
        self.status = None
        self.body = bytearray()
        self.ended = False
        self.reset = None  # error code of a RST_STREAM
        self.first_byte_at = None
        self.ended_at = None

    def json(self):
        try:
            return json.loads(bytes(self.body))
        except ValueError:
            return None

    def describe(self):
        if self.reset is not None:
            return f"stream {self.stream_id} reset with {code_name(self.reset)}"
        if self.status is None:
            return f"stream {self.stream_id}: no response"
        shown = bytes(self.body[:200])
        more = "…" if len(self.body) > 200 else ""
        return (f"stream {self.stream_id}: {self.status} {dict(self.headers)} "
                f"body ({len(self.body)} bytes) {shown!r}{more}{'' if self.ended else ' (not ended)'}")


class Client:
    """An h2 client connection driven by hand: nothing happens until `pump` reads."""

    def __init__(self, args, local_settings=None, auto_window=True):
        self.args = args
        self.sock = open_socket(args)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        if local_settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=local_settings)
        self.conn.initiate_connection()
        self.auto_window = auto_window
        self.responses = {}
        self.goaway = None
        self.closed = False
        self.pings = 0
        self.remote_settings_seen = False
        self.flush()

    def flush(self):
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_request(self, headers, body=None):
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers, end_stream=body is None)
        if body is not None:
            self.conn.send_data(stream_id, body, end_stream=True)
        self.responses[stream_id] = Response(stream_id)
        self.flush()
        return stream_id

    def ping(self):
        self.conn.ping(b"keygate!")
        self.flush()

    def pump(self, timeout):
        """Reads what arrives within `timeout` seconds (one recv); False once closed."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return True
        except (ConnectionError, ssl.SSLError, OSError):
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self.handle(event)
        self.flush()
        return True

    def handle(self, event):
        now = time.monotonic()
        response = self.responses.get(getattr(event, "stream_id", None))
        if isinstance(event, h2.events.ResponseReceived) and response:
            response.headers = {n.decode(): v.decode(errors="replace") for n, v in event.headers}
            response.status = int(response.headers.get(":status", "0"))
        elif isinstance(event, h2.events.DataReceived) and response:
            response.body.extend(event.data)
            response.first_byte_at = response.first_byte_at or now
            if self.auto_window and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and response:
            response.ended = True
            response.ended_at = now
        elif isinstance(event, h2.events.StreamReset) and response:
            response.reset = event.error_code
            response.ended_at = now
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event.error_code
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings += 1
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            self.remote_settings_seen = True

    def wait(self, done, timeout=IO_TIMEOUT):
        """Pumps until `done()` holds or the connection ends; returns `done()`."""
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or not self.pump(min(left, 0.5)):
                break
        return done()

    def finished(self, stream_id):
        response = self.responses[stream_id]
        return lambda: response.ended or response.reset is not None

    def get(self, path, key=None, probe=None, extra=(), method="GET", body=None, timeout=IO_TIMEOUT):
        """One request, waited for."""
        stream_id = self.send_request(request_headers(self.args, path, key, method, probe, extra), body)
        self.wait(self.finished(stream_id), timeout)
        return self.responses[stream_id]

    def close(self):
        try:
            self.conn.close_connection()
            self.flush()
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        self.sock.close()


def server_answers(args, report, what="a fresh connection"):
    """The gateway still serves: a new connection gets a 200 for a keyed request."""
    try:
        client = Client(args)
        response = client.get("/after-attack", key=args.key, probe="after-attack")
        client.close()
    except Exception as error:  # noqa: BLE001
        return report.check(False, f"{what}: could not complete a request: {error!r}")
    return report.check(response.status == 200 and response.ended, f"{what} still gets 200: {response.describe()}")


# ------------------------------------------------------------------------------------------
# RawConn: frames by hand
# ------------------------------------------------------------------------------------------


class Outcome:
    """What the server did about one stream: answered, reset it, went away, or closed."""

    def __init__(self, kind, code=None, status=None, detail=""):
        self.kind = kind  # "response" | "reset" | "goaway" | "closed" | "timeout"
        self.code = code
        self.status = status
        self.detail = detail

    def is_error(self, codes=None):
        """A stream or connection error (a close counts: no answer was given)."""
        if self.kind == "closed":
            return True
        if self.kind in ("reset", "goaway"):
            return codes is None or self.code in codes
        return False

    def __str__(self):
        if self.kind == "response":
            return f"a response with status {self.status} {self.detail}"
        if self.kind in ("reset", "goaway"):
            name = "RST_STREAM" if self.kind == "reset" else "GOAWAY"
            return f"{name} {code_name(self.code)} {self.detail}".rstrip()
        return f"{self.kind} {self.detail}".rstrip()


class RawConn:
    def __init__(self, args, settings=None):
        self.args = args
        self.sock = open_socket(args)
        self.buffer = bytearray()
        self.block_buffer = bytearray()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.remote_settings = {}
        self.closed = False
        self.goaway = None
        self.goaway_debug = b""
        self.next_stream = 1
        self.sock.sendall(PREFACE + SettingsFrame(0, settings=settings or {}).serialize())

    def handshake(self, timeout=IO_TIMEOUT):
        """Waits for the server's SETTINGS (acknowledged) and its ACK of ours."""
        got_settings = got_ack = False
        deadline = time.monotonic() + timeout
        while not (got_settings and got_ack) and time.monotonic() < deadline:
            frame = self.read_frame(deadline - time.monotonic())
            if frame is None:
                break
            if isinstance(frame, SettingsFrame):
                if "ACK" in frame.flags:
                    got_ack = True
                else:
                    got_settings = True
                    self.remote_settings.update(frame.settings)
        if not (got_settings and got_ack):
            raise RuntimeError("no SETTINGS exchange with the server")
        return self.remote_settings

    def stream_id(self):
        stream_id = self.next_stream
        self.next_stream += 2
        return stream_id

    def block(self, headers):
        return self.encoder.encode(headers, huffman=False)

    def send(self, *frames):
        data = b"".join(f.serialize() if not isinstance(f, (bytes, bytearray)) else bytes(f) for f in frames)
        self.sock.sendall(data)

    def try_send(self, *frames):
        """Like send, but a connection the server already closed is reported, not raised."""
        try:
            self.send(*frames)
            return True
        except (ConnectionError, ssl.SSLError, OSError):
            self.closed = True
            return False

    def headers(self, stream_id, headers, end_stream=True, end_headers=True):
        frame = HeadersFrame(stream_id)
        frame.data = self.block(headers)
        if end_stream:
            frame.flags.add("END_STREAM")
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame

    def read_frame(self, timeout):
        """The next frame, or None when the connection closed or nothing came in `timeout`."""
        deadline = time.monotonic() + max(timeout, 0)
        while True:
            if len(self.buffer) >= 9:
                length = int.from_bytes(self.buffer[:3], "big")
                if len(self.buffer) >= 9 + length:
                    head = bytes(self.buffer[:9])
                    body = bytes(self.buffer[9:9 + length])
                    del self.buffer[:9 + length]
                    frame, _ = Frame.parse_frame_header(memoryview(head), strict=False)
                    frame.parse_body(memoryview(body))
                    frame.fields = None
                    if isinstance(frame, (HeadersFrame, ContinuationFrame)):
                        # Every header block is decoded, in order, to keep HPACK state in step.
                        self.block_buffer.extend(frame.data)
                        if "END_HEADERS" in frame.flags:
                            frame.fields = dict(self.decoder.decode(bytes(self.block_buffer), raw=True))
                            self.block_buffer.clear()
                    elif isinstance(frame, GoAwayFrame):
                        self.goaway = frame.error_code
                        self.goaway_debug = bytes(frame.additional_data)
                    elif isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                        self.remote_settings.update(frame.settings)
                        self.try_send(SettingsFrame(0, flags=["ACK"]))
                    elif isinstance(frame, PingFrame) and "ACK" not in frame.flags:
                        self.try_send(PingFrame(0, data=frame.opaque_data, flags=["ACK"]))
                    return frame
            left = deadline - time.monotonic()
            if self.closed or left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(65536)
            except (socket.timeout, TimeoutError):
                return None
            except (ConnectionError, ssl.SSLError, OSError):
                self.closed = True
                return None
            if not data:
                self.closed = True
                return None
            self.buffer.extend(data)

    def outcome(self, stream_id, timeout=IO_TIMEOUT):
        """Reads until the server answers, resets or refuses `stream_id`, or leaves."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.read_frame(deadline - time.monotonic())
            if frame is None:
                if self.closed:
                    return Outcome("closed", detail="(the server closed the connection)")
                return Outcome("timeout", detail=f"(nothing about stream {stream_id} in {timeout}s)")
            if isinstance(frame, GoAwayFrame):
                return Outcome("goaway", frame.error_code, detail=f"last_stream_id={frame.last_stream_id} "
                                                                  f"{bytes(frame.additional_data)!r}")
            if frame.stream_id != stream_id:
                continue
            if isinstance(frame, RstStreamFrame):
                return Outcome("reset", frame.error_code)
            if frame.fields is not None:
                status = frame.fields.get(b":status", b"?").decode()
                return Outcome("response", status=int(status) if status.isdigit() else status,
                               detail=str({k.decode(): v.decode(errors="replace") for k, v in frame.fields.items()}))

    def drain(self, timeout):
        """Reads frames for `timeout` seconds or until the connection closes; returns them."""
        frames = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self.read_frame(deadline - time.monotonic())
            if frame is None:
                if self.closed:
                    break
                continue
            frames.append(frame)
        return frames

    def wait_for(self, wanted, timeout):
        """The first frame for which `wanted(frame)` holds, or None on close or timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self.read_frame(deadline - time.monotonic())
            if frame is None:
                if self.closed:
                    return None
                continue
            if wanted(frame):
                return frame
        return None

    def alive(self, timeout=3.0):
        """Whether the server still answers a PING on this connection."""
        if not self.try_send(PingFrame(0, data=b"alive?!!")):
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frame = self.read_frame(deadline - time.monotonic())
            if frame is None:
                return False
            if isinstance(frame, PingFrame) and "ACK" in frame.flags:
                return True
            if isinstance(frame, GoAwayFrame):
                return False
        return False

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


__all__ = [
    "CANCEL", "COMPRESSION_ERROR", "ContinuationFrame", "DataFrame", "ENHANCE_YOUR_CALM", "ExtensionFrame",
    "GoAwayFrame", "HeadersFrame", "PROTOCOL_ERROR", "PingFrame", "REFUSED_STREAM", "RstStreamFrame",
    "STREAM_CLOSED", "SETTINGS_INITIAL_WINDOW_SIZE", "SETTINGS_MAX_CONCURRENT_STREAMS",
    "SETTINGS_MAX_HEADER_LIST_SIZE", "SettingsFrame", "WindowUpdateFrame", "Client", "Outcome", "RawConn",
    "Report", "code_name", "parse_args", "pattern", "request_headers", "run", "server_answers",
]

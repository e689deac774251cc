#!/usr/bin/env python3
"""Turns one h2load run (its stdout and its --log-file) into benches/load.sh's result line.

Usage: h2result.py STDOUT_FILE LOG_FILE SECONDS

Prints `requests=… duration_us=… sent=… non2xx=… connect_err=… read_err=… write_err=…
timeout_err=… p50_us=… p99_us=… p999_us=… max_us=… tls=… alpn=…`, the fields keys.lua prints
for wrk, so both load generators feed the same table:
  requests    requests done (an answer arrived), as wrk counts completed responses
  sent        requests started
  non2xx      done requests whose status was not 2xx
  read_err    h2load's `errored` (stream or connection failures); timeout_err its `timeout`
  p…_us       percentiles of every done request's time in the log (nearest rank)
  tls, alpn   the negotiated TLS version + cipher, and the application protocol
duration_us is the -D measuring time, the period h2load's own req/s figure divides by.
"""

import math
import re
import sys


def percentile(sorted_values, p):
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def main() -> None:
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    text = open(sys.argv[1], encoding="utf-8", errors="replace").read()
    seconds = float(sys.argv[3])

    def number(pattern: str) -> int:
        match = re.search(pattern, text, re.MULTILINE)
        if not match:
            sys.exit(f"h2result.py: no `{pattern}` in h2load's output")
        return int(match.group(1))

    done = number(r"^requests: .*?(\d+) done")
    started = number(r"^requests: .*?(\d+) started")
    errored = number(r"^requests: .*?(\d+) errored")
    timeouts = number(r"^requests: .*?(\d+) timeout")
    ok = number(r"^status codes: (\d+) 2xx")
    proto = re.search(r"^TLS Protocol: (\S+)", text, re.MULTILINE)
    cipher = re.search(r"^Cipher: (\S+)", text, re.MULTILINE)
    alpn = re.search(r"^Application protocol: (\S+)", text, re.MULTILINE)

    times = []
    with open(sys.argv[2], encoding="ascii", errors="replace") as log:
        for line in log:
            fields = line.split("\t")
            # start (µs since the epoch), status (-1 when no answer came), time (µs)
            if len(fields) == 3 and int(fields[1]) > 0:
                times.append(int(fields[2]))
    times.sort()

    print(
        f"requests={done} duration_us={int(seconds * 1e6)} sent={started} non2xx={done - ok} "
        f"connect_err=0 read_err={errored} write_err=0 timeout_err={timeouts} "
        f"p50_us={percentile(times, 50)} p99_us={percentile(times, 99)} "
        f"p999_us={percentile(times, 99.9)} max_us={times[-1] if times else 0} "
        f"tls={proto.group(1) if proto else 'none'}/{cipher.group(1) if cipher else 'none'} "
        f"alpn={alpn.group(1) if alpn else 'none'}"
    )


if __name__ == "__main__":
    main()

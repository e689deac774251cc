"""A request without a key gets 401 and its stream ends; a wrong key 401; a valid key 200, also
for many requests multiplexed on one connection."""

from common import Client, Report, parse_args, request_headers, run


def main():
    args = parse_args(__doc__)
    report = Report("auth", args)
    client = Client(args)

    missing = client.get("/private/a", probe="reject-auth-missing")
    report.check(missing.status == 401 and missing.ended, f"no key → 401, stream ended: {missing.describe()}")
    body = missing.json() or {}
    report.check(body.get("error") == "missing_api_key", f"error code missing_api_key: {body}")
    report.check(missing.headers.get("content-type", "").startswith("application/json"), "JSON content-type")
    report.check("www-authenticate" in missing.headers, "401 carries www-authenticate")
    report.check("x-upstream" not in missing.headers, "the 401 did not come from the upstream")

    wrong = client.get("/private/a", key="not-a-key", probe="reject-auth-wrong")
    report.check(wrong.status == 401 and (wrong.json() or {}).get("error") == "invalid_api_key",
                 f"wrong key → 401 invalid_api_key: {wrong.describe()}")

    ok = client.get("/private/a", key=args.key, probe="auth-ok", method="POST", body=b"hello over h2")
    report.check(ok.status == 200 and ok.ended, f"valid key → 200: {ok.describe()}")
    report.check(ok.headers.get("x-upstream") == "yes", "the 200 came from the upstream")
    report.check(bytes(ok.body) == b"hello over h2", f"the body went through: {bytes(ok.body)!r}")

    # Ten keyed and ten unkeyed requests interleaved on one connection, as many at once as the
    # server's MAX_CONCURRENT_STREAMS allows: each gets its own answer.
    streams = []
    for i in range(10):
        streams.append((True, request_headers(args, f"/private/m{i}", args.key, probe=f"auth-multi-{i}")))
        streams.append((False, request_headers(args, f"/private/m{i}", None, probe=f"reject-auth-multi-{i}")))
    sent = []
    batch = max(1, min(args.max_streams, 20))
    for start in range(0, len(streams), batch):
        ids = [(keyed, client.send_request(headers)) for keyed, headers in streams[start:start + batch]]
        client.wait(lambda: all(client.finished(s)() for _, s in ids))
        sent.extend(ids)
    for keyed, stream_id in sent:
        response = client.responses[stream_id]
        want = 200 if keyed else 401
        report.check(response.status == want and response.ended,
                     f"multiplexed {'keyed' if keyed else 'unkeyed'} request → {want}: {response.describe()}")
    report.check(client.goaway is None and not client.closed, "the connection stayed open throughout")
    client.close()
    report.finish()


run(main)

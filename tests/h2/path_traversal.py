"""`:path` with dot-segments, plain or percent-encoded, is normalised before routing or refused:
`/public/../secret` is routed as `/secret` (protected: 401 without a key), never as the public
`/public/` route; paths that climb above the root or hide a slash are 400. With a key, the
upstream receives the normalised path (the Rust side checks that no `..` or `%2e` reaches it)."""

from common import Client, Report, parse_args, run

# Without a key: each resolves outside /public/, or is refused. 200 would mean it was routed
# on the raw prefix and reached the upstream through the public route.
UNKEYED = [
    "/public/../secret",
    "/public/%2e%2e/secret",
    "/public/%2E%2e/secret",
    "/public/.%2e/secret",
    "/public/%2e./secret",
    "/public/./../secret",
    "/public//../secret",
    "/public/a/../../secret",
    "/public/..%2fsecret",
    "/public/..%2Fsecret",
    "/public/..%5csecret",
    "/public/..;/secret",
    "/public/%2e%2e;/secret",
    "/public/.;x/../secret",
    "/public/..\\secret",
    "/public/%2e%2e%2fsecret",
    "/../public/x",
    "/public/%00/../secret",
]

# With a key: (path, statuses allowed). Normalised ones reach the upstream (200), others 400.
KEYED = [
    ("/x/../y", {200}),
    ("/x/%2e%2e/y", {200}),
    ("/x/%2E%2E/y/.", {200}),
    ("//x//y/./z/..", {200}),
    ("/%7euser/%41", {200}),
    ("/..", {400}),
    ("/%2e%2e/y", {400}),
    ("/x/..%2f..%2fetc/passwd", {400}),
    ("/x/%5c..%5c", {400}),
]


def main():
    args = parse_args(__doc__)
    report = Report("path_traversal", args)
    client = Client(args)

    public = client.get("/public/ok", probe="path-public-ok")
    report.check(public.status == 200, f"/public/ok without a key → 200 (the public route works): "
                                       f"{public.describe()}")

    for i, path in enumerate(UNKEYED):
        response = client.get(path, probe=f"reject-path-{i}")
        report.check(response.status in (400, 401), f"{path} without a key → 400 or 401: {response.describe()}")
        report.check("x-upstream" not in response.headers, f"{path} did not reach the upstream")

    for i, (path, allowed) in enumerate(KEYED):
        probe = f"path-keyed-{i}" if 200 in allowed else f"reject-path-keyed-{i}"
        response = client.get(path, key=args.key, probe=probe)
        report.check(response.status in allowed, f"{path} with a key → {sorted(allowed)}: {response.describe()}")
    report.check(client.goaway is None and not client.closed, "the connection stayed open throughout")
    client.close()
    report.finish()


run(main)

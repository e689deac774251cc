#!/usr/bin/env python3
"""Prints benches/load.sh's table from its results.tsv (one line per target and round).

Every figure is the median over the rounds; `spread` is (max - min) / median of requests/s.
Machine and run facts come from the environment (LOAD_*), set by load.sh.
"""

import csv
import os
import statistics
import sys

# target → (what, keys) in table order; the first block is proxied traffic, the second the
# rejection path.
ROWS = [
    ("direct", "upstream alone (direct)", "-"),
    ("kg-1", "keygate", "1"),
    ("kg-1-baseline", "keygate (baseline, LOAD_BASELINE)", "1"),
    ("kg-10k", "keygate", "10,000"),
    ("kg-1m", "keygate", "1,000,000"),
    ("ng-1", "nginx map", "1"),
    ("ng-1m", "nginx map", "1,000,000"),
]
REJECT_ROWS = [
    ("kg-1m-reject-unknown", "keygate: unknown keys → 401", "1,000,000"),
    ("kg-1m-reject-badcrc", "keygate: kg_ bad checksum → 401", "1,000,000"),
    ("ng-1m-reject-unknown", "nginx map: unknown keys → 401", "1,000,000"),
    ("ng-1m-reject-badcrc", "nginx map: kg_ bad checksum → 401", "1,000,000"),
]


def load(path: str, clk_tck: int) -> dict:
    runs: dict[str, list[dict]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            n = int(row["requests"])
            seconds = int(row["duration_us"]) / 1e6
            runs.setdefault(row["target"], []).append(
                {
                    "rps": n / seconds if seconds else 0.0,
                    "p50": int(row["p50_us"]) / 1000,
                    "p99": int(row["p99_us"]) / 1000,
                    "p999": int(row["p999_us"]) / 1000,
                    "cpu": int(row["cpu_ticks"]) / clk_tck / n * 100_000 if n else float("nan"),
                    "user": int(row["user_ticks"]) / clk_tck / n * 100_000 if n else float("nan"),
                    "sys": int(row["sys_ticks"]) / clk_tck / n * 100_000 if n else float("nan"),
                    "cpu_pct": 100 * int(row["cpu_ticks"]) / clk_tck / seconds if seconds else 0.0,
                    "rss": int(row["rss_kb"]) / 1024,
                    "rss_now": int(row["rss_now_kb"]) / 1024,
                    "bad": int(row["non2xx"]),
                    "requests": n,
                }
            )
    out = {}
    for target, rounds in runs.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in ("rps", "p50", "p99", "p999", "cpu", "user", "sys", "cpu_pct", "rss", "rss_now")}
        rps = [r["rps"] for r in rounds]
        med["spread"] = (max(rps) - min(rps)) / med["rps"] if med["rps"] else 0.0
        med["rounds"] = len(rounds)
        med["bad"] = sum(r["bad"] for r in rounds)
        med["requests"] = sum(r["requests"] for r in rounds)
        out[target] = med
    return out


def table(title: str, rows, stats, last_col: str) -> None:
    head = (
        f"{'target':<34} {'keys':>9} {'req/s':>9} {'spread':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'p99.9 ms':>8} {'CPU s/100k':>10} {'CPU %':>6} {'peak RSS MB':>11} {'RSS MB':>7} {last_col:>11}"
    )
    print(title)
    print(head)
    print("-" * len(head))
    for target, what, keys in rows:
        s = stats.get(target)
        if s is None and target == "kg-1-baseline":
            continue  # only with LOAD_BASELINE
        if s is None:
            print(f"{what:<34} {keys:>9} {'(no run completed)':>20}")
            continue
        marks = "*" if target == "direct" else ""
        last = f"{s['bad']}/{s['requests']}"
        print(
            f"{what:<34} {keys:>9} {s['rps']:>9.0f} {s['spread']:>6.1%} {s['p50']:>7.2f} {s['p99']:>7.2f} "
            f"{s['p999']:>8.2f} {s['cpu']:>10.3f}{marks:1} {s['cpu_pct']:>5.0f}{marks:1} {s['rss']:>10.1f}{marks:1} "
            f"{s['rss_now']:>6.1f}{marks:1} {last:>11}"
        )


def ratio(stats, a: str, b: str, key: str) -> str:
    if a not in stats or b not in stats or not stats[b][key]:
        return "n/a"
    return f"{stats[a][key] / stats[b][key]:.2f}×"


def main() -> None:
    env = os.environ.get
    clk_tck = int(env("LOAD_CLK_TCK", "100"))
    stats = load(sys.argv[1], clk_tck)

    print()
    print("=" * 110)
    print(f"machine:  {env('LOAD_NPROC', '?')} cores, {env('LOAD_CPU', '?')}, {env('LOAD_KERNEL', '?')}")
    print(f"versions: {env('LOAD_VERSIONS', '?')}")
    background = [tuple(int(v) for v in x.split("/")) for x in env("LOAD_BACKGROUND", "").split()]
    if background:
        busy = [b for b, _ in background]
        niced = [n for _, n in background]
        print(
            f"quiet?:   other work's CPU in the second before each run (% of all cores): normal priority "
            f"median {statistics.median(busy):.0f}, max {max(busy)};\n          niced median "
            f"{statistics.median(niced):.0f}, max {max(niced)}"
            + ("  <- NOISY" if statistics.median(busy) >= 10 else "")
        )
    print(f"load:     {env('LOAD_SHAPE', '?')}")
    print("          GET / with x-api-key; 10k/1M keys: 10,000 distinct valid keys spread across the")
    print('          table, cycled. Upstream: nginx, 1 worker, return 200 "ok\\n". keygate: workers = 1;')
    print("          nginx proxy: worker_processes 1. All on 127.0.0.1.")
    print(f"pinning:  {env('LOAD_PINNING', '?')}")
    print("logs:     keygate RUST_LOG=warn (its per-request access event off); nginx access_log off")
    print("figures:  medians over rounds; spread = (max-min)/median of req/s; CPU s/100k = the proxy's")
    print("          user+sys CPU seconds per 100,000 requests; CPU % = its CPU time / wall time (near 100:")
    print("          the proxy was the bottleneck); peak RSS = VmHWM (includes key loading),")
    print("          RSS = VmRSS after the run (nginx: the worker); * = the upstream's own worker on the")
    print("          direct row; errors / 401s = responses with status > 399 / completed")
    print("=" * 110)
    print()
    table("Proxied (valid keys → upstream)", ROWS, stats, "errors")
    print()
    table("Rejection path (invalid keys; the upstream must see nothing)", REJECT_ROWS, stats, "401s")
    print()
    print("Ratios (medians):")
    for label, kg, ng in (("1 key", "kg-1", "ng-1"), ("1,000,000 keys", "kg-1m", "ng-1m")):
        print(
            f"  keygate / nginx, {label:<15} throughput {ratio(stats, kg, ng, 'rps'):>7}   "
            f"CPU per request {ratio(stats, kg, ng, 'cpu'):>7}   p99 {ratio(stats, kg, ng, 'p99'):>7}"
        )
    for label, kg in (("1 key", "kg-1"), ("10,000 keys", "kg-10k"), ("1,000,000 keys", "kg-1m")):
        print(
            f"  keygate / direct, {label:<14} throughput {ratio(stats, kg, 'direct', 'rps'):>7}   "
            f"p99 {ratio(stats, kg, 'direct', 'p99'):>7}"
        )
    if "kg-1-baseline" in stats:
        print(
            f"  keygate / baseline, 1 key        throughput {ratio(stats, 'kg-1', 'kg-1-baseline', 'rps'):>7}   "
            f"CPU per request {ratio(stats, 'kg-1', 'kg-1-baseline', 'cpu'):>7}   "
            f"p99 {ratio(stats, 'kg-1', 'kg-1-baseline', 'p99'):>7}"
        )
    for label, who, rej in (
        ("keygate, unknown keys", "kg", "unknown"),
        ("keygate, bad checksum", "kg", "badcrc"),
        ("nginx,   unknown keys", "ng", "unknown"),
    ):
        print(
            f"  rejected / proxied throughput, {label} (1M): "
            f"{ratio(stats, f'{who}-1m-reject-{rej}', f'{who}-1m', 'rps')}"
        )
    print()
    cpu_split(stats)


def cpu_split(stats) -> None:
    """Where each proxy's CPU went: its own code, and the kernel working for it (for a proxy on
    loopback, mostly TCP send and receive: the peer's receive path runs inside the sender's
    syscall). Both proxies make the same four socket calls per request, so the kernel part is
    a floor that no user-space work can go under."""
    rows = [(t, w, k) for t, w, k in ROWS if t != "direct" and t in stats]
    print("CPU per request, split (medians; CPU s/100k = user + kernel)")
    head = f"{'target':<34} {'keys':>9} {'user s/100k':>11} {'kernel s/100k':>13} {'kernel share':>12}"
    print(head)
    print("-" * len(head))
    for target, what, keys in rows:
        s = stats[target]
        total = s["user"] + s["sys"]
        share = s["sys"] / total if total else float("nan")
        print(f"{what:<34} {keys:>9} {s['user']:>11.3f} {s['sys']:>13.3f} {share:>12.0%}")
    for label, kg, ng in (("1 key", "kg-1", "ng-1"), ("1,000,000 keys", "kg-1m", "ng-1m")):
        if kg in stats and ng in stats and stats[ng]["cpu"]:
            print(
                f"  {label}: keygate's kernel time alone is {stats[kg]['sys'] / stats[ng]['cpu']:.2f}× nginx's "
                f"whole CPU per request; its user time {ratio(stats, kg, ng, 'user')} nginx's"
            )


if __name__ == "__main__":
    main()

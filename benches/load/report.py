#!/usr/bin/env python3
"""Prints benches/load.sh's report from its results.tsv (one line per placement, target and
round), and writes its chart (LOAD_SVG) with chart.py.

Every figure is the median over the rounds; `spread` is (max - min) / median of requests/s.
Machine and run facts come from the environment (LOAD_*), set by load.sh.
"""

import csv
import os
import statistics
import sys

import chart

# target → (what, keys) in table order, per block.
PROXIED = [
    ("direct", "upstream alone (direct)", "-"),
    ("kg-1", "keygate", "1"),
    ("kg-1-baseline", "keygate (baseline, LOAD_BASELINE)", "1"),
    ("kg-10k", "keygate", "10,000"),
    ("kg-1m", "keygate", "1,000,000"),
    ("ng-1", "nginx map", "1"),
    ("ng-1m", "nginx map", "1,000,000"),
]
REJECTED = [
    ("kg-1m-reject-unknown", "keygate: unknown keys → 401", "1,000,000"),
    ("kg-1m-reject-badcrc", "keygate: kg_ bad checksum → 401", "1,000,000"),
    ("ng-1m-reject-unknown", "nginx map: unknown keys → 401", "1,000,000"),
    ("ng-1m-reject-badcrc", "nginx map: kg_ bad checksum → 401", "1,000,000"),
]
H2TLS = [
    ("kg-h2tls", "keygate, HTTP/2 over TLS", "1"),
    ("ng-h2tls", "nginx map, HTTP/2 over TLS", "1"),
]
WORKERS = [
    ("kg-1-w2", "keygate workers = 2", "1"),
    ("kg-h2tls-w2", "keygate workers = 2, HTTP/2 TLS", "1"),
]
# Issue 17's rows: (label, keygate target, nginx target).
GOAL_ROWS = [
    ("proxied, 1 key", "kg-1", "ng-1"),
    ("proxied, 1M keys", "kg-1m", "ng-1m"),
    ("rejection flood (unknown keys)", "kg-1m-reject-unknown", "ng-1m-reject-unknown"),
    ("rejection flood (kg_ bad checksum)", "kg-1m-reject-badcrc", "ng-1m-reject-badcrc"),
    ("HTTP/2 over TLS, 1 key", "kg-h2tls", "ng-h2tls"),
]
# workers = 2 against workers = 1, unpinned: (label, workers = 2 target, workers = 1 target).
WORKER_ROWS = [
    ("HTTP/1.1 (wrk)", "kg-1-w2", "kg-1"),
    ("HTTP/2 over TLS (h2load)", "kg-h2tls-w2", "kg-h2tls"),
]


def load(path: str, clk_tck: int) -> dict:
    runs: dict[tuple[str, str], list[dict]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            n = int(row["requests"])
            seconds = int(row["duration_us"]) / 1e6
            per_100k = lambda ticks: int(ticks) / clk_tck / n * 100_000 if n else float("nan")  # noqa: E731
            runs.setdefault((row["placement"], row["target"]), []).append(
                {
                    "rps": n / seconds if seconds else 0.0,
                    "p50": int(row["p50_us"]) / 1000,
                    "p99": int(row["p99_us"]) / 1000,
                    "p999": int(row["p999_us"]) / 1000,
                    "cpu": per_100k(row["cpu_ticks"]),
                    "user": per_100k(row["user_ticks"]),
                    "sys": per_100k(row["sys_ticks"]),
                    "cpu_pct": 100 * int(row["cpu_ticks"]) / clk_tck / seconds if seconds else 0.0,
                    "rss": int(row["rss_kb"]) / 1024,
                    "rss_now": int(row["rss_now_kb"]) / 1024,
                    "bad": int(row["non2xx"]),
                    "requests": n,
                }
            )
    out: dict[str, dict] = {"pinned": {}, "unpinned": {}}
    keys = ("rps", "p50", "p99", "p999", "cpu", "user", "sys", "cpu_pct", "rss", "rss_now")
    for (placement, target), rounds in runs.items():
        med = {k: statistics.median(r[k] for r in rounds) for k in keys}
        rps = [r["rps"] for r in rounds]
        med["spread"] = (max(rps) - min(rps)) / med["rps"] if med["rps"] else 0.0
        med["rounds"] = len(rounds)
        med["bad"] = sum(r["bad"] for r in rounds)
        med["requests"] = sum(r["requests"] for r in rounds)
        out.setdefault(placement, {})[target] = med
    return out


def table(title: str, rows, stats, last_col: str) -> None:
    rows = [r for r in rows if r[0] in stats]
    if not rows:
        return
    head = (
        f"{'target':<34} {'keys':>9} {'req/s':>9} {'spread':>6} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'p99.9 ms':>8} {'CPU s/100k':>10} {'CPU %':>6} {'peak RSS MB':>11} {'RSS MB':>7} {last_col:>11}"
    )
    print(title)
    print(head)
    print("-" * len(head))
    for target, what, keys in rows:
        s = stats[target]
        marks = "*" if target == "direct" else ""
        last = f"{s['bad']}/{s['requests']}"
        print(
            f"{what:<34} {keys:>9} {s['rps']:>9.0f} {s['spread']:>6.1%} {s['p50']:>7.2f} {s['p99']:>7.2f} "
            f"{s['p999']:>8.2f} {s['cpu']:>10.3f}{marks:1} {s['cpu_pct']:>5.0f}{marks:1} {s['rss']:>10.1f}{marks:1} "
            f"{s['rss_now']:>6.1f}{marks:1} {last:>11}"
        )
    print()


def quotient(stats, a: str, b: str, key: str):
    if a not in stats or b not in stats or not stats[b][key]:
        return None
    return stats[a][key] / stats[b][key]


def fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2f}×"


def goals(placement: str, stats) -> list[dict]:
    """Issue 17's verdict per row: pinned ≥ 1.0× throughput and ≤ 1.0× CPU per request;
    unpinned ≥ 0.9× throughput (CPU per request shown, not judged)."""
    verdicts = []
    for label, kg, ng in GOAL_ROWS:
        if kg not in stats or ng not in stats:
            continue
        thr = quotient(stats, kg, ng, "rps")
        cpu = quotient(stats, kg, ng, "cpu")
        if placement == "pinned":
            met = thr is not None and cpu is not None and thr >= 1.0 and cpu <= 1.0
            goal = "≥ 1.00× and ≤ 1.00× CPU"
        else:
            met = thr is not None and thr >= 0.9
            goal = "≥ 0.90×"
        verdicts.append({"label": label, "kg": kg, "ng": ng, "thr": thr, "cpu": cpu, "goal": goal, "met": met})
    return verdicts


def print_goals(placement: str, stats, verdicts) -> None:
    if not verdicts:
        return
    print(f"keygate / nginx, {placement} (issue 17: {verdicts[0]['goal']})")
    head = (
        f"{'row':<36} {'keygate req/s':>13} {'nginx req/s':>11} {'throughput':>10} "
        f"{'CPU/request':>11} {'p99':>6}  met?"
    )
    print(head)
    print("-" * len(head))
    for v in verdicts:
        kg, ng = stats[v["kg"]], stats[v["ng"]]
        print(
            f"{v['label']:<36} {kg['rps']:>13.0f} {ng['rps']:>11.0f} {fmt(v['thr']):>10} "
            f"{fmt(v['cpu']):>11} {fmt(quotient(stats, v['kg'], v['ng'], 'p99')):>6}  {'yes' if v['met'] else 'NO'}"
        )
    print()


def print_workers(stats) -> list[dict]:
    rows = []
    for label, two, one in WORKER_ROWS:
        if two in stats and one in stats:
            rows.append({"label": label, "two": two, "one": one, "thr": quotient(stats, two, one, "rps")})
    if not rows:
        return rows
    print("keygate workers = 2 / workers = 1, unpinned (issue 17: not slower, ≥ 1.00×)")
    head = (
        f"{'row':<28} {'workers=1 req/s':>15} {'workers=2 req/s':>15} {'throughput':>10} "
        f"{'CPU/request':>11} {'w=2 CPU %':>9}  met?"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        one, two = stats[r["one"]], stats[r["two"]]
        met = r["thr"] is not None and r["thr"] >= 1.0
        r["met"] = met
        print(
            f"{r['label']:<28} {one['rps']:>15.0f} {two['rps']:>15.0f} {fmt(r['thr']):>10} "
            f"{fmt(quotient(stats, r['two'], r['one'], 'cpu')):>11} {two['cpu_pct']:>9.0f}  {'yes' if met else 'NO'}"
        )
    print()
    return rows


def cpu_split(stats) -> None:
    """Where each proxy's CPU went: its own code, and the kernel working for it (for a proxy on
    loopback, mostly TCP send and receive: the peer's receive path runs inside the sender's
    syscall)."""
    rows = [(t, w, k) for t, w, k in PROXIED + H2TLS if t != "direct" and t in stats]
    if not rows:
        return
    print("CPU per request, split (pinned, medians; CPU s/100k = user + kernel)")
    head = f"{'target':<34} {'keys':>9} {'user s/100k':>11} {'kernel s/100k':>13} {'kernel share':>12}"
    print(head)
    print("-" * len(head))
    for target, what, keys in rows:
        s = stats[target]
        total = s["user"] + s["sys"]
        share = s["sys"] / total if total else float("nan")
        print(f"{what:<34} {keys:>9} {s['user']:>11.3f} {s['sys']:>13.3f} {share:>12.0%}")
    for label, kg, ng in (("1 key", "kg-1", "ng-1"), ("1,000,000 keys", "kg-1m", "ng-1m"), ("HTTP/2 TLS", "kg-h2tls", "ng-h2tls")):
        if kg in stats and ng in stats:
            print(
                f"  {label}: keygate / nginx user time {fmt(quotient(stats, kg, ng, 'user'))}, "
                f"kernel time {fmt(quotient(stats, kg, ng, 'sys'))}"
            )
    print()


def main() -> None:
    env = os.environ.get
    clk_tck = int(env("LOAD_CLK_TCK", "100"))
    by_placement = load(sys.argv[1], clk_tck)

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
    print('          table, cycled. Upstream: nginx, 1 worker, return 200 "ok\\n". keygate: workers = 1')
    print("          unless marked; nginx proxy: worker_processes 1. All on 127.0.0.1.")
    tls = [x for x in env("LOAD_TLS_SEEN", "").split(";") if x]
    if tls:
        differ = len({x.split(" ", 1)[-1] for x in tls}) > 1
        print(
            f"TLS:      one self-signed P-256 certificate; negotiated: {', '.join(tls)}"
            + ("  <- NOT THE SAME: the TLS row compares unlike work" if differ else "")
        )
    print(f"placing:  {env('LOAD_PINNING', '?')}")
    print("logs:     keygate RUST_LOG=warn (its per-request access event off); nginx access_log off")
    print("figures:  medians over rounds; spread = (max-min)/median of req/s; CPU s/100k = the proxy's")
    print("          user+sys CPU seconds per 100,000 requests; CPU % = its CPU time / wall time (near 100")
    print("          with one worker: the proxy was the bottleneck); peak RSS = VmHWM (includes key")
    print("          loading), RSS = VmRSS after the run (nginx: the worker); * = the upstream's own worker")
    print("          on the direct row; errors / 401s = responses with status > 399 / completed")
    print("=" * 110)
    print()

    pinned, unpinned = by_placement.get("pinned", {}), by_placement.get("unpinned", {})
    verdicts = {}
    if pinned:
        print("#### PINNED (proxy on its own core)")
        print()
        table("Proxied (valid keys → upstream)", PROXIED, pinned, "errors")
        table("Rejection path (invalid keys; the upstream must see nothing)", REJECTED, pinned, "401s")
        table("HTTP/2 over TLS (h2load; valid key → upstream over HTTP/1.1)", H2TLS, pinned, "errors")
        verdicts["pinned"] = goals("pinned", pinned)
        print_goals("pinned", pinned, verdicts["pinned"])
        if "kg-1-baseline" in pinned:
            print(
                f"keygate / baseline, 1 key: throughput {fmt(quotient(pinned, 'kg-1', 'kg-1-baseline', 'rps'))}, "
                f"CPU per request {fmt(quotient(pinned, 'kg-1', 'kg-1-baseline', 'cpu'))}, "
                f"p99 {fmt(quotient(pinned, 'kg-1', 'kg-1-baseline', 'p99'))}"
            )
            print()
        cpu_split(pinned)
    worker_rows = []
    if unpinned:
        print("#### UNPINNED (nothing pinned: the scheduler places every process)")
        print()
        table("Unpinned runs", PROXIED + REJECTED + H2TLS + WORKERS, unpinned, "errors/401s")
        verdicts["unpinned"] = goals("unpinned", unpinned)
        print_goals("unpinned", unpinned, verdicts["unpinned"])
        worker_rows = print_workers(unpinned)

    met = [v for vs in verdicts.values() for v in vs] + worker_rows
    if met:
        print(f"issue 17 rows met: {sum(1 for v in met if v['met'])} of {len(met)}")

    svg = env("LOAD_SVG")
    if svg:
        note = f"{env('LOAD_WHEN', '?')}; {env('LOAD_NPROC', '?')} cores, {env('LOAD_CPU', '?')}"
        if background:
            busy = statistics.median(b for b, _ in background)
            note += f"; other work's CPU before each run: median {busy:.0f}%" + (" (NOISY)" if busy >= 10 else "")
        with open(svg, "w", encoding="utf-8") as f:
            f.write(chart.render(by_placement, verdicts, worker_rows, env("LOAD_SHAPE", ""), note))


if __name__ == "__main__":
    main()

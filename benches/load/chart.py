"""The SVG chart of benches/load.sh: per placement, requests/s and p50/p99/p99.9 latency of
keygate beside nginx for each of issue 17's rows, and keygate's workers = 2 against
workers = 1. Plain SVG text, no plotting library, so the instrument needs nothing new."""

import math
from html import escape

WIDTH = 1000
KEYGATE, NGINX, W2 = "#1f6fb4", "#8a8a8a", "#e07b00"
BAR_X, BAR_W = 250, 300  # requests/s bars: left edge and full length
LAT_X, LAT_W = 640, 320  # latency axis: left edge and length (log scale)
BAR_H, ROW_GAP = 13, 12


def _text(x, y, s, size=12, anchor="start", weight="normal", fill="#222"):
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
        f'font-weight="{weight}" fill="{fill}">{escape(s)}</text>'
    )


def _latency_axis(stats_list):
    values = [s[k] for s in stats_list for k in ("p50", "p99", "p999") if s[k] > 0]
    lo = min(values, default=0.1) / 1.5
    hi = max(values, default=10) * 1.5
    lo_log, hi_log = math.log10(lo), math.log10(hi)
    if hi_log - lo_log < 1e-9:
        hi_log = lo_log + 1

    def at(ms):
        return LAT_X + (math.log10(max(ms, lo)) - lo_log) / (hi_log - lo_log) * LAT_W

    ticks = [m * 10**e for e in range(-3, 5) for m in (1, 2, 5) if lo <= m * 10**e <= hi]
    return at, ticks


def _marker(kind, x, y, color):
    if kind == "p50":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>'
    if kind == "p99":
        return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="{color}"/>'
    return f'<path d="M{x:.1f},{y - 5:.1f} L{x + 5:.1f},{y:.1f} L{x:.1f},{y + 5:.1f} L{x - 5:.1f},{y:.1f} Z" fill="{color}"/>'


def _pairs_section(out, y, title, rows, at, ticks, max_rps):
    """rows: (label, [(series name, color, stats)…], note). Returns the next y."""
    out.append(_text(20, y, title, 15, weight="bold"))
    y += 22
    out.append(_text(BAR_X, y, "requests/s", 11, fill="#555"))
    out.append(_text(LAT_X, y, "latency, ms (log scale): ● p50  ■ p99  ◆ p99.9", 11, fill="#555"))
    y += 8
    top = y
    for label, series, note in rows:
        out.append(_text(20, y + BAR_H + 2, label, 12))
        if note:
            out.append(_text(20, y + 2 * BAR_H + 6, note, 11, fill="#555"))
        for i, (name, color, s) in enumerate(series):
            by = y + i * (BAR_H + 3)
            w = BAR_W * s["rps"] / max_rps if max_rps else 0
            out.append(f'<rect x="{BAR_X}" y="{by:.1f}" width="{w:.1f}" height="{BAR_H}" fill="{color}"/>')
            out.append(_text(BAR_X + w + 4, by + BAR_H - 2, f"{s['rps']:,.0f} {name}", 10))
            cy = by + BAR_H / 2
            out.append(
                f'<line x1="{at(s["p50"]):.1f}" y1="{cy:.1f}" x2="{at(s["p999"]):.1f}" y2="{cy:.1f}" '
                f'stroke="{color}" stroke-width="2"/>'
            )
            for kind in ("p50", "p99", "p999"):
                out.append(_marker(kind, at(s[kind]), cy, color))
        y += len(series) * (BAR_H + 3) + ROW_GAP
    for t in ticks:
        x = at(t)
        out.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{y - 6}" stroke="#ddd" stroke-width="1"/>')
        out.append(_text(x, y + 6, f"{t:g}", 10, "middle", fill="#555"))
    out.append(f'<line x1="{BAR_X}" y1="{top - 4}" x2="{BAR_X}" y2="{y - 6}" stroke="#999" stroke-width="1"/>')
    return y + 26


def render(by_placement, verdicts, worker_rows, shape, note) -> str:
    """by_placement: placement → target → median figures; verdicts: placement → report.py's
    goal rows; worker_rows: report.py's workers rows; shape and note: the subtitle lines."""
    out = []
    y = 30
    out.append(_text(20, y, "keygate beside nginx (benches/load.sh)", 18, weight="bold"))
    y += 18
    out.append(_text(20, y, shape, 11, fill="#555"))
    y += 14
    out.append(_text(20, y, note, 11, fill="#555"))
    y += 14
    out.append(
        f'<rect x="20" y="{y}" width="12" height="10" fill="{KEYGATE}"/>'
        + _text(36, y + 9, "keygate", 11)
        + f'<rect x="100" y="{y}" width="12" height="10" fill="{NGINX}"/>'
        + _text(116, y + 9, "nginx (map)", 11)
        + f'<rect x="200" y="{y}" width="12" height="10" fill="{W2}"/>'
        + _text(216, y + 9, "keygate workers = 2", 11)
    )
    y += 36
    every = [s for stats in by_placement.values() for s in stats.values()]
    at, ticks = _latency_axis(every)
    max_rps = max((s["rps"] for s in every), default=1)
    titles = {
        "pinned": "Pinned: each proxy on its own core (goal ≥ 1.00× throughput, ≤ 1.00× CPU/request)",
        "unpinned": "Unpinned: nothing pinned (goal ≥ 0.90× throughput)",
    }
    for placement in ("pinned", "unpinned"):
        stats = by_placement.get(placement) or {}
        rows = []
        for v in verdicts.get(placement, []):
            note = f"{v['thr']:.2f}× req/s, {v['cpu']:.2f}× CPU — {'met' if v['met'] else 'not met'}" if v["thr"] and v["cpu"] else ""
            rows.append((v["label"], [("keygate", KEYGATE, stats[v["kg"]]), ("nginx", NGINX, stats[v["ng"]])], note))
        if rows:
            y = _pairs_section(out, y, titles[placement], rows, at, ticks, max_rps)
    if worker_rows:
        stats = by_placement.get("unpinned") or {}
        rows = []
        for r in worker_rows:
            note = f"{r['thr']:.2f}× — {'met' if r['met'] else 'not met'}" if r["thr"] else ""
            rows.append(
                (r["label"], [("workers = 1", KEYGATE, stats[r["one"]]), ("workers = 2", W2, stats[r["two"]])], note)
            )
        y = _pairs_section(out, y, "keygate workers = 2 against workers = 1, unpinned (goal ≥ 1.00×)", rows, at, ticks, max_rps)
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y}" viewBox="0 0 {WIDTH} {y}" '
        f'font-family="DejaVu Sans, Helvetica, Arial, sans-serif">'
        f'<rect width="{WIDTH}" height="{y}" fill="white"/>'
    )
    return head + "\n".join(out) + "</svg>\n"

"""The report as one self-contained HTML page: inline styles, inline SVG drawings and data-URI pictures,
no scripts and no network fetches, so it opens offline in any browser. Long parts (graph code, Relax and
TIR) sit in <details> elements, shown on demand.
"""
from __future__ import annotations

import base64
import html

from .graph_svg import draw

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#1a1a1a;padding:0 16px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:480px;font-size:12px}
.kept{color:#176117}.rolled{color:#a11}.legend span{display:inline-block;padding:1px 8px;margin-right:6px;
border:1px solid #555;border-radius:3px;font-size:12px}.bar{fill:#2e86ab}.muted{color:#666}
"""


def _e(v) -> str:
    return html.escape(str(v))


def _table(head: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        out.append("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>")
    return "".join(out) + "</table>"


def _fold(summary: str, content: str) -> str:
    """HTML content shown on demand."""
    return f"<details><summary>{_e(summary)}</summary>{content}</details>"


def _details(summary: str, text: str) -> str:
    return _fold(summary, f"<pre>{_e(text)}</pre>")


def _passes(report) -> str:
    rows = []
    for r in report.passes:
        guard = ""
        if r.guard is not None and getattr(r.guard, "loss", None) is not None:
            g = r.guard
            guard = (f'{_e(g.metric)} loss {g.loss:.4g} &le; {g.budget:g}: <span class="kept">kept {len(g.kept)}'
                     f'</span>' + (f', <span class="rolled">rolled back {_e(", ".join(n for n, _ in g.rolled_back))}'
                                   f'</span>' if g.rolled_back else ""))
        elif r.guard is not None:
            guard = '<span class="muted">unverified (no calibration data)</span>'
        where = "<br>".join(_e(loc) for loc in r.locations[:8]) + (" ..." if len(r.locations) > 8 else "")
        notes = "<br>".join(_e(n) for n in r.notes)
        change = "" if r.added is None else f"<br>+{r.added} &minus;{r.removed}"
        rows.append([_e(r.name), r.matches, where, f"{r.nodes_before} &rarr; {r.nodes_after}{change}",
                     f"{r.seconds * 1e3:.1f}", guard, notes])
    return _table(["pass", "matches", "where (user source)", "nodes", "ms", "accuracy guard", "notes"], rows, {1, 4})


def _stats(report) -> str:
    if not (report.before and report.after):
        return ""
    a, b = report.before["stats"], report.after["stats"]
    rows = [["ops", a["nodes"], b["nodes"]], ["multiply-accumulates", f"{a['macs']:,}", f"{b['macs']:,}"],
            ["FLOPs (2 per multiply-accumulate)", f"{2 * a['macs']:,}", f"{2 * b['macs']:,}"],
            ["float multiplications", f"{a['float_macs']:,}", f"{b['float_macs']:,}"],
            ["weight bytes", f"{a['weight_bytes']:,}", f"{b['weight_bytes']:,}"]]
    ops = sorted(set(a["ops"]) | set(b["ops"]), key=lambda o: -(a["ops"].get(o, 0) + b["ops"].get(o, 0)))
    hist = [[_e(o), a["ops"].get(o, 0), b["ops"].get(o, 0)] for o in ops]
    return (_table(["", "before", "after"], rows, {1, 2}) + "<h3>Operator histogram</h3>"
            + _table(["op", "before", "after"], hist, {1, 2}))


def _graphs(report) -> str:
    out = []
    if report.after and report.after.get("graph") is not None:
        svg, colour = draw(report.after["graph"], "graph after the passes")
        legend = "".join(f'<span style="background:{c}">{_e(p)}</span>' for p, c in colour.items())
        out.append(f'<p class="legend">Rewritten nodes by pass: {legend or "none"}</p><div>{svg}</div>')
    if report.before:
        out.append(_details("graph before the passes (code)", report.before["code"]))
    if report.after:
        out.append(_details("graph after the passes (code)", report.after["code"]))
    return "".join(out)


def _fallbacks(report) -> str:
    low = report.lowering
    if low is None:
        return "<p>Not lowered (lower=False): the graph ran in eager PyTorch.</p>"
    rows = [[_e(op), len(locs), _e("no TVM lowering"), "<br>".join(_e(l) for l in sorted(set(locs))[:5])]
            for op, locs in low.fallbacks.items()]
    rows += [[_e(", ".join(r["ops"][:6])), 1, _e(r["reason"]), f"region {r['region']}"] for r in low.eager_regions]
    rows += [[_e(", ".join(k.ops[:6])), 1, _e(k.reason), _e(k.name)] for k in low.kernels if k.choice != "tvm"]
    if not rows:
        return "<p>None: every op ran on a TVM kernel or a library call.</p>"
    return _table(["op(s)", "uses", "why in eager", "where"], rows, {1})


def _kernels(report) -> str:
    low = report.lowering
    if low is None:
        return ""
    rows = []
    for k in low.kernels:
        t = f"{k.tvm_us:.0f}" if k.tvm_us is not None else ""
        e = f"{k.eager_us:.0f}" if k.eager_us is not None else ""
        kind = "TVM, default schedule" if k.choice == "tvm" else "eager (torch)"
        rows.append([_e(k.name), _e(", ".join(k.ops[:8])) + (" ..." if len(k.ops) > 8 else ""), kind, t, e,
                     _e(k.reason)])
    lib = _table(["library call", "uses"], [[_e(n), c] for n, c in sorted(low.library_calls.items())], {1})
    relax, seen = [], set()
    for k in low.kernels:  # one entry per compiled kernel (equal regions share one)
        if k.relax and k.kernel not in seen:
            seen.add(k.kernel)
            users = [r.name for r in low.kernels if r.kernel == k.kernel]
            relax.append(_details(f"{k.kernel} ({', '.join(users[:6])}{' ...' if len(users) > 6 else ''}): Relax",
                                  k.relax))
            relax.append(_details(f"{k.kernel}: scheduled TIR", _tir(low, k.kernel)))
    relax = "".join(relax)
    tir = "".join(_details(f"{name}: custom TIR kernel", text) for name, text in sorted(low.tir.items()))
    return (f"<p>Target {_e(low.target)}; {low.unique_kernels} unique kernels; "
            f"{'cache hit' if low.cache_hit else 'compiled'} in {low.seconds:.1f} s. Every TVM kernel runs its "
            "default schedule (effopt's custom kernels are pre-scheduled; no autotuned schedules yet).</p>"
            + _table(["region", "ops", "runs on", "TVM us", "eager us", "choice"], rows, {3, 4}) + lib
            + "<h3>Kernels: Relax functions, their scheduled TIR, effopt's custom TIR kernels</h3>" + relax + tir)


def _tir(low, kernel: str) -> str:
    try:
        return low.kernel_tir(kernel)
    except Exception as e:  # noqa: BLE001 - the page still renders without it
        return f"(not available: {type(e).__name__}: {e})"


def _profile(report) -> str:
    if not report.profile:
        return "<p>No profile (effopt.explain(..., profile=True) measures one).</p>"
    rows = sorted(report.profile, key=lambda p: -p["ms"])
    total = sum(p["ms"] for p in rows) or 1.0
    top = rows[:40]
    bar_h, width = 16, 520
    bars = []
    for i, p in enumerate(top):
        w = max(1.0, width * p["ms"] / top[0]["ms"])
        label = f"{p['node']} ({p['kind']}: {', '.join(p['ops'][:3])})"
        bars.append(f'<text x="0" y="{i * bar_h + 12}" font-size="11">{_e(label[:60])}</text>'
                    f'<rect class="bar" x="380" y="{i * bar_h + 2}" width="{w:.1f}" height="{bar_h - 4}"/>'
                    f'<text x="{385 + w:.0f}" y="{i * bar_h + 12}" font-size="11">{p["ms"]:.3f} ms</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{380 + width + 90}" height="{len(top) * bar_h + 4}">'
           + "".join(bars) + "</svg>")
    table = _table(["node", "runs on", "ops", "ms", "share"],
                   [[_e(p["node"]), p["kind"], _e(", ".join(p["ops"][:6])), f"{p['ms']:.3f}",
                     f"{100 * p['ms'] / total:.1f}%"] for p in rows], {3, 4})
    by_op = _table(["runs on", "op(s)", "calls", "ms", "share"],
                   [[g["kind"], _e(g["ops"]), g["calls"], f"{g['ms']:.3f}", f"{100 * g['ms'] / total:.1f}%"]
                    for g in report.profile_by_op()], {2, 3, 4})
    wall = report.wall
    outside = "" if not wall else (
        f"<p>Wall time: the graph as one call {wall['graph_ms']:.2f} ms, {wall['graph_ms'] - wall['kernels_ms']:+.2f} ms "
        f"beside its kernels' sum (dispatch, copies at region boundaries, thread pools); the model called through "
        f"torch.compile {wall['call_ms']:.2f} ms.</p>")
    return f"<p>Total {total:.2f} ms over {len(rows)} kernels and ops (median of runs on the example inputs).</p>" \
        + outside + by_op + svg + _fold("every kernel and op", table)


def _images(report) -> str:
    out = []
    for name, png in report.images.items():
        if png:
            b64 = base64.b64encode(png).decode()
            out.append(f'<figure><img alt="{_e(name)}" src="data:image/png;base64,{b64}">'
                       f"<figcaption>{_e(name.replace('_', ' '))}</figcaption></figure>")
    return "".join(out)


def frontier(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed-up, loss) that no other point beats on both (faster and lower loss),
    by speed-up."""
    keep = [i for i, (x, y) in enumerate(points)
            if not any((x2 >= x and y2 <= y) and (x2, y2) != (x, y) for x2, y2 in points)]
    return sorted(keep, key=lambda i: points[i][0])


def _auto(report) -> str:
    """approximate='auto': every candidate as held-out loss against speed-up over the exact compile, the
    chosen one ringed, the frontier joined."""
    info = report.auto
    if not info or not info.get("candidates"):
        return ""
    cands = info["candidates"]
    pts = [(1.0 / c["ms"], c["held_out"]) for c in cands] + [(1.0, 0.0)]
    labels = [c["label"] for c in cands] + ["exact"]
    W, H, P = 560, 300, 50
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs + [1.0]) * 0.95, max(xs) * 1.05
    y1 = max(ys + [1e-6]) * 1.1

    def X(v):
        return P + (v - x0) / max(x1 - x0, 1e-9) * (W - 2 * P)

    def Y(v):
        return H - P + 10 - v / y1 * (H - 2 * P)

    chosen = info.get("speedup_over_exact")
    dots = []
    for (x, y), label, c in zip(pts, labels, cands + [None]):
        colour = "#1a7f37" if c is None or c["within"] else "#cf222e"
        ring = chosen is not None and abs(x - chosen) < 1e-9
        dots.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="{7 if ring else 4}" fill="{colour}" '
                    f'stroke="{"#000" if ring else "none"}" stroke-width="2"><title>{_e(label)}: {x:.2f}x, loss '
                    f'{y:.4g}</title></circle>')
    front = frontier(pts)
    line = " ".join(f"{X(pts[i][0]):.1f},{Y(pts[i][1]):.1f}" for i in front)
    budget = next((r.guard.budget for r in report.passes if r.guard is not None and r.guard.budget), None)
    bline = (f'<line x1="{P}" x2="{W - P}" y1="{Y(budget):.1f}" y2="{Y(budget):.1f}" stroke="#888" '
             f'stroke-dasharray="4"/><text x="{W - P}" y="{Y(budget) - 4:.1f}" font-size="11" text-anchor="end">'
             f'budget {budget:g}</text>') if budget and budget <= y1 else ""
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}">'
           f'<line x1="{P}" y1="{H - P + 10}" x2="{W - P}" y2="{H - P + 10}" stroke="#000"/>'
           f'<line x1="{P}" y1="{P - 10}" x2="{P}" y2="{H - P + 10}" stroke="#000"/>'
           f'<text x="{W / 2}" y="{H - 12}" font-size="12" text-anchor="middle">speed-up over the exact compile</text>'
           f'<text x="14" y="{H / 2}" font-size="12" transform="rotate(-90 14 {H / 2})" text-anchor="middle">'
           f'held-out loss</text><polyline points="{line}" fill="none" stroke="#0969da"/>{bline}'
           + "".join(dots) + "</svg>")
    rows = [[_e(c["label"]), f"{1 / c['ms']:.2f}x", f"{c['held_out']:.4g}", "yes" if c["within"] else "no",
             c["matches"], _e(c["stage"])] for c in cands]
    head = (f"<p>{'The stored choice (searched in an earlier compile)' if info.get('reused') else 'Searched'}: "
            f"<b>{_e(' + '.join(f'{k}={v}' for k, v in info['chosen'].items()) or 'exact')}</b>, "
            f"{info['speedup_over_exact']:.2f}x the exact compile. Green: within budget; ringed: chosen; "
            "blue: the frontier.</p>")
    return head + svg + _table(["candidate", "speed-up", "held-out loss", "within budget", "rewrites", "stage"],
                               rows, {1, 2, 4})


def render(report) -> str:
    sections = [("Passes", _passes(report)), ("Graph statistics", _stats(report)), ("Graph", _graphs(report)),
                ("Fallbacks", _fallbacks(report)), ("Kernels", _kernels(report)), ("Profile", _profile(report))]
    if report.auto:
        sections.insert(1, ("Approximate search", _auto(report)))
    pictures = _images(report)
    if pictures:
        sections.append(("Token merging", pictures))
    notes = "".join(f"<p>{_e(n)}</p>" for n in report.notes)
    body = "".join(f'<h2 id="{t.lower().replace(" ", "-")}">{t}</h2>{s}' for t, s in sections)
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>effopt report</title>"
            f"<style>{_CSS}</style></head><body><h1>effopt report</h1><p>{_e(report.headline())}</p>{notes}"
            f"{body}</body></html>")


__all__ = ["render"]

"""The graph as an SVG arc diagram: one row per op in execution order, data edges as arcs on the left, nodes
coloured by the pass that produced them (node.meta["effopt_pass"], set by the backend) so rewrites stand
out. Views, getitems and constants are left out (they are free). Repeated blocks collapse: a run of nodes
from one module instance (`blocks.7`, `encoder.layer.7`) whose op sequence equals an earlier block's is
drawn as one row ("blocks.2-11: 10 blocks as blocks.1"), so a 12-layer ViT stays a page tall.
"""
from __future__ import annotations

import html
import re

import torch.fx as fx

from .stats import FREE_OPS, PASS_KEY, op_name

ROW, WIDTH, X0 = 18, 760, 300
_HIDDEN = FREE_OPS | {"clone"}  # not drawn: free, or a copy that changes no value
PALETTE = ["#e4572e", "#17bebb", "#ffc914", "#76b041", "#7d5ba6", "#f08cae", "#2e86ab", "#a23b72", "#f18f01"]
_BLOCK = re.compile(r"^(.*?[A-Za-z_]\w*\.\d+)(?:\.|$)")


def _block(n: fx.Node) -> str | None:
    """The innermost module instance with an index in its path (a transformer block), from dynamo's
    module stack."""
    stack = n.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0] if isinstance(list(stack.values())[-1], tuple) else str(list(stack)[-1])
    path = str(path).replace("L['self'].", "").replace("L__self___", "")
    m = _BLOCK.match(path)
    return m.group(1) if m else None


def _signature(run: list[fx.Node]) -> tuple:
    """What makes two blocks the same drawing: their ops, in order, and the passes that produced them."""
    return tuple((op_name(n), n.meta.get(PASS_KEY)) for n in run)


def _rows(graph: fx.Graph) -> list:
    """Rows to draw: nodes, or ("collapsed", label, count) for repeated blocks."""
    nodes = [n for n in graph.nodes if n.op in ("placeholder", "output")
             or (n.op == "call_function" and op_name(n) not in _HIDDEN)]
    keys = [_block(n) if n.op == "call_function" else None for n in nodes]
    last = None  # nodes a pass inserted inside a block (no module of their own) belong to it
    for i, k in enumerate(keys):
        if k is None and last is not None and nodes[i].op == "call_function":
            nxt = next((k2 for k2 in keys[i + 1:] if k2 is not None), None)
            keys[i] = last if nxt == last else None
        elif k is not None:
            last = k
    runs: list[tuple[str | None, list[fx.Node]]] = []
    for n, key in zip(nodes, keys):
        if runs and runs[-1][0] == key and key is not None:
            runs[-1][1].append(n)
        else:
            runs.append((key, [n]))
    rows, signatures = [], {}
    i = 0
    while i < len(runs):
        key, run = runs[i]
        sig = _signature(run)
        if key is not None and sig in signatures:  # collapse this and the following identical blocks
            j = i
            while j < len(runs) and runs[j][0] is not None and _signature(runs[j][1]) == sig:
                j += 1
            first, last = runs[i][0], runs[j - 1][0]
            label = f"{first}" + (f" .. {last}" if j - i > 1 else "") + \
                f": {j - i} block(s) as {signatures[sig]} ({len(run)} ops each)"
            rows.append(("collapsed", label, (j - i) * len(run)))
            i = j
            continue
        if key is not None:
            signatures[sig] = key
        rows.extend(run)
        i += 1
    return rows


def draw(gm: fx.GraphModule, title: str = "") -> tuple[str, dict[str, str]]:
    """(SVG text, {pass name: colour}) of gm's graph."""
    rows = _rows(gm.graph)
    passes = sorted({n.meta.get(PASS_KEY) for n in rows if isinstance(n, fx.Node) and n.meta.get(PASS_KEY)})
    colour = {p: PALETTE[i % len(PALETTE)] for i, p in enumerate(passes)}
    y_of: dict[fx.Node, int] = {}
    body, arcs = [], []
    for i, r in enumerate(rows):
        y = 10 + i * ROW
        if isinstance(r, tuple):
            body.append(f'<rect x="{X0}" y="{y}" width="{WIDTH - X0 - 10}" height="{ROW - 4}" rx="3" '
                        f'fill="#eeeeee" stroke="#888" stroke-dasharray="4 2"/>'
                        f'<text x="{X0 + 6}" y="{y + ROW - 8}" class="c">{html.escape(r[1])}</text>')
            continue
        y_of[r] = y
        p = r.meta.get(PASS_KEY)
        fill = colour.get(p, "#ffffff")
        label = r.name if r.op in ("placeholder", "output") else op_name(r)
        tip = f"{r.name} = {label}" + (f" (from {p})" if p else "")
        body.append(f'<g class="node{" rewritten" if p else ""}" data-pass="{html.escape(p or "")}">'
                    f'<title>{html.escape(tip)}</title>'
                    f'<rect x="{X0}" y="{y}" width="{WIDTH - X0 - 10}" height="{ROW - 4}" rx="3" fill="{fill}" '
                    f'stroke="#555"/><text x="{X0 + 6}" y="{y + ROW - 8}">{html.escape(label)}</text></g>')
    for n, y in y_of.items():
        for src in n.all_input_nodes:
            while src not in y_of and src.op == "call_function" and op_name(src) in _HIDDEN and src.all_input_nodes:
                src = src.all_input_nodes[0]  # through free views to the value they show
            if src in y_of and y_of[src] < y:
                y0, y1 = y_of[src] + ROW / 2 - 2, y + ROW / 2 - 2
                r = min(X0 - 10, (y1 - y0) / 2)
                arcs.append(f'<path d="M{X0} {y0:.0f} C{X0 - r:.0f} {y0:.0f} {X0 - r:.0f} {y1:.0f} {X0} {y1:.0f}" '
                            f'fill="none" stroke="#9aa" stroke-width="0.8"/>')
    height = 20 + len(rows) * ROW
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
           f'viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{html.escape(title)}">'
           '<style>text{font:11px monospace;fill:#111}text.c{fill:#444;font-style:italic}</style>'
           + "".join(arcs) + "".join(body) + "</svg>")
    return svg, colour


__all__ = ["draw"]

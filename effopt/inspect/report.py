"""The report of a compile: pass records, the graph before and after the passes, lowering decisions and
fallbacks, and (from effopt.explain) a profile on the example inputs; as text, JSON and an HTML page."""
from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from typing import Any

from ..graph import collect, publish

_LAST: list = [None]
WIDTH = 100  # the text form's line width


@dataclass
class Report:
    passes: list
    lowering: Any
    graph: Any  # the compiled GraphModule (TVM regions as submodules); eager runs instead where
    # versus_eager says it lost
    before: dict | None = None  # {"code", "stats"} of the captured ATen graph
    after: dict | None = None  # {"code", "stats", "graph"} after the passes, before lowering
    profile: list[dict] | None = None  # effopt.explain: median ms per TVM region / library call / eager op
    # effopt.explain: the wall time beside the kernels' sum: {"kernels_ms" (the profile's sum), "graph_ms" (the
    # compiled graph run as one call), "call_ms" (the torch.compile'd model called as the user calls it)}
    wall: dict | None = None
    images: dict[str, bytes | None] = field(default_factory=dict)  # PNGs (token merges)
    notes: list[str] = field(default_factory=list)
    compile_seconds: float | None = None
    # the compiled graph timed against the captured graph in eager on the example inputs (kernel_choice
    # 'measure'): {"compiled_ms", "eager_ms", "speedup", "use_compiled"}; eager ran where it lost
    versus_eager: dict | None = None
    # approximate='auto': {"chosen", "candidates" (each: settings, label, ms relative to the exact compile,
    # loss, held_out, within, matches), "speedup_over_exact", "reused"}
    auto: dict | None = None
    # approximate options with calibration: the accuracy budget judged on what runs: {"budget", "decided" (the
    # guards' loss on the inputs they decided on), "rewritten" (the rewritten graph before lowering) and
    # "compiled" (the lowered model) on "inputs" ("held-out", else "calibration"), "action" (None, or what
    # ran instead because lowering pushed the loss over the budget)}
    budget: dict | None = None
    runs_eager: bool = False  # the whole compiled graph lost to eager PyTorch, which runs instead

    # ---- text --------------------------------------------------------------------------------------
    def __str__(self) -> str:
        lines = [self.headline(), "passes:"]
        lines += [f"  {line}" for r in self.passes if r.matches or r.notes for line in str(r).splitlines()]
        quiet = [r.name for r in self.passes if not (r.matches or r.notes)]
        if quiet:
            lines.append(f"  no matches: {', '.join(quiet)}")
        if self.before and self.after:
            lines.append("graph: " + _stats_change(self.before["stats"], self.after["stats"]))
        if self.lowering is not None:
            lines += str(self.lowering).splitlines()
            lines += [f"  eager region {r['region']} ({', '.join(r['ops'][:4])}): {r['reason']}"
                      for r in self.lowering.eager_regions]
        if self.profile:
            total = sum(p["ms"] for p in self.profile)
            lines.append(f"profile on the example inputs: {total:.2f} ms in {len(self.profile)} kernels and ops; "
                         "where the time goes:")
            lines += [f"  {g['ms']:8.3f} ms {100 * g['ms'] / total:5.1f}%  {g['calls']:3d} x {g['kind']:7s} {g['ops']}"
                      for g in self.profile_by_op()[:6]]
        if self.wall:
            w = self.wall
            lines.append(f"wall time: the graph {w['graph_ms']:.2f} ms against its kernels' {w['kernels_ms']:.2f} ms "
                         f"({w['graph_ms'] - w['kernels_ms']:+.2f} ms between kernels: dispatch, copies at region "
                         f"boundaries, thread pools); a call through torch.compile {w['call_ms']:.2f} ms")
        lines += self.notes
        return "\n".join(_wrap(lines))

    def profile_by_op(self) -> list[dict]:
        """The profile summed per kind and op list (a TVM region by its ops), slowest first."""
        groups: dict = {}
        for p in self.profile or []:
            key = (p["kind"], ", ".join(p["ops"][:4]) + (" ..." if len(p["ops"]) > 4 else ""))
            g = groups.setdefault(key, {"kind": key[0], "ops": key[1], "calls": 0, "ms": 0.0})
            g["calls"] += 1
            g["ms"] += p["ms"]
        return sorted(groups.values(), key=lambda g: -g["ms"])

    def headline(self) -> str:
        rewrites = sum(r.matches for r in self.passes)
        low = self.lowering
        tail = ""
        if low is not None:
            tvm = sum(k.choice == "tvm" for k in low.kernels)
            tail = (f"; {tvm} TVM kernel(s), {sum(low.library_calls.values())} library call(s), "
                    f"{sum(len(v) for v in low.fallbacks.values())} op(s) in eager")
        v = self.versus_eager
        if v is not None:
            tail += (f"; {v['speedup']:.2f}x eager on the example inputs" if v["use_compiled"] else
                     f"; runs in EAGER: the compiled graph measured {v['compiled_ms']:.3g} ms against eager's "
                     f"{v['eager_ms']:.3g} ms")
            if v.get("buckets"):  # a graph of symbolic sizes, decided per size bucket of its calls
                tail += "; per size bucket: " + ", ".join(
                    f"rows <= {b} {'compiled' if d['use_compiled'] else 'eager'} ({d['speedup']:.2f}x)"
                    for b, d in sorted(v["buckets"].items()))
        return f"effopt report: {rewrites} rewrite(s) by {sum(bool(r.matches) for r in self.passes)} pass(es){tail}"

    def rewrites(self) -> dict[str, int]:
        return {r.name: r.matches for r in self.passes}

    # ---- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        low = self.lowering
        return {
            "passes": [_record_dict(r) for r in self.passes],
            "graph_before": self.before["stats"] if self.before else None,
            "graph_after": self.after["stats"] if self.after else None,
            "lowering": None if low is None else {
                "target": low.target, "seconds": low.seconds, "cache_hit": low.cache_hit,
                "kernels": [{"name": k.name, "ops": k.ops, "choice": k.choice, "tvm_us": k.tvm_us,
                             "eager_us": k.eager_us, "reason": k.reason}
                            for k in low.kernels],
                "tuned": low.tuned, "tuning_db": low.tuning_db,
                "library_calls": low.library_calls, "fallbacks": low.fallbacks,
                "eager_regions": low.eager_regions},
            "profile": self.profile,
            "wall": self.wall,
            "notes": self.notes,
            "compile_seconds": self.compile_seconds,
            "versus_eager": self.versus_eager,
            "auto": self.auto,
            "budget": self.budget,
            "runs_eager": self.runs_eager,
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    # ---- HTML --------------------------------------------------------------------------------------
    def to_html(self) -> str:
        from .html import render

        return render(self)

    def save_html(self, path: str) -> str:
        """A self-contained page (no network fetches: styles, drawings and pictures inline)."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.to_html())
        return path


def _record_dict(r) -> dict:
    g = r.guard
    return {"name": r.name, "matches": r.matches, "locations": r.locations, "nodes_before": r.nodes_before,
            "nodes_after": r.nodes_after, "nodes_added": r.added, "nodes_removed": r.removed, "seconds": r.seconds, "notes": r.notes, "tokens": r.tokens,
            "layers": r.layers,
            "guard": None if g is None else {"metric": g.metric, "budget": g.budget, "loss": g.loss, "kept": g.kept,
                                             "rolled_back": g.rolled_back, "evaluations": g.evaluations}}


def _mega(v: float) -> str:
    return f"{v / 1e9:.2f} G" if v >= 1e9 else f"{v / 1e6:.1f} M"


def _stats_change(a: dict, b: dict) -> str:
    return (f"{a['nodes']} -> {b['nodes']} ops; MACs {_mega(a['macs'])} -> {_mega(b['macs'])} (float "
            f"multiplications {_mega(a['float_macs'])} -> {_mega(b['float_macs'])}); weights "
            f"{a['weight_bytes'] / 2 ** 20:.2f} -> {b['weight_bytes'] / 2 ** 20:.2f} MB")


def _wrap(lines: list[str]) -> list[str]:
    out = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()))
        out += textwrap.wrap(line, WIDTH, subsequent_indent=indent + "    ", break_long_words=True,
                             break_on_hyphens=False) or [""]
    return out


def set_last_report(report: Report) -> None:
    _LAST[0] = report
    publish("reports", report)


def collect_reports():
    """The reports of every graph compiled inside the block (a model with graph breaks has several)."""
    return collect("reports")


def last_report() -> Report | None:
    """The report of the most recent graph effopt compiled in this process."""
    return _LAST[0]

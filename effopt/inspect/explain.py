"""`effopt.explain(model, example_inputs, **options)`: compile the model as `torch.compile(backend="effopt")`
would with the same options, run it once on the example inputs, and return the report of what happened:
the pass records, the graph before and after, the lowering's kernels and fallbacks, and a profile of where
the time goes on those inputs (each TVM region, library call and eager op, median of a few runs).

It resets dynamo's caches (as a fresh torch.compile would need to see the model again).
"""
from __future__ import annotations

import io
import math
import statistics
import time
import warnings

import torch
import torch.fx as fx

from ..graph import split_inputs
from .stats import FREE_OPS, op_name

def _kind(gm: fx.GraphModule, n: fx.Node) -> str:
    from ..lowering.library import LIBRARY_OPS

    if n.op == "call_module":
        return "tvm"
    return "library" if n.target in LIBRARY_OPS else "eager"


def profile_graph(gm: fx.GraphModule, inputs: list, rounds: int = 5, region_ops: dict | None = None) -> list[dict]:
    """Median wall time of each compute node of the compiled graph (TVM regions are call_module nodes, whose
    ops `region_ops` names), running the graph node by node `rounds` times; views and getitems are free
    and left out."""
    times: dict[fx.Node, list[float]] = {}

    class Timed(fx.Interpreter):
        def run_node(self, n):
            t0 = time.perf_counter()
            out = super().run_node(n)
            if n.op in ("call_module", "call_function"):
                times.setdefault(n, []).append(time.perf_counter() - t0)
            return out

    with torch.no_grad():
        for _ in range(rounds):
            Timed(gm).run(*inputs)
    rows = []
    for n, ts in times.items():
        if n.op == "call_function" and op_name(n) in FREE_OPS:
            continue
        ops = (region_ops or {}).get(n.target, [str(n.target)]) if n.op == "call_module" else [op_name(n)]
        rows.append({"node": n.name, "kind": _kind(gm, n), "ops": list(ops), "ms": statistics.median(ts) * 1e3})
    return rows


def wall_times(report, compiled, args, kwargs, leaves, rounds: int = 5) -> dict:
    """The wall time beside the profile's sum of kernels: the compiled graph run as one call (what runs between
    the kernels: dispatch, copies at region boundaries, thread pools), and the torch.compile'd model as the
    user calls it (dynamo's guards, and the whole-graph decision)."""
    from ..timing import interleaved_medians

    with torch.no_grad():
        m = interleaved_medians({"graph": lambda: report.graph(*leaves), "call": lambda: compiled(*args, **kwargs)},
                                [], rounds=max(rounds, 3), warmup=1)
    return {"kernels_ms": sum(p["ms"] for p in report.profile), "graph_ms": m["graph"] * 1e3,
            "call_ms": m["call"] * 1e3}


def _token_picture(model, example_inputs, options) -> bytes | None:
    """The merged patches of the first image, as PNG bytes, for token reduction on an image model."""
    from .token_view import draw_token_merges, token_sources

    args, kwargs = split_inputs(example_inputs)
    images = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() == 4]
    if not images:
        return None
    image = images[0]
    try:
        source = token_sources(model, example_inputs, **options)
    except ValueError:
        return None
    side = math.isqrt(source.shape[1] - 1)
    if side * side != source.shape[1] - 1 or image.shape[-1] % side:
        return None  # not a square grid of patches after one CLS token
    fig = draw_token_merges(image[0], source[0], image.shape[-1] // side, title="merged patches (first image)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def explain(model: torch.nn.Module, example_inputs, profile: bool = True, rounds: int = 5, **options):
    """The report (effopt.inspect.report.Report) of compiling `model` with `options` (the backend's options) and
    running it on `example_inputs` (a tensor, a tuple of positional inputs, or a dict of keyword inputs)."""
    from ..options import Options
    from .report import collect_reports

    Options.from_dict(options)  # bad options raise here, naming the valid ones
    args, kwargs = split_inputs(example_inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="effopt", options=dict(options))
    with collect_reports() as reports, torch.no_grad():
        t0 = time.perf_counter()
        compiled(*args, **kwargs)
        compile_s = time.perf_counter() - t0
    if not reports:
        raise RuntimeError("effopt.explain: torch.compile did not call the effopt backend (the model ran "
                           "without a graph to compile)")
    report = max(reports, key=lambda r: r.after["stats"]["nodes"] if r.after else 0)
    report.compile_seconds = compile_s
    if len(reports) > 1:
        report.notes.append(f"the model compiled as {len(reports)} graphs (graph breaks); this report covers the "
                            f"largest ({report.after['stats']['nodes']} ops)")
    if profile:
        leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        try:
            regions = {k.name: [o for o in k.ops if o not in FREE_OPS]
                       for k in report.lowering.kernels} if report.lowering else {}
            report.profile = profile_graph(report.graph, leaves, rounds, regions)
            report.wall = wall_times(report, compiled, args, kwargs, leaves, rounds)
        except Exception as e:  # noqa: BLE001 - e.g. a graph break left inputs this graph does not take
            report.notes.append(f"profile skipped: {type(e).__name__}: {e}")
    if any(options.get(k) is not None for k in ("token_merge", "token_prune")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report.images["token_merges"] = _token_picture(model, example_inputs, options)
    torch._dynamo.reset()
    return report


__all__ = ["explain", "profile_graph", "wall_times"]

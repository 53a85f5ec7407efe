"""Tuning tasks: every TVM kernel a compiled model runs, deduplicated by structure, weighted by use.

A model is compiled as `torch.compile(model, backend="effopt")` would compile it (same graph passes),
and its graph is cut into regions and converted as the lowering stage does. Three kinds of task come out:

* `tir`: a fused TIR kernel (elementwise, normalization, softmax, reductions, token merging's
  matching and scatter kernels), keyed by its structural hash; MetaSchedule searches its schedules.
* `knobs`: one of effopt's hand-scheduled kernels (flash attention, int8 linear, shift linear), keyed by
  its parameters and shapes; the tuner measures its tile settings (kernels/tunable.py).
* `gemm`: a frozen-weight linear that runs on the library (MKL/oneDNN), as a TIR matmul of its shape
  (MetaSchedule searches it) and, on CPUs with AVX-512, AVX2 + FMA or NEON, effopt's packed kernel (its tiles are measured); the
  faster replaces the library only where it is measured faster than the library.

`weight` is how many times the kernel runs per forward; kernels with symbolic sizes are listed as skipped
(MetaSchedule measures concrete shapes).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..graph import collect, split_inputs
from ..lowering.tuned import gemm_func, gemm_key, gemm_parts, normalized


@dataclass
class Task:
    key: str  # "tir:<hash>", "gemm:MxNxK[+bias]", "knobs:<kernel>:<digest>": the database's task key
    kind: str  # "tir" | "gemm" | "knobs"
    name: str
    weight: int = 1
    flops: float = 0.0
    mod: object = field(default=None, repr=False)  # IRModule {"main": unscheduled PrimFunc} (tir, gemm)
    knob: object = field(default=None, repr=False)  # kernels.tunable.KnobTask (knobs)
    gemm: tuple | None = None  # (M, N, K, has_bias)

    @property
    def workload(self) -> str | None:
        return self.key.split(":", 1)[1] if self.kind == "tir" else None


@dataclass
class Extraction:
    tasks: list[Task]
    skipped: list[tuple[str, str]]  # (kernel, why it is not a tuning task)


def _flops(mod) -> float:
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        return float(estimate_tir_flops(mod))
    except Exception:  # noqa: BLE001 - opaque kernels
        return 0.0


def _static(func) -> bool:
    from tvm.s_tir import meta_schedule as ms

    try:
        ms.arg_info.ArgInfo.from_prim_func(func)  # refuses symbolic sizes
        return True
    except Exception:  # noqa: BLE001
        return False


def _call_counts(mod) -> dict[str, int]:
    """PrimFunc name -> call_tir sites in the Relax functions of `mod`, times each function's `multiplicity`
    attribute (how many regions share it)."""
    from tvm import relax

    counts: dict[str, int] = {}
    for _, f in mod.functions_items():
        if not isinstance(f, relax.Function):
            continue
        mult = int(f.attrs["effopt_multiplicity"]) if f.attrs is not None and "effopt_multiplicity" in f.attrs else 1

        def visit(e, mult=mult):
            if isinstance(e, relax.Call) and getattr(e.op, "name", "") in ("relax.call_tir", "relax.call_tir_inplace") \
                    and e.args and hasattr(e.args[0], "name_hint"):
                counts[e.args[0].name_hint] = counts.get(e.args[0].name_hint, 0) + mult

        relax.analysis.post_order_visit(f.body, visit)
    return counts


def graph_tasks(gm, target, gemm_decisions: dict | None = None) -> Extraction:
    """The tasks of one rewritten ATen graph (the graph effopt lowers; changed here), for a tvm Target.
    `gemm_decisions`: the lowering stage's MKL/oneDNN choices (lowering.library.select_gemm_kernels),
    which are made before the graph is cut into regions (oneDNN takes a GELU into its GEMM)."""
    import tvm

    from ..lowering.build import module_of
    from ..lowering.build import fused_tir
    from ..lowering.kernels import tunable
    from ..lowering.partition import partition
    from ..lowering.to_relax import Converter
    from ..lowering.tuning_db import workload_hash

    cpu = target.kind.name == "llvm"
    knob_tasks: dict[str, Task] = {}

    def collect(t):  # every hand-scheduled kernel the conversion builds (CPU kernels only)
        if cpu:
            task = knob_tasks.setdefault(t.key, Task(t.key, "knobs", t.kernel, 0, knob=t))
            task.weight += 1
        return None

    tasks: dict[str, Task] = _gemm_tasks(gm)
    if gemm_decisions is not None:
        from ..lowering.library import select_gemm_kernels

        select_gemm_kernels(gm, gemm_decisions)
    skipped: list[tuple[str, str]] = []
    kernels: dict = {}
    entries: dict[str, list] = {}
    with tunable.using(collect):
        for i, region in enumerate(partition(gm)):
            try:
                conv = Converter(kernels, target).convert(region.graph())
            except Exception as e:  # noqa: BLE001 - stays in eager PyTorch: nothing to tune
                skipped.append((f"region {i}", f"not lowered: {str(e)[:120]}"))
                continue
            fkey = hashlib.sha256(conv.func.script().encode()).hexdigest()[:16]
            if fkey not in entries:
                entries[fkey] = [f"region_{fkey}", conv.func, 0]
            entries[fkey][2] += 1
    if entries:
        custom = {gv: f for gv, f in kernels.values()}
        mod = module_of([(name, f.with_attr("global_symbol", name).with_attr("effopt_multiplicity", count), custom)
                       for name, f, count in entries.values()])
        fused = fused_tir(mod, target)
        counts = _call_counts(fused)
        for gv, f in fused.functions_items():
            if not isinstance(f, tvm.tirx.PrimFunc) or gv.name_hint not in counts:
                continue
            if f.attrs is not None and f.attrs.get("tirx.is_scheduled"):
                continue  # hand-scheduled: tuned through its knobs
            if not _static(f):
                skipped.append((gv.name_hint, "symbolic sizes (MetaSchedule tunes concrete shapes)"))
                continue
            nm = normalized(f)
            key = "tir:" + workload_hash(nm)
            task = tasks.setdefault(key, Task(key, "tir", gv.name_hint, 0, _flops(nm), nm))
            task.weight += counts[gv.name_hint]
    for t in knob_tasks.values():
        if t.knob.shapes is None:
            skipped.append((t.name, "symbolic sizes"))
            continue
        tasks[t.key] = t
    return Extraction(list(tasks.values()), skipped)


def _gemm_tasks(gm) -> dict:
    tasks: dict[str, Task] = {}
    for node in gm.graph.nodes:
        parts = gemm_parts(gm, node)
        if parts is None:
            continue
        shape = parts[3]
        key = gemm_key(*shape)
        if key not in tasks:
            m, n, k, _ = shape
            tasks[key] = Task(key, "gemm", f"linear {m}x{n}x{k}", 0, 2.0 * m * n * k, normalized(gemm_func(*shape)),
                              gemm=shape)
        tasks[key].weight += 1
    return tasks


def merge(parts: list[Extraction]) -> Extraction:
    tasks: dict[str, Task] = {}
    skipped = []
    for p in parts:
        skipped += p.skipped
        for t in p.tasks:
            if t.key in tasks:
                tasks[t.key].weight += t.weight
            else:
                tasks[t.key] = t
    return Extraction(sorted(tasks.values(), key=lambda t: -(t.weight * max(t.flops, 1.0))), skipped)


def extract_tasks(model, example_inputs, target, options: dict | None = None, tdict: dict | None = None) -> Extraction:
    """Compile `model` with effopt's graph passes (`options`: the backend's options) and list the tuning
    tasks of every graph it compiles to, for `target` (a tvm Target; `tdict` the dict a compile names it
    by, whose MKL/oneDNN decisions are reused)."""
    opts = dict(options or {})
    opts["lower"] = False  # the passes' graph is what is lowered; the tasks come from it
    args, kwargs = split_inputs(example_inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="effopt", options=opts)
    with collect("graphs") as graphs, torch.no_grad():  # the backend publishes each graph after its passes
        compiled(*args, **kwargs)
    torch._dynamo.reset()
    if not graphs:
        raise RuntimeError("effopt.autotune: torch.compile did not call the effopt backend (no graph to tune)")
    from ..lowering.cache import DecisionStore
    from ..lowering.select import Choice
    from ..options import Options

    o = Options.from_dict(options or {})
    store = DecisionStore(o.cache_dir, tdict) if o.cache else None
    try:
        decisions = {k: Choice.from_json(v) for k, v in (store.load("gemm") if store else {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        decisions = {}
    return merge([graph_tasks(g, target, decisions) for g in graphs])

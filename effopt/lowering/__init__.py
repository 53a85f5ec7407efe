"""Lowering stage: partition the rewritten ATen graph, compile TVM regions, keep library and eager ops.

Only this package and autotune/ import TVM.
"""
from __future__ import annotations

import functools
import json
import operator
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ops.spec import spec_of
from ..options import KernelChoice, Options
from . import eager as _eager  # noqa: F401 - registers the ops' eager kernels
from . import threads
from .tuned import TunedSchedules, use_tuned_gemms
from .cache import DecisionStore, KernelCache, default_dir, make_key
from .library import LIBRARY_OPS, select_gemm_kernels
from .partition import partition, replace_region, topological_sort, unsupported_ops
from .kernels import tunable
from .runtime import TVMKernel
from .select import Choice, choose, concrete, versus_float


class EffoptFallbackWarning(UserWarning):
    """Part of a graph runs in eager PyTorch instead of a compiled kernel."""


class EffoptSlowerWarning(UserWarning):
    """A rewrite (or the whole compiled graph) measured slower on this CPU than what it replaced, which runs
    instead."""


class FloatRegion(torch.nn.Module):
    """A region whose rewritten ops (int8, shift, approximate attention) run as the float32 layers they
    replaced (each node's meta["float_form"], a module taking the op's own arguments)."""

    def __init__(self, region_graph: fx.Graph):
        super().__init__()
        graph = fx.Graph()
        graph.output(graph.graph_copy(region_graph, {}))  # node meta (the float forms) comes along
        self.layers = torch.nn.ModuleList()
        for n in graph.nodes:
            if n.op == "call_function" and isinstance(n.meta.get("float_form"), torch.nn.Module):
                self.layers.append(n.meta["float_form"])
                n.op, n.target = "call_module", f"layers.{len(self.layers) - 1}"
        self.gm = fx.GraphModule(self, graph)

    def forward(self, *args):
        return self.gm(*args)


def _has_float_forms(graph: fx.Graph) -> list[str]:
    return [n.target._opname if isinstance(n.target, torch._ops.OpOverload) else str(n.target)
            for n in graph.nodes if n.op == "call_function" and isinstance(n.meta.get("float_form"), torch.nn.Module)]


@dataclass
class KernelRecord:
    name: str
    ops: list[str]
    choice: str  # "tvm" | "eager"
    tvm_us: float | None = None
    eager_us: float | None = None
    reason: str = ""
    relax: str = ""  # the region as a Relax function (TVMScript), for the inspection report
    kernel: str = ""  # the compiled kernel it calls (structurally equal regions share one); the TIR kernels
    # in it that run tuned schedules or tiles are listed in LoweringRecord.tuned
    float_us: float | None = None  # rewritten ops: the float32 layers they replaced, timed beside them


@dataclass
class LoweringRecord:
    target: dict = field(default_factory=dict)
    kernels: list[KernelRecord] = field(default_factory=list)
    library_calls: dict[str, int] = field(default_factory=dict)
    gemms: list[dict] = field(default_factory=list)
    tuned: list[dict] = field(default_factory=list)  # kernels built with tuned schedules or tiles (effopt tune)
    tuning_db: str = ""  # the tuning database consulted ("" where this target has none)
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    eager_regions: list[dict] = field(default_factory=list)  # regions TVM could not take: their ops and why
    tir: dict[str, str] = field(default_factory=dict)  # effopt's custom TIR kernels by name (TVMScript)
    modules: dict = field(default_factory=dict, repr=False)  # kernel name -> its IRModule (for kernel_tir)
    _tvm_target: object = field(default=None, repr=False)
    _tuned: object = field(default=None, repr=False)

    def kernel_tir(self, kernel: str) -> str:
        """The scheduled TIR that kernel `kernel` (a KernelRecord.kernel) compiles to, computed on demand."""
        from .build import scheduled_tir

        if kernel not in self.modules:
            raise KeyError(f"no kernel {kernel!r}; kernels: {sorted(self.modules)}")
        return scheduled_tir(self.modules[kernel], self._tvm_target, self._tuned)
    unique_kernels: int = 0
    cache_hit: bool = False
    parallel: str = ""  # "omp": TVM's parallel loops run on torch's OpenMP threads; "serial": on one thread
    seconds: float = 0.0

    def __str__(self) -> str:
        tvm_n = sum(k.choice == "tvm" for k in self.kernels)
        lines = [f"lowering for {self.target.get('kind')} ({self.target.get('mcpu', '')}): {len(self.kernels)} regions, "
                 f"{tvm_n} on TVM kernels ({self.unique_kernels} unique, {self.parallel or 'no'} threads), "
                 f"{len(self.kernels) - tvm_n} kept eager; "
                 f"library calls {dict(sorted(self.library_calls.items()))}; "
                 + (f"{len(self.tuned)} kernel(s) tuned; " if self.tuned else "") +
                 f"{'cache hit' if self.cache_hit else 'compiled'} in {self.seconds:.1f} s"]
        for op, locs in self.fallbacks.items():
            lines.append(f"  fallback to eager: {op} x{len(locs)}")
        return "\n".join(lines)


def _tolerances(graph: fx.Graph):
    """The self-check's tolerances for a region: float rounding, unless one of its ops declares its own
    (effopt/ops/: L-Mul's relative L2 error, int8's off-by-one codes); the loosest wins."""
    from .select import TOLERANCES

    declared = [s.tolerance for s in (spec_of(n.target) for n in graph.nodes if n.op == "call_function")
                if s is not None and s.tolerance]
    if not declared:
        return None
    relative = [t["relative_l2"] for t in declared if "relative_l2" in t]
    if relative:
        return {"relative_l2": max(relative)}
    out = dict(TOLERANCES)
    for t in declared:
        for k, v in t.items():
            out[k] = max(out.get(k, v), v)
    return out


def _knob_lookup(tuned, record: "LoweringRecord"):
    """The hand-scheduled kernels' tile lookup in the tuning database (None: their defaults)."""
    if tuned is None:
        return None

    def lookup(task):
        knobs = tuned.knobs(task)
        if knobs is not None and not any(t.get("task") == task.key for t in record.tuned):
            c = tuned.choices[task.key]
            record.tuned.append({"kernel": task.kernel, "task": task.key, "kind": "knobs", "knobs": knobs,
                                 "default_us": c.get("default_us"), "tuned_us": c.get("tuned_us")})
        return knobs

    return lookup


def _dedup(applied: list[dict]) -> list[dict]:
    seen, out = set(), []
    for a in applied:
        if a["kernel"] not in seen:
            seen.add(a["kernel"])
            out.append(dict(a, kind="tir"))
    return out


def _region_ops(graph: fx.Graph) -> list[str]:
    return [n.target._opname if isinstance(n.target, torch._ops.OpOverload) else str(n.target)
            for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


def _warn_fallbacks(gm, record: LoweringRecord):
    record.fallbacks = unsupported_ops(gm)
    for op, locs in record.fallbacks.items():
        where = sorted({l for l in locs if l != "?"})
        warnings.warn(f"effopt: {op} has no TVM lowering; it runs in eager PyTorch ({len(locs)} use(s)"
                      + (f", e.g. {where[0]})" if where else ")"), EffoptFallbackWarning, stacklevel=2)


def _build_all(funcs: dict, target, build_module, strict: bool = False):
    """Build every kernel in one module (one LLVM run); if that fails, build them one by one to find the
    kernels TVM cannot compile, and leave those regions in eager PyTorch."""
    from .build import module_of

    try:
        return build_module(module_of(funcs.values()), target)
    except Exception as first:  # noqa: BLE001 - TVM raises many error types
        if len(funcs) == 1 or strict:
            raise
        bad = []
        for fkey, (kname, f, kernels) in list(funcs.items()):
            try:
                build_module(module_of([(kname, f, kernels)]), target)
            except Exception as e:  # noqa: BLE001
                bad.append(kname)
                del funcs[fkey]
                warnings.warn(f"effopt: TVM could not compile kernel {kname}; its regions stay in eager PyTorch: "
                              f"{str(e).splitlines()[0][:300]}", EffoptFallbackWarning, stacklevel=3)
        if not bad or not funcs:
            raise first
        return build_module(module_of(funcs.values()), target)


def _float_instead(gm, regions, graphs: dict, record: LoweringRecord, force: bool, gen, replaced) -> None:
    """Regions with rewritten ops that run eager (no TVM kernel for them on this target): their eager form
    timed against the float32 layers they replaced, which run instead where faster (an int8 GEMM without a
    fast int8 dot product, torch._int_mm's reference loop on AVX2, is 20-50x slower than float32). Then one
    warning for every region of rewritten ops that stays float32."""
    for i, graph in ({} if force else graphs).items():
        region = regions[i]
        args = [getattr(gm, a.target) if a.op == "get_attr" else concrete(a.meta.get("val"), gen)
                for a in region.inputs]
        eager = fx.GraphModule(torch.nn.Module(), graph)
        c = versus_float(eager, FloatRegion(graph), args, Choice(False, reason="no TVM kernel"))
        record.kernels.append(KernelRecord(f"eager_region{i}", _region_ops(graph), "float32" if c.use_float
                                           else "eager", None, None, c.reason, float_us=c.float_us))
        if c.use_float:
            replace_region(gm, region, f"float_region{i}", FloatRegion(graph), replaced)
    kept = [k for k in record.kernels if k.choice == "float32"]
    if kept:
        rewritten = [k for k in record.kernels if k.float_us is not None]
        ops = sorted({o for k in kept for o in k.ops})
        warnings.warn(f"effopt: on this CPU, {len(kept)} of {len(rewritten)} rewritten layer(s) ({', '.join(ops)}) "
                      "measured slower than the float32 layers they replace, which run instead (the report's "
                      "lowering lists them)", EffoptSlowerWarning, stacklevel=3)


def lower(gm: fx.GraphModule, options: Options) -> tuple[fx.GraphModule, LoweringRecord]:
    """Returns a GraphModule whose TVM regions call compiled kernels; raises only on internal errors."""
    from tvm import relax
    import tvm

    from ..target import resolve_target, target_dict
    from .build import build_module, module_of
    from .to_relax import Converter

    t0 = time.perf_counter()
    record = LoweringRecord(target=target_dict(options.target))
    target = resolve_target(options.target)
    if target.kind.name != "llvm":
        raise NotImplementedError(f"running on target kind {target.kind.name!r} from CPU tensors is not supported; "
                                  "use a CPU target such as 'host' or {'kind': 'llvm'}")
    tuned = TunedSchedules.for_target(record.target, options.cache_dir) if options.tuning else None
    if tuned is not None:
        record.tuning_db, record._tuned = tuned.db.path, tuned
    store = DecisionStore(options.cache_dir, record.target) if options.cache else None
    saved = store.load("gemm") if store else {}
    try:
        decisions = {k: Choice.from_json(v) for k, v in saved.items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        decisions = {}
    if tuned is not None:
        record.tuned += use_tuned_gemms(gm, tuned, target)
    record.gemms = select_gemm_kernels(gm, decisions)
    if store and decisions.keys() - saved.keys():
        store.save("gemm", {k: v.to_json() for k, v in decisions.items()})
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in LIBRARY_OPS:
            name = n.target._opname if isinstance(n.target, torch._ops.OpOverload) else str(n.target)
            record.library_calls[name] = record.library_calls.get(name, 0) + 1
    _warn_fallbacks(gm, record)
    regions = partition(gm)

    # Convert each region; structurally equal regions (the same block repeated) share one kernel.
    funcs, region_fn, converted, script_of = {}, {}, {}, {}
    unconverted: dict[int, fx.Graph] = {}  # regions TVM could not take that hold rewritten ops (their float forms compete)
    force = options.kernel_choice is KernelChoice.TVM
    kernels: dict = {}  # custom PrimFuncs (effopt's own ops), shared by every region's function
    custom: dict = {}  # the same as {GlobalVar: PrimFunc}, filled as regions are converted
    for i, region in enumerate(regions):
        graph = region.graph()
        try:
            with tunable.using(_knob_lookup(tuned, record)):
                conv = Converter(kernels, target).convert(graph)
        except Exception as e:  # noqa: BLE001 - Unsupported, or TVM's own error types
            warnings.warn(f"effopt: region {i} ({', '.join(_region_ops(graph))}) stays in eager PyTorch: {e}",
                          EffoptFallbackWarning, stacklevel=2)
            record.eager_regions.append({"region": i, "ops": _region_ops(graph), "reason": str(e)})
            if _has_float_forms(graph):
                unconverted[i] = graph
            continue
        custom.update({gv: f for gv, f in kernels.values()})
        script = conv.func.script()
        fkey = make_key(script)
        script_of[fkey] = script
        if fkey not in funcs:  # named by content, so a cached library maps names to the same kernels
            kname = f"k_{fkey[:16]}"
            funcs[fkey] = (kname, conv.func.with_attr("global_symbol", kname), custom)
        region_fn[i], converted[i] = fkey, (graph, conv)
    record.unique_kernels = len(funcs)
    record.tir = {gv.name_hint: f.script() for gv, f in kernels.values()}
    record.modules = {entry[0]: module_of([entry]) for entry in funcs.values()}
    record._tvm_target = target
    placeholders_gen, replaced = torch.Generator().manual_seed(0), {}
    if not funcs:
        _float_instead(gm, regions, unconverted, record, force, placeholders_gen, replaced)
        record.seconds = time.perf_counter() - t0
        return gm, record

    cache = KernelCache(options.cache_dir) if options.cache else None
    runtime_dir = os.path.join(options.cache_dir or default_dir(), "runtime")
    # kernel timings depend on whether TVM's parallel loops run on torch's threads or on one thread
    launch = threads.launcher(runtime_dir)
    parallel = record.parallel = "omp" if launch is not None else "serial"
    key = make_key(options.key(), json.dumps(record.target, sort_keys=True), parallel,
                   tuned.digest() if tuned is not None else "", *sorted(funcs))
    loaded = cache.load(key) if cache else None
    choices: dict[str, Choice] = {}
    build_dir = None
    if loaded is not None and not isinstance(loaded[1].get("kernels"), list):
        loaded = None  # written by an older effopt: rebuild
    if loaded is not None:
        module, meta = loaded
        lib_path = cache.library(key)
        choices = {k: Choice.from_json(v) for k, v in meta["choices"].items()}
        built = set(meta["kernels"])  # kernels TVM could not compile are not in the library
        record.tuned += [t for t in meta.get("tuned", []) if isinstance(t, dict)]  # schedules replayed then
        for fkey in [f for f, (kname, *_) in funcs.items() if kname not in built]:
            del funcs[fkey]
        record.cache_hit = True
    else:
        build = build_module if tuned is None else functools.partial(build_module, tuned=tuned)
        executable = _build_all(funcs, target, build, options.strict)
        tuned_tir = _dedup(tuned.applied) if tuned is not None else []  # the build's replayed schedules
        record.tuned += tuned_tir
        build_dir = tempfile.mkdtemp(prefix="effopt-build-")
        lib_path = os.path.join(build_dir, "lib.so")
        executable.export_library(lib_path)
        module = tvm.runtime.load_module(lib_path)
    if launch is not None:
        threads.attach(lib_path, launch)
    vm = relax.VirtualMachine(module, tvm.cpu())

    for i, region in enumerate(regions):
        if i not in region_fn or region_fn[i] not in funcs:
            if i in region_fn and _has_float_forms(converted[i][0]):  # its kernel did not build
                unconverted[i] = converted[i][0]
            continue
        fkey = region_fn[i]
        kname = funcs[fkey][0]
        graph, r = converted[i]
        kernel = TVMKernel(vm[kname], r.tensor_inputs, len(region.outputs) == 1, kname, r.sym_sources,
                           r.out_layouts, r.out_strides)
        if fkey not in choices:
            args = [getattr(gm, a.target) if a.op == "get_attr" else concrete(a.meta.get("val"), placeholders_gen)
                    for a in region.inputs]
            eager = fx.GraphModule(torch.nn.Module(), graph)  # the region as torch ops: the baseline
            choices[fkey] = choose(kernel, eager, args, force, _tolerances(graph))
            if not choices[fkey].use_candidate and choices[fkey].reason.startswith("result differs"):
                warnings.warn(f"effopt: kernel {kname} ({', '.join(_region_ops(graph))}) was not used: "
                              f"{choices[fkey].reason}", EffoptFallbackWarning, stacklevel=2)
            if not force and _has_float_forms(graph):  # rewritten ops: against the float32 layers too
                choices[fkey] = versus_float(kernel if choices[fkey].use_candidate else eager,
                                             FloatRegion(graph), args, choices[fkey])
        c = choices[fkey]
        name = f"tvm_region{i}"
        record.kernels.append(KernelRecord(name, _region_ops(graph),
                                           "float32" if c.use_float else "tvm" if c.use_candidate else "eager",
                                           c.candidate_us, c.baseline_us, c.reason, script_of[fkey], kname,
                                           float_us=c.float_us))
        if c.use_float:
            replace_region(gm, region, f"float_region{i}", FloatRegion(graph), replaced)
        elif c.use_candidate:  # regions that lose stay inline in the graph, as plain torch ops
            replace_region(gm, region, name, kernel, replaced)
    _float_instead(gm, regions, unconverted, record, force, placeholders_gen, replaced)
    topological_sort(gm.graph)
    gm.graph.lint()
    if cache is not None and loaded is None:
        cache.store(key, lib_path, {"choices": {k: v.to_json() for k, v in choices.items()},
                                    "kernels": sorted(kname for kname, *_ in funcs.values()),
                                    "tuned": tuned_tir})
    if build_dir is not None:
        shutil.rmtree(build_dir, ignore_errors=True)  # the loaded library stays mapped
    gm.recompile()
    record.seconds = time.perf_counter() - t0
    return gm, record


__all__ = ["lower", "LoweringRecord", "KernelRecord", "EffoptFallbackWarning", "EffoptSlowerWarning", "FloatRegion"]

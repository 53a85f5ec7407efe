"""Compile Relax functions for a target: fast-math legalization, fusion, default schedules, codegen."""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field

import tvm
from tvm import relax, topi
from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline
from tvm.relax.transform.legalize_ops.nn import _nn_gelu

from .records import EffoptFallbackWarning
from .schedules import default_schedule_pass

_SQRT1_2 = 0.7071067811865476


def _legalize_gelu(bb: relax.BlockBuilder, call: relax.Call) -> relax.Expr:
    # TVM's own gelu legalization calls scalar `erf` per element (3.7 ms on 197x1536 here, against torch's
    # 0.3 ms); topi.fast_erf is a vectorizable rational approximation accurate to float32 rounding.
    x = call.args[0]
    if str(x.ty.dtype) != "float32":
        return _nn_gelu(bb, call)

    def te_gelu(t):
        erf = topi.fast_erf(topi.multiply(t, _SQRT1_2))
        return topi.multiply(t, topi.add(topi.multiply(erf, 0.5), 0.5))

    return bb.call_te(te_gelu, x, primfunc_name_hint="gelu")


LEGALIZE_OVERRIDES = {"relax.nn.gelu": _legalize_gelu}


@tvm.transform.module_pass(opt_level=0, name="EffoptFastMath")
def fast_math_float32(mod, ctx):
    """TVM's FastMathTransform, restricted to float32: its fast_exp/fast_erf are float32 approximations."""
    return relax.transform.FastMathTransform()(mod) if _all_float32(mod) else mod


def _all_float32(mod) -> bool:
    found = []

    def visit(e):
        ty = getattr(e, "ty", None)
        if isinstance(ty, relax.TensorType) and ty.dtype is not None and "float" in str(ty.dtype):
            found.append(str(ty.dtype))

    for _, f in mod.functions_items():
        if isinstance(f, relax.Function):
            relax.analysis.post_order_visit(f, visit)
    return all(d == "float32" for d in found)


def fused_tir(mod: tvm.IRModule, target) -> tvm.IRModule:
    """Relax ops -> fused, unscheduled TIR kernels: the workloads the autotuner tunes."""
    with target:
        return tvm.transform.Sequential(_to_fused_tir())(mod)


def _to_fused_tir() -> list:
    return [fast_math_float32,
            relax.transform.LegalizeOps(customize_legalize_map=LEGALIZE_OVERRIDES),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            relax.transform.DeadCodeElimination()]


def _to_scheduled_tir(target, tuned=None) -> list:
    """Relax ops -> fused TIR kernels with tuned schedules (`tuned`: an lowering.tuned.TunedSchedules)
    where tuning measured them faster, and effopt's default schedules for the rest."""
    passes = _to_fused_tir()
    if tuned is not None:
        passes.append(tuned.as_pass(target))
    return passes + [default_schedule_pass(target)]


def scheduled_tir(mod: tvm.IRModule, target, tuned=None) -> str:
    """The TIR kernels `mod` compiles to, with their schedules (TVMScript), for the inspection report."""
    with target:
        out = tvm.transform.Sequential(_to_scheduled_tir(target, tuned))(mod)
    return "\n".join(f.script() for _, f in out.functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def relax_pipeline(target, tuned=None) -> tvm.transform.Pass:
    @tvm.transform.module_pass(opt_level=0, name="EffoptRelaxPipeline")
    def _pipeline(mod, ctx):
        with target:
            seq = tvm.transform.Sequential([
                *_to_scheduled_tir(target, tuned),
                *cpu_pipeline.dataflow_lower_passes(target),
                *cpu_pipeline.finalize_passes(target),
            ])
            return seq(mod)

    return _pipeline


def build_module(mod: tvm.IRModule, target, tuned=None):
    """A TVM executable for every Relax function in `mod`."""
    return tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target, tuned))


def module_of(entries):
    """One IRModule of region functions (name, Relax function, {GlobalVar: custom PrimFunc} it may call)."""
    import tvm

    mod = {}
    for kname, f, kernels in entries:
        mod[kname] = f
        mod.update(kernels)
    return tvm.IRModule(mod)


def build_function(emit_body, *param_types, target="host"):
    """One Relax function `emit_body(bb, *params)` over tensors of `param_types` ((shape, dtype) each),
    compiled alone into a callable taking and returning tensors, its parallel loops on torch's OpenMP
    threads as in compiled graphs (for the eager path here, and for kernel tests and benchmarks)."""
    import tvm
    from tvm import relax

    from ..target import resolve_target
    from . import threads
    from .cache import default_dir

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(list(shape), dtype)) for i, (shape, dtype) in
              enumerate(param_types)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(emit_body(bb, *params))
        bb.emit_func_output(out)
    executable = build_module(bb.get(), resolve_target(target))
    build_dir = tempfile.mkdtemp(prefix="effopt-eager-")
    try:
        lib_path = os.path.join(build_dir, "lib.so")
        executable.export_library(lib_path)
        module = tvm.runtime.load_module(lib_path)
        launch = threads.launcher(os.path.join(default_dir(), "runtime"))
        if launch is not None:
            threads.attach(lib_path, launch)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)  # the loaded library stays mapped
    return relax.VirtualMachine(module, tvm.cpu())["main"]


# ---- lowering step 4, build or load: the region functions as one library, from the kernel cache if there ----
def _dedup(applied: list[dict]) -> list[dict]:
    seen, out = set(), []
    for a in applied:
        if a["kernel"] not in seen:
            seen.add(a["kernel"])
            out.append(dict(a, kind="tir"))
    return out


def _build_all(funcs: dict, target, build_module, strict: bool = False):
    """Build every kernel in one module (one LLVM run); if that fails, build them one by one to find the
    kernels TVM cannot compile, and leave those regions in eager PyTorch."""
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
                              f"{str(e).splitlines()[0][:300]}", EffoptFallbackWarning, stacklevel=4)
        if not bad or not funcs:
            raise first
        return build_module(module_of(funcs.values()), target)


@dataclass
class Built:
    """The compiled library of a graph's region functions, loaded."""

    vm: object  # relax.VirtualMachine: vm[kernel name] calls a region function
    choices: dict  # fkey -> select.Choice, as the kernel cache stored them (the choose step adds the others)
    cache: object
    key: str
    lib_path: str
    loaded: bool  # from the kernel cache
    build_dir: str | None = None
    tuned_tir: list = field(default_factory=list)

    def keep(self, funcs: dict) -> None:
        """After a build: the library and the choices into the kernel cache; the build directory removed
        (the loaded library stays mapped)."""
        if self.cache is not None and not self.loaded:
            self.cache.store(self.key, self.lib_path, {"choices": {k: v.to_json() for k, v in self.choices.items()},
                                                       "kernels": sorted(kname for kname, *_ in funcs.values()),
                                                       "tuned": self.tuned_tir})
        if self.build_dir is not None:
            shutil.rmtree(self.build_dir, ignore_errors=True)


def build_or_load(funcs: dict, options, record, target, tuned) -> Built:
    """Build `funcs` (convert.Conversion.funcs; the kernels TVM cannot compile are dropped from it, their
    regions stay eager), or load the library a compile of the same graph, options, target and tuning left
    in the kernel cache."""
    from . import threads
    from .cache import KernelCache, default_dir, make_key
    from .select import Choice

    cache = KernelCache(options.cache_dir) if options.cache else None
    # kernel timings depend on whether TVM's parallel loops run on torch's threads or on one thread
    launch = threads.launcher(os.path.join(options.cache_dir or default_dir(), "runtime"))
    parallel = record.parallel = "omp" if launch is not None else "serial"
    key = make_key(options.key(), json.dumps(record.target, sort_keys=True), parallel,
                   tuned.digest() if tuned is not None else "", *sorted(funcs))
    loaded = cache.load(key) if cache else None
    if loaded is not None and not isinstance(loaded[1].get("kernels"), list):
        loaded = None  # written by an older effopt: rebuild
    if loaded is not None:
        module, meta = loaded
        built = Built(None, {k: Choice.from_json(v) for k, v in meta["choices"].items()}, cache, key,
                      cache.library(key), True)
        kernels = set(meta["kernels"])  # kernels TVM could not compile are not in the library
        record.tuned += [t for t in meta.get("tuned", []) if isinstance(t, dict)]  # schedules replayed then
        for fkey in [f for f, (kname, *_) in funcs.items() if kname not in kernels]:
            del funcs[fkey]
        record.cache_hit = True
    else:
        build = build_module if tuned is None else functools.partial(build_module, tuned=tuned)
        executable = _build_all(funcs, target, build, options.strict)
        build_dir = tempfile.mkdtemp(prefix="effopt-build-")
        built = Built(None, {}, cache, key, os.path.join(build_dir, "lib.so"), False, build_dir,
                      _dedup(tuned.applied) if tuned is not None else [])  # the build's replayed schedules
        record.tuned += built.tuned_tir
        executable.export_library(built.lib_path)
        module = tvm.runtime.load_module(built.lib_path)
    if launch is not None:
        threads.attach(built.lib_path, launch)
    built.vm = relax.VirtualMachine(module, tvm.cpu())
    return built

"""Lowering step 3, convert: each region to a Relax function (to_relax.Converter); structurally equal regions
(the same block repeated) share one function, named by its content so that a cached library maps names to
the same kernels. Regions TVM cannot take stay in eager PyTorch, with a warning."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch.fx as fx

from .cache import make_key
from .kernels import tunable
from .records import EffoptFallbackWarning, LoweringRecord, region_ops
from .select import has_float_forms


@dataclass
class Conversion:
    funcs: dict = field(default_factory=dict)  # fkey -> (kernel name, Relax function, {GlobalVar: PrimFunc})
    region_fn: dict = field(default_factory=dict)  # region index -> fkey
    converted: dict = field(default_factory=dict)  # region index -> (its graph, to_relax.ConvertedRegion)
    scripts: dict = field(default_factory=dict)  # fkey -> the function as TVMScript (for the report)
    # regions TVM could not take (or whose kernel did not build) that hold rewritten ops: their float forms
    # compete with their eager form (replace.py)
    unconverted: dict[int, fx.Graph] = field(default_factory=dict)


def _knob_lookup(tuned, record: LoweringRecord):
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


def convert(regions, target, tuned, record: LoweringRecord) -> Conversion:
    from .build import module_of, scheduled_tir
    from .to_relax import Converter

    out = Conversion()
    kernels: dict = {}  # custom PrimFuncs (effopt's own ops), shared by every region's function
    custom: dict = {}  # the same as {GlobalVar: PrimFunc}, filled as regions are converted
    for i, region in enumerate(regions):
        graph = region.graph()
        try:
            with tunable.using(_knob_lookup(tuned, record)):
                conv = Converter(kernels, target).convert(graph)
        except Exception as e:  # noqa: BLE001 - Unsupported, or TVM's own error types
            warnings.warn(f"effopt: region {i} ({', '.join(region_ops(graph))}) stays in eager PyTorch: {e}",
                          EffoptFallbackWarning, stacklevel=3)
            record.eager_regions.append({"region": i, "ops": region_ops(graph), "reason": str(e)})
            if has_float_forms(graph):
                out.unconverted[i] = graph
            continue
        custom.update({gv: f for gv, f in kernels.values()})
        script = conv.func.script()
        fkey = make_key(script)
        out.scripts[fkey] = script
        if fkey not in out.funcs:
            kname = f"k_{fkey[:16]}"
            out.funcs[fkey] = (kname, conv.func.with_attr("global_symbol", kname), custom)
        out.region_fn[i], out.converted[i] = fkey, (graph, conv)
    record.unique_kernels = len(out.funcs)
    record.tir = {gv.name_hint: f.script() for gv, f in kernels.values()}
    record.modules = {entry[0]: module_of([entry]) for entry in out.funcs.values()}
    record._tvm_target, record._schedule = target, scheduled_tir
    return out


__all__ = ["Conversion", "convert"]

"""Lowering stage: the rewritten ATen graph becomes TVM kernels where they win, library calls and eager
PyTorch elsewhere. `lower` runs six named steps, each in its module:

    1. library choice   library.choose_library     each GEMM on MKL or oneDNN (and tuned GEMMs, tuned.py)
    2. partition        partition.partition        TVM-convertible regions; ops without a rule stay eager
    3. convert          convert.convert            each region to a Relax function (to_relax.py, aten/, rules.py)
    4. build or load    build.build_or_load        one library for all regions, or the kernel cache's
    5. choose           select.choose              per region: its kernel against eager (and the float32
                                                   layers it replaced), checked and timed: decisions as data
    6. replace          replace.replace            the chosen forms into the graph (measures nothing)

What it did is a LoweringRecord (records.py). Only this package and autotune/ import TVM.
"""
from __future__ import annotations

import time

import torch
import torch.fx as fx

from ..options import KernelChoice, Options
from ..target import resolve_target, target_dict
from . import eager as _eager  # noqa: F401 - registers the ops' eager kernels
from .build import build_or_load
from .buckets import size_bucket
from .cache import DecisionStore
from .convert import convert
from .library import choose_library
from .partition import partition, warn_fallbacks
from .records import EffoptFallbackWarning, EffoptSlowerWarning, KernelRecord, LoweringRecord
from .replace import replace
from .select import FloatRegion, choose
from .tuned import TunedSchedules, use_tuned_gemms


def lower(gm: fx.GraphModule, options: Options) -> tuple[fx.GraphModule, LoweringRecord]:
    """Returns a GraphModule whose TVM regions call compiled kernels; raises only on internal errors."""
    t0 = time.perf_counter()
    record = LoweringRecord(target=target_dict(options.target))
    target = resolve_target(options.target)
    if target.kind.name != "llvm":
        raise NotImplementedError(f"running on target kind {target.kind.name!r} from CPU tensors is not supported; "
                                  "use a CPU target such as 'host' or {'kind': 'llvm'}")
    tuned = TunedSchedules.for_target(record.target, options.cache_dir) if options.tuning else None
    if tuned is not None:
        record.tuning_db, record._tuned = tuned.db.path, tuned
        record.tuned += use_tuned_gemms(gm, tuned, target)
    force = options.kernel_choice is KernelChoice.TVM
    gen = torch.Generator().manual_seed(0)  # the random inputs every check and timing runs on

    choose_library(gm, options, record)
    warn_fallbacks(gm, record)
    regions = partition(gm)
    conv = convert(regions, target, tuned, record)
    built = build_or_load(conv.funcs, options, record, target, tuned) if conv.funcs else None
    picks = choose(gm, regions, conv, built, record, force, gen)
    # kernel_choice="tvm" keeps the TVM kernels at every size; "measure" reopens close choices per size bucket
    store = DecisionStore(options.cache_dir, record.target) if options.cache and not force else None
    record.per_bucket = replace(gm, regions, picks, per_bucket=not force, store=store)
    if built is not None:
        built.keep(conv.funcs)
    gm.recompile()
    record.seconds = time.perf_counter() - t0
    return gm, record


__all__ = ["lower", "size_bucket", "LoweringRecord", "KernelRecord", "EffoptFallbackWarning", "EffoptSlowerWarning", "FloatRegion"]

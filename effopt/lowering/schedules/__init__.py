"""Default CPU schedules for the kernels effopt generates; the first rule that applies wins."""
from __future__ import annotations

import tvm
from tvm.s_tir import dlight as dl

from .generic import ParallelOuter
from .injective import Injective
from .rowwise import RowReduction


def default_schedule_pass(target):
    """A module pass that schedules every unscheduled PrimFunc for `target`."""
    if target.kind.name == "llvm":
        rules = [Injective(), RowReduction(), dl.cpu.Reduction(), dl.cpu.GEMV(), ParallelOuter()]
    else:
        rules = [dl.gpu.Fallback()]
    apply = dl.ApplyDefaultSchedule(*rules)

    @tvm.transform.module_pass(opt_level=0, name="EffoptDefaultSchedule")
    def _pass(mod, ctx):
        with target:
            return apply(mod)

    return _pass


__all__ = ["default_schedule_pass", "Injective", "ParallelOuter", "RowReduction"]

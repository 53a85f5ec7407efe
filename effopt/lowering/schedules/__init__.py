"""Default CPU schedules for the kernels effopt generates; the first rule that applies wins."""
from __future__ import annotations

import tvm
from tvm.s_tir import dlight as dl

from .generic import ParallelOuter
from .injective import Injective
from .rowwise import RowReduction


class _Tolerant(dl.ScheduleRule):
    """A rule that does not apply where its analysis fails (dlight's GEMV asserts on some scatter and
    comparison kernels) instead of failing the build: the next rule gets the kernel."""

    def __init__(self, rule: dl.ScheduleRule):
        self.rule = rule

    def apply(self, func, target, tunable):
        try:
            return self.rule.apply(func, target, tunable)
        except (AssertionError, ValueError, IndexError, RuntimeError):
            return None


def default_schedule_pass(target):
    """A module pass that schedules every unscheduled PrimFunc for `target`."""
    if target.kind.name == "llvm":
        rules = [Injective(), RowReduction(), dl.cpu.Reduction(), _Tolerant(dl.cpu.GEMV()), ParallelOuter()]
    else:
        rules = [dl.gpu.Fallback()]
    apply = dl.ApplyDefaultSchedule(*rules)

    @tvm.transform.module_pass(opt_level=0, name="EffoptDefaultSchedule")
    def _pass(mod, ctx):
        with target:
            return apply(mod)

    return _pass


__all__ = ["default_schedule_pass", "Injective", "ParallelOuter", "RowReduction"]

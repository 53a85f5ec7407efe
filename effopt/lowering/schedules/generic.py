"""Last-resort CPU schedule: parallelize the outermost spatial loop of each root block.

Kernels that no other rule takes (gathers, odd reductions) would otherwise run single-threaded and
scalar, which is how TVM's untuned pipeline ends up 85x slower than eager on a ViT.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from ...logs import warn_once
from ..records import EffoptSlowerWarning


class ParallelOuter(CPUScheduleRule):
    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        for info in infos:
            kinds = info.dom_kind()
            loops = sch.get_loops(info.block_rv)
            if kinds and kinds[0] == "S" and loops:
                try:
                    sch.parallel(loops[0])
                except Exception as e:  # noqa: BLE001 - TVM refuses (a dependence, an odd loop): serial
                    warn_once("parallel-outer", f"effopt: a kernel's outer loop could not be parallelised and runs "
                              f"on one core ({type(e).__name__}: {str(e).splitlines()[0][:160]}); said once",
                              EffoptSlowerWarning)
        return sch

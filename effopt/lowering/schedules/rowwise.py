"""Row-wise normalization kernels on CPU: softmax, LayerNorm, RMSNorm and what is fused around them.

Every block reduces or maps over the trailing axes of a row; rows are independent. The schedule runs
rows in parallel and computes each row's reductions and elementwise steps under the row loop, so the
intermediates live in a row-sized buffer that stays in L1. Inner loops are left plain (no predicated
split) for LLVM's loop vectorizer, which handles the ragged tail of rows such as 197 that a fixed
16-lane split would turn into scalar code.
"""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from ...logs import warn_once
from ..records import EffoptSlowerWarning


def _leading_s(kind: str) -> int:
    return len(kind) - len(kind.lstrip("S"))


class RowReduction(CPUScheduleRule):
    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or not infos[-1].is_injective():
            return None
        if all(info.is_injective() for info in infos):
            return None
        kinds = [info.dom_kind() for info in infos]
        if any(not k or k[0] != "S" for k in kinds):
            return None
        rows = min(_leading_s(k) for k in kinds)
        try:
            # elementwise blocks read by one block only are inlined into it; the rest get row buffers
            for info in infos[:-1]:
                if info.is_injective() and len(sch.get_consumers(info.block_rv)) == 1:
                    try:
                        sch.compute_inline(info.block_rv)
                    except Exception as e:  # noqa: BLE001 - not inlinable (e.g. reads a reduction): keep it
                        warn_once("rowwise-inline", "effopt: an elementwise step of a row-wise kernel could not "
                                  f"be fused and is written to memory ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160]}); said once", EffoptSlowerWarning)
            blocks = list(sch.get_child_blocks(sch.get_sblock("root")))
            out = blocks[-1]
            loops = sch.get_loops(out)
            row = sch.fuse(*loops[:rows]) if rows > 1 else loops[0]
            sch.parallel(row)
            for b in reversed(blocks[:-1]):
                sch.compute_at(b, row, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - the pattern does not fit: let the next rule try
            return None
        return sch


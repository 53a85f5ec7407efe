"""Default CPU schedule for elementwise/broadcast/reshape kernels: inline producers, fuse all loops,
vectorize by the target's vector width, parallelize in chunks large enough to amortize thread start-up."""
from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.s_tir.dlight.cpu.base import CPUScheduleRule
from tvm.target.codegen import llvm_get_vector_width

# Below this many elements a kernel runs on one thread: TVM's thread pool wake-up (~5-10 us) costs more.
PARALLEL_MIN_ELEMENTS = 16384


def vector_lanes(target, sch: s_tir.Schedule, block) -> int:
    bits = llvm_get_vector_width(target)
    bits = bits if bits > 0 else 128
    writes = sch.get(block).writes
    dtype_bits = writes[0].source.dtype.bits if writes else 32
    return max(bits // max(dtype_bits, 8), 1)


class Injective(CPUScheduleRule):
    def apply(self, func, target, _):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or not all(b.is_injective() for b in infos):
            return None
        for b in infos[:-1]:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # a producer that cannot inline (multiple consumers): schedule generically
                return None
        block = infos[-1].block_rv
        loops = sch.get_loops(block)
        if not loops:
            return sch
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        lanes = vector_lanes(target, sch, block)
        extent = get_extent(sch, fused)
        if isinstance(extent, int) and extent <= lanes:
            if extent > 1:
                sch.vectorize(fused)
            return sch
        outer, vec = sch.split(fused, factors=[None, lanes])
        sch.vectorize(vec)
        if not isinstance(extent, int) or extent >= PARALLEL_MIN_ELEMENTS:
            chunk = max(PARALLEL_MIN_ELEMENTS // (4 * lanes), 1)
            par, _ = sch.split(outer, factors=[None, chunk])
            sch.parallel(par)
        return sch

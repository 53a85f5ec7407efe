"""A float32 linear y = x @ w^T (+ b) as a register-tiled TIR kernel over pre-packed weights, generated for
the target's vector unit (AVX-512: 16 lanes, 32 registers; AVX2 + FMA: 8 and 16; NEON: 4 and 32): the
autotuner's rival to MKL/oneDNN on frozen-weight GEMMs (effopt/autotune).

The weight is frozen, so it is packed once, when the model is compiled, as [N/16, K, 16] (N padded to a
multiple of 16 with zero rows): one 64-byte vector holds one k of 16 consecutive output channels (two
AVX2 registers, four NEON ones: the layout does not depend on the target). A tile of MB rows x NB vectors
keeps MB*NB accumulators in registers over the whole K; each k
loads NB weight vectors, broadcasts MB values of x, and issues MB*NB fused multiply-adds (llvm.fma, so
the rounding does not depend on LLVM's contraction). The tiles run in parallel, column panel major, so
that consecutive tiles on one core reuse a panel from its L2. Rows past M read row M-1 again and are not
stored; columns past N are not stored.

(MB, NB) is the autotuner's knob (`space`): the tuning database keeps the setting measured fastest on
the target, and `effopt.lowering.tuned.use_tuned_gemms` calls the kernel only where it beat the library.
"""
from __future__ import annotations

import torch
from tvm.script import tirx as T

from .common import VECTOR_UNITS, VectorUnit, vector_unit

LANES = 16  # output channels per packed group
_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True}


def panels(n: int) -> int:
    """Vectors of 16 output channels in the packed weight (N rounded up)."""
    return (n + LANES - 1) // LANES


def space(m: int, n: int, unit: VectorUnit = VECTOR_UNITS["avx512"]) -> list[dict]:
    """Candidate (mb, nb) tiles, the default first: at most 7/8 of the vector registers as accumulators
    (28 of AVX-512's 32, 14 of AVX2's 16), at least a quarter of them (to cover the FMA latency) where the
    shape allows, no more rows than M."""
    nv = panels(n) * (LANES // unit.lanes)
    most, least = unit.registers * 7 // 8, unit.registers // 4
    fits = [{"mb": mb, "nb": nb} for mb in (6, 4, 8, 12, 14, 3, 2, 1) for nb in (4, 3, 2, 1)
            if (mb <= m or mb == 1) and nv % nb == 0 and mb * nb <= most]
    return [t for t in fits if t["mb"] * t["nb"] >= least] or fits


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N/16), K, 16], zero rows past N."""
    n, k = w.shape
    nv = panels(n)
    wp = torch.zeros(nv * LANES, k, dtype=w.dtype)
    wp[:n] = w
    return wp.reshape(nv, LANES, k).permute(0, 2, 1).contiguous()


def pad_bias(b: torch.Tensor | None, n: int) -> torch.Tensor:
    out = torch.zeros(panels(n) * LANES, dtype=torch.float32)
    if b is not None:
        out[:n] = b
    return out


def linear_func(M: int, N: int, K: int, mb: int, nb: int, unit: VectorUnit = VECTOR_UNITS["avx512"]):
    """(x [M, K], packed [ceil(N/16), K, 16], bias [ceil(N/16)*16]) -> y [M, N], all float32, in vectors
    of `unit.lanes` (nb counts them)."""
    VL = unit.lanes
    PARTS = LANES // VL
    np_ = panels(N)
    nv = np_ * PARTS
    if mb < 1 or nb < 1 or nv % nb:
        raise ValueError(f"packed linear: tile {mb}x{nb} vectors does not split {nv} column vectors")
    NT = nv // nb
    RB = (M + mb - 1) // mb
    fma = f"llvm.fma.v{VL}f32"
    vec = f"float32x{VL}"

    @T.prim_func(private=True, s_tir=True)
    def packed_linear(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr(_ATTRS)
        X = T.match_buffer(x_h, (M, K), "float32")
        W = T.match_buffer(w_h, (np_, K, LANES), "float32")
        B = T.match_buffer(b_h, (np_ * LANES,), "float32")
        Y = T.match_buffer(y_h, (M, N), "float32")
        with T.sblock("root"):
            for tr in T.parallel(NT * RB):
                acc = T.alloc_buffer((mb, nb * VL), "float32", scope="local")
                for i in T.unroll(mb):
                    for j in T.unroll(nb):
                        acc[i, T.ramp(j * VL, 1, VL)] = B.vload([(tr // RB * nb + j) * VL], vec)
                for k in range(K):
                    for i in T.unroll(mb):
                        for j in T.unroll(nb):
                            acc[i, T.ramp(j * VL, 1, VL)] = T.call_llvm_pure_intrin(
                                fma, T.broadcast(X[T.min(tr % RB * mb + i, M - 1), k], VL),
                                W.vload([(tr // RB * nb + j) // PARTS, k, (tr // RB * nb + j) % PARTS * VL], vec),
                                acc[i, T.ramp(j * VL, 1, VL)], dtype=vec)
                for i in T.unroll(mb):
                    if tr % RB * mb + i < M:
                        for j in T.unroll(nb):
                            for l in T.vectorized(VL):
                                if (tr // RB * nb + j) * VL + l < N:
                                    Y[tr % RB * mb + i, (tr // RB * nb + j) * VL + l] = acc[i, j * VL + l]

    return packed_linear


def describe(tile: dict) -> str:
    """How reports name the kernel with a tile setting."""
    return f"packed kernel, tiles {tile['mb']}x{tile['nb']}"


def unit_of(target) -> VectorUnit:
    """The vector unit the kernel is generated for on `target` (supported(target) must be None)."""
    unit = vector_unit(target)
    if unit is None:
        raise ValueError(supported(target))
    return unit


def supported(target) -> str | None:
    """Why the kernel cannot run on `target` (a tvm Target), or None."""
    if vector_unit(target) is not None:
        return None
    keys = sorted(target.keys) if target is not None else []
    return f"the packed linear needs AVX-512, AVX2 + FMA or NEON on a CPU (target keys {keys})"

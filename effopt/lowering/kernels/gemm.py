"""A float32 linear y = x @ w^T (+ b) as a register-tiled TIR kernel over pre-packed weights, for x86 CPUs
with AVX-512: the autotuner's rival to MKL/oneDNN on frozen-weight GEMMs (effopt/autotune).

The weight is frozen, so it is packed once, when the model is compiled, as [N/16, K, 16] (N padded to a
multiple of 16 with zero rows): one 64-byte vector holds one k of 16 consecutive output channels. A tile
of MB rows x NB*16 columns keeps MB*NB float32x16 accumulators in registers over the whole K; each k
loads NB weight vectors, broadcasts MB values of x, and issues MB*NB fused multiply-adds (llvm.fma, so
the rounding does not depend on LLVM's contraction). The tiles run in parallel, column panel major, so
that consecutive tiles on one core reuse a panel from its L2. Rows past M read row M-1 again and are not
stored; columns past N are not stored.

(MB, NB) is the autotuner's knob (`space`): the tuning database keeps the setting measured fastest on
the target, and `effopt.autotune.apply.use_tuned_gemms` calls the kernel only where it beat the library.
"""
from __future__ import annotations

import torch
from tvm.script import tirx as T

from .common import x86_feature_missing

LANES = 16
_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True}


def panels(n: int) -> int:
    """Vectors of 16 output channels in the packed weight (N rounded up)."""
    return (n + LANES - 1) // LANES


def space(m: int, n: int) -> list[dict]:
    """Candidate (mb, nb) tiles, the default first: at most 28 of the 32 zmm registers as accumulators,
    at least 8 of them (to cover the FMA latency) where the shape allows, no more rows than M."""
    nv = panels(n)
    fits = [{"mb": mb, "nb": nb} for mb in (6, 4, 8, 12, 14, 2, 1) for nb in (4, 3, 2, 1)
            if (mb <= m or mb == 1) and nv % nb == 0 and mb * nb <= 28]
    return [t for t in fits if t["mb"] * t["nb"] >= 8] or fits


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


def linear_func(M: int, N: int, K: int, mb: int, nb: int):
    """(x [M, K], packed [ceil(N/16), K, 16], bias [ceil(N/16)*16]) -> y [M, N], all float32."""
    nv = panels(N)
    if mb < 1 or nb < 1 or nv % nb:
        raise ValueError(f"packed linear: tile {mb}x{nb} vectors does not split {nv} column vectors")
    NT = nv // nb
    RB = (M + mb - 1) // mb
    fma = "llvm.fma.v16f32"

    @T.prim_func(private=True, s_tir=True)
    def packed_linear(x_h: T.handle, w_h: T.handle, b_h: T.handle, y_h: T.handle):
        T.func_attr(_ATTRS)
        X = T.match_buffer(x_h, (M, K), "float32")
        W = T.match_buffer(w_h, (nv, K, LANES), "float32")
        B = T.match_buffer(b_h, (nv * LANES,), "float32")
        Y = T.match_buffer(y_h, (M, N), "float32")
        with T.sblock("root"):
            for tr in T.parallel(NT * RB):
                acc = T.alloc_buffer((mb, nb * LANES), "float32", scope="local")
                for i in T.unroll(mb):
                    for j in T.unroll(nb):
                        acc[i, T.ramp(j * LANES, 1, LANES)] = B.vload([(tr // RB * nb + j) * LANES], "float32x16")
                for k in range(K):
                    for i in T.unroll(mb):
                        for j in T.unroll(nb):
                            acc[i, T.ramp(j * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                                fma, T.broadcast(X[T.min(tr % RB * mb + i, M - 1), k], LANES),
                                W.vload([tr // RB * nb + j, k, 0], "float32x16"),
                                acc[i, T.ramp(j * LANES, 1, LANES)], dtype="float32x16")
                for i in T.unroll(mb):
                    if tr % RB * mb + i < M:
                        for j in T.unroll(nb):
                            for l in T.vectorized(LANES):
                                if (tr // RB * nb + j) * LANES + l < N:
                                    Y[tr % RB * mb + i, (tr // RB * nb + j) * LANES + l] = acc[i, j * LANES + l]

    return packed_linear


def describe(tile: dict) -> str:
    """How reports name the kernel with a tile setting."""
    return f"packed kernel, tiles {tile['mb']}x{tile['nb']}"


def supported(target) -> str | None:
    """Why the kernel cannot run on `target` (a tvm Target), or None."""
    return x86_feature_missing(target, "avx512f", "the packed linear")

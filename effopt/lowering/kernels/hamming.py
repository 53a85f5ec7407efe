"""TVM kernels for `effopt.ops.attention.hamming_attention` (ShiftAddViT-style Hamming attention).

Semantics are those of `effopt.ops.attention.hamming_attention_ref`:

    code = sign bits (x > 0) of qp [B, H, N, bits] and kp [B, H, M, bits], packed into uint64 words
    sim  = bits - popcount(code_q XOR code_k)                       (integer, per word: one popcount)
    s    = beta * sim + LOG2E * mask                                 (beta * sim is a table lookup)
    e    = floor(s - rowmax(s) + 0.5)  (integer <= 0; e < -126: weight 0)
    out  = sum_j 2^e_j v_j / sum_j 2^e_j

and 2^e * v is an integer addition of e << 23 to v's float32 bit pattern (0 when v is zero/denormal or the
result leaves the normal range), the normalizer a float sum of powers of two whose bit patterns are built
from the exponents. No exp and no float multiply in the N x M part (beta * sim is a lookup in a table of
bits + 1 floats; LOG2E * mask is applied to the mask beforehand), and no N x M matrix: each parallel task
takes a block of query rows of one (batch, head) and keeps rows x M words of scratch.

Two pre-scheduled PrimFuncs (attribute "tirx.is_scheduled" -- TVM 0.27's spelling of tir.is_scheduled --
so effopt's default schedule pass leaves them alone): `hamming_pack` (signs -> uint64 words, parallel over
rows) and `hamming_attention` (parallel over the fused (batch, head, block of query rows) loop, vectorized
over V's last dim and over keys). Any `bits` works: the last word is zero-padded in both codes, which leaves
popcount(XOR) unchanged. The batch dim may be symbolic (a tirx.Var); H, N, M, bits and V's last dim must
be static. v must be finite (inf/nan in v are not propagated as the reference would). Entry point: `emit`.
"""
from __future__ import annotations

import math

import numpy as np
from tvm import relax, tirx
from tvm.script import tirx as T

from .common import as_float32, batch, dims, same, static
import torch

from ..rules import additive_mask, float32_attention, lowers

_OP = "hamming attention"  # names this kernel in shape errors

LOG2E = 1.4426950408889634  # effopt.ops.attention.LOG2E
_MIN_EXP = -126


# ---- the lowering rule of effopt::hamming_attention (effopt/ops/attention.py) ------------------------------------
@lowers(torch.ops.effopt.hamming_attention.default)
def _lower(cv, node, q, k, v, mask, proj, beta):
    from . import projection

    float32_attention(node, q, k, v)
    qp, kp = projection.emit(cv.bb, q, proj), projection.emit(cv.bb, k, proj)
    return emit(cv.bb, qp, kp, v, additive_mask(cv, mask), float(beta))

__all__ = ["emit", "pack_func", "attention_func"]


def pack_func(B, H: int, R: int, bits: int) -> tirx.PrimFunc:
    """x [B, H, R, bits] float32 -> codes [B, H, R, ceil(bits/64)] uint64; bit k of word w is x[64w+k] > 0."""
    B = batch(B)
    W = (bits + 63) // 64

    @T.prim_func(private=True, s_tir=True)
    def hamming_pack(x_h: T.handle, c_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        X = T.match_buffer(x_h, (B, H, R, bits), "float32")
        C = T.match_buffer(c_h, (B, H, R, W), "uint64")
        with T.sblock("root"):  # relax passes (RewriteDataflowReshape) expect a root block
            T.reads()
            T.writes()
            Xf = T.decl_buffer((B * H * R * bits,), "float32", data=X.data)
            Cf = T.decl_buffer((B * H * R * W,), "uint64", data=C.data)
            for f in T.parallel(B * H * R):
                for w in range(W):
                    acc = T.decl_buffer((1,), "uint64")  # (global scope: a stack slot, not TVM workspace)
                    acc[0] = T.uint64(0)
                    for k in range(64):
                        if w * 64 + k < bits:
                            acc[0] = acc[0] | T.Select(Xf[f * bits + w * 64 + k] > T.float32(0),
                                                       T.shift_left(T.uint64(1), T.Cast("uint64", k)), T.uint64(0))
                    Cf[f * W + w] = acc[0]

    return hamming_pack


def _rows_per_task(N: int) -> int:
    """Query rows per parallel task: they share each loaded chunk of a V row, and their accumulators
    (rows x 16 floats) fit in AVX-512's 32 vector registers with room to spare."""
    return max(1, min(8, N))


def _chunk(Dv: int) -> int:
    """Columns of V per vector step: 16 floats (one AVX-512 register), or the largest power of two
    dividing Dv."""
    return next(c for c in (16, 8, 4, 2, 1) if Dv % c == 0)


def attention_func(B, H: int, N: int, M: int, bits: int, Dv: int, beta: float,
                   mask_shape: tuple | None, rows: int | None = None) -> tirx.PrimFunc:
    """codes_q [B,H,N,W], codes_k [B,H,M,W] uint64, v [B,H,M,Dv] float32, LOG2E * mask [1|B, 1|H, 1|N, 1|M]
    float32 (if mask_shape is not None; "B" or 1 for its batch dim) -> out [B,H,N,Dv] float32.

    One parallel task per (batch, head, block of `rows` query rows). Per task, with scratch of 3 x rows x M
    words (no N x M matrix):
      1. s[r, j] = table[bits - popcount(q_r ^ k_j)] (+ LOG2E * mask, scaled beforehand), row maxima;
      2. e = floor(s - max + 0.5); per (r, j) the exponent threshold (-e) << 23 (or INT_MAX when the weight
         is 0, e < -126) and the addend e << 23; the normalizers as sums of 2^e built from exponent bits;
      3. acc[r, :] += v_j with e added to its exponent field (0 if it would leave the normal range), for
         each key j that has a nonzero weight in at least one of the rows; out = acc / normalizer.
    """
    B = batch(B)
    W = (bits + 63) // 64
    R = rows or _rows_per_task(N)
    VL = _chunk(Dv)
    NB = (N + R - 1) // R
    beta32 = float(np.float32(beta))
    has_mask = mask_shape is not None
    if has_mask:
        mb, mh, mn, mm = mask_shape  # each 1 or the full size ("B" for the batch: 1 or B)
        mB = 1 if mb == 1 else B
        mshape = (mB, mh, mn, mm)
        # element strides of the mask, 0 along broadcast dims
        sm = 1 if mm != 1 else 0
        sn = mm if mn != 1 else 0
        sh = mn * mm if mh != 1 else 0
        sb = mh * mn * mm if mb != 1 else 0
        msize = mB * mh * mn * mm
    else:  # a placeholder, never read
        mshape, sb, sh, sn, sm, msize = (1,), 0, 0, 0, 0, 1

    def popcount(CQ, CK, qrow, krow):
        """bits - similarity: popcount of the XOR of two packed codes (int32)."""
        total = None
        for w in range(W):
            x = T.Cast("int32", T.popcount(CQ[qrow * W + w] ^ CK[krow * W + w]))
            total = x if total is None else total + x
        return total

    @T.macro
    def body(CQ, CK, Vf, Mf, Of):
        # beta * sim for every possible sim, rounded to float32 exactly as the reference does
        table = T.decl_buffer((bits + 1,), "float32")
        for k in range(bits + 1):
            table[k] = T.Cast("float32", k) * T.float32(beta32)
        for t in T.parallel(B * H * NB):
            bh = T.meta_var(t // NB)
            i0 = T.meta_var(t % NB * R)
            # scratch (rows x M words each): scores; per key j and row r, the exponent-field threshold and
            # addend (interleaved, so that one key's are adjacent); keys with a nonzero weight in some row
            sc = T.decl_buffer((R * M,), "float32")
            ta = T.decl_buffer((M * R * 2,), "int32")
            act = T.decl_buffer((M,), "int32")
            mx = T.decl_buffer((R,), "float32")
            mv = T.decl_buffer((16,), "float32")
            den = T.decl_buffer((R,), "float32")
            # accumulators: rows x VL lanes (<= 512 bytes, below TVM's stack-allocation limit, so that they
            # live in registers)
            acc = T.decl_buffer((R * VL,), "float32")
            # (touched here so that TVM's storage rewrite does not place it in the dead score buffer)
            for x in T.vectorized(R * VL):
                acc[x] = T.float32(0)
            # 1. scores (rows past N repeat row N-1 and are not stored) and row maxima, the latter as 16
            # running lane maxima (a serial max is one dependent instruction per key)
            for r in T.unroll(R):
                for j in range(M):
                    if has_mask:
                        sc[r * M + j] = table[bits - popcount(CQ, CK, bh * N + T.min(i0 + r, N - 1), bh * M + j)] \
                            + Mf[bh // H * sb + bh % H * sh + T.min(i0 + r, N - 1) * sn + j * sm]
                    else:
                        sc[r * M + j] = table[bits - popcount(CQ, CK, bh * N + T.min(i0 + r, N - 1), bh * M + j)]
            for r in T.unroll(R):
                for l in T.vectorized(16):
                    mv[l] = T.float32("-inf")
                for jc in range(M // 16):
                    for l in T.vectorized(16):
                        mv[l] = T.max(mv[l], sc[r * M + jc * 16 + l])
                for j in range(M % 16):
                    mv[j] = T.max(mv[j], sc[r * M + M // 16 * 16 + j])
                mx[r] = T.float32("-inf")
                for l in range(16):
                    mx[r] = T.max(mx[r], mv[l])
            # 2. integer exponents e = floor(s - max + 0.5) as the threshold (-e) << 23 on v's exponent field
            # (INT_MAX when the weight is 0) and the addend e << 23; normalizers as sums of 2^e made of bits
            for j in range(M):
                act[j] = 0
            for r in T.unroll(R):
                den[r] = T.float32(0)
                for j in range(M):
                    ef = T.Bind(T.floor(sc[r * M + j] - mx[r] + T.float32(0.5)))
                    e = T.Bind(T.Cast("int32", T.max(ef, T.float32(_MIN_EXP - 1))))
                    ta[(j * R + r) * 2] = T.Select(ef >= T.float32(_MIN_EXP), T.shift_left(0 - e, 23), 0x7FFFFFFF)
                    ta[(j * R + r) * 2 + 1] = T.shift_left(e, 23)
                    den[r] = den[r] + T.Select(ef >= T.float32(_MIN_EXP),
                                               T.reinterpret("float32", T.shift_left(e + 127, 23)), T.float32(0))
                    act[j] = T.bitwise_or(act[j], T.Cast("int32", ef >= T.float32(_MIN_EXP)))
            # 3. per chunk of VL columns of v: sum_j 2^e v_j, adding e to v's exponent field where the result
            # stays normal (exponent field > -e; zero and denormal v give 0), else 0; then divide
            for dc in range(Dv // VL):
                for x in T.vectorized(R * VL):
                    acc[x] = T.float32(0)
                for j in range(M):
                    if act[j] != 0:
                        for r in T.unroll(R):
                            for l in T.vectorized(VL):
                                acc[r * VL + l] = acc[r * VL + l] + T.reinterpret("float32", T.Select(
                                    T.bitwise_and(T.reinterpret("int32", Vf[(bh * M + j) * Dv + dc * VL + l]),
                                                  0x7F800000) > ta[(j * R + r) * 2],
                                    T.reinterpret("int32", Vf[(bh * M + j) * Dv + dc * VL + l])
                                    + ta[(j * R + r) * 2 + 1], 0))
                for r in T.unroll(R):
                    if i0 + r < N:
                        for l in T.vectorized(VL):
                            Of[(bh * N + i0 + r) * Dv + dc * VL + l] = acc[r * VL + l] / den[r]

    if has_mask:
        @T.prim_func(private=True, s_tir=True)
        def hamming_attention(cq_h: T.handle, ck_h: T.handle, v_h: T.handle, m_h: T.handle, o_h: T.handle):
            T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
            Q = T.match_buffer(cq_h, (B, H, N, W), "uint64")
            K = T.match_buffer(ck_h, (B, H, M, W), "uint64")
            V = T.match_buffer(v_h, (B, H, M, Dv), "float32")
            MK = T.match_buffer(m_h, mshape, "float32")
            O = T.match_buffer(o_h, (B, H, N, Dv), "float32")
            with T.sblock("root"):  # relax passes (RewriteDataflowReshape) expect a root block
                T.reads()
                T.writes()
                CQ = T.decl_buffer((B * H * N * W,), "uint64", data=Q.data)
                CK = T.decl_buffer((B * H * M * W,), "uint64", data=K.data)
                Vf = T.decl_buffer((B * H * M * Dv,), "float32", data=V.data)
                Mf = T.decl_buffer((msize,), "float32", data=MK.data)
                Of = T.decl_buffer((B * H * N * Dv,), "float32", data=O.data)
                body(CQ, CK, Vf, Mf, Of)

        return hamming_attention

    @T.prim_func(private=True, s_tir=True)
    def hamming_attention(cq_h: T.handle, ck_h: T.handle, v_h: T.handle, o_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        Q = T.match_buffer(cq_h, (B, H, N, W), "uint64")
        K = T.match_buffer(ck_h, (B, H, M, W), "uint64")
        V = T.match_buffer(v_h, (B, H, M, Dv), "float32")
        O = T.match_buffer(o_h, (B, H, N, Dv), "float32")
        with T.sblock("root"):  # relax passes (RewriteDataflowReshape) expect a root block
            T.reads()
            T.writes()
            CQ = T.decl_buffer((B * H * N * W,), "uint64", data=Q.data)
            CK = T.decl_buffer((B * H * M * W,), "uint64", data=K.data)
            Vf = T.decl_buffer((B * H * M * Dv,), "float32", data=V.data)
            Of = T.decl_buffer((B * H * N * Dv,), "float32", data=O.data)
            body(CQ, CK, Vf, None, Of)

    return hamming_attention


def emit(bb: relax.BlockBuilder, qp: relax.Expr, kp: relax.Expr, v: relax.Expr, mask: relax.Expr | None,
         beta: float) -> relax.Expr:
    """Emit `effopt.ops.attention.hamming_attention(qp, kp, v, mask, beta)` into `bb` (inside a function / dataflow
    block): packs qp and kp into uint64 codes (two call_tir), then calls the attention kernel.

    qp [B, H, N, bits], kp [B, H, M, bits], v [B, H, M, Dv]; B may be symbolic, the other dims must be
    static. mask: None, or additive float (or bool, True = attend) broadcastable to [B, H, N, M] with
    dims of size 1 broadcast. Returns the output var [B, H, N, Dv] in v's dtype (computed in float32)."""
    B, H, N, bits = dims(qp, _OP, "qp", 4)
    kB, kH, M, kbits = dims(kp, _OP, "kp", 4)
    vB, vH, vM, Dv = dims(v, _OP, "v", 4)
    H, N, bits, M, Dv = (static(d, _OP, w) for d, w in ((H, "H"), (N, "N"), (bits, "bits"), (M, "M"), (Dv, "Dv")))
    if not (same(B, kB) and same(B, vB) and same(H, kH) and same(H, vH) and same(M, vM) and bits == kbits):
        raise ValueError(f"hamming attention: incompatible shapes qp {[B, H, N, bits]}, kp {[kB, kH, M, kbits]}, "
                         f"v {[vB, vH, vM, Dv]}")
    if bits <= 0:
        raise ValueError("hamming attention: bits must be positive")
    out_dtype = str(v.ty.dtype)
    qp, kp, v = as_float32(bb, qp), as_float32(bb, kp), as_float32(bb, v)
    W = (bits + 63) // 64
    mask_shape = None
    if mask is not None:
        mdims = dims(mask, _OP, "mask")
        if len(mdims) > 4:
            raise ValueError(f"hamming attention: mask must have at most 4 dims, got {mdims}")
        if len(mdims) < 4:
            mask = bb.emit(relax.op.expand_dims(mask, list(range(4 - len(mdims)))))
            mdims = [1] * (4 - len(mdims)) + mdims
        if str(mask.ty.dtype) == "bool":  # as torch's SDPA: True takes part in attention
            mask = bb.emit(relax.op.where(mask, relax.const(0.0, "float32"), relax.const(-math.inf, "float32")))
        # LOG2E * mask, rounded to float32 as the reference does (an elementwise op on the mask, which
        # leaves the kernel's N x M part free of float multiplies)
        mask = bb.emit(relax.op.multiply(as_float32(bb, mask), relax.const(LOG2E, "float32")))
        for d, full, what in zip(mdims, (B, H, N, M), "BHNM"):
            if not (isinstance(d, int) and d == 1) and not same(d, full):
                raise ValueError(f"hamming attention: mask shape {mdims} does not broadcast to "
                                 f"{[B, H, N, M]} (dim {what})")
        mask_shape = tuple(1 if isinstance(d, int) and d == 1 else (d if isinstance(d, int) else "B")
                           for d in mdims)
        mask_shape = ("B" if mask_shape[0] != 1 else 1,) + mask_shape[1:]
    pq = bb.add_func(pack_func(B, H, N, bits), "hamming_pack")
    cq = bb.emit(relax.call_tir(pq, [qp], relax.TensorType([B, H, N, W], "uint64")))
    pk = pq if M == N else bb.add_func(pack_func(B, H, M, bits), "hamming_pack")
    ck = bb.emit(relax.call_tir(pk, [kp], relax.TensorType([B, H, M, W], "uint64")))
    attn = bb.add_func(attention_func(B, H, N, M, bits, Dv, beta, mask_shape), "hamming_attention")
    args = [cq, ck, v] + ([mask] if mask is not None else [])
    out = bb.emit(relax.call_tir(attn, args, relax.TensorType([B, H, N, Dv], "float32")))
    return out if out_dtype == "float32" else bb.emit(relax.op.astype(out, out_dtype))

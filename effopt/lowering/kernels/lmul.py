"""TVM kernels for `effopt.ops.attention.lmul_attention` (L-Mul attention, "Addition is All You Need").

Semantics are those of `effopt.ops.attention.lmul_attention_ref` and `effopt.ops.attention.lmul`:

    s   = sum_d LMul(q[i, d] * scale, k[j, d])      (q * scale: an ordinary float32 multiply)
    p   = softmax_j(s + mask)                        (exact softmax: float exp and divide)
    out = sum_j LMul(p[i, j], v[j, e])               (accumulated in float32)

    LMul(a, b) on the int32 patterns: r = (a & keep) + (b & keep) - 0x3F800000 + (1 << (23 - l(m)))
    (modulo 2^32, as torch's int32 add); 0 if a or b has a zero exponent field or r <= 0; else
    min(r, 0x7F7FFFFF) | sign(a) ^ sign(b).

Both N x M x D contractions are integer adds on bit patterns; the only float op in them is the float32
accumulation. The inner loop per 16 products is 5 AVX-512 ops: vpaddd, vpmaxsd, vpminsd, vpternlogd
(xor + or of the signs), vaddps, with the scalar-side operands as broadcast memory operands. Exactness:

* The vector-side operand (k, v) is pre-encoded once ("prep" kernels): mantissa-truncated pattern, or a
  sentinel SK for a zero exponent field, chosen so that SK + (a & keep) + C lies in [-2^31, 0] for every
  scalar-side operand a with a nonzero exponent: the result clamps to 0 without a separate test.
* The scalar-side operand (q * scale, p) is pre-encoded per row: (a & keep) + C, its sign, and the upper
  clamp bound: 0x7F7FFFFF, or 0 when its exponent field is zero (so the product clamps to 0).
* A product clamped to 0 has bit pattern 0 | sign = +-0.0, which adds nothing to a float sum.
* Integer adds wrap modulo 2^32 like torch's int32 adds (see `_wadd`: TVM's own uint32/int32 adds carry
  LLVM's nuw/nsw flags, under which LLVM folded the elementwise kernel's range checks away); compares
  are int32.

Kernels (all "tirx.is_scheduled", so effopt's default schedule pass leaves them alone, and "op_pattern"
opaque, so FuseOps leaves them unfused):

* `lmul_prep_k`: k [B, H, M, D] -> [B, H, ceil(M/16), D, 2, 16] uint32 (encoded pattern, sign), keys padded
  with the sentinel to a multiple of 16 (their scores are computed and ignored).
* `lmul_prep_v`: v [B, H, M, Dv] -> [B, H, ceil(Dv/16), M, 2, 16] uint32.
* `lmul_attention`: parallel over the fused (batch, head, block of R=4 query rows) loop; per block a
  scratch of R x M scores (no N x M matrix), scores vectorized over 16 keys with R rows sharing each key
  load, softmax vectorized (own exp: Cody-Waite + degree-6 polynomial, about 1 ulp), output vectorized
  over 16 lanes of Dv.
* `lmul_elementwise` (emit_elementwise): the elementwise LMul, bit-exact against `effopt.ops.attention.lmul`.

The batch dim may be symbolic (a tirx.Var); H, N, M, D and Dv must be static. Entry points: `emit`,
`emit_elementwise`.
"""
from __future__ import annotations

import tvm
from tvm import relax, tirx
from tvm.script import tirx as T

from .common import as_float32, batch, dims, same, static
import torch

from ..rules import additive_mask, float32_attention, lowers

_OP = "lmul attention"  # names this kernel in shape errors


# ---- the lowering rule of effopt::lmul_attention (effopt/ops/attention.py) ---------------------------------------
@lowers(torch.ops.effopt.lmul_attention.default)
def _lower(cv, node, q, k, v, mask, scale, mantissa_bits):
    float32_attention(node, q, k, v)
    return emit(cv.bb, q, k, v, additive_mask(cv, mask), float(scale), int(mantissa_bits))

__all__ = ["emit", "emit_elementwise", "attention_func", "prep_k_func", "prep_v_func", "elementwise_func",
           "lmul_constants"]

LANES = 16  # float32 lanes of an AVX-512 vector
ROWS = 4  # query rows per parallel task: they share every key load in the score loop

# An alloc_buffer annotated so is a stack alloca. (StorageRewrite may merge annotated buffers that are not
# live at the same time and drop the annotation: those come from TVM's per-thread workspace pool instead.)
_STACK = {"disable_lower_builtin": True}
_STACK_LIMIT = 256 * 1024  # bytes of per-task scratch kept on the stack
_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # 8: kOpaque

_LOG2E = 1.4426950408889634
_EXP_HI = 88.72283172607421875  # expf overflows above this
_EXP_LO = -87.33654022216796875  # below this (-126 ln 2) the result is subnormal: flushed to 0


def _offset_bits(m: int) -> int:
    return m if m <= 3 else (3 if m == 4 else 4)  # effopt.ops.attention.lmul_offset_bits


def lmul_constants(mantissa_bits: int) -> tuple[int, int, int]:
    """(keep mask, additive constant C mod 2^32, vector-side zero sentinel SK mod 2^32)."""
    if not 0 <= int(mantissa_bits) <= 23:
        raise ValueError(f"mantissa_bits must be in 0..23, got {mantissa_bits}")
    m = int(mantissa_bits)
    keep = ~((1 << (23 - m)) - 1) & 0x7FFFFFFF
    c = -0x3F800000 + (1 << (23 - _offset_bits(m)))
    # SK + a + C in [-2^31, 0] for a in [0x00800000, 0x7FFFFFFF]: SK = -(0x7FFFFFFF + C)
    sk = -(0x7FFFFFFF + c)
    assert -(2 ** 31) <= sk + 0x00800000 + c and sk + 0x7FFFFFFF + c <= 0
    return keep, c & 0xFFFFFFFF, sk & 0xFFFFFFFF


# ---- expression helpers (PrimExpr builders, called inside the TVMScript bodies) ------------------------------
def _wadd(a, b):
    """a + b mod 2^32 for uint32 a, b (scalars or vectors). TVM emits uint32 adds as `add nuw`, which LLVM may
    assume never wraps (it then folds range checks away); a uint64 add truncated to 32 bits is a true
    wrapping add, and LLVM narrows it back to one 32-bit add."""
    return T.Cast("uint32", T.Cast("uint64", a) + T.Cast("uint64", b))


def _encode_scalar(bits, keep: int, c: int):
    """Scalar-side encoding of a float32 pattern `bits` (uint32): ((bits & keep) + C, upper clamp, sign)."""
    return (_wadd(bits & T.uint32(keep), T.uint32(c)),
            T.Select((bits & T.uint32(0x7F800000)) == T.uint32(0), T.int32(0), T.int32(0x7F7FFFFF)),
            bits & T.uint32(0x80000000))


def _encode_vector(bits, keep: int, sk: int):
    """Vector-side encoding of a float32 pattern `bits` (uint32): (bits & keep, or SK for a zero exponent)."""
    return T.Select((bits & T.uint32(0x7F800000)) == T.uint32(0), T.uint32(sk), bits & T.uint32(keep))


def _term(kv, ks, qc, qu, qs):
    """The float32 L-Mul product from encoded operands: vector side (kv, ks), scalar side (qc, qu, qs).
    add, max, min, xor + or (one vpternlogd), and the caller's fadd: 5 AVX-512 ops per 16 products."""
    mag = T.min(T.max(T.reinterpret("int32", _wadd(kv, qc)), T.int32(0)), qu)
    return T.reinterpret("float32", mag | T.reinterpret("int32", ks ^ qs))


def _exp(x):
    """exp(x) for float32, vectorizable: Cody-Waite reduction, cephes expf polynomial; exact 0 below -87.34."""
    xc = tirx.Var("xc", "float32")
    n = tirx.Var("n", "float32")
    r = tirx.Var("r", "float32")
    poly = ((((((T.float32(1.9875691500e-4) * r + T.float32(1.3981999507e-3)) * r + T.float32(8.3334519073e-3)) * r
                + T.float32(4.1665795894e-2)) * r + T.float32(1.6666665459e-1)) * r + T.float32(5.0000001201e-1))
            * r * r + r + T.float32(1.0))
    two_n = T.reinterpret("float32", (T.Cast("int32", n) + T.int32(127)) << T.int32(23))
    body = tirx.Let(r, xc - n * T.float32(0.693359375) - n * T.float32(-2.12194440e-4), poly * two_n)
    body = tirx.Let(n, T.floor(xc * T.float32(_LOG2E) + T.float32(0.5)), body)
    body = tirx.Let(xc, T.min(T.max(x, T.float32(_EXP_LO)), T.float32(_EXP_HI)), body)
    return T.Select(x < T.float32(_EXP_LO), T.float32(0.0), body)


# ---- PrimFuncs ----------------------------------------------------------------------------------------------
def prep_k_func(B, H: int, M: int, D: int, mantissa_bits: int) -> tirx.PrimFunc:
    """k [B, H, M, D] -> [B, H, MC, D, 2, 16] uint32: encoded pattern (or sentinel) and sign bits."""
    B = batch(B)
    keep, _, sk = lmul_constants(mantissa_bits)
    MC = (M + LANES - 1) // LANES

    @T.prim_func(private=True, s_tir=True)
    def lmul_prep_k(k_h: T.handle, o_h: T.handle):
        T.func_attr(_ATTRS)
        K = T.match_buffer(k_h, (B, H, M, D), "float32")
        O = T.match_buffer(o_h, (B, H, MC, D, 2, LANES), "uint32")
        with T.sblock("root"):  # relax passes (RewriteDataflowReshape) expect a root block
            for bh in T.parallel(B * H):
                for jc, d in T.grid(MC, D):
                    for l in range(LANES):
                        j = T.meta_var(jc * LANES + l)
                        if j < M:
                            ik = T.Bind(T.reinterpret("uint32", K[bh // H, bh % H, j, d]))
                            O[bh // H, bh % H, jc, d, 0, l] = _encode_vector(ik, keep, sk)
                            O[bh // H, bh % H, jc, d, 1, l] = ik & T.uint32(0x80000000)
                        else:
                            O[bh // H, bh % H, jc, d, 0, l] = T.uint32(sk)
                            O[bh // H, bh % H, jc, d, 1, l] = T.uint32(0)

    return lmul_prep_k


def prep_v_func(B, H: int, M: int, DV: int, mantissa_bits: int) -> tirx.PrimFunc:
    """v [B, H, M, Dv] -> [B, H, EC, M, 2, 16] uint32 (EC = ceil(Dv/16)); lanes past Dv hold the sentinel."""
    B = batch(B)
    keep, _, sk = lmul_constants(mantissa_bits)
    EC = (DV + LANES - 1) // LANES

    @T.prim_func(private=True, s_tir=True)
    def lmul_prep_v(v_h: T.handle, o_h: T.handle):
        T.func_attr(_ATTRS)
        V = T.match_buffer(v_h, (B, H, M, DV), "float32")
        O = T.match_buffer(o_h, (B, H, EC, M, 2, LANES), "uint32")
        with T.sblock("root"):  # relax passes (RewriteDataflowReshape) expect a root block
            for bh in T.parallel(B * H):
                for j, ec in T.grid(M, EC):
                    for l in range(LANES):
                        e = T.meta_var(ec * LANES + l)
                        if e < DV:
                            iv = T.Bind(T.reinterpret("uint32", V[bh // H, bh % H, j, e]))
                            O[bh // H, bh % H, ec, j, 0, l] = _encode_vector(iv, keep, sk)
                            O[bh // H, bh % H, ec, j, 1, l] = iv & T.uint32(0x80000000)
                        else:
                            O[bh // H, bh % H, ec, j, 0, l] = T.uint32(sk)
                            O[bh // H, bh % H, ec, j, 1, l] = T.uint32(0)

    return lmul_prep_v


def attention_func(B, H: int, N: int, M: int, D: int, DV: int, scale: float, mantissa_bits: int,
                   mask_shape: tuple | None) -> tirx.PrimFunc:
    """(q [B,H,N,D], kp (prep_k), vp (prep_v)[, mask]) -> out [B,H,N,Dv] float32.

    `mask_shape`: None, or the mask's 4-D shape, each dim 1 (broadcast) or the full extent."""
    B = batch(B)
    keep, c, _ = lmul_constants(mantissa_bits)
    MC, EC, R = (M + LANES - 1) // LANES, (DV + LANES - 1) // LANES, ROWS
    MP, MF, EF = MC * LANES, (M // LANES) * LANES, (DV // LANES)
    NB = (N + R - 1) // R
    scale = T.float32(float(scale))
    full = (B, H, N, M)
    if mask_shape is None:
        mask_shape = (1, 1, 1, 1)
    bcast = [isinstance(d, int) and d == 1 for d in mask_shape]
    mshape = [1 if one else f for one, f in zip(bcast, full)]
    fb, fh, fn, fm = (0 if one else 1 for one in bcast)
    NEG = T.float32(-3.4028234663852886e38)
    # per-task scratch on the stack (an alloca) unless large: then TVM's workspace allocator
    scratch = _STACK if 4 * R * (4 * MP + 3 * D) <= _STACK_LIMIT else None

    @T.macro
    def encode_p(S, tot, PC, PU, PS, r, j):  # p = e / sum, encoded for the PV contraction
        pc, pu, ps = T.meta_var(_encode_scalar(T.reinterpret("uint32", S[r, j] / tot[0]), keep, c))
        PC[r, j] = pc
        PU[r, j] = pu
        PS[r, j] = ps

    @T.prim_func(private=True, s_tir=True)
    def lmul_attention(q_h: T.handle, kp_h: T.handle, vp_h: T.handle, m_h: T.handle, o_h: T.handle):
        T.func_attr(_ATTRS)
        Q = T.match_buffer(q_h, (B, H, N, D), "float32")
        KP = T.match_buffer(kp_h, (B, H, MC, D, 2, LANES), "uint32")
        VP = T.match_buffer(vp_h, (B, H, EC, M, 2, LANES), "uint32")
        MASK = T.match_buffer(m_h, mshape, "float32")
        O = T.match_buffer(o_h, (B, H, N, DV), "float32")
        with T.sblock("root"):  # relax passes (RewriteDataflowReshape) expect a root block
            for task in T.parallel(B * H * NB):
                b = T.meta_var(task // (H * NB))
                h = T.meta_var(task // NB % H)
                i0 = T.meta_var(task % NB * R)
                S = T.alloc_buffer((R, MP), "float32", annotations=scratch)  # scores, then exp(s - max)
                PC = T.alloc_buffer((R, MP), "uint32", annotations=scratch)  # encoded p (_encode_scalar)
                PU = T.alloc_buffer((R, MP), "int32", annotations=scratch)
                PS = T.alloc_buffer((R, MP), "uint32", annotations=scratch)
                QC = T.alloc_buffer((R, D), "uint32", annotations=scratch)  # encoded q * scale
                QU = T.alloc_buffer((R, D), "int32", annotations=scratch)
                QS = T.alloc_buffer((R, D), "uint32", annotations=scratch)
                acc = T.alloc_buffer((R, LANES), "float32", annotations=_STACK)
                red = T.alloc_buffer((LANES,), "float32", annotations=_STACK)
                tot = T.alloc_buffer((1,), "float32", annotations=_STACK)
                # 1. q * scale, encoded (rows past N repeat row N-1: computed, never stored)
                for r, d in T.grid(R, D):
                    qc, qu, qs = T.meta_var(_encode_scalar(
                        T.reinterpret("uint32", Q[b, h, T.min(i0 + r, N - 1), d] * scale), keep, c))
                    QC[r, d] = qc
                    QU[r, d] = qu
                    QS[r, d] = qs
                # 2. scores: 16 keys x R rows per step (each key load shared by the R rows), summed over d
                for jc in range(MC):
                    for r in T.unroll(R):
                        for l in T.vectorized(LANES):
                            acc[r, l] = T.float32(0)
                    for d in range(D):
                        for r in T.unroll(R):
                            for l in T.vectorized(LANES):
                                acc[r, l] = acc[r, l] + _term(KP[b, h, jc, d, 0, l], KP[b, h, jc, d, 1, l],
                                                              QC[r, d], QU[r, d], QS[r, d])
                    for r in T.unroll(R):
                        for l in T.vectorized(LANES):
                            S[r, jc * LANES + l] = acc[r, l]
                # 3. softmax per row: vectorized over the full 16-key chunks, scalar over the M % 16 tail
                for r in range(R):
                    i = T.meta_var(T.min(i0 + r, N - 1))
                    for l in T.vectorized(LANES):
                        red[l] = NEG
                    tot[0] = NEG
                    for jc in range(MF // LANES):
                        for l in T.vectorized(LANES):
                            S[r, jc * LANES + l] = S[r, jc * LANES + l] + MASK[
                                b * fb, h * fh, i * fn, (jc * LANES + l) * fm]
                            red[l] = T.max(red[l], S[r, jc * LANES + l])
                    for j in range(MF, M):
                        S[r, j] = S[r, j] + MASK[b * fb, h * fh, i * fn, j * fm]
                        tot[0] = T.max(tot[0], S[r, j])
                    for l in range(LANES):
                        tot[0] = T.max(tot[0], red[l])
                    for l in T.vectorized(LANES):
                        red[l] = T.float32(0)
                    for jc in range(MF // LANES):
                        for l in T.vectorized(LANES):
                            S[r, jc * LANES + l] = _exp(S[r, jc * LANES + l] - tot[0])
                            red[l] = red[l] + S[r, jc * LANES + l]
                    for j in range(MF, M):
                        S[r, j] = _exp(S[r, j] - tot[0])
                        red[0] = red[0] + S[r, j]
                    tot[0] = T.float32(0)
                    for l in range(LANES):
                        tot[0] = tot[0] + red[l]
                    for jc in range(MF // LANES):
                        for l in T.vectorized(LANES):
                            encode_p(S, tot, PC, PU, PS, r, jc * LANES + l)
                    for j in range(MF, M):
                        encode_p(S, tot, PC, PU, PS, r, j)
                # 4. out = sum_j LMul(p_j, v_j): 16 lanes of Dv x R rows per step (each v load shared)
                for ec in range(EC):
                    for r in T.unroll(R):
                        for l in T.vectorized(LANES):
                            acc[r, l] = T.float32(0)
                    for j in range(M):
                        for r in T.unroll(R):
                            for l in T.vectorized(LANES):
                                acc[r, l] = acc[r, l] + _term(VP[b, h, ec, j, 0, l], VP[b, h, ec, j, 1, l],
                                                              PC[r, j], PU[r, j], PS[r, j])
                    for r in T.unroll(R):
                        if i0 + r < N:
                            if ec < EF:
                                for l in T.vectorized(LANES):
                                    O[b, h, i0 + r, ec * LANES + l] = acc[r, l]
                            else:
                                for l in range(LANES):
                                    if ec * LANES + l < DV:
                                        O[b, h, i0 + r, ec * LANES + l] = acc[r, l]

    return lmul_attention


def elementwise_func(mantissa_bits: int) -> tirx.PrimFunc:
    """a, b [n] float32 -> LMul(a, b) [n], bit-exact against effopt.ops.attention.lmul."""
    keep, c, _ = lmul_constants(mantissa_bits)
    n = tirx.Var("n", "int64")

    @T.prim_func(private=True, s_tir=True)
    def lmul_elementwise(a_h: T.handle, b_h: T.handle, o_h: T.handle):
        T.func_attr(_ATTRS)
        A = T.match_buffer(a_h, (n,), "float32")
        Bf = T.match_buffer(b_h, (n,), "float32")
        O = T.match_buffer(o_h, (n,), "float32")
        with T.sblock("root"):  # relax passes (RewriteDataflowReshape) expect a root block
            for io in T.parallel((n + 1023) // 1024):
                for ii in range(1024 // LANES):
                    for l in T.vectorized(LANES):
                        if io * 1024 + ii * LANES + l < n:
                            ia = T.Bind(T.reinterpret("uint32", A[io * 1024 + ii * LANES + l]))
                            ib = T.Bind(T.reinterpret("uint32", Bf[io * 1024 + ii * LANES + l]))
                            r = T.Bind(T.reinterpret("int32", _wadd(_wadd(ia & T.uint32(keep), ib & T.uint32(keep)),
                                                                    T.uint32(c))))
                            O[io * 1024 + ii * LANES + l] = T.reinterpret("float32", T.Select(
                                ((ia & T.uint32(0x7F800000)) == T.uint32(0))
                                | ((ib & T.uint32(0x7F800000)) == T.uint32(0)) | (r <= T.int32(0)),
                                T.int32(0),
                                T.min(r, T.int32(0x7F7FFFFF))
                                | T.reinterpret("int32", (ia ^ ib) & T.uint32(0x80000000))))

    return lmul_elementwise


# ---- Relax entry points ---------------------------------------------------------------------------------------
def emit(bb: relax.BlockBuilder, q: relax.Expr, k: relax.Expr, v: relax.Expr, mask: relax.Expr | None,
         scale: float, mantissa_bits: int) -> relax.Expr:
    """Emit L-Mul attention (effopt.ops.attention.lmul_attention_ref) into `bb`; returns the [B, H, N, Dv] output.

    q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv]; `mask` None or an additive float mask broadcastable to
    [B, H, N, M] (rank <= 4, each dim 1 or full). B may be symbolic; the other dims must be static.
    Non-float32 inputs are computed in float32 and the output cast to v's dtype, as the reference does."""
    lmul_constants(mantissa_bits)  # validates mantissa_bits
    (B, H, N, D), (Bk, Hk, M, Dk), (Bv, Hv, Mv, DV) = (dims(x, _OP, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    H, N, D, M, DV = (static(d, _OP, w) for d, w in ((H, "H"), (N, "N"), (D, "D"), (M, "M"), (DV, "Dv")))
    if not (same(B, Bk) and same(B, Bv) and H == Hk == Hv and D == Dk and M == Mv):
        raise ValueError(f"lmul attention: incompatible shapes q {[B, H, N, D]}, k {[Bk, Hk, M, Dk]}, "
                         f"v {[Bv, Hv, Mv, DV]}")
    out_dtype = str(v.ty.dtype)
    q, k, v = (as_float32(bb, x) for x in (q, k, v))
    full = (B, H, N, M)
    if mask is None:
        mask = relax.const(tvm.runtime.tensor(__import__("numpy").zeros((1, 1, 1, 1), "float32")))
        mask_shape = (1, 1, 1, 1)
    else:
        mdims = dims(mask, _OP, "mask")
        if len(mdims) > 4:
            raise ValueError(f"lmul attention: mask of rank {len(mdims)} > 4")
        mask_shape = tuple([1] * (4 - len(mdims)) + mdims)
        for d, f in zip(mask_shape, full):
            if not (isinstance(d, int) and d == 1) and not same(d, f):
                raise ValueError(f"lmul attention: mask shape {mdims} does not broadcast to {list(full)}")
        mask = as_float32(bb, mask)
        if len(mdims) < 4:
            mask = bb.emit(relax.op.reshape(mask, relax.ShapeExpr(list(mask_shape))))
    m = int(mantissa_bits)
    MC, EC = (M + LANES - 1) // LANES, (DV + LANES - 1) // LANES
    gk = bb.add_func(prep_k_func(B, H, M, D, m), f"lmul_prep_k_m{m}")
    gv = bb.add_func(prep_v_func(B, H, M, DV, m), f"lmul_prep_v_m{m}")
    ga = bb.add_func(attention_func(B, H, N, M, D, DV, scale, m, mask_shape), f"lmul_attention_m{m}")
    kp = bb.emit(relax.call_tir(gk, [k], relax.TensorType([B, H, MC, D, 2, LANES], "uint32")))
    vp = bb.emit(relax.call_tir(gv, [v], relax.TensorType([B, H, EC, M, 2, LANES], "uint32")))
    out = bb.emit(relax.call_tir(ga, [q, kp, vp, mask], relax.TensorType([B, H, N, DV], "float32")))
    return out if out_dtype == "float32" else bb.emit(relax.op.astype(out, out_dtype))


def emit_elementwise(bb: relax.BlockBuilder, a: relax.Expr, b: relax.Expr, mantissa_bits: int) -> relax.Expr:
    """Emit the elementwise LMul(a, b) of two float32 tensors of the same shape (no broadcasting)."""
    sa, sb = dims(a, _OP, "a"), dims(b, _OP, "b")
    if len(sa) != len(sb) or not all(same(x, y) for x, y in zip(sa, sb)):
        raise ValueError(f"lmul: shapes {sa} and {sb} differ")
    n = 1
    for d in sa:
        n = n * d
    flat = [bb.emit(relax.op.reshape(as_float32(bb, x), relax.ShapeExpr([n]))) for x in (a, b)]
    g = bb.add_func(elementwise_func(mantissa_bits), f"lmul_elementwise_m{int(mantissa_bits)}")
    out = bb.emit(relax.call_tir(g, flat, relax.TensorType([n], "float32")))
    return bb.emit(relax.op.reshape(out, relax.ShapeExpr(sa)))

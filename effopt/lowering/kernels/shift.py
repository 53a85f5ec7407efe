"""Shift linear kernels on packed power-of-two weights (effopt/ops/shift.py): `effopt::shift_linear`.

Float path (`shift_float`): y[m, n] = s[n] * sum_t sum_k  x[m, k] * (±2^-e[t, n, k])

x * 2^-e is an integer subtract on x's exponent bits and the sign an xor: the inner loop has no
multiplication (the one multiply per output is the channel scale). An x whose exponent field is not above
e (zero, or below 2^(e-126)) contributes 0: the reference gives a subnormal there, within float tolerance
of 0. The result differs from `shift_linear_ref` only in summation order.

Integer path (ShiftAddViT's MatShift): activations quantized per token (`shift_scale`, `shift_quant`), then
acc[m, n] = sum  ±(xq[m, k] << (6 - e)) in int32 and y = float32(acc) * s[n] * (step[m] * 2^-6): bit for
bit `matshift_linear_ref`. One PrimFunc (`shift_matmul`) serves both
paths; its x dtype picks the term arithmetic.

Both stream the weights as 4-bit codes (8x fewer bytes than fp32, which is what a few tokens' linear is
bound by): blocks of 32 weights, 16 bytes of codes loaded as one vector, their low nibbles paired with the
block's even x and their high nibbles with its odd x, read from a de-interleaved copy of x made once per
call. Each output channel is a parallel task; its codes are decoded once per block and applied to `MB`
tokens at a time, so the decode is shared by several tokens. Bias is added after the kernel (a separate
Relax op). Entry point for graphs: `emit`; alone (tests, benchmarks): `build`.
"""
from __future__ import annotations

from tvm import relax, tirx
from tvm.script import tirx as T

from . import tunable
from .common import dims, extent, rows, static
import torch

from ..rules import Unsupported, lowers, static_shape

LANES = 16
BLK = 2 * LANES  # weights per block of 16 code bytes
_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # 8: kOpaque
_OP = "shift linear"


def token_block(m) -> int:
    """Tokens that share one decode of a code block (m symbolic: a stream of sizes, most of them several rows)."""
    return 1 if isinstance(m, int) and m == 1 else 4


def _float_term(xi, code):
    """x * (±2^-e) on x's bits (uint32): exponent subtract, sign xor; 0 for code 7 or an x too small."""
    e = code & T.uint32(7)
    r = (xi - (e << T.uint32(23))) ^ ((code >> T.uint32(3)) << T.uint32(31))
    live = T.And(e < T.uint32(7), ((xi >> T.uint32(23)) & T.uint32(255)) > e)
    return T.Select(live, T.reinterpret("float32", r), T.float32(0.0))


def _int_term(xi, code):
    """±(xi << (6 - e)) on int32, 0 for code 7: shift, mask, conditional negate."""
    e = code & T.int32(7)
    sgn = T.int32(0) - (code >> T.int32(3))  # 0 or -1
    live = T.int32(0) - T.Cast("int32", e < T.int32(7))  # -1 or 0
    return (((xi << ((T.int32(6) - e) & T.int32(7))) & live) ^ sgn) - sgn


def matmul_func(M: int, N: int, K: int, terms: int, xdtype: str = "float32", mb: int | None = None) -> tirx.PrimFunc:
    """(x [M, K], w [terms, N, ceil(K/2)] uint8, scale [N] float32, post [M, 1] float32) -> y [M, N] float32.

    float32 x: the float path, y = sum x * (±2^-e) * s[n] * post[m] (post: ones). int8 x (quantized
    activations): MatShift, y = float32(sum ±(x << (6 - e))) * s[n] * post[m] (post: each token's step
    times 2^-6). The epilogue's multiplies are in the kernel, so nothing can contract them with a bias add."""
    KH = (K + 1) // 2
    KF = K // BLK * BLK
    M = extent(M)  # symbolic: one kernel for every row count
    MB = token_block(M) if mb is None else mb  # tokens per decode: the autotuner's knob
    MP = (M + MB - 1) // MB * MB
    integer = xdtype == "int8"
    acc_t, bits_t = ("int32", "int32") if integer else ("float32", "uint32")
    term, zero, to_bits = (_int_term, T.int32(0), lambda v: T.Cast("int32", v)) if integer else \
        (_float_term, T.float32(0.0), lambda v: T.reinterpret("uint32", v))

    @T.prim_func(private=True, s_tir=True)
    def shift_matmul(x_h: T.handle, w_h: T.handle, s_h: T.handle, p_h: T.handle, y_h: T.handle):
        T.func_attr(_ATTRS)
        X = T.match_buffer(x_h, (M, K), xdtype)
        W = T.match_buffer(w_h, (terms, N, KH), "uint8")
        S = T.match_buffer(s_h, (N,), "float32")
        P = T.match_buffer(p_h, (M, 1), "float32")
        Y = T.match_buffer(y_h, (M, N), "float32")
        with T.sblock("root"):
            XD = T.alloc_buffer((MP, 2, KF // 2 + 1), bits_t)  # even, odd x of the full blocks (zero padded)
            for m in T.parallel(MP):
                for k in range(KF // 2):
                    XD[m, 0, k] = T.Select(m < M, to_bits(X[T.min(m, M - 1), 2 * k]), T.Cast(bits_t, 0))
                    XD[m, 1, k] = T.Select(m < M, to_bits(X[T.min(m, M - 1), 2 * k + 1]), T.Cast(bits_t, 0))
            for n in T.parallel(N):
                acc = T.alloc_buffer((MB, LANES), acc_t, scope="local")
                for mb in range(MP // MB):
                    for i, l in T.grid(MB, LANES):
                        acc[i, l] = zero
                    for t in range(terms):
                        for kb in range(KF // BLK):
                            for i in T.unroll(MB):
                                for l in T.vectorized(LANES):
                                    byte = T.meta_var(T.Cast(bits_t, W[t, n, kb * LANES + l]))
                                    acc[i, l] = acc[i, l] \
                                        + term(XD[mb * MB + i, 0, kb * LANES + l], byte & T.Cast(bits_t, 15)) \
                                        + term(XD[mb * MB + i, 1, kb * LANES + l], byte >> T.Cast(bits_t, 4))
                    for i in range(MB):
                        if mb * MB + i < M:
                            tot = T.alloc_buffer((1,), acc_t, scope="local")
                            tot[0] = zero
                            for l in range(LANES):
                                tot[0] = tot[0] + acc[i, l]
                            for t in range(terms):
                                for k in range(KF, K):
                                    code = T.meta_var((T.Cast(bits_t, W[t, n, k // 2])
                                                       >> T.Cast(bits_t, (k % 2) * 4)) & T.Cast(bits_t, 15))
                                    tot[0] = tot[0] + term(to_bits(X[mb * MB + i, k]), code)
                            Y[mb * MB + i, n] = T.Cast("float32", tot[0]) * S[n] * P[mb * MB + i, 0]

    return shift_matmul


def scale_func(M: int, K: int, bits: int) -> tirx.PrimFunc:
    """x [M, K] float32 -> (inv [M, 1], step [M, 1]) float32: per token, amax = max(max|x|, smallest normal
    float), inv = qmax / amax (a true division, once per token), step = amax / qmax. The max runs over
    16 lanes, then across them (max is exact in any order)."""
    qmax = float(2 ** (bits - 1) - 1)
    KV = K // LANES * LANES
    M = extent(M)

    @T.prim_func(private=True, s_tir=True)
    def shift_scale(x_h: T.handle, i_h: T.handle, st_h: T.handle):
        T.func_attr(_ATTRS)
        X = T.match_buffer(x_h, (M, K), "float32")
        INV = T.match_buffer(i_h, (M, 1), "float32")
        ST = T.match_buffer(st_h, (M, 1), "float32")
        with T.sblock("root"):
            for m in T.parallel(M):
                lanes = T.alloc_buffer((LANES,), "float32", scope="local")
                amax = T.alloc_buffer((1,), "float32", scope="local")
                for l in T.vectorized(LANES):
                    lanes[l] = T.float32(1.1754943508222875e-38)
                for kb in range(KV // LANES):
                    for l in T.vectorized(LANES):
                        lanes[l] = T.max(lanes[l], T.fabs(X[m, kb * LANES + l]))
                amax[0] = T.float32(1.1754943508222875e-38)
                for l in range(LANES):
                    amax[0] = T.max(amax[0], lanes[l])
                for k in range(KV, K):
                    amax[0] = T.max(amax[0], T.fabs(X[m, k]))
                INV[m, 0] = T.float32(qmax) / amax[0]
                ST[m, 0] = amax[0] / T.float32(qmax)

    return shift_scale


def quant_func(M: int, K: int, bits: int, offset: int = 0, lo: int | None = None, hi: int | None = None):
    """(x [M, K] float32, inv [M, 1]) -> xq [M, K] int8 = clamp(nearbyint(x * inv) + offset, lo, hi); by
    default symmetric, [-qmax, qmax]. (PT2E's uint8 activations use offset zero_point - 128, [-128, 127].)"""
    qmax = 2 ** (bits - 1) - 1
    lo, hi = (-qmax if lo is None else lo), (qmax if hi is None else hi)
    M = extent(M)

    @T.prim_func(private=True, s_tir=True)
    def shift_quant(x_h: T.handle, i_h: T.handle, q_h: T.handle):
        T.func_attr(_ATTRS)
        X = T.match_buffer(x_h, (M, K), "float32")
        INV = T.match_buffer(i_h, (M, 1), "float32")
        Q = T.match_buffer(q_h, (M, K), "int8")
        with T.sblock("root"):
            for m in T.parallel(M):
                for k in T.vectorized(K):
                    Q[m, k] = T.Cast("int8", T.max(T.min(T.nearbyint(X[m, k] * INV[m, 0]) + T.float32(offset),
                                                         T.float32(hi)), T.float32(lo)))

    return shift_quant


def _quantize(bb, x2, m, k: int, bits: int, scale: float | None, offset: int = 0, lo=None, hi=None):
    """(xq [m, k] int8, step [m, 1]) of x2 [m, k]: per token, or with a given per-tensor scale (and an
    offset and range, for PT2E's affine quantization)."""
    col = relax.TensorType([m, 1], "float32")
    if scale is None:
        sc = bb.emit(relax.call_tir(bb.add_func(scale_func(m, k, bits), "shift_scale"), [x2], [col, col]))
        inv, step = bb.emit(relax.TupleGetItem(sc, 0)), bb.emit(relax.TupleGetItem(sc, 1))
    else:
        import numpy as np

        inv = bb.emit(relax.op.full([m, 1], relax.const(np.float32(1.0 / scale), "float32"), "float32"))
        step = bb.emit(relax.op.full([m, 1], relax.const(np.float32(scale), "float32"), "float32"))
    xq = bb.emit(relax.call_tir(bb.add_func(quant_func(m, k, bits, offset, lo, hi), "shift_quant"), [x2, inv],
                                relax.TensorType([m, k], "int8")))
    return xq, step


def emit_quantize_affine(bb: relax.BlockBuilder, x: relax.Expr, scale: float, zero_point: int, quant_min: int,
                         quant_max: int) -> relax.Expr:
    """`effopt::quantize_affine` (effopt/ops/int8.py): PT2E's quantize_per_tensor, shifted into int8."""
    xs, m, x2 = rows(bb, x, "int8 quantize")
    shift = 128 if quant_max > 127 else 0
    xq, _ = _quantize(bb, x2, m, xs[-1], 8, scale, zero_point - shift, quant_min - shift, quant_max - shift)
    return bb.emit(relax.op.reshape(xq, xs))


def emit_quantize(bb: relax.BlockBuilder, x: relax.Expr, scale: float | None) -> relax.Expr:
    """`effopt::quantize_rows` (effopt/ops/int8.py): (xq int8, step [..., 1]) of x [..., K] float32."""
    xs, m, x2 = rows(bb, x, "int8 quantize")
    xq, step = _quantize(bb, x2, m, xs[-1], 8, scale)
    return relax.Tuple([bb.emit(relax.op.reshape(xq, xs)), bb.emit(relax.op.reshape(step, [*xs[:-1], 1]))])


def emit(bb: relax.BlockBuilder, x: relax.Expr, packed: relax.Expr, scale: relax.Expr, bias, k: int,
         bits: int) -> relax.Expr:
    """y [..., N] = shift_linear(x [..., K]) (+ bias [N]) as Relax calls of the kernels above."""
    xs, m, x2 = rows(bb, x, _OP)
    terms, n, kh = (static(d, _OP, "the packed weight") for d in dims(packed, _OP, "packed weight", 3))
    if xs[-1] != k or kh != (k + 1) // 2:
        raise ValueError(f"{_OP}: x has {xs[-1]} features, the weight {k} ({kh} bytes per row)")
    if str(x.ty.dtype) != "float32":
        raise NotImplementedError(f"{_OP} kernels take float32 activations, got {x.ty.dtype}")
    out = relax.TensorType([m, n], "float32")
    if bits:
        x2, step = _quantize(bb, x2, m, k, bits, None)
        post = bb.emit(relax.op.multiply(step, relax.const(2.0 ** -6, "float32")))  # exact
    else:
        post = relax.op.ones(relax.ShapeExpr([m, 1]), "float32")
    xdtype = "int8" if bits else "float32"
    mb = tunable.choose("shift_matmul", {"terms": terms, "xdtype": xdtype},
                        tunable.static_shapes([x2, packed, scale, post, out]),
                        [{"mb": token_block(m)}] + [{"mb": b} for b in (1, 2, 4, 8)
                                                  if b != token_block(m) and (not isinstance(m, int) or b <= m)],
                        lambda t: matmul_func(m, n, k, terms, xdtype, **t))["mb"]
    y = bb.emit(relax.call_tir(bb.add_func(matmul_func(m, n, k, terms, xdtype, mb), "shift_matmul"),
                               [x2, packed, scale, post], out))
    if bias is not None:
        y = bb.emit(relax.op.add(y, bias))
    return bb.emit(relax.op.reshape(y, [*xs[:-1], n]))


def emit_conv(bb: relax.BlockBuilder, x: relax.Expr, packed: relax.Expr, scale: relax.Expr, bias, kernel, stride,
              padding, dilation) -> relax.Expr:
    """A convolution of one group, x [B, C, H, W] -> [B, N, Ho, Wo], as the shift linear of its patches
    [B, Ho, Wo, C kh kw] (im2col: one strided slice of the padded input per kernel tap; a patch embedding,
    stride = kernel without padding, is a reshape)."""
    b, c, h, w = (static(d, _OP, "every dim of x") for d in dims(x, _OP, "x", 4))
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = ([int(v) for v in a] for a in (kernel, stride, padding, dilation))
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw) == (sh, sw) and not (ph or pw) and (dh, dw) == (1, 1) and h % kh == 0 and w % kw == 0:
        x6 = bb.emit(relax.op.reshape(x, [b, c, ho, kh, wo, kw]))
        patches = relax.op.permute_dims(x6, [0, 2, 4, 1, 3, 5])
    else:
        if ph or pw:
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, ph, ph, pw, pw]))
        taps = [bb.emit(relax.op.strided_slice(x, [2, 3], [i * dh, j * dw],
                                               [i * dh + sh * (ho - 1) + 1, j * dw + sw * (wo - 1) + 1], [sh, sw]))
                for i in range(kh) for j in range(kw)]
        cols = bb.emit(relax.op.stack(taps, axis=2))  # [B, C, kh kw, Ho, Wo]: channel-major, as the weight
        patches = relax.op.permute_dims(relax.op.reshape(cols, [b, c * kh * kw, ho, wo]), [0, 2, 3, 1])
    patches = bb.emit(relax.op.reshape(patches, [b, ho, wo, c * kh * kw]))
    y = emit(bb, patches, packed, scale, bias, c * kh * kw, 0)
    return bb.emit(relax.op.permute_dims(y, [0, 3, 1, 2]))


def build(m: int, n: int, k: int, terms: int, bits: int = 0, bias: bool = False, target="host"):
    """The shift linear compiled alone: a function (x [m, k], packed, scale[, bias]) -> y [m, n]."""
    from ..build import build_function

    def body(bb, x, w, s, b=None):
        return emit(bb, x, w, s, b, k, bits)

    types = [((m, k), "float32"), ((terms, n, (k + 1) // 2), "uint8"), ((n,), "float32")]
    return build_function(body, *types, *([((n,), "float32")] if bias else []), target=target)


# ---- the lowering rules of effopt/ops/shift.py's ops, and of the activation quantizers of effopt/ops/int8.py ---
@lowers(torch.ops.effopt.shift_linear.default)
def _lower_linear(cv, node, x, packed, scale, bias, in_features, activation_bits):
    return emit(cv.bb, x, packed, scale, bias, int(in_features), int(activation_bits))


@lowers(torch.ops.effopt.shift_conv2d.default)
def _lower_conv2d(cv, node, x, packed, scale, bias, kernel, stride, padding, dilation):
    if not static_shape(node, "x"):
        raise Unsupported("shift_conv2d kernels need static shapes")
    return emit_conv(cv.bb, x, packed, scale, bias, kernel, stride, padding, dilation)


@lowers(torch.ops.effopt.quantize_rows.default)
def _lower_quantize_rows(cv, node, x, scale):
    if cv.dtype_of(x) != "float32":
        raise Unsupported("quantize_rows takes float32")
    return emit_quantize(cv.bb, x, None if scale is None else float(scale))


@lowers(torch.ops.effopt.quantize_affine.default)
def _lower_quantize_affine(cv, node, x, scale, zero_point, quant_min, quant_max):
    if cv.dtype_of(x) != "float32":
        raise Unsupported("quantize_affine takes float32")
    return emit_quantize_affine(cv.bb, x, float(scale), int(zero_point), int(quant_min), int(quant_max))

__all__ = ["matmul_func", "scale_func", "quant_func", "emit", "emit_quantize", "emit_quantize_affine", "emit_conv", "build", "token_block", "LANES"]

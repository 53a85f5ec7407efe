"""The fused int8 linear (`effopt::int8_linear`, effopt/int8_ops.py) as one TIR kernel on AVX-512 VNNI:

    quantize   q[m, k] = clamp(nearbyint(x[m, k] * inv[m]) + offset, lo, hi)       uint8
               per token (inv = 127 / max|x[m]|, offset 128, [1, 255]: symmetric int8 + 128), or with a
               calibrated per-tensor scale, or PT2E's affine scale and zero point
    GEMM       acc[m, n] = sum_k q[m, k] * wq[n, k] - wsum[n]       uint8 x int8, int32 accumulation
    epilogue   y[m, n] = act(float(acc) * (step[m] * w_step[n]) + bias[n]) (+ residual[m, n])

VNNI's vpdpbusd multiplies unsigned by signed bytes, four per int32 lane; wsum = offset * sum_k wq[n, k]
(effopt.int8_ops.pack_weight) takes the offset back out, exactly in int32. The weights come packed as
[N/16, K/4, 16, 4] int8: one 64-byte vector holds four consecutive k of 16 output channels, the operand
vpdpbusd takes.

Stage 1 quantizes each row once into a uint8 buffer (parallel over rows); stage 2 runs tiles of MB rows x
NB*16 columns (parallel over column tiles), MB*NB int32x16 accumulators held in registers over the whole
K, and writes the epilogue straight from them: neither the int32 accumulator nor the dequantized values
go to memory. LLVM contracts the epilogue's multiply and bias add into one fused multiply-add
(int8_linear_fused_ref computes the same rounding).
"""
from __future__ import annotations

from tvm import relax, tirx
from tvm.script import tirx as T

from . import tunable
from .common import dims, static, x86_feature_missing

LANES = 16
_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # 8: kOpaque
_OP = "int8 linear"
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
_TINY = 1.1754943508222875e-38  # the smallest normal float32, as effopt.shift_ops.act_quantize


def _rational(x, clip: float, alphas, betas):
    """x * P(x^2) / Q(x^2) on x clipped to [-clip, clip]: Eigen's (and TVM's fast_erf / fast_tanh)
    float32 approximations, which vectorize (libm's erff and tanhf would be a call per element)."""
    x = T.max(T.min(x, T.float32(clip)), T.float32(-clip))
    x2 = x * x
    p = T.float32(alphas[0])
    for a in alphas[1:]:
        p = p * x2 + T.float32(a)
    q = T.float32(betas[0])
    for b in betas[1:]:
        q = q * x2 + T.float32(b)
    return x * p / q


_ERF = (4.0, (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
              -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02),
        (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02))
_TANH = (9.0, (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
               1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03),
         (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))


def _act(v, activation: str):
    if activation == "relu":
        return T.max(v, T.float32(0.0))
    if activation == "gelu":
        return T.float32(0.5) * v * (T.float32(1.0) + _rational(v * T.float32(0.7071067811865476), *_ERF))
    if activation == "gelu_tanh":
        inner = T.float32(0.7978845608028654) * (v + T.float32(0.044715) * v * v * v)
        return T.float32(0.5) * v * (T.float32(1.0) + _rational(inner, *_TANH))
    return v


def tiles(m: int, n: int) -> tuple[int, int]:
    """(MB rows, NB vectors of 16 columns) per register tile: up to 4 x 4 of the 32 zmm registers."""
    nb = next(b for b in (4, 2, 1) if (n // LANES) % b == 0)
    return (1 if m == 1 else 4), nb


def _load(X, XS, m, k, smooth: bool):
    return XS[m, k] if smooth else X[m, k]


def _f32(v: float) -> float:
    import numpy as np

    return float(np.float32(v))


def _out(v, quant):
    """The kernel's output value: float, or uint8 requantized for the next int8 linear (quant: (inv, offset,
    lo, hi))."""
    if quant is None:
        return v
    inv, offset, lo, hi = quant
    return T.Cast("uint8", T.max(T.min(T.nearbyint(v * T.float32(inv)) + T.float32(offset), T.float32(hi)),
                                 T.float32(lo)))


def linear_func(M: int, N: int, K: int, scale: float | None, offset: int, lo: int, hi: int, activation: str,
                residual: bool, smooth: bool = False, prequantized: bool = False, out_quant=None, mb: int | None = None,
                nb: int | None = None):
    """(x [M, K] float32, packed [N/16, K/4, 16, 4] int8, wsum [N] int32, w_step [N], bias [N], residual
    [M, N] (or [1, 1], unread), smooth [K] (or [1], unread)) -> y [M, N] float32. With smooth, x * smooth
    (SmoothQuant's per-channel 1 / s) is quantized instead of x, through a scratch copy (so that LLVM's
    reassociation cannot merge the two multiplies, and the rounding stays the reference's). Activations
    become uint8 clamp(nearbyint(x * inv) + offset, lo, hi): per token symmetric (scale None; offset 128,
    [1, 255]) or affine with a fixed scale. `prequantized`: x is that uint8 already (the int8 linear
    before requantized its output with this scale). `out_quant` (scale, offset, lo, hi): y is requantized
    to uint8 for the next int8 linear instead of stored as float."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"int8 linear activation={activation!r}; valid: {list(ACTIVATIONS)}")
    K4 = (K + 3) // 4
    MB, NB = tiles(M, N)
    MB, NB = MB if mb is None else mb, NB if nb is None else nb  # the autotuner's knobs
    if (N // LANES) % NB:
        raise ValueError(f"int8 linear: {N // LANES} column vectors do not split into tiles of {NB}")
    MP = (M + MB - 1) // MB * MB
    NT = N // LANES // NB
    KV = K // LANES * LANES
    dynamic = scale is None
    RM, RN = (M, N) if residual else (1, 1)
    SK, XM, XK = (K, M, K) if smooth else (1, 1, 1)
    inv_c, step_c = (1.0, 1.0) if dynamic else (_f32(1.0 / scale), _f32(scale))
    if prequantized and (dynamic or smooth):
        raise ValueError("a pre-quantized int8 linear input has a static scale and no smoothing")
    oq = None if out_quant is None else (_f32(1.0 / out_quant[0]), *out_quant[1:])
    x_t, y_t = ("uint8" if prequantized else "float32"), ("float32" if out_quant is None else "uint8")
    vnni = "llvm.x86.avx512.vpdpbusd.512"

    @T.prim_func(private=True, s_tir=True)
    def int8_linear(x_h: T.handle, w_h: T.handle, ws_h: T.handle, s_h: T.handle, b_h: T.handle, r_h: T.handle,
                    sm_h: T.handle, y_h: T.handle):
        T.func_attr(_ATTRS)
        X = T.match_buffer(x_h, (M, K), x_t)
        W = T.match_buffer(w_h, (N // LANES, K4, LANES, 4), "int8")
        WSUM = T.match_buffer(ws_h, (N,), "int32")
        S = T.match_buffer(s_h, (N,), "float32")
        B = T.match_buffer(b_h, (N,), "float32")
        R = T.match_buffer(r_h, (RM, RN), "float32")  # [1, 1] and unread without a residual
        SM = T.match_buffer(sm_h, (SK,), "float32")
        Y = T.match_buffer(y_h, (M, N), y_t)
        with T.sblock("root"):
            XQ = T.alloc_buffer((MP, 4 * K4), "uint8")
            STEP = T.alloc_buffer((MP,), "float32")
            XS = T.alloc_buffer((XM, XK), "float32")
            for m in T.parallel(MP):
                inv = T.alloc_buffer((1,), "float32", scope="local")
                if m < M:
                    if smooth:
                        for k in T.vectorized(K):
                            XS[m, k] = X[m, k] * SM[k]
                    if dynamic:
                        lanes = T.alloc_buffer((LANES,), "float32", scope="local")
                        amax = T.alloc_buffer((1,), "float32", scope="local")
                        for l in T.vectorized(LANES):
                            lanes[l] = T.float32(_TINY)
                        for kb in range(KV // LANES):
                            for l in T.vectorized(LANES):
                                lanes[l] = T.max(lanes[l], T.fabs(_load(X, XS, m, kb * LANES + l, smooth)))
                        amax[0] = T.float32(_TINY)
                        for l in range(LANES):
                            amax[0] = T.max(amax[0], lanes[l])
                        for k in range(KV, K):
                            amax[0] = T.max(amax[0], T.fabs(_load(X, XS, m, k, smooth)))
                        inv[0] = T.float32(127.0) / amax[0]
                        STEP[m] = amax[0] / T.float32(127.0)
                    else:
                        inv[0] = T.float32(inv_c)
                        STEP[m] = T.float32(step_c)
                    if prequantized:
                        for k in T.vectorized(K):
                            XQ[m, k] = X[m, k]
                    else:
                        for k in T.vectorized(K):
                            XQ[m, k] = T.Cast("uint8", T.max(T.min(T.nearbyint(_load(X, XS, m, k, smooth) * inv[0])
                                                                   + T.float32(offset), T.float32(hi)), T.float32(lo)))
                    for k in range(K, 4 * K4):  # padding: its weights are 0
                        XQ[m, k] = T.uint8(0)
                else:
                    STEP[m] = T.float32(0.0)
                    for k in range(4 * K4):
                        XQ[m, k] = T.uint8(0)
            for t in T.parallel(NT):
                acc = T.alloc_buffer((MB, NB * LANES), "int32", scope="local")
                for mb in range(MP // MB):
                    for i in T.unroll(MB):
                        for j in T.unroll(NB):
                            for l in T.vectorized(LANES):
                                acc[i, j * LANES + l] = T.int32(0)
                    for k4 in range(K4):
                        for i in T.unroll(MB):
                            for j in T.unroll(NB):
                                acc[i, T.ramp(j * LANES, 1, LANES)] = T.call_llvm_pure_intrin(
                                    vnni, acc[i, T.ramp(j * LANES, 1, LANES)],
                                    T.reinterpret(T.broadcast(T.reinterpret(
                                        XQ.vload([mb * MB + i, k4 * 4], "uint8x4"), dtype="int32"), LANES),
                                        dtype="uint8x64"),
                                    W.vload([t * NB + j, k4, 0, 0], "int8x64"), dtype="int32x16")
                    for i in T.unroll(MB):
                        if mb * MB + i < M:
                            for j in T.unroll(NB):
                                for l in T.vectorized(LANES):
                                    n = T.meta_var((t * NB + j) * LANES + l)
                                    m = T.meta_var(mb * MB + i)
                                    v = T.meta_var(T.Cast("float32", acc[i, j * LANES + l] - WSUM[n])
                                                   * (STEP[m] * S[n]) + B[n])
                                    if residual:
                                        Y[m, n] = _out(_act(v, activation) + R[m, n], oq)
                                    else:
                                        Y[m, n] = _out(_act(v, activation), oq)

    return int8_linear


def supported(target) -> str | None:
    """Why the kernel cannot run on `target` (a tvm Target), or None."""
    return x86_feature_missing(target, "avx512vnni", "the fused int8 kernel")


def emit(bb: relax.BlockBuilder, x, packed, wsum, w_step, bias, residual, k: int, scale: float | None,
         offset: int, lo: int, hi: int, activation: str, smooth=None, out_quant=None) -> relax.Expr:
    """y [..., N] = int8_linear(x [..., K]) as one call of the kernel above."""
    xs = [static(d, _OP, "every dim of x") for d in dims(x, _OP, "x")]
    m = 1
    for d in xs[:-1]:
        m *= d
    ng, k4 = (static(d, _OP, "the packed weight") for d in dims(packed, _OP, "packed weight", 4)[:2])
    n = ng * LANES
    if xs[-1] != k or k4 != (k + 3) // 4:
        raise ValueError(f"{_OP}: x has {xs[-1]} features, the weight {k}")
    x2 = bb.emit(relax.op.reshape(x, [m, k]))
    b = bias if bias is not None else relax.op.zeros(relax.ShapeExpr([n]), "float32")
    r = bb.emit(relax.op.reshape(residual, [m, n])) if residual is not None else \
        relax.op.zeros(relax.ShapeExpr([1, 1]), "float32")
    sm = smooth if smooth is not None else relax.op.zeros(relax.ShapeExpr([1]), "float32")
    prequantized = str(x.ty.dtype) == "uint8"
    out = relax.TensorType([m, n], "float32" if out_quant is None else "uint8")
    fixed = (m, n, k, scale, offset, lo, hi, activation, residual is not None, smooth is not None, prequantized,
             out_quant)
    mb, nb = tiles(m, n)
    space = [{"mb": mb, "nb": nb}] + [{"mb": a, "nb": c} for a in (1, 2, 4, 6) for c in (1, 2, 4)
                                      if (a, c) != (mb, nb) and (n // LANES) % c == 0 and a * c <= 24 and a <= m]
    knobs = tunable.choose("int8_linear", {"fixed": [str(v) for v in fixed]},
                           tunable.static_shapes([bb.normalize(e) for e in (x2, packed, wsum, w_step, b, r, sm)] + [out]), space,
                           lambda t: linear_func(*fixed, **t))
    y = bb.emit(relax.call_tir(bb.add_func(linear_func(*fixed, **knobs), "int8_linear"),
                               [x2, packed, wsum, w_step, b, r, sm], out))
    return bb.emit(relax.op.reshape(y, [*xs[:-1], n]))

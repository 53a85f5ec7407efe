"""The fused int8 linear (`effopt::int8_linear`, effopt/ops/int8.py) as one TIR kernel, generated for the
target's integer dot product (`Isa`: AVX-512 VNNI, AVX-VNNI, AVX2, aarch64 NEON sdot and i8mm smmla):

    quantize   q[m, k] = clamp(nearbyint(x[m, k] * inv[m]) + offset, lo, hi)       uint8
               per token (inv = 127 / max|x[m]|, offset 128, [1, 255]: symmetric int8 + 128), or with a
               calibrated per-tensor scale, or PT2E's affine scale and zero point
    GEMM       acc[m, n] = sum_k q[m, k] * wq[n, k] - wsum[n]       uint8 x int8, int32 accumulation
    epilogue   y[m, n] = act(float(acc) * (step[m] * w_step[n]) + bias[n]) (+ residual[m, n])

VNNI's vpdpbusd multiplies unsigned by signed bytes, four per int32 lane; wsum = offset * sum_k wq[n, k]
(effopt.ops.int8.pack_weight) takes the offset back out, exactly in int32. The weights come packed as
[N/16, K/4, 16, 4] int8: one 64-byte vector holds four consecutive k of 16 output channels, the operand
vpdpbusd takes; a 32-byte half (8 channels) is AVX-VNNI's and AVX2's operand, a 16-byte quarter NEON's.

Without VNNI (AVX2: Zen 3, Haswell to Comet Lake), vpmaddubsw multiplies unsigned by signed bytes into
int16 pair sums, which saturate (255 * 127 * 2 > 32767). Two exact forms: with activations in [1, 255]
(symmetric int8 + 128, every mode effopt quantizes to) x - 128 lies in [-127, 127], and
vpmaddubsw(|w|, sign(x, w)) sums products of at most 128 * 127 (no saturation); with the full [0, 255]
(PT2E's uint8) x is split into 128 * (x >> 7) + (x & 127), two vpmaddubsw each within range. vpmaddwd
with ones (or 128) then sums the int16 pairs into the int32 lanes. NEON's sdot multiplies signed bytes:
x - 128 there too. i8mm's smmla multiplies a 2 x 8 block of activations (two rows) by an 8 x 2 block of
weights into a 2 x 2 int32 tile: two packed k-groups of four channels, zipped by 32-bit words, are two such
weight blocks (zip1/zip2, no repacking). Where x - 128 is used, the offset's term changes: acc = sum (x - 128) w - (offset - 128)
sum w, so wsum is rescaled (exactly: wsum / offset is sum w).

Stage 1 quantizes each row once into a uint8 buffer (parallel over rows); stage 2 runs tiles of MB rows x
NB*16 columns (parallel over column tiles), MB*NB int32x16 accumulators held in registers over the whole
K, and writes the epilogue straight from them: neither the int32 accumulator nor the dequantized values
go to memory. LLVM contracts the epilogue's multiply and bias add into one fused multiply-add
(int8_linear_fused_ref computes the same rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

from tvm import relax
from tvm.script import tirx as T

from . import tunable
from ...host import host
from .common import dims, extent, memo_kernel, rows, static
from ...target import int8_dot_product
from ...ops.int8 import token_zero_point
import torch

from ..rules import Unsupported, lowers

LANES = 16  # output channels per packed weight group (the layout of effopt.ops.int8.pack_weight)


@dataclass(frozen=True)
class Isa:
    """The integer dot product a target has, and what the kernel generated for it looks like."""
    name: str  # "avx512vnni" | "avxvnni" | "avx2" | "neon-dot" | "neon-i8mm"
    lanes: int  # int32 accumulator lanes per vector register (i8mm: output channels per 2 x 2 tile pair)
    registers: int  # vector registers (register tiles use at most about 3/4 of them)
    # i8mm only: smmla written out in plain vector arithmetic, so that an x86 machine runs (and the tests
    # check) the kernel's layout, zips and epilogue exactly; never chosen for a target
    emulated: bool = False

    @property
    def pairs(self) -> bool:
        """Whether the GEMM works on pairs of rows (i8mm's 2 x 2 tiles): register tiles have even rows."""
        return self.name == "neon-i8mm"


ISAS = {"avx512vnni": Isa("avx512vnni", 16, 32), "avxvnni": Isa("avxvnni", 8, 16), "avx2": Isa("avx2", 8, 16),
        "neon-dot": Isa("neon-dot", 4, 32), "neon-i8mm": Isa("neon-i8mm", 4, 32)}


# an LLVM CPU name with each dot product (for building a lower ISA's kernel on any machine that runs it), and
# the /proc/cpuinfo flags a CPU needs to execute that kernel
ISA_TARGETS = {"avx512vnni": ({"kind": "llvm", "mcpu": "icelake-server"}, ("avx512_vnni", "avx512bw")),
               "avxvnni": ({"kind": "llvm", "mcpu": "alderlake"}, ("avx_vnni", "avx2")),
               "avx2": ({"kind": "llvm", "mcpu": "haswell"}, ("avx2", "fma")),
               "neon-dot": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]},
                            ("asimddp",)),
               "neon-i8mm": ({"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                              "mattr": ["+neon", "+dotprod", "+i8mm"]}, ("asimddp", "i8mm"))}


def host_runs(isa_name: str) -> str | None:
    """Why this host (effopt.host, under EFFOPT_HOST_ISA) cannot execute `isa_name`'s kernel, or None."""
    h = host()
    if isa_name.startswith("neon") == h.x86:
        return f"this is an {h.arch} CPU: it cannot execute {isa_name} code"
    return h.missing(*ISA_TARGETS[isa_name][1])


def isa_of(target) -> Isa | None:
    """The best integer dot product of `target` (a tvm Target), or None where it has none worth a kernel."""
    name = int8_dot_product(target)
    return ISAS[name] if name else None


_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # 8: kOpaque
_OP = "int8 linear"
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
_TINY = 1.1754943508222875e-38  # the smallest normal float32, as effopt.ops.shift.act_quantize


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


def tiles(m, n: int, isa: Isa = ISAS["avx512vnni"]) -> tuple[int, int]:
    """(MB rows, NB vectors of isa.lanes columns) per register tile: up to 16 accumulators of AVX-512's 32
    registers, 8 of AVX2's 16 (the rest hold the weights, the broadcast activations and the pair sums).
    A symbolic m (a served stream of row counts) takes the tiles of many rows; the last tile's missing rows
    are zeros inside the kernel."""
    most = isa.registers // 2
    m = m if isinstance(m, int) else 64
    nb = next(b for b in (4, 2, 1) if (n // isa.lanes) % b == 0)
    if isa.pairs:  # rows in pairs (a single row pads its partner with zeros)
        return (2 if m <= 2 else max(2, min(4, most // nb) // 2 * 2)), nb
    mb = 1 if m == 1 else max(1, min(4, most // nb))
    return mb, nb


def _x_form(isa: Isa, lo: int, hi: int) -> tuple[str, int]:
    """(dtype, shift) of the kernel's quantized activations x in [lo, hi]: stored as x - shift, uint8 as
    quantized, or int8 x - 128 (NEON's signed dot product; AVX2's sign pair for [1, 255]). 7-bit values
    ([0, 127], TOKEN_AFFINE) are both: no shift anywhere."""
    if lo >= 0 and hi <= 127:
        return ("int8" if isa.name.startswith("neon") else "uint8"), 0
    if isa.name.startswith("neon") or (isa.name == "avx2" and lo >= 1):
        return "int8", 128
    return "uint8", 0


def _dot(isa: Isa, lo: int, hi: int, acc, xword, w):
    """acc (int32 x isa.lanes) + the products of 4 activation bytes (`xword`, one int32, values in [lo, hi]
    less _x_form's shift) with a vector of weights (4 bytes per lane), exactly."""
    n = isa.lanes
    if isa.name in ("avx512vnni", "avxvnni"):
        return T.call_llvm_pure_intrin(f"llvm.x86.avx512.vpdpbusd.{32 * n}", acc,
                                       T.reinterpret(T.broadcast(xword, n), dtype=f"uint8x{4 * n}"), w,
                                       dtype=f"int32x{n}")
    if isa.name == "neon-dot":
        return T.call_llvm_pure_intrin("llvm.aarch64.neon.sdot.v4i32.v16i8", acc,
                                       T.reinterpret(T.broadcast(xword, n), dtype="int8x16"), w, dtype="int32x4")
    maddubs, maddwd = "llvm.x86.avx2.pmadd.ub.sw", "llvm.x86.avx2.pmadd.wd"
    if lo >= 0 and hi <= 127:  # 7 bits: pair sums of at most 2 * 127 * 127, as vpmaddubsw takes them
        pairs = T.call_llvm_pure_intrin(maddubs, T.reinterpret(T.broadcast(xword, n), dtype="uint8x32"), w,
                                        dtype="int16x16")
        return acc + T.call_llvm_pure_intrin(maddwd, pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")
    if lo >= 1:  # x - 128 in [-127, 127]: |w| (unsigned) times x with w's sign
        xb = T.reinterpret(T.broadcast(xword, n), dtype="int8x32")
        wabs = T.call_llvm_pure_intrin("llvm.x86.avx2.psign.b", w, w, dtype="int8x32")  # -128 -> 0x80 = 128
        xs = T.call_llvm_pure_intrin("llvm.x86.avx2.psign.b", xb, w, dtype="int8x32")
        pairs = T.call_llvm_pure_intrin(maddubs, wabs, xs, dtype="int16x16")
        return acc + T.call_llvm_pure_intrin(maddwd, pairs, T.broadcast(T.int16(1), 16), dtype="int32x8")
    xb = T.reinterpret(T.broadcast(xword, n), dtype="uint8x32")  # [0, 255]: 128 * high bit + low 7 bits
    low = T.call_llvm_pure_intrin(maddubs, T.bitwise_and(xb, T.broadcast(T.uint8(127), 32)), w, dtype="int16x16")
    high = T.call_llvm_pure_intrin(maddubs, T.shift_right(xb, T.broadcast(T.uint8(7), 32)), w, dtype="int16x16")
    return acc + T.call_llvm_pure_intrin(maddwd, low, T.broadcast(T.int16(1), 16), dtype="int32x8") \
        + T.call_llvm_pure_intrin(maddwd, high, T.broadcast(T.int16(128), 16), dtype="int32x8")


def _smmla(isa: Isa, acc, a, b):
    """acc (int32x4, the 2 x 2 tile [r0c0, r0c1, r1c0, r1c1]) + a (int8x16: two rows of 8) times b (int8x16:
    two columns of 8), as aarch64's smmla computes it; written out in vector arithmetic where emulated."""
    if not isa.emulated:
        return T.call_llvm_pure_intrin("llvm.aarch64.neon.smmla.v4i32.v16i8", acc, a, b, dtype="int32x4")
    order = [(o, k) for o in range(4) for k in range(8)]  # lane o * 8 + k: output o = 2 i + j, term k
    pa = T.Cast("int32x32", T.Shuffle([a, a], [8 * (o // 2) + k for o, k in order]))
    pb = T.Cast("int32x32", T.Shuffle([b, b], [8 * (o % 2) + k for o, k in order]))
    v, n = pa * pb, 32
    while n > 4:  # sum adjacent lanes: 32 -> 16 -> 8 -> 4
        v = T.Shuffle([v], list(range(0, n, 2))) + T.Shuffle([v], list(range(1, n, 2)))
        n //= 2
    return acc + v


def _result(acc, m, n, bufs, activation: str, residual: bool, quant, affine: bool):
    """The epilogue's value y[m, n] from the int32 accumulator; bufs: (WSUM, STEP, S, B, R, ZP). `affine`
    (TOKEN_AFFINE): ZP holds each token's zero point and WSUM sum w; else WSUM is the offset's term."""
    wsum, step, s, b, r, zp = bufs
    off = zp[m] * wsum[n] if affine else wsum[n]
    y = _act(T.Cast("float32", acc - off) * (step[m] * s[n]) + b[n], activation)
    return _out(y + r[m, n] if residual else y, quant)


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


@memo_kernel
def linear_func(M: int, N: int, K: int, scale: float | None, offset: int, lo: int, hi: int, activation: str,
                residual: bool, smooth: bool = False, prequantized: bool = False, out_quant=None, mb: int | None = None,
                nb: int | None = None, *, isa: Isa):
    """(x [M, K] float32, packed [N/16, K/4, 16, 4] int8, wsum [N] int32, w_step [N], bias [N], residual
    [M, N] (or [1, 1], unread), smooth [K] (or [1], unread)) -> y [M, N] float32. With smooth, x * smooth
    (SmoothQuant's per-channel 1 / s) is quantized instead of x, through a scratch copy (so that LLVM's
    reassociation cannot merge the two multiplies, and the rounding stays the reference's). Activations
    become uint8 clamp(nearbyint(x * inv) + offset, lo, hi): per token symmetric (scale None; offset 128,
    [1, 255]) or affine with a fixed scale. `prequantized`: x is that uint8 already (the int8 linear
    before requantized its output with this scale). `out_quant` (scale, offset, lo, hi): y is requantized
    to uint8 for the next int8 linear instead of stored as float. `isa`: the dot product the GEMM is
    generated for; where it takes x - 128 (`_x_type` int8), wsum must be (offset - 128) * sum_k w (`emit`)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"int8 linear activation={activation!r}; valid: {list(ACTIVATIONS)}")
    M = extent(M)  # symbolic: one built kernel for every row count (rows padded to the tile inside)
    K4 = (K + 3) // 4
    K8 = (K4 + 1) // 2  # i8mm's k groups of 8 (an odd last group of 4 pairs with zero weights)
    XW = 8 * K8 if isa.pairs else 4 * K4  # the quantized row's width, zero padded
    VL = isa.lanes
    MB, NB = tiles(M, N, isa)
    MB, NB = MB if mb is None else mb, NB if nb is None else nb  # the autotuner's knobs
    if N % LANES or (N // VL) % NB:
        raise ValueError(f"int8 linear: {N // VL} column vectors do not split into tiles of {NB}")
    if isa.pairs and MB % 2:
        raise ValueError(f"int8 linear ({isa.name}): register tiles take rows in pairs, not {MB}")
    PARTS = LANES // VL  # vectors per packed group of 16 channels
    MP = (M + MB - 1) // MB * MB
    NT = N // VL // NB
    # a uint8 input handed over by the kernel before may hold any byte (the lowering's self-check feeds
    # zeros; [lo, hi] holds only for what a kernel wrote): the full-range form is exact for all of them
    dot_lo, dot_hi = (0, 255) if prequantized else (lo, hi)
    xq_t, shift = _x_form(isa, dot_lo, dot_hi)
    KV = K // LANES * LANES
    dynamic = scale is None
    affine = token_zero_point(scale, lo)  # TOKEN_AFFINE: each token's range and zero point
    RM, RN = (M, N) if residual else (1, 1)
    SK, XM, XK = (K, M, K) if smooth else (1, 1, 1)
    inv_c, step_c = (1.0, 1.0) if dynamic else (_f32(1.0 / scale), _f32(scale))
    if prequantized and (dynamic or smooth):
        raise ValueError("a pre-quantized int8 linear input has a static scale and no smoothing")
    oq = None if out_quant is None else (_f32(1.0 / out_quant[0]), *out_quant[1:])
    x_t, y_t = ("uint8" if prequantized else "float32"), ("float32" if out_quant is None else "uint8")

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
            XQ = T.alloc_buffer((MP, XW), xq_t)
            STEP = T.alloc_buffer((MP,), "float32")
            ZP = T.alloc_buffer((MP,), "int32")  # TOKEN_AFFINE's zero points (unused otherwise)
            XS = T.alloc_buffer((XM, XK), "float32")
            for m in T.parallel(MP):
                inv = T.alloc_buffer((1,), "float32", scope="local")
                zero = T.alloc_buffer((1,), "float32", scope="local")
                zero[0] = T.float32(offset)
                if m < M:
                    if smooth:
                        for k in T.vectorized(K):
                            XS[m, k] = X[m, k] * SM[k]
                    if affine:  # min(x, 0) and max(x, 0) of the row, then its scale and zero point
                        vlo = T.alloc_buffer((LANES,), "float32", scope="local")
                        vhi = T.alloc_buffer((LANES,), "float32", scope="local")
                        ext = T.alloc_buffer((2,), "float32", scope="local")
                        for l in T.vectorized(LANES):
                            vlo[l] = T.float32(0.0)
                            vhi[l] = T.float32(0.0)
                        for kb in range(KV // LANES):
                            for l in T.vectorized(LANES):
                                vlo[l] = T.min(vlo[l], _load(X, XS, m, kb * LANES + l, smooth))
                                vhi[l] = T.max(vhi[l], _load(X, XS, m, kb * LANES + l, smooth))
                        ext[0] = T.float32(0.0)
                        ext[1] = T.float32(0.0)
                        for l in range(LANES):
                            ext[0] = T.min(ext[0], vlo[l])
                            ext[1] = T.max(ext[1], vhi[l])
                        for k in range(KV, K):
                            ext[0] = T.min(ext[0], _load(X, XS, m, k, smooth))
                            ext[1] = T.max(ext[1], _load(X, XS, m, k, smooth))
                        ext[1] = T.max(ext[1] - ext[0], T.float32(_TINY))  # the range
                        inv[0] = T.float32(hi) / ext[1]
                        STEP[m] = ext[1] / T.float32(hi)
                        zero[0] = T.nearbyint(-ext[0] * inv[0])
                        ZP[m] = T.Cast("int32", zero[0])
                    elif dynamic:
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
                            XQ[m, k] = T.Cast(xq_t, T.Cast("int32", X[m, k]) - T.int32(int(shift)))
                    else:
                        for k in T.vectorized(K):
                            XQ[m, k] = T.Cast(xq_t, T.max(T.min(T.nearbyint(_load(X, XS, m, k, smooth) * inv[0])
                                                                + zero[0], T.float32(hi)), T.float32(lo))
                                              - T.float32(shift))
                    for k in range(K, XW):  # padding: its weights are 0
                        XQ[m, k] = T.Cast(xq_t, 0)
                else:
                    STEP[m] = T.float32(0.0)
                    ZP[m] = T.int32(0)
                    for k in range(XW):
                        XQ[m, k] = T.Cast(xq_t, 0)
            if isa.pairs:
                for t in T.parallel(NT):
                    # acc[row pair, 2 x 2 tile, lane]: tile 2 j + h holds channels (t NB + j) 4 + 2 h + {0, 1}
                    pacc = T.alloc_buffer((MB // 2, NB * 2, 4), "int32", scope="local")
                    for mb in range(MP // MB):
                        for i in T.unroll(MB // 2):
                            for j in T.unroll(NB * 2):
                                for l in T.vectorized(4):
                                    pacc[i, j, l] = T.int32(0)
                        for k8 in range(K8):
                            for j in T.unroll(NB):
                                c = T.meta_var((t * NB + j) * VL)
                                lo4 = T.meta_var(T.reinterpret(W.vload([c // LANES, 2 * k8, c % LANES, 0], "int8x16"),
                                                               dtype="int32x4"))
                                hi4 = T.meta_var(T.if_then_else(
                                    2 * k8 + 1 < K4,
                                    T.reinterpret(W.vload([c // LANES, T.min(2 * k8 + 1, K4 - 1), c % LANES, 0],
                                                          "int8x16"), dtype="int32x4"),
                                    T.broadcast(T.int32(0), 4)))
                                for h in T.unroll(2):
                                    for i in T.unroll(MB // 2):
                                        pacc[i, j * 2 + h, T.ramp(0, 1, 4)] = _smmla(
                                            isa, pacc[i, j * 2 + h, T.ramp(0, 1, 4)],
                                            T.Shuffle([XQ.vload([mb * MB + 2 * i, k8 * 8], "int8x8"),
                                                       XQ.vload([mb * MB + 2 * i + 1, k8 * 8], "int8x8")],
                                                      list(range(16))),
                                            T.reinterpret(T.Shuffle([lo4, hi4], [2 * h, 2 * h + 4, 2 * h + 1, 2 * h + 5]),
                                                          dtype="int8x16"))
                        for i in T.unroll(MB):
                            if mb * MB + i < M:
                                for j in T.unroll(NB):
                                    for l in T.unroll(VL):
                                        n = T.meta_var((t * NB + j) * VL + l)
                                        m = T.meta_var(mb * MB + i)
                                        Y[m, n] = _result(pacc[i // 2, j * 2 + l // 2, i % 2 * 2 + l % 2], m, n,
                                                          (WSUM, STEP, S, B, R, ZP), activation, residual,
                                                          oq, affine)
            else:
                for t in T.parallel(NT):
                    acc = T.alloc_buffer((MB, NB * VL), "int32", scope="local")
                    for mb in range(MP // MB):
                        for i in T.unroll(MB):
                            for j in T.unroll(NB):
                                for l in T.vectorized(VL):
                                    acc[i, j * VL + l] = T.int32(0)
                        for k4 in range(K4):
                            for i in T.unroll(MB):
                                for j in T.unroll(NB):
                                    acc[i, T.ramp(j * VL, 1, VL)] = _dot(
                                        isa, dot_lo, dot_hi, acc[i, T.ramp(j * VL, 1, VL)],
                                        T.reinterpret(XQ.vload([mb * MB + i, k4 * 4], f"{xq_t}x4"), dtype="int32"),
                                        W.vload([(t * NB + j) // PARTS, k4, (t * NB + j) % PARTS * VL, 0],
                                                f"int8x{4 * VL}"))
                        for i in T.unroll(MB):
                            if mb * MB + i < M:
                                for j in T.unroll(NB):
                                    for l in T.vectorized(VL):
                                        n = T.meta_var((t * NB + j) * VL + l)
                                        m = T.meta_var(mb * MB + i)
                                        Y[m, n] = _result(acc[i, j * VL + l], m, n, (WSUM, STEP, S, B, R, ZP),
                                                          activation, residual, oq, affine)

    return int8_linear


def supported(target) -> str | None:
    """Why the kernel cannot run on `target` (a tvm Target), or None."""
    if isa_of(target) is not None:
        return None
    keys = sorted(target.keys) if target is not None else []
    return f"the fused int8 kernel needs AVX2, AVX-VNNI, AVX-512 VNNI or aarch64 dotprod (target keys {keys})"


def emit(bb: relax.BlockBuilder, x, packed, wsum, w_step, bias, residual, k: int, scale: float | None,
         offset: int, lo: int, hi: int, activation: str, smooth=None, out_quant=None, *,
         isa: Isa) -> relax.Expr:
    """y [..., N] = int8_linear(x [..., K]) as one call of the kernel above, for `isa`: `isa_of(target)` of
    the target it is built for (another ISA's instructions abort LLVM's code generation)."""
    xs, m, x2 = rows(bb, x, _OP)  # m symbolic in a graph of symbolic sizes
    ng, k4 = (static(d, _OP, "the packed weight") for d in dims(packed, _OP, "packed weight", 4)[:2])
    n = ng * LANES
    if xs[-1] != k or k4 != (k + 3) // 4:
        raise ValueError(f"{_OP}: x has {xs[-1]} features, the weight {k}")
    b = bias if bias is not None else relax.op.zeros(relax.ShapeExpr([n]), "float32")
    r = bb.emit(relax.op.reshape(residual, [m, n])) if residual is not None else \
        relax.op.zeros(relax.ShapeExpr([1, 1]), "float32")
    sm = smooth if smooth is not None else relax.op.zeros(relax.ShapeExpr([1]), "float32")
    prequantized = str(x.ty.dtype) == "uint8"
    shift = _x_form(isa, *((0, 255) if prequantized else (lo, hi)))[1]  # as linear_func decides
    if shift and offset != 128:  # the kernel sums (x - 128) w: (offset - 128) sum w
        if offset == 0:  # wsum is 0 and says nothing of sum w: summed from the weights
            sw = bb.emit(relax.op.sum(relax.op.astype(packed, "int32"), axis=[1, 3]))
        else:
            sw = bb.emit(relax.op.floor_divide(wsum, relax.const(offset, "int32")))
        wsum = bb.emit(relax.op.multiply(relax.op.reshape(sw, [n]), relax.const(offset - 128, "int32")))
    elif shift:
        wsum = relax.op.zeros(relax.ShapeExpr([n]), "int32")
    out = relax.TensorType([m, n], "float32" if out_quant is None else "uint8")
    fixed = (m, n, k, scale, offset, lo, hi, activation, residual is not None, smooth is not None, prequantized,
             out_quant)
    mb, nb = tiles(m, n, isa)
    most = isa.registers * 3 // 4
    space = [{"mb": mb, "nb": nb}] + [{"mb": a, "nb": c} for a in (1, 2, 4, 6) for c in (1, 2, 4)
                                      if (a, c) != (mb, nb) and (n // isa.lanes) % c == 0 and a * c <= most
                                      and (not isinstance(m, int) or (a <= m if not isa.pairs else a % 2 == 0 and a <= max(m, 2)))
                                      and (not isa.pairs or a % 2 == 0)]
    params = {"fixed": [str(v) for v in fixed]} if isa.name == "avx512vnni" else \
        {"fixed": [str(v) for v in fixed], "isa": isa.name}  # AVX-512 keys as before: tuned databases stay valid
    knobs = tunable.choose("int8_linear", params,
                           tunable.static_shapes([bb.normalize(e) for e in (x2, packed, wsum, w_step, b, r, sm)] + [out]), space,
                           lambda t: linear_func(*fixed, **t, isa=isa))
    y = bb.emit(relax.call_tir(bb.add_func(linear_func(*fixed, **knobs, isa=isa), "int8_linear"),
                               [x2, packed, wsum, w_step, b, r, sm], out))
    return bb.emit(relax.op.reshape(y, [*xs[:-1], n]))


# ---- the lowering rule of effopt::int8_linear (effopt/ops/int8.py) ----------------------------------------------
@lowers(torch.ops.effopt.int8_linear.default)
def _lower(cv, node, x, packed, wsum, w_step, bias, scale, offset, lo, hi, in_features, activation, residual,
           smooth, out_scale, out_offset, out_lo, out_hi):
    why = supported(cv.target)
    if why:
        raise Unsupported(why)
    if cv.dtype_of(x) not in ("float32", "uint8"):
        raise Unsupported("int8_linear takes float32 (or requantized uint8) activations")
    out = None if out_scale is None else (float(out_scale), int(out_offset), int(out_lo), int(out_hi))
    return emit(cv.bb, x, packed, wsum, w_step, bias, residual, int(in_features),
                None if scale is None else float(scale), int(offset), int(lo), int(hi), str(activation), smooth,
                out, isa=isa_of(cv.target))

"""Int8 quantization: the activation quantizer as a torch custom op, and the weight quantizer.

    quantize_rows(x, scale)   x [..., K] float32 -> (xq int8 [..., K], step float32 [..., 1]):
        scale None (dynamic, per token): step = max(max|x|, tiny) / 127, xq = nearbyint(x * (127 / max|x|));
        scale s (static, per tensor, from calibration): step = s, xq = nearbyint(x * float32(1 / s));
        both clamped to [-127, 127] (symmetric).
    quantize_weight(w)        w [N, K] -> (wq int8 [N, K], per-output-channel step [N]), symmetric.

An int8 linear is then int_mm(xq, wq^T) (int32 accumulation) times step * w_step, plus bias: the
quantizer has a TVM kernel (the MatShift path's, effopt/lowering/kernels/shift.py, bit-exact against this
reference), the GEMM runs on torch's int8 GEMM (oneDNN VNNI) where that is exact and fast on this CPU
(`int_mm_usable`, which asks effopt.host), and the dequantization fuses with what follows it in a TVM region.

torch._int_mm is not trusted blindly: without VNNI it is a reference loop (3 GOPS on a Zen 3, against
70-150 GFLOPS for float32), and oneDNN limited to AVX2 on a VNNI CPU (ONEDNN_MAX_CPU_ISA=AVX2) returns
saturated, wrong sums. `int_mm` falls back to an exact float64 GEMM (every int8 x int8 sum of K < 2^37 terms
is exact in float64), and the quantize pass uses the library GEMM only where `int_mm_usable()`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..host import torch_int8_gemm
from .shift import act_quantize
from .spec import declare, numel, shape

Tensor = torch.Tensor
QMAX = 127


def int_mm_usable() -> str | None:
    """Why torch._int_mm must not run int8 GEMMs on this CPU (wrong sums, or no int8 dot product, so slower
    than the float32 GEMM), or None: effopt.host's answer, which EFFOPT_HOST_ISA can lower."""
    return torch_int8_gemm()


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] int8 @ b [K, N] int8 -> int32, exactly: torch._int_mm where usable, else in float64."""
    if int_mm_usable() is None:
        return torch._int_mm(a, b)
    return (a.to(torch.float64) @ b.to(torch.float64)).to(torch.int32)


def quantize_rows_ref(x: Tensor, scale: float | None) -> tuple[Tensor, Tensor]:
    if scale is None:
        xq, step = act_quantize(x, 8)
    else:
        inv = torch.tensor(1.0 / scale, dtype=torch.float32)
        xq = torch.round(x.to(torch.float32) * inv).clamp(-QMAX, QMAX)
        step = torch.full((*x.shape[:-1], 1), scale, dtype=torch.float32)
    return xq.to(torch.int8), step


@torch.library.custom_op("effopt::quantize_rows", mutates_args=())
def quantize_rows(x: Tensor, scale: Optional[float]) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization of x's rows: per token (scale None) or with a calibrated scale."""
    return quantize_rows_ref(x, scale)


@quantize_rows.register_fake
def _(x, scale):
    return torch.empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1))


def quantize_affine_ref(x: Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> Tensor:
    """PT2E's quantize_per_tensor (clamp(round(x * (1 / scale)) + zero_point)), as int8: uint8 ranges shifted
    by -128 so that torch's int8 GEMM takes them (the GEMM's result is compensated by 128 - zero_point)."""
    q = torch.clamp(torch.round(x.to(torch.float32) * (1.0 / scale)) + zero_point, quant_min, quant_max)
    return (q - (128 if quant_max > 127 else 0)).to(torch.int8)


@torch.library.custom_op("effopt::quantize_affine", mutates_args=())
def quantize_affine(x: Tensor, scale: float, zero_point: int, quant_min: int, quant_max: int) -> Tensor:
    return quantize_affine_ref(x, scale, zero_point, quant_min, quant_max)


@quantize_affine.register_fake
def _(x, scale, zero_point, quant_min, quant_max):
    return torch.empty(x.shape, dtype=torch.int8)


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """(wq int8 [N, K], step [N] float32): per output channel, symmetric."""
    w = w.detach().to(torch.float32)
    amax = w.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    step = amax / QMAX
    return torch.round(w / step).clamp(-QMAX, QMAX).to(torch.int8), step[:, 0]


# ---- the fused int8 linear: quantize, int8 GEMM, dequantize, bias, activation, residual add as one op ------
ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")
SYMMETRIC = (128, 1, 255)  # (offset, lo, hi) of symmetric int8 activations stored as uint8: q + 128
# (offset, lo, hi) of per-token asymmetric 7-bit activations: q = nearbyint(x * inv) + z in [0, 127], with the
# scale and the zero point z of each token's own range [min(x, 0), max(x, 0)]. Offset 1: wsum holds sum_k w,
# which the GEMM's sum loses z times per token. 7 bits let AVX2's vpmaddubsw take q as it is (one instruction
# per 4 bytes instead of the sign pair that 8-bit q needs, see lowering/kernels/int8.py); the asymmetric range
# keeps most of the 8th bit's accuracy (activations after GELU or LayerNorm are far from symmetric).
TOKEN_AFFINE = (1, 0, 127)


def token_zero_point(scale: float | None, lo: int) -> bool:
    """Whether the activations have a zero point per token (TOKEN_AFFINE) rather than one fixed offset."""
    return scale is None and lo == 0


def pack_weight(wq: Tensor, offset: int = 128) -> tuple[Tensor, Tensor]:
    """wq [N, K] int8 (N a multiple of 16) -> (packed [N/16, ceil(K/4), 16, 4] int8: four consecutive k of
    16 output channels per 64 bytes, the operand of AVX-512 VNNI's vpdpbusd; K zero padded, and
    wsum [N] int32 = offset * sum_k wq[n, k], what the activations' uint8 offset adds to the GEMM)."""
    n, k = wq.shape
    if n % 16:
        raise ValueError(f"int8 linear packing needs a multiple of 16 output channels, got {n}")
    k4 = (k + 3) // 4
    w = torch.zeros(n, 4 * k4, dtype=torch.int8)
    w[:, :k] = wq
    packed = w.reshape(n // 16, 16, k4, 4).permute(0, 2, 1, 3).contiguous()
    return packed, (offset * wq.to(torch.int32).sum(dim=1)).to(torch.int32)


def unpack_weight(packed: Tensor, k: int) -> Tensor:
    """pack_weight's inverse: wq [N, K] int8."""
    ng, k4 = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(ng * 16, 4 * k4)[:, :k]


def quantize_u8(x: Tensor, scale: float | None, offset: int, lo: int, hi: int) \
        -> tuple[Tensor, Tensor, Tensor | None]:
    """(q [..., K] int32 in [lo, hi], step [..., 1] float32, zero point [..., 1] int32 or None):
    per token symmetric (scale None, lo >= 1: inv = 127 / max|x|, q = nearbyint(x * inv) + offset), per token
    asymmetric (scale None, lo 0, TOKEN_AFFINE: range r = max(x, 0) - min(x, 0), inv = hi / r,
    z = nearbyint(-min(x, 0) * inv), q = clamp(nearbyint(x * inv) + z, 0, hi), step r / hi), or with a
    per-tensor scale (inv = float32(1 / scale), q = clamp(nearbyint(x * inv) + offset, lo, hi)). The zero
    point is returned only where it is per token; elsewhere it is `offset`, folded into wsum."""
    if token_zero_point(scale, lo):
        x = x.to(torch.float32)
        low = x.amin(dim=-1, keepdim=True).clamp_max(0.0)
        rng = (x.amax(dim=-1, keepdim=True).clamp_min(0.0) - low).clamp_min(torch.finfo(torch.float32).tiny)
        inv = torch.full_like(rng, float(hi)) / rng  # a true division, as the kernel's
        z = torch.round(-low * inv)
        q = torch.clamp(torch.round(x * inv) + z, 0, hi)
        return q.to(torch.int32), rng / float(hi), z.to(torch.int32)
    if scale is None:
        xq, step = act_quantize(x, 8)
        return xq.to(torch.int32) + offset, step, None
    inv = torch.tensor(1.0 / scale, dtype=torch.float32)
    q = torch.clamp(torch.round(x.to(torch.float32) * inv) + offset, lo, hi)
    return q.to(torch.int32), torch.full((*x.shape[:-1], 1), scale, dtype=torch.float32), None


def _epilogue(y: Tensor, activation: str, residual: Tensor | None) -> Tensor:
    if activation == "relu":
        y = torch.relu(y)
    elif activation in ("gelu", "gelu_tanh"):
        y = torch.nn.functional.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y + residual if residual is not None else y


def _requantize(y: Tensor, out_scale: float | None, offset: int, lo: int, hi: int) -> Tensor:
    """y quantized for the next int8 linear (a folded dequantize -> quantize pair), or y."""
    if out_scale is None:
        return y
    inv = torch.tensor(1.0 / out_scale, dtype=torch.float32)
    return torch.clamp(torch.round(y * inv) + offset, lo, hi).to(torch.uint8)


def _inputs(x: Tensor, scale: float | None, offset: int, lo: int, hi: int, smooth: Tensor | None):
    """(q int32, step [..., 1], per-token zero point or None): x quantized, or x itself where it came
    quantized (uint8, static scale)."""
    if x.dtype == torch.uint8:
        return x.to(torch.int32), torch.full((*x.shape[:-1], 1), scale, dtype=torch.float32), None
    return quantize_u8(x * smooth if smooth is not None else x, scale, offset, lo, hi)


def _offset_term(wsum: Tensor, zp: Tensor | None, rows: int) -> Tensor:
    """What the GEMM's sum of q * w loses to the activations' offset: wsum [N] (offset * sum w), or each
    token's zero point times wsum (sum w) [rows, N]."""
    return wsum if zp is None else zp.reshape(rows, 1).to(torch.int64) * wsum.to(torch.int64)


@torch.library.custom_op("effopt::int8_linear", mutates_args=())
def int8_linear(x: Tensor, packed: Tensor, wsum: Tensor, w_step: Tensor, bias: Optional[Tensor],
                scale: Optional[float], offset: int, lo: int, hi: int, in_features: int, activation: str,
                residual: Optional[Tensor], smooth: Optional[Tensor], out_scale: Optional[float], out_offset: int,
                out_lo: int, out_hi: int) -> Tensor:
    """act(float(sum_k (q[m, k] - offset) * wq[n, k]) * (step[m] * w_step[n]) + bias[n]) (+ residual), with
    q = quantize_u8(x * smooth) (smooth: SmoothQuant's 1 / s per input channel, folded as s into wq), or
    q = x where x comes as uint8 (quantized by the int8_linear before it, with this op's static scale).
    With out_scale, the result is itself quantized to uint8 (clamp(round(y / out_scale) + out_offset,
    out_lo, out_hi)) for the next int8_linear: the dequantize -> quantize pair between two int8 GEMMs
    folded into one requantize. One kernel per target ISA (effopt/lowering/kernels/int8.py); this eager
    form runs the GEMM on int_mm (q - 128 as int8, corrected by 128 * sum wq - wsum). With TOKEN_AFFINE
    activations the offset is each token's zero point, and wsum is sum wq."""
    q, step, zp = _inputs(x, scale, offset, lo, hi, smooth)
    q8 = (q - 128).to(torch.int8).reshape(-1, in_features)
    wq = unpack_weight(packed, in_features)
    acc = (int_mm(q8, wq.t()) + (128 * wq.to(torch.int32).sum(dim=1) - _offset_term(wsum, zp, len(q8)))).to(torch.int32)
    y = acc.to(torch.float32).reshape(*x.shape[:-1], -1) * (step * w_step)
    y = _epilogue(y + bias if bias is not None else y, activation, residual)
    return _requantize(y, out_scale, out_offset, out_lo, out_hi)


@int8_linear.register_fake
def _(x, packed, wsum, w_step, bias, scale, offset, lo, hi, in_features, activation, residual, smooth, out_scale,
      out_offset, out_lo, out_hi):
    return x.new_empty((*x.shape[:-1], packed.shape[0] * 16),
                       dtype=torch.float32 if out_scale is None else torch.uint8)


def int8_linear_fused_ref(x: Tensor, packed: Tensor, wsum: Tensor, w_step: Tensor, bias: Tensor | None,
                          scale: float | None, offset: int, lo: int, hi: int, in_features: int, activation: str,
                          residual: Tensor | None, smooth: Tensor | None = None, out_scale: float | None = None,
                          out_offset: int = 128, out_lo: int = 1, out_hi: int = 255) -> Tensor:
    """The fused kernel's arithmetic in plain torch, for exact tests: int64 accumulation of q * wq minus
    wsum, then acc * scale + bias with one rounding (the kernel's fused multiply-add: the product of two
    float32 is exact in float64, so only the sum is rounded before float32)."""
    q, step, zp = _inputs(x, scale, offset, lo, hi, smooth)
    wq = unpack_weight(packed, in_features).to(torch.int64)
    q2 = q.to(torch.int64).reshape(-1, in_features)
    acc = (q2 @ wq.t() - _offset_term(wsum.to(torch.int64), zp, len(q2))).to(torch.int32)
    s = (step * w_step).reshape(-1, wq.shape[0])
    b = bias.double() if bias is not None else 0.0
    y = (acc.double() * s.double() + b).to(torch.float32).reshape(*x.shape[:-1], -1)
    return _requantize(_epilogue(y, activation, residual), out_scale, out_offset, out_lo, out_hi)


class FloatLinear(torch.nn.Module):
    """The float32 layer an int8_linear replaced, called with the int8_linear's own arguments: what runs
    where the target's int8 kernel measured slower (node.meta["float_form"], read by the lowering). A
    uint8 input (handed over requantized) is dequantized first, and a requantized output quantized, so
    its neighbours see the interface they were built for."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous(), persistent=False)

    def forward(self, x, packed, wsum, w_step, bias, scale, offset, lo, hi, in_features, activation, residual=None,
                smooth=None, out_scale=None, out_offset=128, out_lo=1, out_hi=255):
        if x.dtype == torch.uint8:
            x = (x.to(torch.float32) - offset) * scale
        y = _epilogue(torch.nn.functional.linear(x, self.weight, bias), activation, residual)
        return _requantize(y, out_scale, out_offset, out_lo, out_hi)


def int8_linear_ref(x: Tensor, wq: Tensor, w_step: Tensor, bias: Tensor | None, scale: float | None,
                    activations: str = "int8") -> Tensor:
    """The int8 linear the quantize pass builds, in plain torch (tests); activations 'uint7': per token with a
    zero point (TOKEN_AFFINE), where scale is None."""
    if activations == "uint7" and scale is None:
        q, step, zp = quantize_u8(x, None, *TOKEN_AFFINE)
        xq = q - zp  # in [-127, 127]
    else:
        xq, step = quantize_rows_ref(x, scale)
    xq = xq.to(torch.int8)
    acc = int_mm(xq.reshape(-1, xq.shape[-1]), wq.t()).reshape(*x.shape[:-1], -1)
    y = acc.to(torch.float32) * (step * w_step)
    return y + bias if bias is not None else y


# ---- declarations (effopt/ops/spec.py) ------------------------------------------------------------------------
# Quantization after float ops: a float32 value that differs from eager's in its last bit (a LayerNorm computed
# in another order) can land on the other side of a rounding boundary, so int8 outputs may differ by 1 in a
# few elements (at most 1%); anything else is still an error.
OFF_BY_ONE = {"int8_off_by_one": 0.01}


def _int8_products(b, out):  # int8 x int8 products, int32 accumulation
    return numel(shape(out)) * int(b["in_features"]), 0


declare(quantize_rows, tolerance=OFF_BY_ONE)
declare(quantize_affine, tolerance=OFF_BY_ONE)
declare(int8_linear, tolerance=OFF_BY_ONE, alone=True, cost=_int8_products)

__all__ = ["int8_linear", "FloatLinear", "int_mm", "int_mm_usable", "int8_linear_fused_ref", "pack_weight", "unpack_weight", "quantize_u8", "ACTIVATIONS",
           "SYMMETRIC", "TOKEN_AFFINE", "token_zero_point", "quantize_rows", "quantize_rows_ref", "quantize_affine", "quantize_affine_ref", "quantize_weight", "int8_linear_ref", "QMAX"]

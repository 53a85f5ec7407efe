"""Power-of-two (shift) weights: quantization, 4-bit packing and the plain-torch reference of the shift
arithmetic that effopt's shift kernels must match exactly.

A weight matrix W [N, K] (a linear layer's out x in) becomes, per output channel n, a scale s[n] times a sum
of `terms` signed powers of two:

    W[n, k] ~ s[n] * sum_t  sign[t, n, k] * 2^(-e[t, n, k]),    e in 0..6, or the term is 0

Each term is one 4-bit code: bit 3 the sign, bits 0-2 the exponent e (0..6; 7 means zero), two codes per
byte along K (the low nibble holds the even k). `terms=1` is DeepShift-Q's rounding of log2|w| (8x fewer
bytes than fp32); `terms=2` quantizes the residual again (w ~ s (±2^-e1 ± 2^-e2)), 4x fewer bytes and far
more precision. The scale s[n] is max|W[n, :]|, so every |w / s| <= 1 and e = 0 is the largest magnitude.

Every dequantized weight s * (±2^-e) is exact in float32, so the reference linear `shift_linear_ref` is an
ordinary float matmul with the dequantized weights; the kernels compute x * 2^-e as an integer subtract on
x's exponent bits (exact for normal floats) and differ from it only in summation order.

The integer path (ShiftAddViT's MatShift, `activation_bits=8`): each token's activations are quantized
symmetrically, xq = nearbyint(x * (qmax / max|x|)) with qmax = 2^(bits-1) - 1, and each weight term is the
integer ±2^(6-e), so xq * w is xq shifted left by 6 - e, negated for a negative sign, accumulated in int32
(exact); y = float32(acc) * s[n] * 2^-6 * (max|x| / qmax), multiplied in that order. `matshift_linear_ref` computes the same integers
exactly (float64 matmul of integers below 2^53) and the same float32 epilogue, so the kernel matches it
bit for bit.

The torch custom ops (`torch.ops.effopt.*`):
    shift_linear(x, packed, scale, bias, in_features, activation_bits)   the inference op the `shift_add`
        pass puts in place of a frozen linear layer; lowered to effopt's shift kernels
    shift_weight(weight, terms)        the power-of-two weight, with a straight-through gradient (fine-tuning)
    act_quant(x, bits)                 per-token symmetric fake quantization, straight-through (fine-tuning)
"""
from __future__ import annotations

import torch

from ..options.shift_add import ACT_BITS, TERMS
from .spec import declare, numel, shape

Tensor = torch.Tensor
MAX_SHIFT = 6  # exponents 0..6 below the channel scale; code 7 is zero
ZERO_CODE = 7


def _round_pow2(v: Tensor) -> tuple[Tensor, Tensor]:
    """(sign bit, exponent code) of v in [-1, 1] rounded to the nearest of {±2^-e, e = 0..6} or 0 (in the
    log domain as DeepShift-Q; below half the smallest power it is 0)."""
    mag = v.abs()
    e = torch.round(-torch.log2(mag.clamp_min(2.0 ** -40))).clamp(0, MAX_SHIFT)
    zero = mag < 2.0 ** -(MAX_SHIFT + 1)
    code = torch.where(zero, torch.full_like(e, ZERO_CODE), e).to(torch.uint8)
    sign = ((v < 0) & ~zero).to(torch.uint8)
    return sign, code


def _value(sign: Tensor, code: Tensor) -> Tensor:
    v = torch.where(code == ZERO_CODE, torch.zeros((), dtype=torch.float32), torch.exp2(-code.to(torch.float32)))
    return torch.where(sign.bool(), -v, v)


def quantize(weight: Tensor, terms: int = 1) -> tuple[Tensor, Tensor]:
    """(codes [terms, N, K] uint8 (sign << 3 | exponent), scale [N] float32) for weight [N, K]."""
    if terms not in TERMS:
        raise ValueError(f"terms={terms!r}; valid: {list(TERMS)}")
    if weight.dim() != 2:
        raise ValueError(f"quantize takes a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    rest = w / scale[:, None]
    codes = []
    for _ in range(terms):
        sign, code = _round_pow2(rest)
        codes.append(sign << 3 | code)
        rest = rest - _value(sign, code)
    return torch.stack(codes), scale


def dequantize(codes: Tensor, scale: Tensor) -> Tensor:
    """The weight [N, K] float32 that the codes stand for (exact)."""
    v = _value(codes >> 3, codes & 7).sum(dim=0)
    return v * scale[:, None]


def _byte_table() -> Tensor:
    """[256, 2]: the weights (without scale) of a packed byte's low and high nibble."""
    v = _value(torch.arange(16, dtype=torch.uint8) >> 3, torch.arange(16, dtype=torch.uint8) & 7)
    return torch.stack([v.repeat(16), v.repeat_interleave(16)], dim=-1)


_BYTES = _byte_table()


def dequantize_packed(packed: Tensor, scale: Tensor, k: int) -> Tensor:
    """`dequantize` straight from packed bytes [terms, N, ceil(K/2)] (one table lookup per byte): the
    same values, a few times faster (the eager shift linear dequantizes on every call)."""
    v = torch.nn.functional.embedding(packed.long(), _BYTES).flatten(-2)[..., :k]
    return (v.sum(dim=0) if v.shape[0] > 1 else v[0]) * scale[:, None]


def pack(codes: Tensor) -> Tensor:
    """codes [..., K] (4-bit values in uint8) -> [..., ceil(K / 2)] uint8, two codes per byte (low nibble: even k);
    an odd K is padded with a zero code."""
    k = codes.shape[-1]
    if k % 2:
        codes = torch.cat([codes, torch.full(codes.shape[:-1] + (1,), ZERO_CODE, dtype=torch.uint8)], dim=-1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack(packed: Tensor, k: int) -> Tensor:
    """The inverse of `pack` for K = k."""
    out = torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)
    return out[..., :k]


def shift_linear_ref(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, k: int) -> Tensor:
    """y = x @ W^T + bias with W the power-of-two weight that `packed` [terms, N, ceil(K/2)] and `scale` [N]
    encode (float32 accumulation)."""
    y = x.to(torch.float32) @ dequantize_packed(packed, scale, k).t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)




def act_quantize(x: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(xq, step): x [..., K] float32 quantized per token (last dim), symmetric, to integers in
    [-qmax, qmax] (float32 holding integers), and the step max|x| / qmax per token [..., 1]."""
    qmax = float(2 ** (bits - 1) - 1)
    amax = x.to(torch.float32).abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    inv = torch.full_like(amax, qmax) / amax  # a true division (a scalar / tensor is reciprocal * scalar)
    xq = torch.round(x.to(torch.float32) * inv).clamp(-qmax, qmax)  # round: half to even (nearbyint)
    return xq, amax / qmax


def integer_weight(codes: Tensor) -> Tensor:
    """The integer weight sum_t ±2^(6-e) [N, K] (int64) of codes [terms, N, K]: MatShift's shift amounts."""
    e = (codes & 7).to(torch.int64)
    v = torch.where(e == ZERO_CODE, 0, 1 << (MAX_SHIFT - e).clamp_min(0))
    return torch.where((codes >> 3).bool(), -v, v).sum(dim=0)


def matshift_linear_ref(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, k: int,
                        bits: int) -> Tensor:
    """The integer path: exactly the kernel's integers (xq << (6 - e), signed, summed in int32) and its
    float32 epilogue float32(acc) * s[n] * 2^-6 * step (+ bias)."""
    xq, step = act_quantize(x, bits)
    w = integer_weight(unpack(packed, k))
    # integers summed exactly: in float32 (torch's GEMM) while no partial sum can reach 2^24, else float64
    bound = float(2 ** (bits - 1) - 1) * float(w.abs().sum(dim=1).max()) if w.numel() else 0.0
    dt = torch.float32 if bound < 2 ** 24 else torch.float64
    acc = (xq.to(dt) @ w.to(dt).t()).to(torch.float32)  # exact integers (< 2^31), rounded to float32
    y = acc * scale * (2.0 ** -MAX_SHIFT) * step
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def linear_ref(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, k: int, bits: int) -> Tensor:
    """The shift linear of either path: float (bits 0) or integer."""
    if bits:
        return matshift_linear_ref(x, packed, scale, bias, k, bits)
    return shift_linear_ref(x, packed, scale, bias, k)


def weight_bytes(n: int, k: int, terms: int) -> int:
    """Bytes of a packed [N, K] weight with its scales (the fp32 weight takes 4 N K)."""
    return terms * n * ((k + 1) // 2) + 4 * n



# ---- the custom ops --------------------------------------------------------------------------------------
from typing import Optional  # noqa: E402


def _check_bits(bits: int) -> None:
    if bits not in ACT_BITS:
        raise ValueError(f"activation_bits={bits!r}; valid: {list(ACT_BITS)} (0: float path)")


class FloatShift(torch.nn.Module):
    """The float32 linear (or convolution) a shift_linear (shift_conv2d) replaced, called with the shift
    op's own arguments: what runs where the target's shift kernel measured slower (node.meta["float_form"])."""

    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous(), persistent=False)

    def forward(self, x, packed, scale, bias, *rest):
        if len(rest) == 4:  # shift_conv2d(x, packed, scale, bias, kernel, stride, padding, dilation)
            (kh, kw), stride, padding, dilation = rest
            w = self.weight.reshape(self.weight.shape[0], -1, kh, kw)
            return torch.nn.functional.conv2d(x.to(torch.float32), w, bias, stride, padding, dilation).to(x.dtype)
        return torch.nn.functional.linear(x, self.weight, bias)


@torch.library.custom_op("effopt::shift_linear", mutates_args=())
def shift_linear(x: Tensor, packed: Tensor, scale: Tensor, bias: Optional[Tensor], in_features: int,
                 activation_bits: int) -> Tensor:
    """x [..., K] @ W^T + bias with W the packed power-of-two weight [terms, N, ceil(K/2)] and scales [N]."""
    _check_bits(activation_bits)
    return linear_ref(x, packed, scale, bias, in_features, activation_bits)


@shift_linear.register_fake
def _(x, packed, scale, bias, in_features, activation_bits):
    return x.new_empty((*x.shape[:-1], packed.shape[1]))


@torch.library.custom_op("effopt::shift_conv2d", mutates_args=())
def shift_conv2d(x: Tensor, packed: Tensor, scale: Tensor, bias: Optional[Tensor], kernel: list[int],
                 stride: list[int], padding: list[int], dilation: list[int]) -> Tensor:
    """A convolution (one group) of x [B, C, H, W] on packed power-of-two weights [terms, N, ceil(C kh kw / 2)]:
    the shift linear of each patch."""
    c, (kh, kw) = x.shape[1], kernel
    w = dequantize_packed(packed, scale, c * kh * kw).reshape(-1, c, kh, kw)
    return torch.nn.functional.conv2d(x.to(torch.float32), w, bias, stride, padding, dilation).to(x.dtype)


def conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


@shift_conv2d.register_fake
def _(x, packed, scale, bias, kernel, stride, padding, dilation):
    h, w = (conv_out(x.shape[2 + i], kernel[i], stride[i], padding[i], dilation[i]) for i in range(2))
    return x.new_empty((x.shape[0], packed.shape[1], h, w))


@torch.library.custom_op("effopt::shift_weight", mutates_args=())
def shift_weight(weight: Tensor, terms: int) -> Tensor:
    """The weight [N, ...] (a linear's [N, K] or a conv's [N, C, kh, kw]) rounded per output channel to
    `terms` powers of two per element (exact dequantized values)."""
    codes, scale = quantize(weight.reshape(weight.shape[0], -1), terms)
    return dequantize(codes, scale).to(weight.dtype).reshape(weight.shape)


@shift_weight.register_fake
def _(weight, terms):
    return torch.empty_like(weight)


@torch.library.custom_op("effopt::act_quant", mutates_args=())
def act_quant(x: Tensor, bits: int) -> Tensor:
    """x fake-quantized per token to `bits` bits (symmetric), as MatShift's integer path sees it."""
    if bits not in ACT_BITS[1:]:
        raise ValueError(f"act_quant bits={bits!r}; valid: {list(ACT_BITS[1:])}")
    xq, step = act_quantize(x, bits)
    return (xq * step).to(x.dtype)


@act_quant.register_fake
def _(x, bits):
    return torch.empty_like(x)


# straight-through estimators: the rounding passes the gradient unchanged (DeepShift's and ShiftAddViT's
# fine-tuning recipe), so the float weights under the rounding keep learning
torch.library.register_autograd("effopt::shift_weight", lambda ctx, g: (g, None))
torch.library.register_autograd("effopt::act_quant", lambda ctx, g: (g, None))


# ---- declarations (effopt/ops/spec.py) ------------------------------------------------------------------------
def _linear_products(b, out):  # additions of shifted activations: no multiplications
    return numel(shape(out)) * int(b["in_features"]), 0


def _conv_products(b, out):
    x = shape(b["x"])
    k = b["kernel"]
    return (numel(shape(out)) * x[1] * int(k[0]) * int(k[1]) if x else 0), 0


# each lowered alone, so the lowering measures it against its eager form (torch's GEMM on the dequantized
# weights) shape by shape
declare(shift_linear, alone=True, cost=_linear_products)
declare(shift_conv2d, alone=True, cost=_conv_products)
# training-time ops of a reparameterized model (straight-through); the shift pass converts them
declare(shift_weight)
declare(act_quant)

__all__ = ["quantize", "dequantize", "pack", "unpack", "shift_linear_ref", "matshift_linear_ref", "linear_ref",
           "act_quantize", "integer_weight", "dequantize_packed", "weight_bytes", "TERMS", "ACT_BITS", "MAX_SHIFT"]

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
"""
from __future__ import annotations

import torch

Tensor = torch.Tensor
MAX_SHIFT = 6  # exponents 0..6 below the channel scale; code 7 is zero
ZERO_CODE = 7
TERMS = (1, 2, 3)


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
    w = dequantize(unpack(packed, k), scale)
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def weight_bytes(n: int, k: int, terms: int) -> int:
    """Bytes of a packed [N, K] weight with its scales (the fp32 weight takes 4 N K)."""
    return terms * n * ((k + 1) // 2) + 4 * n


__all__ = ["quantize", "dequantize", "pack", "unpack", "shift_linear_ref", "weight_bytes", "TERMS", "MAX_SHIFT"]

"""Int8 quantization: the activation quantizer as a torch custom op, and the weight quantizer.

    quantize_rows(x, scale)   x [..., K] float32 -> (xq int8 [..., K], step float32 [..., 1]):
        scale None (dynamic, per token): step = max(max|x|, tiny) / 127, xq = nearbyint(x * (127 / max|x|));
        scale s (static, per tensor, from calibration): step = s, xq = nearbyint(x * float32(1 / s));
        both clamped to [-127, 127] (symmetric).
    quantize_weight(w)        w [N, K] -> (wq int8 [N, K], per-output-channel step [N]), symmetric.

An int8 linear is then torch._int_mm(xq, wq^T) (int32 accumulation) times step * w_step, plus bias: the
quantizer has a TVM kernel (the MatShift path's, effopt/lowering/kernels/shift.py, bit-exact against this
reference), the GEMM runs on torch's int8 GEMM (oneDNN VNNI), and the dequantization fuses with what
follows it in a TVM region.
"""
from __future__ import annotations

from typing import Optional

import torch

from .shift_ops import act_quantize

Tensor = torch.Tensor
QMAX = 127


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


def int8_linear_ref(x: Tensor, wq: Tensor, w_step: Tensor, bias: Tensor | None, scale: float | None) -> Tensor:
    """The int8 linear the quantize pass builds, in plain torch (tests)."""
    xq, step = quantize_rows_ref(x, scale)
    acc = torch._int_mm(xq.reshape(-1, xq.shape[-1]), wq.t()).reshape(*x.shape[:-1], -1)
    y = acc.to(torch.float32) * (step * w_step)
    return y + bias if bias is not None else y


__all__ = ["quantize_rows", "quantize_rows_ref", "quantize_affine", "quantize_affine_ref", "quantize_weight", "int8_linear_ref", "QMAX"]

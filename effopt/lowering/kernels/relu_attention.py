"""The kernel of effopt::relu_attention (effopt/ops/relu_attention.py) as Relax: two batched matmuls around
the scale, mask, relu and 1/M, which TVM fuses into the first matmul's epilogue and schedules by default."""
from __future__ import annotations

import torch
from tvm import relax

from ..rules import Unsupported, additive_mask, float32_attention, lowers
from .common import dims


def emit(bb: relax.BlockBuilder, q, k, v, mask, scale: float):
    """q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv], mask additive float32 broadcastable to [B, H, N, M]
    or None -> [B, H, N, Dv]. M static (the weights are divided by it)."""
    op = relax.op
    m = dims(k, "relu_attention", "k", 4)[2]
    if not isinstance(m, int):
        raise Unsupported("relu_attention needs a static key count")
    s = bb.emit(op.multiply(op.matmul(q, op.permute_dims(k, [0, 1, 3, 2])), relax.const(scale, "float32")))
    if mask is not None:
        s = bb.emit(op.add(s, mask))
    w = bb.emit(op.multiply(op.nn.relu(s), relax.const(1.0 / m, "float32")))
    return bb.emit(op.matmul(w, v))


@lowers(torch.ops.effopt.relu_attention.default)
def _lower(cv, node, q, k, v, mask, scale):
    float32_attention(node, q, k, v)
    return emit(cv.bb, q, k, v, additive_mask(cv, mask), float(scale))

"""effopt's TVM kernels called from eager PyTorch, for custom ops whose PyTorch reference is too slow to
run a model with.

L-Mul's reference (`effopt.ops.attention.lmul_attention_ref`) does every product of both N x M x D contractions as
a separate integer tensor op: about 3.5 s per attention of DINOv2 at batch 8, minutes per forward. The
eager forward of `effopt::lmul_attention` (what the accuracy guard, `effopt.reparameterize`'s fine-tuning
and any un-lowered graph run) calls the same TVM kernel that the lowering uses instead, compiled once per
input signature in this process. The reference stays the oracle: the lowering's self-check runs it under
`effopt.ops.attention.reference_kernels()`, and tests compare this path with it.
"""
from __future__ import annotations

import threading

import torch

from ..ops import attention as _attention
from ..ops.attention import additive_mask
from .runtime import compact

_lock = threading.Lock()
_compiled: dict[tuple, object] = {}


def _compile(key, emit_body, *param_types):
    """`build_function`, cached in this process by `key`."""
    fn = _compiled.get(key)
    if fn is not None:
        return fn
    with _lock:
        if key not in _compiled:
            from .build import build_function

            _compiled[key] = build_function(emit_body, *param_types)
        return _compiled[key]


def lmul_attention(q, k, v, mask, scale: float, mantissa_bits: int) -> torch.Tensor:
    """L-Mul attention of float32 CPU tensors q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv] with an optional
    mask (boolean, True: attend, or additive float32) broadcastable to [B, H, N, M]; out [B, H, N, Dv]."""
    from .kernels import lmul

    tensors = [compact(t) for t in (q, k, v)]
    if mask is not None:
        tensors.append(compact(additive_mask(mask).to(torch.float32)))
    types = tuple((tuple(t.shape), "float32") for t in tensors)
    key = ("lmul_attention", types, float(scale), int(mantissa_bits))

    def body(bb, q, k, v, mask=None):
        return lmul.emit(bb, q, k, v, mask, float(scale), int(mantissa_bits))

    fn = _compile(key, body, *types)
    return torch.from_dlpack(fn(*tensors))


def clear() -> None:
    """Forget the compiled kernels (tests)."""
    with _lock:
        _compiled.clear()


_attention.EAGER_KERNELS["lmul_attention"] = lmul_attention  # eager effopt::lmul_attention runs it

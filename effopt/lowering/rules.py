"""The lowering's rule registry: which ops convert to Relax, how, and which form regions of their own.

ATen ops' rules are in lowering/aten/ (one file per op category); effopt's own ops' rules sit beside their
kernels (lowering/kernels/), called with the op's arguments by name (effopt/ops/spec.py). Extension is by registration (`@lowers`), not by
edits to the converter.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx
from tvm import relax

from ..ops.spec import spec_of

class Unsupported(Exception):
    """The op, or this use of it, has no Relax lowering; the region runs in eager PyTorch."""


CONVERTERS: dict[Any, Callable] = {}
# For ops lowered only in some uses: node -> whether this use can be lowered (checked before partitioning)
LOWERABLE: dict[Any, Callable[[fx.Node], bool]] = {}
# Ops that form a region of their own, so that the measured choice (TVM kernel or torch's) is made for the
# op alone, per shape: attention, where torch's fused kernel is a strong baseline.
ISOLATED: set = set()


def lowers(*ops):
    def deco(fn):
        for op in ops:
            CONVERTERS[op] = fn
        return fn
    return deco


DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float64: "float64",
          torch.int64: "int64", torch.int32: "int32", torch.int8: "int8", torch.uint8: "uint8", torch.bool: "bool"}


def relax_dtype(dt: torch.dtype) -> str:
    if dt not in DTYPES:
        raise Unsupported(f"dtype {dt}")
    return DTYPES[dt]


def call_rule(rule, cv, node: fx.Node, args, kwargs):
    """A rule called with the converted arguments: by name for effopt's ops (their declared schema)."""
    spec = spec_of(node.target)
    if spec is not None:
        return rule(cv, node, **spec.bind(args, kwargs))
    return rule(cv, node, *args, **kwargs)


def static_shape(node: fx.Node, name: str) -> bool:
    """Whether argument `name` of an effopt op's node has a fully static shape."""
    v = spec_of(node.target).bind(node)[name].meta["val"]
    return all(isinstance(d, int) for d in v.shape)


def additive_mask(cv, mask):
    """A boolean mask (True: attend) as the additive float32 mask the kernels take."""
    if mask is None or cv.dtype_of(mask) != "bool":
        return mask if mask is None else cv.cast(mask, "float32")
    return cv.bb.emit(relax.op.where(mask, relax.const(0.0, "float32"), relax.const(float("-inf"), "float32")))


def float32_attention(node, *tensors):
    if any(t.ty.dtype != "float32" for t in tensors):
        raise Unsupported(f"{node.target} kernels take float32")

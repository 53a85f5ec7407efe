"""Tensor creation: full, scalar_tensor, arange, zeros/ones (and their new_ forms)."""
from __future__ import annotations

import torch
from tvm import relax

from ..rules import Unsupported, lowers

aten = torch.ops.aten


@lowers(aten.full.default)
def _full(cv, node, size, fill_value, *, dtype=None, layout=None, device=None, pin_memory=None):
    dt = cv.out_dtype(node)
    return relax.op.full(cv.shape(node.meta["val"]), relax.const(fill_value, dt), dt)


@lowers(aten.scalar_tensor.default)
def _scalar_tensor(cv, node, value, *, dtype=None, layout=None, device=None, pin_memory=None):
    return relax.const(value, cv.out_dtype(node))


@lowers(aten.arange.start_step, aten.arange.default, aten.arange.start)
def _arange(cv, node, *args, dtype=None, layout=None, device=None, pin_memory=None):
    dt = cv.out_dtype(node)
    if node.target is aten.arange.default:
        start, end, step = 0, args[0], 1
    else:
        start, end, step = (list(args) + [1])[:3]
    if not all(isinstance(v, int) for v in (start, end, step)):
        raise Unsupported("symbolic or float arange")
    return relax.op.arange(start, end, step, dt)


@lowers(aten.zeros.default, aten.ones.default, aten.new_zeros.default, aten.new_ones.default,
        aten.new_full.default, aten.full_like.default, aten.zeros_like.default, aten.ones_like.default)
def _fill(cv, node, *args, dtype=None, layout=None, device=None, pin_memory=None, memory_format=None):
    target = node.target
    value = {aten.zeros.default: 0, aten.new_zeros.default: 0, aten.zeros_like.default: 0,
             aten.ones.default: 1, aten.new_ones.default: 1, aten.ones_like.default: 1}.get(target)
    if value is None:  # new_full(x, size, v) / full_like(x, v)
        value = args[2] if target is aten.new_full.default else args[1]
    dt = cv.out_dtype(node)
    return relax.op.full(cv.shape(node.meta["val"]), relax.const(value, dt), dt)

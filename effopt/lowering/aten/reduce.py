"""Reductions: sum, mean, amax/amin (whatever _reduce registers), variance, argmax."""
from __future__ import annotations

import math

import torch
from tvm import relax

from ..rules import Unsupported, lowers, relax_dtype

aten = torch.ops.aten


def _dims(dim, ndim):
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return [d % ndim for d in dims]


def _reduce(relax_op):
    def rule(cv, node, x, dim=None, keepdim=False, *, dtype=None):
        if dtype is not None:
            x = cv.cast(x, relax_dtype(dtype))
        return relax_op(x, _dims(dim, len(x.ty.shape.values) if x.ty.shape is not None else 0), keepdim)
    return rule


lowers(aten.sum.dim_IntList)(_reduce(relax.op.sum))
lowers(aten.mean.dim)(_reduce(relax.op.mean))
lowers(aten.amax.default)(_reduce(relax.op.max))
lowers(aten.amin.default)(_reduce(relax.op.min))


@lowers(aten.var.correction)
def _var(cv, node, x, dim=None, *, correction=None, keepdim=False):
    if cv.out_dtype(node) != "float32":
        raise Unsupported("var on non-float32")
    shape = node.args[0].meta["val"].shape
    dims = _dims(dim, len(shape))
    if any(not isinstance(shape[d], int) for d in (dims if dims is not None else range(len(shape)))):
        raise Unsupported("var over a symbolic dim")
    n = math.prod(int(shape[d]) for d in (dims if dims is not None else range(len(shape))))
    c = 1.0 if correction is None else float(correction)
    v = relax.op.variance(x, dims, keepdim)  # the population variance (divides by n)
    return v if c == 0 else relax.op.multiply(v, relax.const(n / max(n - c, 0) if n > c else float("nan"), "float32"))


@lowers(aten.argmax.default)
def _argmax(cv, node, x, dim=None, keepdim=False):
    if dim is None:
        raise Unsupported("argmax over all dims")
    return relax.op.argmax(x, int(dim) % node.args[0].meta["val"].dim(), bool(keepdim))

"""Data movement: views and reshapes, permutes, slices, selects, concatenation, flips, tril."""
from __future__ import annotations

import torch
from tvm import relax

from ..rules import Unsupported, lowers

aten = torch.ops.aten


@lowers(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(cv, node, x, size):
    return relax.op.reshape(x, cv.shape(node.meta["val"]))


@lowers(aten.permute.default)
def _permute(cv, node, x, dims):
    return relax.op.permute_dims(x, [d % len(dims) for d in dims])


@lowers(aten.transpose.int)
def _transpose(cv, node, x, d0, d1):
    n = len(node.meta["val"].shape)
    axes = list(range(n))
    axes[d0 % n], axes[d1 % n] = axes[d1 % n], axes[d0 % n]
    return relax.op.permute_dims(x, axes)


@lowers(aten.t.default)
def _t(cv, node, x):
    return relax.op.permute_dims(x, [1, 0]) if len(node.meta["val"].shape) == 2 else x


@lowers(aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.expand.default,
        aten.alias.default, aten.view_as.default if hasattr(aten, "view_as") else aten.alias.default)
def _reshape_like(cv, node, x, *rest, **kw):
    if node.target is aten.expand.default:
        return relax.op.broadcast_to(x, cv.shape(node.meta["val"]))
    return relax.op.reshape(x, cv.shape(node.meta["val"]))


@lowers(aten.clone.default)
def _clone(cv, node, x, *, memory_format=None):
    # A functional copy; Relax tensors are always compact so the copy is a no-op unless fused away.
    return relax.op.astype(x, cv.out_dtype(node))


@lowers(aten._to_copy.default)
def _to_copy(cv, node, x, *, dtype=None, layout=None, device=None, pin_memory=None, non_blocking=False,
             memory_format=None):
    src = node.args[0].meta["val"]
    if device is not None and torch.device(device) != src.device:
        raise Unsupported("device transfer")
    return relax.op.astype(x, cv.out_dtype(node))


@lowers(aten.slice.Tensor)
def _slice(cv, node, x, dim=0, start=None, end=None, step=1):
    src = node.args[0].meta["val"]
    dim = dim % src.dim()
    size = src.shape[dim]
    start = 0 if start is None else start
    end = size if end is None else end
    if isinstance(start, int) and isinstance(size, int) and isinstance(end, int):
        start, end = max(min(start if start >= 0 else start + size, size), 0), max(min(end if end >= 0 else end + size, size), 0)
    elif not (isinstance(start, int) and start >= 0):
        raise Unsupported("symbolic slice start")
    elif isinstance(end, int) and end >= 2 ** 62:  # x[a:] on a symbolic dim: torch passes INT64_MAX
        end = size
    elif isinstance(end, int) and end < 0:
        raise Unsupported("negative slice end on a symbolic dim")
    return relax.op.strided_slice(x, [dim], [cv.prim(start)], [cv.prim(end) if not isinstance(end, int) else end],
                                  [step], assume_inbound=True)


@lowers(aten.select.int)
def _select(cv, node, x, dim, index):
    src = node.args[0].meta["val"]
    dim = dim % src.dim()
    if not isinstance(index, int):
        raise Unsupported("symbolic select index")
    if index < 0:
        if not isinstance(src.shape[dim], int):
            raise Unsupported("negative select on a symbolic dim")
        index += src.shape[dim]
    sl = relax.op.strided_slice(x, [dim], [index], [index + 1], assume_inbound=True)
    return relax.op.squeeze(sl, [dim])


@lowers(aten.unbind.int)
def _unbind(cv, node, x, dim=0):
    dim = dim % node.args[0].meta["val"].dim()
    return relax.Tuple([relax.op.squeeze(relax.op.strided_slice(x, [dim], [i], [i + 1], assume_inbound=True), [dim])
                        for i in range(len(node.meta["val"]))])


@lowers(aten.cat.default)
def _cat(cv, node, tensors, dim=0):
    dt = cv.out_dtype(node)
    vals = [t for t, n in zip(tensors, node.args[0]) if n.meta["val"].numel() != 0 or n.meta["val"].dim() > 1]
    return relax.op.concat([cv.cast(t, dt) for t in vals], dim % node.meta["val"].dim())


@lowers(aten.stack.default)
def _stack(cv, node, tensors, dim=0):
    dt = cv.out_dtype(node)
    return relax.op.stack([cv.cast(t, dt) for t in tensors], dim % node.meta["val"].dim())


@lowers(aten.flip.default)
def _flip(cv, node, x, dims):
    for d in dims:
        x = relax.op.flip(x, int(d) % node.meta["val"].dim())
    return x


@lowers(aten.tril.default)
def _tril(cv, node, x, diagonal=0):
    return relax.op.tril(x, int(diagonal))

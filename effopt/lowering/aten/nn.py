"""Neural-network ops: padding, pooling, softmax, LayerNorm."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from tvm import relax

from ..rules import LOWERABLE, Unsupported, lowers

aten = torch.ops.aten


@lowers(aten.constant_pad_nd.default)
def _constant_pad(cv, node, x, pad, value=0.0):
    if len(pad) % 2 or len(pad) // 2 > len(node.meta["val"].shape) or any(int(p) < 0 for p in pad):
        raise Unsupported("constant_pad_nd with negative (cropping) pads")
    rank = len(node.meta["val"].shape)
    width = [0] * (2 * rank)  # relax: (before, after) per dim from the first; torch: from the last dim back
    for i in range(len(pad) // 2):
        d = rank - 1 - i
        width[2 * d], width[2 * d + 1] = int(pad[2 * i]), int(pad[2 * i + 1])
    return relax.op.nn.pad(x, width, pad_value=float(value))


def _pool_args(kernel, stride, padding, dims=2):
    k = [int(v) for v in (kernel if len(kernel) == dims else list(kernel) * dims)]
    s = [int(v) for v in (stride if stride else k)]
    s = s if len(s) == dims else s * dims
    p = [int(v) for v in (padding if len(padding) == dims else list(padding) * dims)]
    return k, s, p


@lowers(aten.avg_pool2d.default)
def _avg_pool2d(cv, node, x, kernel, stride=(), padding=(0,), ceil_mode=False, count_include_pad=True,
                divisor_override=None):
    if divisor_override is not None or len(node.meta["val"].shape) != 4:
        raise Unsupported("avg_pool2d with a divisor override, or unbatched")
    k, s, p = _pool_args(kernel, stride, padding)
    return relax.op.nn.avg_pool2d(x, k, s, [p[0], p[1], p[0], p[1]], ceil_mode=bool(ceil_mode),
                                  count_include_pad=bool(count_include_pad))


def _max_pool_lowerable(node: fx.Node) -> bool:
    """Only the pooled values may be used, not the indices (training's backward wants those)."""
    return len(node.meta["val"][0].shape) == 4 and \
        all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)


@lowers(aten.max_pool2d_with_indices.default)
def _max_pool2d(cv, node, x, kernel, stride=(), padding=(0,), dilation=(1,), ceil_mode=False):
    k, s, p = _pool_args(kernel, stride, padding)
    d = [int(v) for v in (dilation if len(dilation) == 2 else list(dilation) * 2)]
    out = relax.op.nn.max_pool2d(x, k, s, [p[0], p[1], p[0], p[1]], d, ceil_mode=bool(ceil_mode))
    idx = node.meta["val"][1]
    return relax.Tuple([out, relax.op.zeros(cv.shape(idx), "int64")])  # indices unused (checked)


LOWERABLE[aten.max_pool2d_with_indices.default] = _max_pool_lowerable


@lowers(aten._softmax.default)
def _softmax(cv, node, x, dim, half_to_float):
    return relax.op.nn.softmax(x, dim)


@lowers(aten._log_softmax.default)
def _log_softmax(cv, node, x, dim, half_to_float):
    return relax.op.nn.log_softmax(x, dim)


@lowers(aten.native_layer_norm.default)
def _layer_norm(cv, node, x, normalized_shape, weight, bias, eps):
    ndim = len(node.args[0].meta["val"].shape)
    axes = list(range(ndim - len(normalized_shape), ndim))
    dt = cv.out_dtype(node)
    shape = [cv.prim(s) for s in normalized_shape]
    weight = weight if weight is not None else relax.op.ones(shape, dt)
    bias = bias if bias is not None else relax.op.zeros(shape, dt)
    if dt == "bfloat16":
        # TVM's layer_norm takes float32/float16 only; torch's bf16 kernel accumulates in float32 as well.
        out = relax.op.astype(relax.op.nn.layer_norm(*(cv.cast(t, "float32") for t in (x, weight, bias)), axes, eps),
                              dt)
    else:
        out = relax.op.nn.layer_norm(x, weight, bias, axes, eps)
    # mean and rstd are returned by the ATen op but almost never used in inference; DCE drops them.
    mean = relax.op.mean(x, axes, keepdims=True)
    rstd = relax.op.rsqrt(relax.op.add(relax.op.variance(x, axes, keepdims=True), relax.const(eps, dt)))
    return relax.Tuple([out, mean, rstd])

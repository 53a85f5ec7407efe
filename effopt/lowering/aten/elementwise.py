"""Elementwise ops: arithmetic and comparisons (with torch's type promotion), activations, clamps,
selection (where, masked_fill), remainder, logical and bitwise ops."""
from __future__ import annotations

import torch
import torch.fx as fx
from tvm import relax

from ..rules import Unsupported, lowers, relax_dtype

aten = torch.ops.aten


def _arg_dtype(node: fx.Node, i: int) -> torch.dtype | None:
    a = node.args[i]
    v = a.meta.get("val") if isinstance(a, fx.Node) else None
    return v.dtype if isinstance(v, torch.Tensor) else None


def _compute_dtype(node: fx.Node) -> str:
    """torch's promoted dtype of a binary op's operands (for comparisons, whose output is bool)."""
    dts = [_arg_dtype(node, i) for i in range(2)]
    tensors = [d for d in dts if d is not None]
    if len(tensors) == 2:
        return relax_dtype(torch.promote_types(*tensors))
    other = node.args[1] if dts[0] is not None else node.args[0]
    t = tensors[0]
    if isinstance(other, float) and not t.is_floating_point:
        return "float32"
    return relax_dtype(t)


def _binary(relax_op, comparison=False):
    def rule(cv, node, a, b, *, alpha=1):
        dt = _compute_dtype(node) if comparison else cv.out_dtype(node)
        if comparison and dt == "bool":
            dt = "int8"  # TVM 0.27 emits a float compare (invalid LLVM) for bool == bool
        a, b = cv.cast(a, dt), cv.cast(b, dt)
        if alpha != 1:
            b = relax.op.multiply(b, relax.const(alpha, dt))
        return relax_op(a, b)
    return rule


for _ops, _rop, _cmp in [
    ((aten.add.Tensor, aten.add.Scalar), relax.op.add, False),
    ((aten.sub.Tensor, aten.sub.Scalar), relax.op.subtract, False),
    ((aten.mul.Tensor, aten.mul.Scalar), relax.op.multiply, False),
    ((aten.div.Tensor, aten.div.Scalar), relax.op.divide, False),
    ((aten.pow.Tensor_Tensor, aten.pow.Tensor_Scalar), relax.op.power, False),
    ((aten.maximum.default,), relax.op.maximum, False),
    ((aten.minimum.default,), relax.op.minimum, False),
    ((aten.eq.Tensor, aten.eq.Scalar), relax.op.equal, True),
    ((aten.ne.Tensor, aten.ne.Scalar), relax.op.not_equal, True),
    ((aten.lt.Tensor, aten.lt.Scalar), relax.op.less, True),
    ((aten.le.Tensor, aten.le.Scalar), relax.op.less_equal, True),
    ((aten.gt.Tensor, aten.gt.Scalar), relax.op.greater, True),
    ((aten.ge.Tensor, aten.ge.Scalar), relax.op.greater_equal, True),
]:
    lowers(*_ops)(_binary(_rop, _cmp))


@lowers(aten.rsub.Scalar)
def _rsub(cv, node, a, b, alpha=1):
    dt = cv.out_dtype(node)
    return relax.op.subtract(cv.cast(b, dt), relax.op.multiply(cv.cast(a, dt), relax.const(alpha, dt)))


def _unary(relax_op, float_only=True):
    def rule(cv, node, x):
        if float_only and not node.meta["val"].dtype.is_floating_point:
            raise Unsupported(f"{node.target} on {node.meta['val'].dtype}")
        return relax_op(cv.cast(x, cv.out_dtype(node)))
    return rule


for _op, _rop in [(aten.relu.default, relax.op.nn.relu), (aten.silu.default, relax.op.nn.silu),
                  (aten.sigmoid.default, relax.op.sigmoid), (aten.tanh.default, relax.op.tanh),
                  (aten.exp.default, relax.op.exp), (aten.log.default, relax.op.log), (aten.sqrt.default, relax.op.sqrt),
                  (aten.rsqrt.default, relax.op.rsqrt), (aten.erf.default, relax.op.erf), (aten.sin.default, relax.op.sin),
                  (aten.cos.default, relax.op.cos), (aten.reciprocal.default, lambda x: relax.op.divide(relax.const(1.0, str(x.ty.dtype)), x))]:
    lowers(_op)(_unary(_rop))
lowers(aten.neg.default)(_unary(relax.op.negative, float_only=False))
lowers(aten.abs.default)(_unary(relax.op.abs, float_only=False))
lowers(aten.logical_not.default)(_unary(relax.op.logical_not, float_only=False))


@lowers(aten.gelu.default)
def _gelu(cv, node, x, approximate="none"):
    return relax.op.nn.gelu(x) if approximate == "none" else relax.op.nn.gelu_tanh(x)


@lowers(aten.hardtanh.default, aten.clamp.default)
def _clamp(cv, node, x, lo=None, hi=None):
    if not node.meta["val"].dtype.is_floating_point:
        raise Unsupported("integer clamp")
    lo = float("-inf") if lo is None else lo
    hi = float("inf") if hi is None else hi
    return relax.op.clip(x, lo, hi)


def _hard(x, dt: str):
    """relu6(x + 3) / 6, MobileNetV3's hard sigmoid (torch: clamp(x + 3, 0, 6) / 6)."""
    return relax.op.divide(relax.op.clip(relax.op.add(x, relax.const(3.0, dt)), 0.0, 6.0), relax.const(6.0, dt))


@lowers(aten.hardsigmoid.default)
def _hardsigmoid(cv, node, x):
    if cv.out_dtype(node) != "float32":
        raise Unsupported("hardsigmoid on non-float32")
    return _hard(x, "float32")


@lowers(aten.hardswish.default)
def _hardswish(cv, node, x):
    if cv.out_dtype(node) != "float32":
        raise Unsupported("hardswish on non-float32")
    return relax.op.multiply(x, _hard(x, "float32"))


@lowers(aten.where.self)
def _where(cv, node, cond, a, b):
    dt = cv.out_dtype(node)
    return relax.op.where(cv.cast(cond, "bool"), cv.cast(a, dt), cv.cast(b, dt))


@lowers(aten.masked_fill.Scalar)
def _masked_fill(cv, node, x, mask, value):
    return relax.op.where(cv.cast(mask, "bool"), relax.const(value, cv.out_dtype(node)), x)


@lowers(aten.remainder.Scalar, aten.remainder.Tensor)
def _remainder(cv, node, a, b):
    dt = cv.out_dtype(node)  # Python's modulo, as torch: the result takes the divisor's sign
    return relax.op.floor_mod(cv.cast(a, dt), cv.cast(b, dt))


def _logical_or_bitwise(logical, bitwise):
    def rule(cv, node, a, b):
        dt = _compute_dtype(node)
        a, b = cv.cast(a, dt), cv.cast(b, dt)
        return logical(a, b) if dt == "bool" else bitwise(a, b)
    return rule


lowers(aten.bitwise_and.Tensor, aten.logical_and.default)(_logical_or_bitwise(relax.op.logical_and, relax.op.bitwise_and))
lowers(aten.bitwise_or.Tensor, aten.logical_or.default)(_logical_or_bitwise(relax.op.logical_or, relax.op.bitwise_or))


@lowers(aten.bitwise_not.default)
def _bitwise_not(cv, node, x):
    return relax.op.logical_not(x) if cv.dtype_of(x) == "bool" else relax.op.bitwise_not(x)

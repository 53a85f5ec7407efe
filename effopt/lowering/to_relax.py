"""ATen -> Relax conversion: one rule per decorated function, keyed by ATen OpOverload.

A region (an fx GraphModule cut out by the partitioner) becomes one Relax function whose parameters are
the region's tensor inputs and whose result is a tuple of the region's outputs. Symbolic sizes (a
dynamic batch) become TIR variables bound by the input shapes.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from tvm import relax, tirx

from . import kernels as _kernels  # noqa: F401 - effopt's ops: their rules are in their kernel files
from ..ops.spec import specs
from .rules import CONVERTERS, DTYPES, ISOLATED, LOWERABLE, Unsupported, call_rule, lowers, relax_dtype
from ..ops.sdpa import FLASH_CPU, sdpa_arguments

aten = torch.ops.aten


@dataclass
class ConvertedRegion:
    func: relax.Function
    tensor_inputs: list[int]  # indices of the region inputs that are tensors (the kernel's arguments)
    sym_sources: list  # per symbolic size: (tensor input, dim, divisor) it is read from at call time
    out_layouts: list  # per output: memory order the kernel writes it in, or None (contiguous)
    out_strides: list  # per output: eager's strides where it is neither, to restride into; else None


class _NamedBuilder:
    """The block builder as custom-kernel rules see it: PrimFuncs are named after their content, so that
    kernels from different regions merge into one module without clashes, and a region's Relax script
    (which names the kernels it calls) determines the kernels too (cache keys, kernel sharing)."""

    def __init__(self, bb, kernels: dict):
        self._bb, self._kernels = bb, kernels

    def add_func(self, func, func_name: str):
        import hashlib

        name = f"{func_name}_{hashlib.sha256(func.script().encode()).hexdigest()[:12]}"
        if name not in self._kernels:  # one GlobalVar per kernel for all regions: they share one module
            self._kernels[name] = (self._bb.add_func(func, name), func)
        return self._kernels[name][0]

    def __getattr__(self, name):
        return getattr(self._bb, name)


class Converter:
    def __init__(self, kernels: dict | None = None, target=None):
        self.kernels = {} if kernels is None else kernels  # custom PrimFuncs by name: (GlobalVar, PrimFunc)
        self.target = target  # the tvm Target, for rules whose kernels need a CPU feature
        self.syms: dict[str, tirx.Var] = {}

    # ---- symbolic sizes -------------------------------------------------------------------------
    def prim(self, v):
        """An int, SymInt or sympy expression as a TIR expression."""
        if isinstance(v, bool):
            raise Unsupported("bool where a size was expected")
        if isinstance(v, int):
            return v
        if isinstance(v, torch.SymInt):
            if v.node.is_constant() if hasattr(v.node, "is_constant") else False:
                return int(v)
            return self._sympy(v.node.expr)
        if isinstance(v, sympy.Expr):
            return self._sympy(v)
        raise Unsupported(f"size {v!r}")

    def _sympy(self, e):
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            name = str(e)
            if name not in self.syms:
                self.syms[name] = tirx.Var(name, "int64")
            return self.syms[name]
        if isinstance(e, sympy.Add):
            out = self._sympy(e.args[0])
            for a in e.args[1:]:
                out = out + self._sympy(a)
            return out
        if isinstance(e, sympy.Mul):
            out = self._sympy(e.args[0])
            for a in e.args[1:]:
                out = out * self._sympy(a)
            return out
        if type(e).__name__ == "FloorDiv":
            return tirx.floordiv(self._sympy(e.args[0]), self._sympy(e.args[1]))
        raise Unsupported(f"symbolic size expression {e}")

    def shape(self, val: torch.Tensor) -> list:
        return [self.prim(s) for s in val.shape]

    # ---- the region ---------------------------------------------------------------------------
    def convert(self, graph: fx.Graph, name: str = "main") -> ConvertedRegion:
        """The region as a Relax function, with what calling it needs. Symbolic sizes are passed as a
        trailing shape argument, because Relax cannot solve `s0` from an input dim of `17*s0`."""
        env: dict[fx.Node, Any] = {}
        params, tensor_inputs, dims = [], [], []
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        for i, n in enumerate(placeholders):
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor):
                shape = self.shape(val)
                var = relax.Var(f"in{i}", relax.TensorType(shape, relax_dtype(val.dtype)))
                params.append(var)
                dims.append((len(tensor_inputs), val.shape))
                tensor_inputs.append(i)
                env[n] = var
            elif isinstance(val, (int, torch.SymInt)):
                env[n] = self.prim(val)
            else:
                raise Unsupported(f"region input {n.name} of type {type(val).__name__}")
        for n in graph.nodes:  # symbols that only intermediate shapes mention
            for v in (n.meta.get("val") if isinstance(n.meta.get("val"), (tuple, list)) else [n.meta.get("val")]):
                if isinstance(v, torch.Tensor):
                    self.shape(v)
        sym_sources = [self._source(sym, dims) for sym in sorted(self.syms)]
        if sym_sources:
            params.append(relax.Var("sizes", relax.ShapeType([self.syms[s] for s in sorted(self.syms)])))
        bb = relax.BlockBuilder()
        with bb.function(name, params):
            with bb.dataflow():
                for node in graph.nodes:
                    if node.op == "call_function":
                        env[node] = self._call(bb, node, env)
                    elif node.op == "output":
                        outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
                        layouts = [memory_order(o.meta.get("val")) for o in outs]
                        result = bb.emit_output(relax.Tuple([
                            env[o] if perm is None else bb.emit(relax.op.permute_dims(env[o], perm))
                            for o, perm in zip(outs, layouts)]))
                    elif node.op != "placeholder":
                        raise Unsupported(f"{node.op} node in region")
            bb.emit_func_output(result)
        strides = [restride(o.meta.get("val")) if perm is None else None for o, perm in zip(outs, layouts)]
        return ConvertedRegion(bb.get()[name], tensor_inputs, sym_sources, layouts, strides)

    @staticmethod
    def _source(sym: str, dims) -> tuple[int, int, int]:
        for k, shape in dims:
            for d, size in enumerate(shape):
                if isinstance(size, torch.SymInt):
                    expr = size.node.expr
                    coeff, rest = expr.as_coeff_Mul()
                    if str(rest) == sym and coeff.is_Integer and int(coeff) > 0:
                        return k, d, int(coeff)
        raise Unsupported(f"symbolic size {sym} cannot be read from the region's input shapes")

    def _call(self, bb, node: fx.Node, env):
        if node.target is operator.getitem:
            tup, idx = env[node.args[0]], node.args[1]
            if isinstance(tup, relax.Tuple):  # a converter's tuple of emitted values: take the field itself
                return tup.fields[idx]  # (FuseTIR failed on a group holding only a TupleGetItem of one)
            return bb.emit(relax.TupleGetItem(tup, idx))
        rule = CONVERTERS.get(node.target)
        if rule is None:
            raise Unsupported(f"{node.target}")
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        self.bb = _NamedBuilder(bb, self.kernels)  # for rules that emit several calls (custom kernels)
        out = call_rule(rule, self, node, args, kwargs)
        if isinstance(out, relax.Var):  # already emitted by the rule
            return out
        if isinstance(out, relax.Tuple):
            return relax.Tuple([bb.emit(f) for f in out.fields])
        return bb.emit(out)

    # ---- helpers used by the rules ------------------------------------------------------------
    @staticmethod
    def out_dtype(node: fx.Node) -> str:
        val = node.meta["val"]
        return relax_dtype(val.dtype if isinstance(val, torch.Tensor) else val[0].dtype)

    @staticmethod
    def dtype_of(expr) -> str:
        return str(expr.ty.dtype)

    def cast(self, x, dtype: str):
        if isinstance(x, (int, float, bool)):
            return relax.const(x, dtype)
        return x if self.dtype_of(x) == dtype else relax.op.astype(x, dtype)


def memory_order(val) -> list[int] | None:
    """For a dense tensor whose strides are a permutation of contiguous ones (a transpose, channels-last),
    the dim order from outermost to innermost in memory; None when it is already contiguous.

    Eager code after a region may rely on these strides (a `view`, or SDPA whose output layout follows
    its query's), so the kernel writes in this order and the caller gets a permuted view back."""
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        return None
    shape, stride = [_expr(s) for s in val.shape], [_expr(s) for s in val.stride()]
    if not any(isinstance(s, torch.SymInt) for s in (*val.shape, *val.stride())) and val.is_contiguous():
        return None
    # with symbolic sizes (a served model's sequence length), the order is read at the traced sizes and
    # the density then checked on the expressions, so it holds for every size
    hint = [_hint(s) for s in val.stride()]
    perm = sorted(range(val.dim()), key=lambda d: (-hint[d], d))
    expect = 1
    for d in reversed(perm):
        if shape[d] != 1 and _differ(stride[d], expect):
            return None  # not dense (e.g. expanded): the runtime restrides with a copy
        expect = expect * shape[d]
    return None if perm == list(range(val.dim())) else perm


def _expr(s):
    """An int, or a symbolic size's sympy expression."""
    return s.node.expr if isinstance(s, torch.SymInt) else int(s)


def _hint(s) -> int:
    if not isinstance(s, torch.SymInt):
        return int(s)
    h = s.node.hint
    return int(h) if h is not None else int(s.node.shape_env.size_hint(s.node.expr))


def _differ(a, b) -> bool:
    import sympy

    return sympy.expand(sympy.sympify(a) - sympy.sympify(b)) != 0


def restride(val) -> tuple | None:
    """Eager's strides for an output that is neither contiguous nor a dense permutation (static shapes
    only, and never an expanded, overlapping layout, which cannot be written into)."""
    if not isinstance(val, torch.Tensor) or val.is_contiguous():
        return None
    if any(isinstance(s, torch.SymInt) for s in (*val.shape, *val.stride())) or 0 in val.stride():
        return None
    return tuple(val.stride())


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
    def rule(cv: Converter, node, a, b, *, alpha=1):
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
    def rule(cv: Converter, node, x):
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


@lowers(aten.where.self)
def _where(cv, node, cond, a, b):
    dt = cv.out_dtype(node)
    return relax.op.where(cv.cast(cond, "bool"), cv.cast(a, dt), cv.cast(b, dt))


@lowers(aten.masked_fill.Scalar)
def _masked_fill(cv, node, x, mask, value):
    return relax.op.where(cv.cast(mask, "bool"), relax.const(value, cv.out_dtype(node)), x)


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


# ---- data movement --------------------------------------------------------------------------------
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


@lowers(aten.index_select.default)
def _index_select(cv, node, x, dim, index):
    return relax.op.take(x, index, int(dim) % node.meta["val"].dim())


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


@lowers(aten.remainder.Scalar, aten.remainder.Tensor)
def _remainder(cv, node, a, b):
    dt = cv.out_dtype(node)  # Python's modulo, as torch: the result takes the divisor's sign
    return relax.op.floor_mod(cv.cast(a, dt), cv.cast(b, dt))


@lowers(aten.argmax.default)
def _argmax(cv, node, x, dim=None, keepdim=False):
    if dim is None:
        raise Unsupported("argmax over all dims")
    return relax.op.argmax(x, int(dim) % node.args[0].meta["val"].dim(), bool(keepdim))


@lowers(aten.gather.default)
def _gather(cv, node, x, dim, index, *, sparse_grad=False):
    return relax.op.gather_elements(x, index, int(dim) % node.meta["val"].dim())


@lowers(aten.embedding.default)
def _embedding(cv, node, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    # "clip", not "fast": an id past the vocabulary must not read outside the table (eager raises there)
    return relax.op.take(weight, indices, axis=0, mode="clip")


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


def _logical_or_bitwise(logical, bitwise):
    def rule(cv, node, a, b):
        dt = _compute_dtype(node)
        a, b = cv.cast(a, dt), cv.cast(b, dt)
        return logical(a, b) if dt == "bool" else bitwise(a, b)
    return rule


lowers(aten.bitwise_and.Tensor, aten.logical_and.default)(_logical_or_bitwise(relax.op.logical_and, relax.op.bitwise_and))
lowers(aten.bitwise_or.Tensor, aten.logical_or.default)(_logical_or_bitwise(relax.op.logical_or, relax.op.bitwise_or))


@lowers(aten.index.Tensor)
def _index(cv, node, x, indices):
    # Advanced indexing (Hugging Face builds attention masks with padding_mask[batch_idx, kv_idx]).
    if any(i is None for i in indices):
        present = [k for k, i in enumerate(indices) if i is not None]
        if len(present) != 1:
            raise Unsupported("index with None between several index tensors")
        # "wrap": negative indices count from the end, as in torch; none reads outside x
        return relax.op.take(x, cv.cast(indices[present[0]], "int64"), axis=present[0], mode="wrap")
    return relax.op.index_tensor(x, relax.Tuple([cv.cast(i, "int64") for i in indices]))


@lowers(aten.bitwise_not.default)
def _bitwise_not(cv, node, x):
    return relax.op.logical_not(x) if cv.dtype_of(x) == "bool" else relax.op.bitwise_not(x)


# ---- attention: effopt's tiled online-softmax kernel (kernels/flash.py) against torch's fused SDPA -----------
def _sdpa_lowerable(node: fx.Node) -> bool:
    f = sdpa_arguments(node.target, node.args, node.kwargs)
    if f["dropout_p"] or f["is_causal"] or f["enable_gqa"]:
        return False
    vals = [x.meta.get("val") if isinstance(x, fx.Node) else None for x in (f["q"], f["k"], f["v"])]
    if not all(isinstance(v, torch.Tensor) and v.dim() == 4 and v.dtype == torch.float32 for v in vals):
        return False
    if isinstance(vals[0].shape[-1], torch.SymInt) or isinstance(vals[2].shape[-1], torch.SymInt):
        return False
    if node.target is FLASH_CPU:  # only the attention output may be used, not the log-sum-exp
        return all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)
    return True


@lowers(aten.scaled_dot_product_attention.default, FLASH_CPU)
def _sdpa(cv, node, *args, **kwargs):
    from .kernels import flash

    f = sdpa_arguments(node.target, args, kwargs)
    scale = f["scale"]
    scale = 1.0 / math.sqrt(int(node.args[0].meta["val"].shape[-1])) if scale is None else float(scale)
    out = flash.emit(cv.bb, f["q"], f["k"], f["v"], f["attn_mask"], scale)
    if node.target is FLASH_CPU:  # (output, log-sum-exp): the latter is unused (checked), a placeholder
        lse = node.meta["val"][1]
        return relax.Tuple([out, relax.op.zeros(cv.shape(lse), "float32")])
    return out


for _op in (aten.scaled_dot_product_attention.default, FLASH_CPU):
    LOWERABLE[_op] = _sdpa_lowerable
    ISOLATED.add(_op)
# effopt's ops declared to be lowered alone (effopt/ops/): each its own region, measured against its eager op
ISOLATED.update(s.op for s in specs() if s.alone)

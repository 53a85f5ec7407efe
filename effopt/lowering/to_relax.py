"""Region -> Relax conversion: the Converter, which calls one registered rule per node (rules.py). ATen ops'
rules are in lowering/aten/, one file per op category (as TVM's legalize_ops/); effopt's own ops' rules sit
beside their kernels (lowering/kernels/).

A region (an fx GraphModule cut out by the partitioner) becomes one Relax function whose parameters are
the region's tensor inputs and whose result is a tuple of the region's outputs. Symbolic sizes (a
dynamic batch) become TIR variables bound by the input shapes.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx as fx

from tvm import relax, tirx

from . import aten as _aten, kernels as _kernels  # noqa: F401 - register the rules: ATen's, effopt's ops'
from ..ops.spec import specs
from .rules import CONVERTERS, DTYPES, ISOLATED, LOWERABLE, Unsupported, call_rule, relax_dtype  # noqa: F401



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
        # products of symbols that the region's inputs have as a dim (a linear's rows, batch x tokens, flattened:
        # [s0*s1, K]) while a factor is never a dim alone: each product is one size of the region, read from that
        # dim at call time; (product, its stand-in symbol), the largest products first
        self.atoms: list[tuple[sympy.Expr, sympy.Symbol]] = []

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
            return self._sympy(self._atomize(v.node.expr))
        if isinstance(v, sympy.Expr):
            return self._sympy(self._atomize(v))
        raise Unsupported(f"size {v!r}")

    def _atomize(self, e):
        for product, stand_in in self.atoms:
            e = e.subs(product, stand_in)
        return e

    def _find_atoms(self, input_shapes) -> None:
        """The products of symbols among the input dims whose factors are not all dims alone (see atoms)."""
        rests = [size.node.expr.as_coeff_Mul()[1] for shape in input_shapes for size in shape
                 if isinstance(size, torch.SymInt)]
        alone = {r for r in rests if r.is_Symbol}
        products = {r for r in rests if isinstance(r, sympy.Mul) and all(f.is_Symbol for f in r.args)
                    and not all(f in alone for f in r.args)}
        self.atoms = [(p, sympy.Symbol(str(p).replace("*", "_"), integer=True, positive=True))
                      for p in sorted(products, key=lambda p: (-len(p.args), str(p)))]

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
        self._find_atoms([n.meta["val"].shape for n in placeholders if isinstance(n.meta.get("val"), torch.Tensor)])
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

    def _source(self, sym: str, dims) -> tuple[int, int, int]:
        for k, shape in dims:
            for d, size in enumerate(shape):
                if isinstance(size, torch.SymInt):
                    coeff, rest = self._atomize(size.node.expr).as_coeff_Mul()
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


# effopt's ops declared to be lowered alone (effopt/ops/): each its own region, measured against its eager op
ISOLATED.update(s.op for s in specs() if s.alone)

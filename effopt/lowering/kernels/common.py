"""Helpers shared by the custom kernels' Relax entry points: shapes, static and symbolic dims, dtypes."""
from __future__ import annotations

import tvm
from tvm import relax, tirx


def dims(expr: relax.Expr, op: str, name: str, ndim: int | None = None) -> list:
    """The dims of a tensor expression: ints where static, TIR expressions where symbolic."""
    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
        raise NotImplementedError(f"{op}: {name} needs a tensor type with a known shape, got {ty}")
    out = [int(d) if isinstance(d, tirx.IntImm) else d for d in ty.shape.values]
    if ndim is not None and len(out) != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {out}")
    return out


def static(d, op: str, what: str) -> int:
    if not isinstance(d, int):
        raise NotImplementedError(f"{op}: {what} must be static, got {d}")
    return d


def same(a, b) -> bool:
    """Two dims provably equal (ints, or symbolic expressions)."""
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return tvm.sym.Analyzer().can_prove_equal(a, b)


def batch(b):
    """The PrimFunc's own batch extent: a fresh int64 var if the caller's batch is symbolic."""
    return b if isinstance(b, int) else tirx.Var("B", "int64")


def as_float32(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    return x if str(x.ty.dtype) == "float32" else bb.emit(relax.op.astype(x, "float32"))

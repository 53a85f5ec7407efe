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


def x86_feature_missing(target, feature: str, what: str) -> str | None:
    """Why `what` cannot run on `target` (a tvm Target): not a CPU, or no LLVM feature `feature`; else None."""
    keys = set(target.keys) if target is not None else set()
    if "cpu" not in keys:
        return f"{what} is for x86 CPUs (target keys {sorted(keys)})"
    from tvm.target import codegen

    try:
        ok = codegen.target_has_features(feature, target)
    except Exception:  # noqa: BLE001 - an LLVM without that query
        ok = False
    return None if ok else f"{what} needs {feature}"

"""Helpers shared by the custom kernels' Relax entry points: shapes, static and symbolic dims, dtypes."""
from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm import relax, tirx

from ...target import has_feature


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


def extent(m, name: str = "M"):
    """The PrimFunc's own extent for a caller's dim: the int where static, a fresh int64 var where symbolic
    (match_buffer binds it from the argument's shape at every call, so one built kernel serves every size)."""
    return m if isinstance(m, int) else tirx.Var(name, "int64")


def memo_kernel(make):
    """`make` (a PrimFunc generator that gives each symbolic dim its own var through `extent`) remembered per
    arguments: parsing a kernel's TVMScript takes 0.2-0.5 s, and a graph asks for the same kernel once per
    layer and again in each recompile. A symbolic dim is one key whatever the caller's var is."""
    import functools

    symbolic = object()

    @functools.lru_cache(maxsize=512)
    def cached(key, kwargs):
        return make(*[tirx.Var("M", "int64") if a is symbolic else a for a in key], **dict(kwargs))

    @functools.wraps(make)
    def wrapper(*args, **kwargs):
        key = tuple(symbolic if isinstance(a, tirx.Expr) and not isinstance(a, tirx.IntImm) else a for a in args)
        return cached(key, tuple(sorted(kwargs.items())))

    wrapper.cache_clear = cached.cache_clear
    return wrapper


def rows(bb: relax.BlockBuilder, x: relax.Expr, op: str) -> tuple[list, object, relax.Expr]:
    """(x's dims, M = the product of all but the last, x as [M, K]). The leading dims (batch, tokens) may be
    symbolic, and M with them; the feature dim K must be static."""
    xs = dims(x, op, "x")
    static(xs[-1], op, "the feature dim of x")
    m = 1
    for d in xs[:-1]:
        m = m * d
    return xs, m, bb.emit(relax.op.reshape(x, [m, xs[-1]]))


def as_float32(bb: relax.BlockBuilder, x: relax.Expr) -> relax.Expr:
    return x if str(x.ty.dtype) == "float32" else bb.emit(relax.op.astype(x, "float32"))


@dataclass(frozen=True)
class VectorUnit:
    """A target's float32 vector unit, which register-tiled kernels are generated for."""
    name: str  # "avx512" | "avx2" | "neon"
    lanes: int  # float32 lanes per register
    registers: int


VECTOR_UNITS = {"avx512": VectorUnit("avx512", 16, 32), "avx2": VectorUnit("avx2", 8, 16),
                "neon": VectorUnit("neon", 4, 32)}


def vector_unit(target) -> VectorUnit | None:
    """The widest float32 FMA unit of `target` (a tvm Target), or None (not a CPU, or no FMA)."""
    keys = set(target.keys) if target is not None else set()
    if "cpu" not in keys:
        return None

    def has(feature: str) -> bool:
        return has_feature(target, feature)

    if "arm_cpu" in keys:
        return VECTOR_UNITS["neon"] if has("neon") else None
    if has("avx512f"):
        return VECTOR_UNITS["avx512"]
    if has("avx2") and has("fma"):
        return VECTOR_UNITS["avx2"]
    return None

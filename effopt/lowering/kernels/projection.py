"""A small projection kernel: x [B, H, R, D] @ p [D, C] for Hamming attention's code projection.

Pre-scheduled: parallel over the rows, each row's C outputs accumulated in registers (C floats, vectorized)
over D broadcast multiply-adds. The batch dim may be symbolic."""
from __future__ import annotations

from tvm import relax, tirx
from tvm.script import tirx as T

from .common import batch


def project_func(B, H: int, R: int, D: int, C: int) -> tirx.PrimFunc:
    B = batch(B)

    @T.prim_func(private=True, s_tir=True)
    def project(x_h: T.handle, p_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        X = T.match_buffer(x_h, (B, H, R, D), "float32")
        P = T.match_buffer(p_h, (D, C), "float32")
        Y = T.match_buffer(y_h, (B, H, R, C), "float32")
        with T.sblock("root"):
            T.reads()
            T.writes()
            Xf = T.decl_buffer((B * H * R * D,), "float32", data=X.data)
            Pf = T.decl_buffer((D * C,), "float32", data=P.data)
            Yf = T.decl_buffer((B * H * R * C,), "float32", data=Y.data)
            for f in T.parallel(B * H * R):
                acc = T.decl_buffer((C,), "float32")  # global scope below 1 KiB: on the stack, in registers
                for t in T.vectorized(C):
                    acc[t] = T.float32(0)
                for d in range(D):
                    for t in T.vectorized(C):
                        acc[t] = acc[t] + Xf[f * D + d] * Pf[d * C + t]
                for t in T.vectorized(C):
                    Yf[f * C + t] = acc[t]

    return project


def emit(bb: relax.BlockBuilder, x: relax.Expr, p: relax.Expr) -> relax.Expr:
    """x [B, H, R, D] float32 (B may be symbolic) times the constant p [D, C]."""
    B, H, R, D = [int(d) if isinstance(d, tirx.IntImm) else d for d in x.ty.shape.values]
    D2, C = [int(d) for d in p.ty.shape.values]
    if not all(isinstance(d, int) for d in (H, R, D)) or D != D2:
        raise NotImplementedError(f"projection: shapes {[B, H, R, D]} x {[D2, C]}")
    f = bb.add_func(project_func(B, H, R, D, C), "hamming_project")
    return bb.emit(relax.call_tir(f, [x, p], relax.TensorType([B, H, R, C], "float32")))

"""The shift linear for one token (GEMV) on packed power-of-two weights (effopt/shift_ops.py), float path.

y[n] = s[n] * sum_t sum_k  x[k] * (±2^-e[t, n, k])

x * 2^-e is an integer subtract on x's exponent bits and the sign an xor: the inner loop has no
multiplication (the one multiply per output is the channel scale). The weights stream through as 4-bit
codes, 8x fewer bytes than fp32, which is what a single token's linear is bound by. An x whose exponent
field is not above e (zero, or below 2^(e-126)) contributes 0: the reference gives a subnormal there, within
float tolerance of 0. Vectorized over 16 bytes of codes (32 weights), parallel over outputs.
"""
from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

LANES = 16
_ATTRS = {"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8}  # 8: kOpaque


def gemv_func(N: int, K: int, terms: int) -> tirx.PrimFunc:
    """(x [K] float32, w [terms, N, ceil(K/2)] uint8, scale [N] float32) -> y [N] float32.

    Blocks of 32 weights: 16 bytes of codes load as one vector; their low nibbles pair with the block's
    even x, their high nibbles with its odd x, read from a de-interleaved copy of x (made once per call),
    so every load is contiguous and every shift a constant."""
    KH = (K + 1) // 2
    BLK = 2 * LANES
    KF = K // BLK * BLK

    def term(xi, code):
        e = code & T.uint32(7)
        r = (xi - (e << T.uint32(23))) ^ ((code >> T.uint32(3)) << T.uint32(31))
        live = T.And(e < T.uint32(7), ((xi >> T.uint32(23)) & T.uint32(255)) > e)
        return T.Select(live, T.reinterpret("float32", r), T.float32(0.0))

    @T.prim_func(private=True, s_tir=True)
    def shift_gemv(x_h: T.handle, w_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr(_ATTRS)
        X = T.match_buffer(x_h, (K,), "float32")
        W = T.match_buffer(w_h, (terms, N, KH), "uint8")
        S = T.match_buffer(s_h, (N,), "float32")
        Y = T.match_buffer(y_h, (N,), "float32")
        with T.sblock("root"):
            XD = T.alloc_buffer((2, KF // 2 + 1), "uint32")  # even, odd x of the full blocks, as bits
            for k in range(KF // 2):
                XD[0, k] = T.reinterpret("uint32", X[2 * k])
                XD[1, k] = T.reinterpret("uint32", X[2 * k + 1])
            for n in T.parallel(N):
                acc = T.alloc_buffer((LANES,), "float32", scope="local")
                tot = T.alloc_buffer((1,), "float32", scope="local")
                for l in T.vectorized(LANES):
                    acc[l] = T.float32(0.0)
                for t in range(terms):
                    for kb in range(KF // BLK):
                        for l in T.vectorized(LANES):
                            byte = T.meta_var(T.Cast("uint32", W[t, n, kb * LANES + l]))
                            acc[l] = acc[l] + term(XD[0, kb * LANES + l], byte & T.uint32(15)) \
                                + term(XD[1, kb * LANES + l], byte >> T.uint32(4))
                tot[0] = T.float32(0.0)
                for l in range(LANES):
                    tot[0] = tot[0] + acc[l]
                for t in range(terms):
                    for k in range(KF, K):
                        code = T.meta_var((T.Cast("uint32", W[t, n, k // 2]) >> T.Cast("uint32", (k % 2) * 4))
                                          & T.uint32(15))
                        tot[0] = tot[0] + term(T.reinterpret("uint32", X[k]), code)
                Y[n] = tot[0] * S[n]

    return shift_gemv


def build_gemv(n: int, k: int, terms: int, target="host"):
    """The kernel compiled on its own (tests, benchmarks): a function (x, packed, scale) -> y."""
    from tvm import relax

    from ..eager import build_function

    def body(bb, x, w, s):
        gv = bb.add_func(gemv_func(n, k, terms), "shift_gemv")
        return relax.call_tir(gv, [x, w, s], relax.TensorType([n], "float32"))

    return build_function(body, ((k,), "float32"), ((terms, n, (k + 1) // 2), "uint8"), ((n,), "float32"),
                          target=target)


__all__ = ["gemv_func", "build_gemv", "LANES"]

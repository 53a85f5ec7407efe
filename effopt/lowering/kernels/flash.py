"""Exact softmax attention for CPUs without the N x M score matrix: a FlashAttention-style TVM kernel.

`emit(bb, q, k, v, mask, scale)` adds the kernel to a Relax BlockBuilder and returns its call_tir; it computes
`torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)` in float32 for
q [B,H,N,D], k [B,H,M,D], v [B,H,M,Dv] and an optional additive mask broadcastable to [B,H,N,M].

The kernel is scheduled by hand (attr "tirx.is_scheduled", so the default dlight schedules leave it alone):

* one parallel task per (batch, head, block of BQ query rows);
* the task keeps its query rows transposed, Qt [D, BQ], pre-multiplied by scale*log2(e), so that every
  product runs with the query rows as vector lanes: S^T[j, i] = sum_d K[j, d] * Qt[d, i] takes K rows as
  broadcast scalars (no transposed copy of K), RJ keys x BQ lanes of accumulators held in registers;
* the online softmax works on whole vectors of query rows: running max m[i] and sum l[i] in base 2, the
  exponentials by a vectorizable exp2 (range reduction and a degree-6 polynomial, ~1e-7 relative error);
* O[i, :] += sum_j P^T[j, i] * V[j, :] with RI query rows x Dv lanes of accumulators in registers, which are
  rescaled by exp2(m_old - m_new) as they are loaded once per key block;
* a mask that differs between query rows is copied per key block into a transposed [BK, BQ] tile (about a
  third slower than without a mask); a key-padding mask ([B, 1, 1, M]) is added as one scalar per key;
* the key blocks are BK keys; a partial last block only reads its kn valid keys (key rows are clamped, and
  the scores of padding rows are never used); query rows past N are clamped on read and never stored.

Scores never leave the task's [BK, BQ] tile. The batch, head and sequence sizes may be symbolic: only D, Dv,
the scale, the tile sizes and which mask dimensions broadcast are compiled in.

Differences from torch: a query row whose keys are all masked gets the mean of V (as with HF's finfo.min
masks) where torch 2.13's SDPA gives zeros for -inf or boolean masks; masks are clamped at -FLT_MAX after
scaling to base 2.
"""
from __future__ import annotations

import math

from tvm import relax, tirx
from tvm.script import tirx as T

from . import tunable

LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FLT_MAX = 3.4028234663852886e38

# Query rows per task (the vector lanes: 2 AVX-512 registers), keys per block, key rows per register tile
# of q.k (8 x 2 = 16 accumulator registers); measured best on Zen 4 (2 cores) at D = Dv = 64.
DEFAULT_TILES = {"block_q": 32, "block_k": 64, "rows_qk": 8}


def _rows_pv(dv: int, block_q: int) -> int:
    """Query rows per register tile of p.v: about 16 accumulator registers of 16 floats."""
    rows = max(1, 16 // -(-dv // 16))
    while rows > 1 and (block_q % rows or rows & (rows - 1)):
        rows -= 1
    return rows


def _exp2(x):
    """2**x for x <= 0 (float32), vectorizable: 2**round(x) from the exponent bits times a polynomial."""
    x = tirx.max(x, tirx.const(-127.0, "float32"))
    n = tirx.floor(x + tirx.const(0.5, "float32"))
    f = (x - n) * tirx.const(_LN2, "float32")  # |f| <= ln2 / 2
    p = tirx.const(1.0 / 720, "float32")
    for c in (1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = p * f + tirx.const(c, "float32")
    bits = tirx.shift_left(tirx.Cast("int32", n) + 127, 23)  # n = -127 gives +0.0
    return p * tirx.reinterpret("float32", bits)


def make_kernel(d: int, dv: int, scale: float, mask_bcast: tuple[bool, bool, bool, bool] | None = None,
                block_q: int = DEFAULT_TILES["block_q"], block_k: int = DEFAULT_TILES["block_k"],
                rows_qk: int = DEFAULT_TILES["rows_qk"], rows_pv: int | None = None) -> tirx.PrimFunc:
    """The attention PrimFunc (q, k, v, [mask,] out). `mask_bcast[i]` is True where the 4-D mask has size 1
    and broadcasts along dimension i; None: no mask argument. rows_pv None: chosen from dv."""
    rows_pv = _rows_pv(dv, block_q) if rows_pv is None else rows_pv
    if block_k % rows_qk or block_q % rows_pv:
        raise ValueError(f"block_k ({block_k}) must be a multiple of rows_qk ({rows_qk}) and block_q "
                         f"({block_q}) of rows_pv ({rows_pv})")
    D, DV, BQ, BK, RJ, RI = d, dv, block_q, block_k, rows_qk, rows_pv
    has_mask = mask_bcast is not None
    # mask index = (b, h, i, j) times these: 0 where the mask broadcasts
    sb, sh, sn, sm = (0 if bc else 1 for bc in mask_bcast) if has_mask else (0, 0, 0, 0)
    row_mask = bool(sn)  # the mask differs between query rows
    qscale = float(scale) * LOG2E
    neg_max = -_FLT_MAX

    @T.prim_func(private=True)
    def flash_attention(q: T.handle, k: T.handle, v: T.handle, mask: T.handle, o: T.handle):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        B = T.int64()
        H = T.int64()
        N = T.int64()
        M = T.int64()
        Q = T.match_buffer(q, (B, H, N, D), "float32")
        K = T.match_buffer(k, (B, H, M, D), "float32")
        V = T.match_buffer(v, (B, H, M, DV), "float32")
        O = T.match_buffer(o, (B, H, N, DV), "float32")
        if has_mask:
            MB = T.int64()
            MH = T.int64()
            MN = T.int64()
            MM = T.int64()
            Mask = T.match_buffer(mask, (MB, MH, MN, MM), "float32")
        nqb = (N + (BQ - 1)) // BQ
        for task in T.parallel(B * H * nqb):
            Qt = T.alloc_buffer((D, BQ), "float32", scope="local")
            S = T.alloc_buffer((BK, BQ), "float32", scope="local")
            Acc = T.alloc_buffer((BQ, DV), "float32", scope="local")
            m = T.alloc_buffer((BQ,), "float32", scope="local")
            mnew = T.alloc_buffer((BQ,), "float32", scope="local")
            lsum = T.alloc_buffer((BQ,), "float32", scope="local")
            bsum = T.alloc_buffer((BQ,), "float32", scope="local")
            alpha = T.alloc_buffer((BQ,), "float32", scope="local")
            Rs = T.alloc_buffer((RJ, BQ), "float32", scope="local")
            Ro = T.alloc_buffer((RI, DV), "float32", scope="local")
            Mt = T.alloc_buffer((BK if row_mask else 1, BQ), "float32", scope="local")
            live = T.alloc_buffer((BQ,), "float32", scope="local")  # 1 if a row has a key whose mask is not -inf
            b = task // (H * nqb)
            h = task // nqb % H
            i0 = task % nqb * BQ
            for d in range(D):
                for i in T.vectorized(BQ):
                    Qt[d, i] = Q[b, h, T.min(i0 + i, N - 1), d] * T.float32(qscale)
            for i in T.vectorized(BQ):
                m[i] = T.float32(neg_max)
                lsum[i] = T.float32(0)
            if has_mask:
                # a row whose every key is masked with -inf gets 0, as torch's SDPA gives (the scores below
                # clamp the mask to a finite value; finfo.min masks give the mean of V, also as torch does)
                for i in T.vectorized(BQ):
                    live[i] = T.float32(0)
                if row_mask:
                    for i in range(BQ):
                        for j in range(M):
                            live[i] = T.max(live[i], T.Select(Mask[b * sb, h * sh, T.min(i0 + i, N - 1), j * sm]
                                                              >= T.float32(-3.4028234663852886e38),
                                                              T.float32(1), T.float32(0)))
                else:
                    for j in range(M):
                        live[0] = T.max(live[0], T.Select(Mask[b * sb, h * sh, 0, j * sm]
                                                          >= T.float32(-3.4028234663852886e38),
                                                          T.float32(1), T.float32(0)))
                    for i in range(BQ):
                        live[i] = live[0]
            for i in range(BQ):
                for c in T.vectorized(DV):
                    Acc[i, c] = T.float32(0)
            for kb in range((M + (BK - 1)) // BK):
                k0 = kb * BK
                kn = T.min(M - k0, BK)
                # S^T[j, i] = K[k0 + j, :] . Qt[:, i] (+ mask), RJ key rows at a time in registers, and the new
                # running max of every query row. Rows past the last key repeat key M - 1: they leave the max as it
                # is, and the exponentials and P.V below stop at kn.
                if row_mask:  # the mask tile, transposed like S (a scalar copy: cheaper than gathers)
                    for i in range(BQ):
                        for j in range(kn):
                            Mt[j, i] = T.max(Mask[b * sb, h * sh, T.min(i0 + i, N - 1), (k0 + j) * sm]
                                             * T.float32(LOG2E), T.float32(neg_max))
                    for j in range(BK - kn):  # key rows past M: their scores must not raise the max
                        for i in T.vectorized(BQ):
                            Mt[kn + j, i] = T.float32(neg_max)
                for i in T.vectorized(BQ):
                    mnew[i] = m[i]
                for jo in range((kn + (RJ - 1)) // RJ):
                    for jj in T.unroll(RJ):
                        for i in T.vectorized(BQ):
                            Rs[jj, i] = T.float32(0)
                    for d in range(D):
                        for jj in T.unroll(RJ):
                            for i in T.vectorized(BQ):
                                Rs[jj, i] = Rs[jj, i] + K[b, h, T.min(k0 + jo * RJ + jj, M - 1), d] * Qt[d, i]
                    for jj in T.unroll(RJ):
                        if row_mask:
                            for i in T.vectorized(BQ):
                                Rs[jj, i] = Rs[jj, i] + Mt[jo * RJ + jj, i]
                        elif has_mask:  # the same mask value for every query row
                            for i in T.vectorized(BQ):
                                Rs[jj, i] = Rs[jj, i] + T.max(
                                    Mask[b * sb, h * sh, 0, T.min(k0 + jo * RJ + jj, M - 1) * sm] * T.float32(LOG2E),
                                    T.float32(neg_max))
                        for i in T.vectorized(BQ):
                            mnew[i] = T.max(mnew[i], Rs[jj, i])
                            S[jo * RJ + jj, i] = Rs[jj, i]
                for i in T.vectorized(BQ):
                    alpha[i] = _exp2(m[i] - mnew[i])
                    m[i] = mnew[i]
                    bsum[i] = T.float32(0)
                for j in range(kn):
                    for i in T.vectorized(BQ):
                        S[j, i] = _exp2(S[j, i] - m[i])
                        bsum[i] = bsum[i] + S[j, i]
                for i in T.vectorized(BQ):
                    lsum[i] = lsum[i] * alpha[i] + bsum[i]
                # Acc[i, :] = Acc[i, :] * alpha[i] + P^T[:, i] . V, RI query rows at a time in registers
                for io in range(BQ // RI):
                    for ii in T.unroll(RI):
                        for c in T.vectorized(DV):
                            Ro[ii, c] = Acc[io * RI + ii, c] * alpha[io * RI + ii]
                    for j in range(kn):
                        for ii in T.unroll(RI):
                            for c in T.vectorized(DV):
                                Ro[ii, c] = Ro[ii, c] + S[j, io * RI + ii] * V[b, h, k0 + j, c]
                    for ii in T.unroll(RI):
                        for c in T.vectorized(DV):
                            Acc[io * RI + ii, c] = Ro[ii, c]
            for i in range(T.min(N - i0, BQ)):
                for c in T.vectorized(DV):
                    if has_mask:
                        O[b, h, i0 + i, c] = T.Select(live[i] > T.float32(0), Acc[i, c] / lsum[i], T.float32(0))
                    else:
                        O[b, h, i0 + i, c] = Acc[i, c] / lsum[i]

    if not has_mask:  # drop the unused mask parameter
        f = flash_attention
        params = [p for i, p in enumerate(f.params) if i != 3]
        flash_attention = tirx.PrimFunc(params, f.body, f.ret_type, f.attrs)
    return flash_attention


def tile_space(dv: int) -> list[dict]:
    """The tile settings the autotuner measures, DEFAULT_TILES first."""
    space = [dict(DEFAULT_TILES)]
    for bq in (16, 32, 64):
        for bk in (32, 64, 128):
            for rj in (4, 8):
                t = {"block_q": bq, "block_k": bk, "rows_qk": rj}
                if t not in space and bk % rj == 0 and bq % _rows_pv(dv, bq) == 0:
                    space.append(t)
    return space


def _shape(e: relax.Expr) -> list:
    ty = e.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        raise ValueError(f"flash attention needs tensors of known rank, got {ty}")
    return list(ty.shape.values)


def _static(x) -> int | None:
    return int(x) if isinstance(x, (int, tirx.IntImm)) else None


def emit(bb: relax.BlockBuilder, q: relax.Expr, k: relax.Expr, v: relax.Expr, mask: relax.Expr | None,
         scale: float, **tiles) -> relax.Expr:
    """Emit softmax(q @ k^T * scale + mask) @ v as one call_tir; `tiles` overrides DEFAULT_TILES."""
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if not (len(qs) == len(ks) == len(vs) == 4):
        raise ValueError("flash attention takes q, k, v of rank 4 ([B, H, N, D], [B, H, M, D], [B, H, M, Dv])")
    for e in (q, k, v):
        if str(e.ty.dtype) != "float32":
            raise ValueError(f"flash attention is float32 only, got {e.ty.dtype}")
    d, dv = _static(qs[3]), _static(vs[3])
    if d is None or dv is None or _static(ks[3]) != d:
        raise ValueError(f"head dims must be static and agree: q {qs}, k {ks}, v {vs}")
    mask_bcast = None
    args = [q, k, v]
    if mask is not None:
        ms = _shape(mask)
        if len(ms) > 4:
            raise ValueError(f"mask of rank {len(ms)} does not broadcast to [B, H, N, M]")
        if str(mask.ty.dtype) == "bool":  # torch: True takes part in attention
            mask = bb.emit(relax.op.where(mask, relax.const(0.0, "float32"), relax.const(-math.inf, "float32")))
        elif str(mask.ty.dtype) != "float32":
            mask = bb.emit(relax.op.astype(mask, "float32"))
        if len(ms) < 4:
            ms = [tirx.IntImm("int64", 1)] * (4 - len(ms)) + ms
            mask = bb.emit(relax.op.reshape(mask, relax.ShapeExpr(ms)))
        mask_bcast = tuple(_static(x) == 1 for x in ms)
        args.append(mask)
    if not tiles:  # the autotuner's measured best tiles for these shapes on this target, or the defaults
        out_ty = relax.TensorType([qs[0], qs[1], qs[2], vs[3]], "float32")
        tiles = tunable.choose("flash_attention", {"d": d, "dv": dv, "scale": float(scale), "mask": mask_bcast},
                               tunable.static_shapes([*args, out_ty]), tile_space(dv),
                               lambda t: make_kernel(d, dv, scale, mask_bcast, **t))
    func = make_kernel(d, dv, scale, mask_bcast, **tiles)
    name = f"flash_attention_d{d}_dv{dv}" + ("" if mask_bcast is None else
                                             "_m" + "".join("1" if bc else "x" for bc in mask_bcast))
    gv = bb.add_func(func, name)
    out = relax.TensorType([qs[0], qs[1], qs[2], vs[3]], "float32")
    return bb.emit(relax.call_tir(gv, args, out))

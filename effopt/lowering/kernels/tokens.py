"""Token reduction ops (effopt/ops/tokens.py) as Relax graphs, so ToMe's matching and merging and EViT's
pruning compile into TVM kernels with the block around them.

Each emit function computes what its reference in `token_ops` computes, op for op. ToMe: cosine scores of
the A and B tokens (one batched matmul), the padding and protection rules as `where`s, each A token's best
edge (max/argmax), edge ranks from pairwise comparisons (no sort: ties break by index as the reference's),
positions by counting the unmerged tokens before each, then one scatter-add of every token (times its
size) into its position, a scatter-add of the sizes, a scatter-max of the key mask and a gather of the
source map. EViT: ranks of the CLS attention the same way, kept tokens in order and the rest
scatter-added into one fused token. Default schedules and FuseOps take it from there.
"""
from __future__ import annotations

import numpy as np
from tvm import relax

from ...ops.tokens import NO_EDGE, PAD_BELOW, PAD_EDGE, max_merge
from .common import dims, static
import torch

from ...ops.spec import spec_of
from ..rules import Unsupported, lowers


def _const(value: np.ndarray) -> relax.Constant:
    import tvm

    return relax.const(tvm.runtime.tensor(value))


def _f32(v: float) -> relax.Constant:
    return relax.const(v, "float32")


def _every_other(bb, x, start: int, t: int):
    return bb.emit(relax.op.strided_slice(x, axes=[1], begin=[start], end=[t], strides=[2]))


def _rank_descending(bb, v, earlier):
    """As `ops.tokens.rank_descending`: v [B, T] -> each value's place in a stable descending sort, int32;
    `earlier` the constant [T, T] matrix of j < i."""
    op = relax.op
    vi, vj = bb.emit(op.expand_dims(v, 2)), bb.emit(op.expand_dims(v, 1))  # [B, T, 1] value i; [B, 1, T] value j
    beats = bb.emit(op.logical_or(op.greater(vj, vi), op.logical_and(op.equal(vj, vi), earlier)))
    return bb.emit(op.sum(op.astype(beats, "int32"), axis=-1))


def _scatter_tokens(bb, x, pos, n: int, coef, sizes, masks, source):
    """As `ops.tokens.scatter_tokens`: (sum of x * coef, sum of sizes, max of masks, source through pos)."""
    op = relax.op
    bsz, t, c = dims(x, "token reduction", "x", 3)
    pos3 = bb.emit(op.broadcast_to(op.expand_dims(pos, 2), relax.ShapeExpr([bsz, t, c])))
    weighted = bb.emit(op.multiply(op.astype(x, "float32"), op.expand_dims(coef, 2)))
    acc = bb.emit(op.scatter_elements(op.zeros(relax.ShapeExpr([bsz, n, c]), "float32"), pos3, weighted, axis=1,
                                      reduction="add"))
    new_size = bb.emit(op.scatter_elements(op.zeros(relax.ShapeExpr([bsz, n]), "float32"), pos, sizes, axis=1,
                                           reduction="add"))
    lowest = bb.emit(op.add(op.zeros(relax.ShapeExpr([bsz, n]), "float32"), _f32(float("-inf"))))
    new_kmask = bb.emit(op.scatter_elements(lowest, pos, masks, axis=1, reduction="max"))
    return acc, new_size, new_kmask, bb.emit(op.gather_elements(pos, source, axis=1))


def emit_tome_merge(bb: relax.BlockBuilder, x, metric, size, kmask, source, r: int, protected: int):
    """(x [B, T, C], metric [B, T, D], size [B, T], kmask [B, T], source [B, T0] int64) -> relax.Tuple of
    (x', size', kmask', source') with T - r tokens. T, C static; B may be symbolic."""
    op = relax.op
    bsz, t, c = dims(x, "tome_merge", "x", 3)
    t, c = static(t, "tome_merge", "the token count"), static(c, "tome_merge", "the channel count")
    r = min(int(r), max_merge(t, int(protected)))
    ta, tb = (t + 1) // 2, t // 2
    n = t - r
    m = bb.emit(op.astype(metric, "float32"))
    norm = bb.emit(op.rsqrt(op.maximum(op.sum(op.multiply(m, m), axis=-1, keepdims=True), _f32(1e-24))))
    m = bb.emit(op.multiply(m, norm))
    a, b = _every_other(bb, m, 0, t), _every_other(bb, m, 1, t)
    scores = bb.emit(op.matmul(a, op.permute_dims(b, [0, 2, 1])))  # [B, Ta, Tb]
    pad = bb.emit(op.less(kmask, _f32(PAD_BELOW)))
    pa = bb.emit(op.expand_dims(_every_other(bb, pad, 0, t), 2))
    pb = bb.emit(op.expand_dims(_every_other(bb, pad, 1, t), 1))
    # (bools compared as int8: LLVM rejected TVM's float compare of two i1)
    scores = bb.emit(op.where(op.not_equal(op.astype(pa, "int8"), op.astype(pb, "int8")), _f32(NO_EDGE), scores))
    scores = bb.emit(op.where(op.logical_and(pa, pb), _f32(PAD_EDGE), scores))
    ia, ib = np.arange(ta), np.arange(tb)
    prot = (2 * ia < protected)[:, None] | (2 * ib + 1 < protected)[None, :]
    scores = bb.emit(op.where(_const(prot), _f32(NO_EDGE), scores))
    node_max = bb.emit(op.max(scores, axis=-1))  # [B, Ta]
    node_idx = bb.emit(op.astype(op.argmax(scores, axis=-1), "int64"))
    earlier = _const((ia[None, :] < ia[:, None]))  # [i, j]: j < i
    merged = bb.emit(op.less(_rank_descending(bb, node_max, earlier), relax.const(r, "int32")))
    kept_before = _before(bb, bb.emit(op.logical_not(merged)), earlier)  # unmerged A tokens before each
    pos_a = bb.emit(op.where(merged, op.add(node_idx, relax.const(ta - r, "int64")), kept_before))  # [B, Ta]
    # interleave A and B positions: [B, Ta, 2] -> [B, 2 Ta] -> the first T
    pos_b = _const(np.concatenate([ta - r + ib, [0] * (ta - tb)]).astype("int64"))  # [Ta]
    pos_b = bb.emit(op.broadcast_to(pos_b, relax.ShapeExpr([bsz, ta])))
    pos = bb.emit(op.reshape(op.stack([pos_a, pos_b], axis=2), relax.ShapeExpr([bsz, 2 * ta])))
    if 2 * ta != t:
        pos = bb.emit(op.strided_slice(pos, axes=[1], begin=[0], end=[t]))
    w = bb.emit(op.maximum(op.astype(size, "float32"), _f32(1.0)))
    acc, new_size, new_kmask, new_source = _scatter_tokens(bb, x, pos, n, w, w, kmask, source)
    new_x = bb.emit(op.astype(op.divide(acc, op.expand_dims(new_size, 2)), str(x.ty.dtype)))
    return relax.Tuple([new_x, new_size, new_kmask, new_source])


def _before(bb, flags, earlier):
    """[B, T] bool -> [B, T] int64: how many flagged tokens come before each (pairwise counts: TVM has no
    integer cumsum legalization)."""
    op = relax.op
    pair = op.logical_and(op.expand_dims(flags, 1), earlier)  # [B, i, j]: j flagged and j < i
    return bb.emit(op.astype(op.sum(op.astype(pair, "int32"), axis=-1), "int64"))


def emit_evit_prune(bb: relax.BlockBuilder, x, cls_attn, size, kmask, source, keep: int):
    """EViT pruning as `ops.tokens.evit_prune_ref`: (x', size', kmask', source') with keep + 2 tokens."""
    op = relax.op
    bsz, t, c = dims(x, "evit_prune", "x", 3)
    t, c = static(t, "evit_prune", "the token count"), static(c, "evit_prune", "the channel count")
    keep = min(int(keep), t - 1)
    n = keep + 2
    idx = np.arange(t)
    att_raw = bb.emit(op.astype(cls_attn, "float32"))
    att = bb.emit(op.where(_const(idx == 0), _f32(float(np.finfo(np.float32).max)), att_raw))  # CLS first
    earlier = _const(idx[None, :] < idx[:, None])  # [i, j]: j < i
    kept = bb.emit(op.less(_rank_descending(bb, att, earlier), relax.const(keep + 1, "int32")))
    pos = bb.emit(op.where(kept, _before(bb, kept, earlier), relax.const(keep + 1, "int64")))
    real = bb.emit(op.logical_not(op.less(kmask, _f32(PAD_BELOW))))
    w = bb.emit(op.where(op.logical_and(op.logical_not(kept), real), op.maximum(att_raw, _f32(0.0)), _f32(0.0)))
    wsum = bb.emit(op.maximum(op.sum(w, axis=-1, keepdims=True), _f32(1e-30)))
    coef = bb.emit(op.where(kept, _f32(1.0), op.divide(w, wsum)))
    counted = bb.emit(op.where(op.logical_or(kept, real), op.astype(size, "float32"), _f32(0.0)))
    masks = bb.emit(op.where(op.logical_or(kept, op.logical_not(real)), kmask, _f32(0.0)))
    acc, new_size, new_kmask, new_source = _scatter_tokens(bb, x, pos, n, coef, counted, masks, source)
    new_x = bb.emit(op.astype(acc, str(x.ty.dtype)))
    return relax.Tuple([new_x, bb.emit(op.maximum(new_size, _f32(1.0))), new_kmask, new_source])


def emit_cls_attention(bb: relax.BlockBuilder, q, k, kmask, scale: float):
    """The first query's (CLS) attention over the keys, averaged over heads: q, k [B, H, T, D] -> [B, T]."""
    op = relax.op
    q0 = bb.emit(op.strided_slice(op.astype(q, "float32"), axes=[2], begin=[0], end=[1]))
    s = bb.emit(op.multiply(op.matmul(q0, op.permute_dims(op.astype(k, "float32"), [0, 1, 3, 2])), _f32(scale)))
    s = bb.emit(op.add(s, op.expand_dims(kmask, [1, 2])))
    p = bb.emit(op.nn.softmax(s, axis=-1))
    return op.squeeze(op.mean(p, axis=1), axis=[1])


def emit_token_mask(bb: relax.BlockBuilder, kmask, size, proportional: bool):
    """[B, T] key mask (+ log size) -> [B, 1, 1, T]."""
    m = bb.emit(relax.op.add(kmask, relax.op.log(size))) if proportional else kmask
    return relax.op.expand_dims(m, [1, 2])


def emit_token_unmerge(bb: relax.BlockBuilder, y, source):
    """y [B, T, ...] gathered at source [B, T0] along dim 1 -> [B, T0, ...]."""
    shape = dims(y, "token_unmerge", "y")
    idx = source
    for _ in range(len(shape) - 2):
        idx = relax.op.expand_dims(idx, -1)
    full = relax.ShapeExpr([shape[0], dims(source, "token_unmerge", "source", 2)[1]] + shape[2:])
    return relax.op.gather_elements(y, bb.emit(relax.op.broadcast_to(idx, full)), axis=1)


# ---- the lowering rules of effopt/ops/tokens.py's ops ------------------------------------------------------------
@lowers(torch.ops.effopt.tome_merge.default)
def _lower_tome_merge(cv, node, x, metric, size, kmask, source, r, protected):
    if any(not isinstance(d, int) for d in spec_of(node.target).bind(node)["x"].meta["val"].shape[1:]):
        raise Unsupported("tome_merge needs static token and channel counts")
    return emit_tome_merge(cv.bb, x, metric, size, kmask, source, int(r), int(protected))


@lowers(torch.ops.effopt.evit_prune.default)
def _lower_evit_prune(cv, node, x, cls_attn, size, kmask, source, keep):
    return emit_evit_prune(cv.bb, x, cls_attn, size, kmask, source, int(keep))


@lowers(torch.ops.effopt.cls_attention.default)
def _lower_cls_attention(cv, node, q, k, kmask, scale):
    return emit_cls_attention(cv.bb, q, k, kmask, float(scale))


@lowers(torch.ops.effopt.token_mask.default)
def _lower_token_mask(cv, node, kmask, size, proportional):
    return emit_token_mask(cv.bb, kmask, size, bool(proportional))


@lowers(torch.ops.effopt.token_unmerge.default)
def _lower_token_unmerge(cv, node, y, source):
    return emit_token_unmerge(cv.bb, y, source)

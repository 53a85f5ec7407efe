"""Token reduction operators (ToMe merging, EViT pruning) as torch custom ops.

The token reduction pass (effopt/passes/token_reduction.py) threads a small state through the encoder
blocks of a graph, next to the residual stream x [B, T, C]:

    size    [B, T] float32   how many original tokens each token stands for (ToMe's size)
    kmask   [B, T] float32   additive key mask: 0 for real tokens, -inf (or the model's very negative
                             value) for padding; padding is never merged into real tokens and vice versa
    source  [B, T0] int64    for each original token, the index of the token that now holds it

token_init(x, mask)                              -> (size, kmask, source)   the state of an unreduced x
tome_merge(x, metric, size, kmask, source, r, protected)
    ToMe's bipartite soft matching on `metric` [B, T, D] (the keys, averaged over heads): tokens
    alternate into sets A and B, each A token's most similar B token (cosine) is its edge, the r
    strongest edges merge (size-weighted averages); the first `protected` tokens (CLS, distillation) are
    never merged away; padding merges only with padding, and before any real token (by position, so
    the real tokens' merges do not depend on what padding holds). -> (x', size', kmask', source') with
    T - r tokens.
evit_prune(x, cls_attn, size, kmask, source, keep)
    EViT: keeps the `keep` tokens (after CLS) that receive the most attention from CLS (`cls_attn` [B, T],
    averaged over heads), and fuses the rest into one token (their attention-weighted average, padding
    excluded). -> (x', ...) with 1 + keep + 1 tokens.
token_mask(kmask, size, proportional)            -> [B, 1, 1, T] additive attention mask: kmask, plus
    log(size) with proportional attention (ToMe: a merged token counts as `size` keys).
token_unmerge(y, source)                         -> y gathered back to the original T0 tokens (each
    original token gets the value of the token that holds it), so graph outputs keep their shapes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .spec import declare

Tensor = torch.Tensor
PAD_BELOW = -1.0  # a key-mask value below this marks padding (Hugging Face uses finfo.min, others -inf or -1e4)


def _key_mask(mask: Optional[Tensor], b: int, t: int) -> Tensor:
    """[B, T] additive key mask from an attention mask broadcastable to [B, H, T, T] that is the same for
    every query and head (checked), or zeros."""
    if mask is None:
        return torch.zeros(b, t)
    from .attention import additive_mask

    m = additive_mask(mask).to(torch.float32)
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape)).expand(b, -1, -1, t)
    first = m[:, :1, :1, :]
    if not torch.equal(m, first.expand_as(m)):
        raise ValueError("token reduction needs a key padding mask (the same for every query and head)")
    return first.reshape(b, t).clone()


def token_init_ref(x: Tensor, mask: Optional[Tensor]):
    b, t = x.shape[0], x.shape[1]
    size = torch.ones(b, t, dtype=torch.float32, device=x.device)
    source = torch.arange(t, device=x.device).expand(b, t).contiguous()
    return size, _key_mask(mask, b, t).to(x.device), source


def _pad(kmask: Tensor) -> Tensor:
    return kmask < PAD_BELOW


NO_EDGE = -1e30  # score of a pair that may not merge (a protected token, padding with a real token)
PAD_EDGE = 2.0  # score of two padding tokens: above any cosine, so padding merges first


def rank_descending(v: Tensor) -> Tensor:
    """[B, T] -> [B, T]: each value's place in a stable descending sort (ties: lower index first), from
    pairwise comparisons (the TVM lowering has no sort it could match tie for tie)."""
    i = torch.arange(v.shape[1], device=v.device)
    beats = (v[:, None, :] > v[:, :, None]) | ((v[:, None, :] == v[:, :, None]) & (i[None, :] < i[:, None])[None])
    return beats.sum(dim=-1)


def _count_before(flags: Tensor) -> Tensor:
    """[B, T] bool -> how many flagged tokens come before each (int64)."""
    f = flags.to(torch.int64)
    return torch.cumsum(f, dim=1) - f


def scatter_tokens(x: Tensor, pos: Tensor, n: int, coef: Tensor, sizes: Tensor, masks: Tensor, source: Tensor):
    """Every token into its position pos [B, T] of a sequence of n: (sum of x * coef, sum of sizes, max of
    masks, the source map through pos), the shared end of ToMe's merge and EViT's prune."""
    b, c = x.shape[0], x.shape[2]
    acc = torch.zeros(b, n, c, device=x.device).scatter_add_(
        1, pos[..., None].expand(-1, -1, c), x.to(torch.float32) * coef[..., None])
    new_size = torch.zeros(b, n, device=x.device).scatter_add_(1, pos, sizes)
    new_kmask = torch.full((b, n), -math.inf, device=x.device).scatter_reduce_(1, pos, masks, "amax")
    return acc, new_size, new_kmask, pos.gather(1, source)


def tome_positions(metric: Tensor, kmask: Tensor, r: int, protected: int) -> Tensor:
    """ToMe's bipartite soft matching as the position [B, T] each token takes in the merged sequence.

    Tokens alternate into A (even) and B (odd); each A token's edge is its most similar B token (cosine of
    `metric`, first index on ties). The r A tokens with the strongest edges (ties: lower index first, as a
    stable descending sort) merge into their B token; the merged sequence is [unmerged A tokens in order,
    B tokens in order]. Ranks come from pairwise comparisons rather than a sort, so effopt's TVM lowering
    (lowering/kernels/tokens.py) computes exactly the same positions."""
    b, t = kmask.shape
    ta = (t + 1) // 2
    m = metric.to(torch.float32)
    m = m * m.square().sum(dim=-1, keepdim=True).clamp_min(1e-24).rsqrt()
    scores = m[:, ::2] @ m[:, 1::2].transpose(-1, -2)  # [B, Ta, Tb]
    pa, pb = _pad(kmask[:, ::2]), _pad(kmask[:, 1::2])
    scores = torch.where(pa[:, :, None] != pb[:, None, :], NO_EDGE, scores)  # padding only with padding
    # padding merges first, and by position only: which real tokens merge never depends on what the
    # padding holds (its keys are masked; merging it costs nothing)
    scores = torch.where(pa[:, :, None] & pb[:, None, :], PAD_EDGE, scores)
    ia, ib = torch.arange(ta, device=kmask.device), torch.arange(t // 2, device=kmask.device)
    # protected tokens neither merge away (A) nor receive merges (B)
    scores = torch.where((2 * ia < protected)[:, None] | (2 * ib + 1 < protected)[None, :], NO_EDGE, scores)
    node_max, node_idx = scores.max(dim=-1)
    merged = rank_descending(node_max) < r  # the r strongest edges
    pos_a = torch.where(merged, ta - r + node_idx, _count_before(~merged))
    pos = torch.empty(b, t, dtype=torch.int64, device=kmask.device)
    pos[:, ::2], pos[:, 1::2] = pos_a, (ta - r + ib).expand(b, t // 2)
    return pos


def max_merge(t: int, protected: int) -> int:
    """The largest r a sequence of t tokens can merge in one step."""
    return max(0, (t - protected) // 2)


def tome_merge_ref(x, metric, size, kmask, source, r: int, protected: int):
    t = x.shape[1]
    r = min(r, max_merge(t, protected))
    if r <= 0:
        return x.clone(), size.clone(), kmask.clone(), source.clone()
    pos = tome_positions(metric, kmask, r, protected)
    # every token added into its position, weighted by its size: merged tokens are size-weighted averages
    # (sizes count tokens, so >= 1; the clamp keeps the lowering's self-check on random inputs well-posed)
    w = size.to(torch.float32).clamp_min(1.0)
    # merges never mix padding and real tokens: any member's mask is the group's
    acc, new_size, new_kmask, new_source = scatter_tokens(x, pos, t - r, w, w, kmask, source)
    return (acc / new_size[..., None]).to(x.dtype), new_size, new_kmask, new_source


def evit_prune_ref(x, cls_attn, size, kmask, source, keep: int):
    """EViT: CLS and the `keep` tokens with the most CLS attention (ties: lower index first) stay, in order;
    the rest fuse into one last token, their attention-weighted average (padding weighs nothing). Ranks and
    positions as in `tome_positions`, so the TVM lowering computes the same."""
    t = x.shape[1]
    keep = min(keep, t - 1)
    if keep >= t - 1:
        return x.clone(), size.clone(), kmask.clone(), source.clone()
    att = torch.where(torch.arange(t, device=x.device) == 0, torch.finfo(torch.float32).max,
                      cls_attn.to(torch.float32))  # CLS first
    kept = rank_descending(att) < keep + 1  # CLS and the top `keep`
    pos = torch.where(kept, _count_before(kept), keep + 1)
    real = ~_pad(kmask)
    # (attention is >= 0; the clamp keeps every weight in [0, 1] whatever the input, which the lowering's
    # self-check on random inputs relies on)
    w = torch.where(~kept & real, cls_attn.to(torch.float32).clamp_min(0.0), 0.0)
    coef = torch.where(kept, 1.0, w / w.sum(dim=-1, keepdim=True).clamp_min(1e-30))
    # the fused token is padding only if all of it is
    acc, new_size, new_kmask, new_source = scatter_tokens(
        x, pos, keep + 2, coef, torch.where(kept | real, size, 0.0), torch.where(kept | ~real, kmask, 0.0), source)
    return acc.to(x.dtype), new_size.clamp_min(1.0), new_kmask, new_source


def cls_attention_ref(q: Tensor, k: Tensor, kmask: Tensor, scale: float) -> Tensor:
    """Attention of the first query (CLS) over the keys, averaged over heads: q, k [B, H, T, D] -> [B, T]."""
    s = (q[:, :, :1].to(torch.float32) @ k.to(torch.float32).transpose(-1, -2)) * scale + kmask[:, None, None, :]
    return s.softmax(dim=-1).mean(dim=1)[:, 0]


# ---- the custom ops -------------------------------------------------------------------------------------
@torch.library.custom_op("effopt::token_init", mutates_args=())
def token_init(x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    return token_init_ref(x, mask)


@token_init.register_fake
def _(x, mask):
    b, t = x.shape[0], x.shape[1]
    return (x.new_empty((b, t), dtype=torch.float32), x.new_empty((b, t), dtype=torch.float32),
            x.new_empty((b, t), dtype=torch.int64))


@torch.library.custom_op("effopt::tome_merge", mutates_args=())
def tome_merge(x: Tensor, metric: Tensor, size: Tensor, kmask: Tensor, source: Tensor, r: int,
               protected: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return tome_merge_ref(x, metric, size, kmask, source, r, protected)


@tome_merge.register_fake
def _(x, metric, size, kmask, source, r, protected):
    b, t = x.shape[0], x.shape[1]
    n = t - min(r, max_merge(t, protected))
    return (x.new_empty((b, n) + tuple(x.shape[2:])), size.new_empty((b, n)), kmask.new_empty((b, n)),
            source.new_empty(source.shape))


@torch.library.custom_op("effopt::evit_prune", mutates_args=())
def evit_prune(x: Tensor, cls_attn: Tensor, size: Tensor, kmask: Tensor, source: Tensor,
               keep: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return evit_prune_ref(x, cls_attn, size, kmask, source, keep)


@evit_prune.register_fake
def _(x, cls_attn, size, kmask, source, keep):
    b, t = x.shape[0], x.shape[1]
    n = t if keep >= t - 1 else keep + 2
    return (x.new_empty((b, n) + tuple(x.shape[2:])), size.new_empty((b, n)), kmask.new_empty((b, n)),
            source.new_empty(source.shape))


@torch.library.custom_op("effopt::cls_attention", mutates_args=())
def cls_attention(q: Tensor, k: Tensor, kmask: Tensor, scale: float) -> Tensor:
    return cls_attention_ref(q, k, kmask, scale)


@cls_attention.register_fake
def _(q, k, kmask, scale):
    return q.new_empty((q.shape[0], k.shape[2]), dtype=torch.float32)


@torch.library.custom_op("effopt::token_mask", mutates_args=())
def token_mask(kmask: Tensor, size: Tensor, proportional: bool) -> Tensor:
    m = kmask + size.log() if proportional else kmask.clone()
    return m[:, None, None, :]


@token_mask.register_fake
def _(kmask, size, proportional):
    return kmask.new_empty((kmask.shape[0], 1, 1, kmask.shape[1]))


@torch.library.custom_op("effopt::token_unmerge", mutates_args=())
def token_unmerge(y: Tensor, source: Tensor) -> Tensor:
    idx = source.reshape(source.shape + (1,) * (y.dim() - 2)).expand(source.shape + tuple(y.shape[2:]))
    return y.gather(1, idx)


@token_unmerge.register_fake
def _(y, source):
    return y.new_empty((y.shape[0], source.shape[1]) + tuple(y.shape[2:]))


# ---- declarations (effopt/ops/spec.py) ------------------------------------------------------------------------
# the state's set-up checks the mask at run time (torch); the reductions, masks and unmerging are lowered
# (lowering/kernels/tokens.py)
declare(token_init, library=True)
for _op in (tome_merge, evit_prune, cls_attention, token_mask, token_unmerge):
    declare(_op)

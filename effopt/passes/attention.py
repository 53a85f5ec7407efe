"""Exact attention fusion: softmax attention written out op by op becomes one scaled-dot-product-attention.

After AOTAutograd, `softmax(q @ k.transpose(-2, -1) * scale + mask) @ v` is a chain of ATen ops:

    expand/clone/_unsafe_view of Q and of K^T -> bmm -> view -> [mul|div by a scalar] -> [add mask]
      -> _softmax(-1) -> expand/view -> bmm with expand/clone/_unsafe_view of V -> view

whatever the model wrote (`@`, `matmul`, `bmm`, scaling Q or the scores, by `mul` or `div`). The pass
walks back from each `_softmax` over that chain and replaces it with `aten.scaled_dot_product_attention`
(q, k, v, attn_mask, scale), which torch runs on its fused CPU kernel without materializing the whole
score matrix per head at once. Graphs that already call SDPA (`F.scaled_dot_product_attention`, Hugging
Face `sdpa`) are left as they are and counted as `already_fused` in the record's notes.

A chain is rewritten only if every intermediate (scaled Q, scores, mask sum, probabilities, the 3-D
views) has exactly one user, so nothing a caller can see (returned attention weights, tensors saved for a
backward pass) changes.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.fx as fx

from ..graph import fake_call, fake_mode, source_location
from .manager import GraphPass
from .records import PassRecord

aten = torch.ops.aten

_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
_SDPA_OPS = (aten._scaled_dot_product_flash_attention_for_cpu.default,
             aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_efficient_attention.default,
             aten.scaled_dot_product_attention.default,
             # torch's fused inference paths of nn.MultiheadAttention / nn.TransformerEncoderLayer
             aten._native_multi_head_attention.default, aten._transformer_encoder_layer_fwd.default)




def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _single_user(n: fx.Node) -> bool:
    return len(n.users) == 1


def _strip(n: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """What a 3-D bmm operand [B*H, R, C] was made from, walking back through _unsafe_view/view, clone
    and no-op expand (each step used only on this path): (the 4-D [B, H, R, C] it was flattened from, or
    None; the earliest 3-D tensor of the operand's own shape)."""
    flat = _val(n)
    if not isinstance(flat, torch.Tensor) or flat.dim() != 3:
        return None, None
    cur, best = n, n
    for _ in range(6):
        if not isinstance(cur, fx.Node) or cur.op != "call_function" or (cur is not n and not _single_user(cur)):
            break
        if cur.target in _RESHAPES or cur.target is aten.clone.default:
            cur = cur.args[0]
        elif cur.target is aten.expand.default and tuple(_val(cur.args[0]).shape) == tuple(_val(cur).shape):
            cur = cur.args[0]
        else:
            break
        v = _val(cur)
        if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(flat.shape):
            best = cur
    v = _val(cur)
    # row-major views keep element order, so a 4-D source is the flatten of its first two dims
    four = isinstance(v, torch.Tensor) and v.dim() == 4 and v.shape[0] * v.shape[1] == flat.shape[0] \
        and tuple(v.shape[2:]) == tuple(flat.shape[1:])
    return (cur if four else None), best


def _scalar(x) -> float | None:
    if isinstance(x, bool):
        return None
    return float(x) if isinstance(x, numbers.Number) else None


def _is_last_two_transpose(n: fx.Node) -> bool:
    v = _val(n)
    if not isinstance(v, torch.Tensor):
        return False
    r = v.dim()
    if n.target is aten.transpose.int:
        return sorted(a % r for a in n.args[1:3]) == [r - 2, r - 1]
    if n.target is aten.permute.default:
        return [a % r for a in n.args[1]] == [*range(r - 2), r - 1, r - 2]
    return False


class _Match:
    def __init__(self):
        self.scale = 1.0
        self.mask = None
        self.bool_mask = None  # (condition node, fill value, True if the fill applies where the condition holds)
        self.q = self.k = self.v = None
        self.out = None  # the node whose uses the fused op takes over


_ABSORBING = -1e30  # s + fill == fill exactly in float32 for any |s| < 1e22: an additive mask is then exact


def _match_boolean_mask(m: _Match, s: fx.Node) -> fx.Node:
    """`scores.masked_fill(cond, fill)` or `torch.where(cond, scores, fill)`: records the mask, returns scores."""
    if not _single_user(s):
        return s
    if s.target is aten.masked_fill.Scalar and _scalar(s.args[2]) is not None:
        m.bool_mask = (s.args[1], _scalar(s.args[2]), True)
        return s.args[0]
    if s.target is aten.where.self:
        cond, a, b = s.args
        for scores, fill, where_true in ((a, b, False), (b, a, True)):
            if isinstance(fill, fx.Node) and fill.target is aten.scalar_tensor.default \
                    and _scalar(fill.args[0]) is not None and isinstance(scores, fx.Node) \
                    and tuple(_val(scores).shape) == tuple(_val(s).shape):
                m.bool_mask = (cond, _scalar(fill.args[0]), where_true)
                return scores
    return s


def _boolean_mask_exact(gm: fx.GraphModule, m: _Match) -> str | None:
    """Why turning the boolean mask into an additive one could change results, or None.

    A fill of -1e30 or below (e.g. finfo.min) is absorbed exactly: scores + fill == fill. Otherwise a row
    whose keys are all masked differs (masked_fill(-inf) gives NaN there, SDPA 0), so the rewrite needs
    the condition to be a constant in which every row keeps a key (a causal mask buffer), and a fill that
    underflows softmax (<= -1e4)."""
    cond, fill, where_true = m.bool_mask
    cv = _val(cond)
    if not isinstance(cv, torch.Tensor) or cv.dtype != torch.bool:
        return "the mask condition is not a boolean tensor"
    if fill > 0 or math.isnan(fill):
        return f"fill value {fill} is not a mask"
    if math.isfinite(fill) and fill <= _ABSORBING:
        return None
    if fill > -1e4:
        return f"fill value {fill} does not underflow softmax"
    if cond.op != "get_attr":
        return (f"fill value {fill} with a mask computed at run time: a row with every key masked would change "
                "(NaN or uniform in eager, 0 in SDPA)")
    keep = ~getattr(gm, cond.target) if where_true else getattr(gm, cond.target)
    if not bool(keep.any(dim=-1).all()):
        return "the constant mask masks every key of some row"
    return None


def _additive_mask(gm: fx.GraphModule, m: _Match, before: fx.Node) -> fx.Node:
    """The boolean mask as a float tensor: fill where masked, 0 elsewhere."""
    cond, fill, where_true = m.bool_mask
    dtype = _val(m.q).dtype
    with gm.graph.inserting_before(before):
        f = gm.graph.call_function(aten.scalar_tensor.default, (fill,), {"dtype": dtype})
        z = gm.graph.call_function(aten.scalar_tensor.default, (0.0,), {"dtype": dtype})
        mask = gm.graph.call_function(aten.where.self, (cond, f, z) if where_true else (cond, z, f))
    mode = fake_mode(_val(m.q))
    for n in (f, z, mask):
        n.meta["val"] = fake_call(n.target, n.args, n.kwargs, mode=mode, real=True)
    return mask


def _match_scores(m: _Match, s: fx.Node) -> bool:
    """s: the softmax input, [B, H, N, M]. Fills scale, mask, q and k."""
    s = _match_boolean_mask(m, s)
    if s.target is aten.add.Tensor and _single_user(s) and len(s.args) == 2 and not s.kwargs:
        a, b = s.args
        for scores, mask in ((a, b), (b, a)):
            if isinstance(scores, fx.Node) and isinstance(mask, fx.Node) and _single_user(scores) \
                    and scores.target in (aten.view.default, aten.bmm.default, aten.mul.Tensor, aten.div.Tensor):
                m.mask, s = mask, scores
                break
        else:
            return False
    if s.target in (aten.mul.Tensor, aten.div.Tensor) and _single_user(s):
        c = _scalar(s.args[1])
        if c is None or c == 0:
            return False
        m.scale *= c if s.target is aten.mul.Tensor else 1.0 / c
        s = s.args[0]
    if s.target is aten.view.default and _single_user(s):  # heads: [B*H, N, M] viewed as [B, H, N, M]
        s = s.args[0]
    bmm = s
    if not isinstance(bmm, fx.Node) or bmm.target is not aten.bmm.default or not _single_user(bmm):
        return False
    (q4, q3), (kt4, kt3) = (_strip(a) for a in bmm.args)
    if q4 is not None and kt4 is not None and _is_last_two_transpose(kt4):
        q, kt = q4, kt4  # per-head 4-D tensors
    else:
        q, kt = q3, kt3  # heads folded into the batch (or a single head)
    if q is None or kt is None or not _is_last_two_transpose(kt) or not _single_user(kt):
        return False
    if q.target in (aten.mul.Tensor, aten.div.Tensor) and _single_user(q) and _scalar(q.args[1]) not in (None, 0):
        c = _scalar(q.args[1])
        m.scale *= c if q.target is aten.mul.Tensor else 1.0 / c
        q = q.args[0]
    m.q, m.k = q, kt.args[0]
    return True


def _match_values(m: _Match, softmax: fx.Node) -> bool:
    """From the probabilities to the [B, H, N, Dv] output: fills v and out."""
    p = softmax
    for _ in range(4):
        if not _single_user(p):
            return False
        user = next(iter(p.users))
        if user.target is aten.bmm.default:
            break
        # eval-mode dropout is a clone in the canonical graph
        if user.target not in _RESHAPES and user.target not in (aten.expand.default, aten.clone.default):
            return False
        if user.target is aten.expand.default and tuple(_val(user).shape) != tuple(_val(p).shape):
            return False
        p = user
    else:
        return False
    bmm = user
    if bmm.args[0] is not p or not _single_user(bmm):
        return False
    v4, v3 = _strip(bmm.args[1])
    v = v4 if _val(m.q).dim() == 4 else v3
    out = bmm
    if _val(m.q).dim() == 4:  # [B*H, N, Dv] viewed back as [B, H, N, Dv]
        (out,) = bmm.users
        if out.target is not aten.view.default or _val(out).dim() != 4:
            return False
    m.v, m.out = v, out
    return True


def _shapes_agree(m: _Match) -> bool:
    q, k, v, out = (_val(n) for n in (m.q, m.k, m.v, m.out))
    if any(not isinstance(t, torch.Tensor) or t.dim() != q.dim() for t in (q, k, v, out)):
        return False
    if not (q.dtype == k.dtype == v.dtype == out.dtype) or not q.dtype.is_floating_point:
        return False
    if q.shape[:-2] != k.shape[:-2] or k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        return False
    if tuple(out.shape) != (*q.shape[:-1], v.shape[-1]):
        return False
    if m.mask is not None and m.bool_mask is not None:
        return False
    if m.bool_mask is not None:
        mv = _val(m.bool_mask[0])
        try:
            if torch.broadcast_shapes(tuple(mv.shape), (*q.shape[:-1], k.shape[-2])) != (*q.shape[:-1], k.shape[-2]):
                return False
        except RuntimeError:
            return False
    if m.mask is not None:
        mv = _val(m.mask)
        if not isinstance(mv, torch.Tensor) or mv.dtype != q.dtype or mv.dim() > q.dim():
            return False
        try:
            if torch.broadcast_shapes(tuple(mv.shape), (*q.shape[:-1], k.shape[-2])) != (*q.shape[:-1], k.shape[-2]):
                return False
        except RuntimeError:
            return False
    return math.isfinite(m.scale)


def _fake_output(m: _Match):
    out = fake_call(aten.scaled_dot_product_attention.default, (m.q, m.k, m.v),
                    {"attn_mask": m.mask, "scale": m.scale})
    return _val(m.out) if out is None else out


class FuseAttention(GraphPass):
    name = "fuse_attention"

    def apply(self, gm: fx.GraphModule, record: PassRecord) -> None:
        already = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target in _SDPA_OPS:
                already += 1
                continue
            if node.target is not aten._softmax.default or node.args[2] \
                    or node.args[1] % _val(node).dim() != _val(node).dim() - 1:
                continue
            m = _Match()
            if not (_single_user(node) and _match_scores(m, node.args[0]) and _match_values(m, node)
                    and _shapes_agree(m)):
                continue
            if m.bool_mask is not None:
                why = _boolean_mask_exact(gm, m)
                if why:
                    record.notes.append(f"kept {source_location(node) or node.name} unfused: {why}")
                    continue
                m.mask = _additive_mask(gm, m, m.out)
            with gm.graph.inserting_before(m.out):
                fused = gm.graph.call_function(aten.scaled_dot_product_attention.default, (m.q, m.k, m.v),
                                               {"attn_mask": m.mask, "scale": m.scale})
            fused.meta = dict(node.meta)
            fused.meta["val"] = _fake_output(m)
            m.out.replace_all_uses_with(fused)
            erase_dead_chain(gm, m.out)
            record.add_match(node)
        if already:
            record.notes.append(f"already_fused={already}")


def erase_dead_chain(gm: fx.GraphModule, start: fx.Node) -> None:
    """Erase `start` and, transitively, the inputs that it leaves without users (not placeholders)."""
    stack = [start]
    while stack:
        n = stack.pop()
        if n.users or n.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = n.all_input_nodes
        gm.graph.erase_node(n)
        stack.extend(inputs)

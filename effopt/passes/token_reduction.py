"""Token reduction: ToMe token merging (`token_merge`) and EViT token pruning (`token_prune`) inserted into
the encoder blocks of a traced transformer, training-free.

The pass finds the encoder blocks from their fused attention (an SDPA node, after `fuse_attention`): the
block's residual stream after attention is the first add downstream of the attention output that adds two
[B, T, C] tensors (pre-LN: ViT, DINOv2), or that add's LayerNorm when the add feeds only the norm
(post-LN: BERT). Between attention and MLP of each block, as the papers do, it inserts

    ToMe   effopt::tome_merge: bipartite soft matching on the block's keys (averaged over heads), merging the
           r most similar pairs with size-weighted averages; later attentions get log(size) added to their
           logits (proportional attention).
    EViT   effopt::evit_prune at a few layers: keep the tokens CLS attends to most, fuse the rest into one.

Token state (sizes, the key padding mask, and where each original token went) travels with the stream
(effopt/ops/tokens.py). CLS (and any `protected` leading tokens) is never merged or pruned; padding merges
only with padding, and every later attention gets the reduced key mask. The graph's later shapes are
re-derived (view sizes follow the token count), and outputs that carried the token dimension are gathered
back to the original tokens (`token_unmerge`), so the compiled model returns the shapes eager returns.
Shapes stay static for an input shape and schedule; the batch dimension may be symbolic.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ops import tokens as token_ops  # noqa: F401 - registers effopt::tome_merge and friends
from ..ops.sdpa import FLASH_CPU, sdpa_arguments
from .guarded import GuardedPass
from ..graph import as_fake, fake_call, fake_mode, source_location
from ..options.tokens import TokenConfig, default_prune_layers

aten = torch.ops.aten
effopt_ops = torch.ops.effopt
_SDPA = (aten.scaled_dot_product_attention.default, FLASH_CPU)
_LAYER_NORM = (aten.native_layer_norm.default, aten.layer_norm.default)


# ---- finding the blocks ---------------------------------------------------------------------------------------
@dataclass
class Block:
    sdpa: fx.Node
    q: fx.Node
    k: fx.Node
    mask: fx.Node | None
    scale: float
    stream: fx.Node  # the residual stream after attention, [B, T, C]


def _shape(n) -> tuple | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _stream_after(out: fx.Node, tokens: int) -> fx.Node | None:
    """The residual add of the attention output `out` (or its LayerNorm, post-LN), following single users."""
    node = out
    for _ in range(24):
        users = list(node.users)
        if len(users) != 1:
            return None
        node = users[0]
        if node.op != "call_function":
            return None
        if node.target is aten.add.Tensor and all(isinstance(a, fx.Node) for a in node.args[:2]):
            sa, sb = _shape(node.args[0]), _shape(node.args[1])
            if sa is not None and sa == sb and len(sa) == 3 and sa[1] == tokens:
                break
    else:
        return None
    users = list(node.users)
    if len(users) == 1 and users[0].target in _LAYER_NORM:  # post-LN (BERT): the stream is the norm's output
        ln = users[0]
        if ln.target is aten.layer_norm.default:
            return ln
        outs = list(ln.users)
        if len(outs) == 1 and outs[0].target is operator.getitem and outs[0].args[1] == 0:
            return outs[0]
        return None
    return node


def find_blocks(gm: fx.GraphModule) -> tuple[list[Block], list[str]]:
    blocks, skipped = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in _SDPA:
            continue
        where = source_location(node) or node.name
        f = sdpa_arguments(node.target, node.args, node.kwargs)
        q, k = f["q"], f["k"]
        sq, sk = _shape(q), _shape(k)
        why = None
        if f["dropout_p"] or f["is_causal"] or f["enable_gqa"]:
            why = "dropout, causal or grouped-query attention"
        elif sq is None or sk is None or len(sq) != 4 or sq[2] != sk[2] or not isinstance(sq[2], int):
            why = "not self-attention over a static token count"
        out = node
        if not why and node.target is FLASH_CPU:
            outs = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
            out = outs[0] if len(outs) == 1 and len(node.users) == 1 else None
            why = None if out is not None else "attention log-sum-exp is used"
        stream = None if why else _stream_after(out, sq[2])
        if not why and stream is None:
            why = "no residual stream [B, T, C] found after the attention"
        if why:
            skipped.append(f"{where}: {why}")
            continue
        scale = f["scale"]
        scale = 1.0 / math.sqrt(int(sq[-1])) if scale is None else float(scale)
        blocks.append(Block(node, q, k, f["attn_mask"], scale, stream))
    return blocks, skipped


# ---- shapes after the token count changed ---------------------------------------------------------------------
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _groups(a: tuple, b: tuple) -> list[tuple[list[int], list[int]]] | None:
    """Matching groups of dims (dims of `a`, dims of `b`) with equal products, for a view from a to b."""
    groups, i, j = [], 0, 0
    while i < len(a) or j < len(b):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(a):
            gi.append(i); pi *= a[i]; i += 1  # noqa: E702
        if j < len(b):
            gj.append(j); pj *= b[j]; j += 1  # noqa: E702
        while pi != pj:
            if pi < pj and i < len(a):
                gi.append(i); pi *= a[i]; i += 1  # noqa: E702
            elif pj < pi and j < len(b):
                gj.append(j); pj *= b[j]; j += 1  # noqa: E702
            else:
                return None
        groups.append((gi, gj))
    return groups


def _hint(s) -> int:
    """An int for a size: symbolic sizes (the batch) by their example value, without adding a guard."""
    return int(s.node.hint) if isinstance(s, torch.SymInt) else int(s)


def _new_view_size(old_in: tuple, old_out: tuple, new_in: tuple, size: list, token_counts: set):
    """The size argument of a view whose input changed from old_in to new_in (token counts), or None.

    Dims group by equal products (e.g. [B*T, C] -> [B, T, C]: (B*T) -> (B, T), (C) -> (C)); an output group
    fed by a changed input group changes in one dim: the only one, or the one whose old extent is a token
    count and whose new extent is whole. Symbolic output dims become -1."""
    if len(old_in) != len(new_in):
        return None
    groups = _groups(tuple(_hint(s) for s in old_in), tuple(_hint(s) for s in old_out))
    if groups is None:
        return None
    size = list(size)
    for gi, gj in groups:
        if all(old_in[d] == new_in[d] for d in gi):
            continue
        old_ext = math.prod(_hint(old_in[d]) for d in gi)
        new_ext = math.prod(_hint(new_in[d]) for d in gi)
        fits = [j for j in gj if (new_ext * _hint(old_out[j])) % old_ext == 0 and _hint(old_out[j]) != 1]
        if len(fits) > 1:
            fits = [j for j in fits if _hint(old_out[j]) in token_counts]
        if len(fits) != 1:
            return None
        j = fits[0]
        value = new_ext * _hint(old_out[j]) // old_ext
        symbolic = any(isinstance(new_in[d], torch.SymInt) for d in gi) and len(gj) == 1
        size[j] = -1 if symbolic or not isinstance(size[j], int) else value
    return size


class ShapeError(RuntimeError):
    pass


def repropagate(gm: fx.GraphModule, old: dict[fx.Node, tuple], token_counts: set) -> None:
    """Recompute every node's fake value after the token count changed, fixing view sizes on the way."""
    mode = fake_mode(*[n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"], fresh=True)
    env: dict[fx.Node, object] = {}

    def fake(v):
        return as_fake(mode, v)

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = fake(n.meta.get("val"))
            continue
        if n.op == "get_attr":
            env[n] = fake(getattr(gm, n.target))
            continue
        if n.op == "output":
            continue
        if n.target in _VIEWS and isinstance(n.args[0], fx.Node):
            src = n.args[0]
            new_in = tuple(env[src].shape)
            if src in old and old[src] != new_in and n in old:
                size = _new_view_size(old[src], old[n], new_in, n.args[1], token_counts)
                if size is None:
                    raise ShapeError(f"cannot follow the token count through {n.target} at {n.name}: "
                                     f"{old[src]} -> {list(old[n])} with input now {new_in}")
                n.args = (src, size) + tuple(n.args[2:])
        elif n.target is aten.expand.default and isinstance(n.args[0], fx.Node):
            src = n.args[0]
            new_in = tuple(env[src].shape)
            if src in old and old[src] != new_in:
                pad = len(n.args[1]) - len(new_in)
                size = [(-1 if d >= pad and new_in[d - pad] != 1 else s) for d, s in enumerate(n.args[1])]
                for d, s in enumerate(size):
                    if s != -1 and d >= pad and old[src][d - pad] == 1 and n in old and old[n][d] != 1 \
                            and old[n][d] in set(old[src]) | {max(old[src])}:
                        raise ShapeError(f"cannot tell whether {n.name} expands the token dimension")
                n.args = (src, size) + tuple(n.args[2:])
        args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
        with mode:
            val = n.target(*args, **kwargs)
        n.meta["val"] = val
        env[n] = val


# ---- the rewrite ----------------------------------------------------------------------------------------------
def _set_mask(sdpa: fx.Node, mask: fx.Node) -> None:
    """Set the attention mask argument (positional in SDPA's 4th place when given there, else a keyword)."""
    if sdpa.target is not FLASH_CPU and len(sdpa.args) > 3:
        sdpa.update_arg(3, mask)
    else:
        sdpa.update_kwarg("attn_mask", mask)


@dataclass
class Plan:
    config: TokenConfig
    amounts: list[int]  # per block: tokens merged (merge) or 1 = prune here (prune)
    tokens: list[int] = field(default_factory=list)  # token count entering each block, then at the end


def plan(config: TokenConfig, blocks: list[Block]) -> Plan:
    from ..ops.tokens import max_merge

    sched = config.schedule(len(blocks))
    t = int(_shape(blocks[0].stream)[1]) if blocks else 0
    p = Plan(config, [], [])
    for amount in sched:
        p.tokens.append(t)
        if config.method == "merge":
            r = min(amount, max_merge(t, config.protected))
            p.amounts.append(r)
            t -= r
        else:
            keep = max(1, int(math.ceil((t - 1) * config.keep_rate)))
            if amount and keep + 2 < t and config.keep_rate < 1:
                p.amounts.append(keep)
                t = keep + 2
            else:
                p.amounts.append(0)
    p.tokens.append(t)
    return p


def apply_plan(gm: fx.GraphModule, blocks: list[Block], p: Plan) -> int:
    """Insert the reductions of `p` into gm; returns the number of blocks reduced. Raises ShapeError (gm
    is then inconsistent: apply to a copy)."""
    graph = gm.graph
    old = {n: _shape(n) for n in graph.nodes if _shape(n) is not None}
    out_node = next(n for n in graph.nodes if n.op == "output")
    outputs_before = [(_shape(a) if isinstance(a, fx.Node) else None) for a in torch.utils._pytree.tree_leaves(
        out_node.args[0])]
    state = None  # (size, kmask, source) nodes
    first_mask = blocks[0].mask if blocks else None
    reduced = 0
    for blk, amount in zip(blocks, p.amounts):
        if state is not None:
            with graph.inserting_before(blk.sdpa):
                m = graph.call_function(effopt_ops.token_mask.default,
                                        (state[1], state[0], p.config.method == "merge" and p.config.proportional))
            _set_mask(blk.sdpa, m)
        if amount <= 0:
            continue
        x = blk.stream
        inserted = []
        with graph.inserting_before(x.next):  # new nodes in order, right after the stream
            if state is None:
                init = graph.call_function(effopt_ops.token_init.default, (x, first_mask))
                inserted.append(init)
                state = tuple(graph.call_function(operator.getitem, (init, i)) for i in range(3))
                inserted += state
            if p.config.method == "merge":
                metric = graph.call_function(aten.mean.dim, (blk.k, [1]))
                red = graph.call_function(effopt_ops.tome_merge.default,
                                          (x, metric, *state, amount, p.config.protected))
            else:
                metric = graph.call_function(effopt_ops.cls_attention.default, (blk.q, blk.k, state[1], blk.scale))
                red = graph.call_function(effopt_ops.evit_prune.default, (x, metric, *state, amount))
            outs = [graph.call_function(operator.getitem, (red, i)) for i in range(4)]
        inserted += [metric, red]
        keep = set(inserted) | set(outs)
        x.replace_all_uses_with(outs[0], delete_user_cb=lambda u: u not in keep)
        old[outs[0]] = old[x]  # the views after it had the stream's old shape
        state = tuple(outs[1:])
        reduced += 1
    if not reduced:
        return 0
    # outputs that carry the token dimension go back to the original tokens
    source = state[2]
    repropagate(gm, old, set(p.tokens))
    leaves, spec = torch.utils._pytree.tree_flatten(out_node.args[0])
    fixed = []
    for a, before in zip(leaves, outputs_before):
        now = _shape(a)
        if isinstance(a, fx.Node) and before is not None and now != before:
            if len(now) >= 2 and now[0] == before[0] and now[2:] == before[2:] and before[1] == p.tokens[0]:
                with graph.inserting_before(out_node):
                    unmerged = graph.call_function(effopt_ops.token_unmerge.default, (a, source))
                unmerged.meta["val"] = fake_call(unmerged.target, unmerged.args,
                                                 mode=fake_mode(a.meta["val"], fresh=True))
                a = unmerged
            else:
                raise ShapeError(f"output {a.name} changed from {before} to {now}")
        fixed.append(a)
    out_node.args = (torch.utils._pytree.tree_unflatten(fixed, spec),)
    graph.lint()
    gm.recompile()
    return reduced


def _warn_not_applied(config: TokenConfig, why: str) -> None:
    import warnings

    warnings.warn(f"effopt: {config} was not applied to this graph, which runs without token reduction: {why}",
                  UserWarning, stacklevel=4)


class TokenSchedule:
    """The token pass's one site: the whole schedule, applied as a rewritten copy of the graph (`current`);
    `retry` backs it off to r (or the pruned fraction) times 3/4, 1/2, 1/4 before the guard rolls it back."""

    FACTORS = (1.0, 0.75, 0.5, 0.25)

    def __init__(self, gm: fx.GraphModule, config: TokenConfig, blocks: list):
        self.gm, self.config, self.blocks = gm, config, blocks
        self.current, self.step, self.tried = gm, 0, []
        self.built: dict = {}  # step -> (graph, plan, rewritten blocks)

    @property
    def name(self) -> str:
        return str(self.config.scaled(self.FACTORS[self.step]))

    def build(self, step: int):
        if step not in self.built:
            from ..capture import copy_graph_module

            p = plan(self.config.scaled(self.FACTORS[step]), self.blocks)
            new = copy_graph_module(self.gm)
            self.built[step] = (new, p, apply_plan(new, find_blocks(new)[0], p))
        return self.built[step]

    def apply(self, site) -> None:
        self.current = self.build(self.step)[0]

    def revert(self, site) -> None:
        self.current = self.gm

    def retry(self, site) -> bool:
        """The next milder schedule, while one rewrites anything (the loss of this one is recorded)."""
        if self.step + 1 >= len(self.FACTORS):
            return False
        try:
            if not self.build(self.step + 1)[2]:
                return False
        except ShapeError:
            return False
        self.tried.append(self.name)
        self.step += 1
        self.current = self.built[self.step][0]
        return True


class TokenReductionPass(GuardedPass):
    """The `token_merge`/`token_prune` option on gm (after the exact passes). With calibration data, the
    accuracy guard backs the schedule off (r, or the pruned fraction, times 3/4, 1/2, 1/4, then none) until
    the metric holds within budget. The pass returns a rewritten copy of the graph (gm itself when nothing
    was applied)."""

    name = "tokens"

    def record_name(self) -> str:
        return f"token_{self.config.method}"

    def what(self) -> str:
        return str(self.config)

    def _not_applied(self, record, why: str, note: str) -> None:
        record.notes.insert(0, note)
        _warn_not_applied(self.config, why)

    def sites(self, gm, record):
        blocks, skipped = find_blocks(gm)
        record.notes += [f"skipped {s}" for s in skipped]
        if not blocks:
            self._not_applied(record, "no transformer encoder block (fused attention followed by a residual add) "
                              "in this graph" + (f"; skipped {'; '.join(skipped)}" if skipped else ""),
                              "no encoder block found: nothing reduced")
            return None
        self.schedule = TokenSchedule(gm, self.config, blocks)
        try:
            self.schedule.build(0)
        except ShapeError as e:
            self._not_applied(record, str(e), f"not applied: {e}")
            return None
        return [self.schedule]

    def rewriter(self, gm, sites, record):
        return self.schedule

    def finish(self, gm, sites, rewriter, guard, record):
        sched = self.schedule
        # every milder schedule the guard went through, with the loss it measured over budget
        guard.rolled_back[:0] = list(zip(sched.tried, guard.retried))
        guard.retried = []
        if sched.current is gm:  # rolled back: the graph stays as it was
            new, p, n = gm, plan(self.config.scaled(0.0), sched.blocks), 0
        else:
            new, p, n = sched.built[sched.step]
        for blk, amount in zip(sched.blocks, p.amounts):
            if amount and n:
                record.add_match(blk.sdpa)
        if guard.budget is None:
            summary = f"{self.config} applied, accuracy unverified (no calibration data)"
        else:
            tried = "; ".join(f"{c}: {guard.metric} loss {l:.3g} > budget" for c, l in guard.rolled_back)
            summary = (f"kept {guard.kept[0]} ({guard.metric} loss {guard.loss:.4g} <= budget {guard.budget:g})"
                       if guard.kept else f"rolled back: no schedule held the budget {guard.budget:g}")
            summary += f"; backed off from {tried}" if tried else ""
        record.notes.insert(0, summary)
        record.notes.insert(1, "tokens per block: " + " -> ".join(str(t) for t in p.tokens))
        record.tokens = p.tokens
        return new


__all__ = ["TokenConfig", "find_blocks", "plan", "apply_plan", "TokenReductionPass", "TokenSchedule", "default_prune_layers"]

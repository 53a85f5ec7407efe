"""Approximate attention: each fused softmax attention (an SDPA node, after `fuse_attention`) becomes one of
effopt's approximate attention ops (effopt/ops/), layer by layer, so the accuracy guard can keep or roll
back each layer on its own.

    hamming  ShiftAddViT-style: binary codes from a random projection of q and k, similarity by XOR and
             popcount, power-of-two weights so the product with V is additions only. The weight
             temperature `beta` is fitted per layer on the example (or calibration) inputs unless given.
    linear   kernelized linear attention, O(N): feature map elu+1 (or relu) on q and k.
    lmul     L-Mul: the multiplications of q.k and p.v become integer additions of float bit patterns.
    relu     ReLU attention (Wortsman et al. 2023): relu(q.k^T * scale + mask) / M instead of the softmax.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ..ops import attention as effops
from ..ops.sdpa import FLASH_CPU, sdpa_arguments
from .attention import erase_dead_chain
from .guarded import GuardContext, GuardedPass
from ..graph import add_constant, fake_call, source_location
from ..options.attention import KINDS, AttentionConfig, AttentionKind, register_kind

aten = torch.ops.aten

# ---- the kinds: one entry each (its parameters, their checks, its op and the op's arguments) ----------------
@dataclass(frozen=True)
class Kind(AttentionKind):
    """An approximate attention kind: the option's parameters (AttentionKind) plus its op (effopt/ops/) and
    `arguments(site, config)`, the op's arguments after (q, k, v, mask)."""

    op: object = None
    arguments: Callable = None


def _check_hamming(cfg):
    if not isinstance(cfg.bits, int) or cfg.bits <= 0 or cfg.bits % 64:
        raise ValueError(f"hamming bits must be a positive multiple of 64, got {cfg.bits!r}")
    if cfg.beta is not None and not (isinstance(cfg.beta, (int, float)) and cfg.beta > 0):
        raise ValueError(f"hamming beta must be a positive number or None (fitted), got {cfg.beta!r}")


def _check_linear(cfg):
    if cfg.feature_map not in effops.FEATURE_MAPS:
        raise ValueError(f"linear feature_map={cfg.feature_map!r}; valid: {list(effops.FEATURE_MAPS)}")


def _check_lmul(cfg):
    if not isinstance(cfg.mantissa_bits, int) or not 0 <= cfg.mantissa_bits <= 23:
        raise ValueError(f"lmul mantissa_bits must be an int in 0..23, got {cfg.mantissa_bits!r}")


# hamming: bits, the length of the binary codes (a multiple of 64); beta, the weight temperature
# 2^(beta * equal bits), None fits it per layer on the example inputs; seed, of the random projection (used
# when the graph does not carry a trained one). Its projection is made by `prepare_hamming`.
register_kind(Kind("hamming", {"bits": 64, "beta": None, "seed": 0}, _check_hamming,
                   torch.ops.effopt.hamming_attention.default,
                   lambda site, cfg: (site.extra["proj"], float(site.extra.get("beta", cfg.beta)))))
# linear: feature_map 'elu' (elu + 1) or 'relu'
register_kind(Kind("linear", {"feature_map": "elu"}, _check_linear, torch.ops.effopt.linear_attention.default,
                   lambda site, cfg: (site.scale, cfg.feature_map)))
# lmul: mantissa_bits kept by L-Mul (0..23); the paper's 3-bit L-Mul matches fp8 e4m3 accuracy
register_kind(Kind("lmul", {"mantissa_bits": 3}, _check_lmul, torch.ops.effopt.lmul_attention.default,
                   lambda site, cfg: (site.scale, cfg.mantissa_bits)))
# relu: ReLU attention, relu(q.k^T * scale + mask) / M (Wortsman et al. 2023); no parameters
register_kind(Kind("relu", {}, op=torch.ops.effopt.relu_attention.default, arguments=lambda site, cfg: (site.scale,)))


# ---- the attention layers of a graph -----------------------------------------------------------------------
@dataclass
class AttentionSite:
    """One softmax attention in the graph, with what an approximate op needs."""

    node: fx.Node  # the SDPA node
    out: fx.Node  # the node whose value is the attention output (the SDPA node or its getitem 0)
    q: fx.Node
    k: fx.Node
    v: fx.Node
    mask: fx.Node | None
    scale: float
    name: str = ""
    index: int = 0
    new: fx.Node | None = None  # the approximate op, while applied
    extra: dict = field(default_factory=dict)


def attention_sites(gm: fx.GraphModule) -> tuple[list[AttentionSite], list[str]]:
    """The SDPA nodes an approximate attention can replace, and why others were skipped."""
    sites, skipped = [], []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.scaled_dot_product_attention.default:
            out = node
        elif node.target is FLASH_CPU:
            users = list(node.users)
            if any(u.target is not operator.getitem for u in users) \
                    or any(u.args[1] != 0 for u in users) or len(users) != 1:
                skipped.append(f"{node.name}: log-sum-exp output is used")
                continue
            out = users[0]
        else:
            continue
        args = sdpa_arguments(node.target, node.args, node.kwargs)
        where = source_location(node) or node.name
        if args["dropout_p"] or args["is_causal"] or args["enable_gqa"]:
            skipped.append(f"{where}: causal, dropout or grouped-query attention")
            continue
        q, k, v = (args[n] for n in ("q", "k", "v"))
        qv = q.meta.get("val")
        if not isinstance(qv, torch.Tensor) or qv.dim() != 4 or qv.dtype != torch.float32:
            skipped.append(f"{where}: not a 4-D float32 attention")
            continue
        scale = args["scale"]
        scale = 1.0 / math.sqrt(int(qv.shape[-1])) if scale is None else float(scale)
        sites.append(AttentionSite(node, out, q, k, v, args["attn_mask"], scale,
                                   f"attention[{len(sites)}] at {where}", len(sites)))
    return sites, skipped


class ApproximateAttention:
    """Applies and reverts one approximate attention per site; `finish()` erases the replaced chains.
    (A linear attention whose mask has a query dim is checked when it runs: Hugging Face's padding masks
    have one but do not vary along it.)"""

    def __init__(self, gm: fx.GraphModule, config: AttentionConfig):
        self.gm, self.config = gm, config

    def prepare_hamming(self, sites: list[AttentionSite], args, trainable: bool = False) -> list[str]:
        """Each site's projection (a constant, or a trainable parameter) and, unless `beta` is configured,
        its temperature fitted on `args` (gm's inputs); returns notes on the fits."""
        cfg, notes = self.config, []
        seen = record_site_inputs(self.gm, sites, args) if cfg.beta is None else {}
        for i, s in enumerate(sites):
            d = int(s.q.meta["val"].shape[-1])
            proj = torch.randn(d, cfg.bits, generator=torch.Generator().manual_seed(cfg.seed * 1000 + s.index))
            if cfg.beta is None:
                q, k, v, mask, exact = seen[i]
                s.extra["beta"], err = fit_beta(q, k, v, mask, exact, proj)
                notes.append(f"{s.name}: beta={s.extra['beta']:.3g} (fitted, mse {err:.3g})")
            s.extra["proj"] = self.constant(proj, f"effopt_hamming_proj_{s.index}" if trainable else None)
        return notes

    def retry(self, site: AttentionSite) -> bool:
        """A layer over budget as the next fallback kind, if any."""
        kinds = self.config.kinds
        i = kinds.index(site.extra.get("kind", kinds[0]))
        if i + 1 >= len(kinds):
            return False
        self.revert(site)
        site.extra["kind"] = kinds[i + 1]
        self.apply(site)
        return True

    def apply(self, site: AttentionSite) -> None:
        cfg, graph = self.config, self.gm.graph
        kind = site.extra.get("kind", cfg.kind)
        entry = KINDS.get(kind)
        if not isinstance(entry, Kind):
            raise ValueError(f"no approximate attention {kind!r}")
        target = entry.op
        args = (site.q, site.k, site.v, site.mask, *entry.arguments(site, cfg))
        with graph.inserting_after(site.out):
            new = graph.call_function(target, args)
        new.meta = dict(site.out.meta)
        new.meta["float_form"] = effops.ExactAttention(site.scale)  # where the approximate kernel loses on the target
        fake = fake_call(target, args)
        if fake is not None:
            new.meta["val"] = fake
        site.out.replace_all_uses_with(new, propagate_meta=False)
        site.new = new
        self.gm.recompile()

    def revert(self, site: AttentionSite) -> None:
        site.new.replace_all_uses_with(site.out)
        self.gm.graph.erase_node(site.new)
        site.new = None
        self.gm.recompile()

    def finish(self, sites: list[AttentionSite]) -> None:
        for s in sites:
            if s.new is not None:
                erase_dead_chain(self.gm, s.node if s.out is s.node else s.out)
        for s in sites:
            proj = s.extra.get("proj")
            if proj is not None and not proj.users:  # rolled back, or another kind took the layer
                delattr(self.gm, proj.target)
                self.gm.graph.erase_node(proj)
        self.gm.graph.lint()
        self.gm.recompile()

    def constant(self, value: torch.Tensor, parameter: str | None = None) -> fx.Node:
        """A new constant (e.g. a projection) defined before the first computation of the graph, or, with a
        `parameter` name, a trainable parameter of that name."""
        first = next(n for n in self.gm.graph.nodes if n.op not in ("placeholder", "get_attr"))
        if parameter is None:
            return add_constant(self.gm, value, first, "hamming_proj")
        self.gm.register_parameter(parameter, torch.nn.Parameter(value))
        with self.gm.graph.inserting_before(first):
            node = self.gm.graph.get_attr(parameter)
        node.meta["val"] = value
        return node


# ---- fitting the Hamming temperature ------------------------------------------------------------------------
BETA_GRID = tuple(2.0 ** (i / 2) for i in range(-16, 5))  # 1/256 .. 4


def record_site_inputs(gm: fx.GraphModule, sites: list[AttentionSite], args) -> dict:
    """Runs gm on args; returns {site index: (q, k, v, mask, exact output)}."""
    wanted = {s.out: i for i, s in enumerate(sites)}
    nodes = {s.node: i for i, s in enumerate(sites)}
    seen: dict = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in nodes:
                s = sites[nodes[n]]
                seen[nodes[n]] = [self.env[x] if isinstance(x, fx.Node) else None for x in (s.q, s.k, s.v, s.mask)]
            if n in wanted:
                seen[wanted[n]].append(out)
            return out

    with torch.no_grad():
        Rec(gm).run(*args)
    return seen


def fit_beta(q, k, v, mask, exact, proj) -> tuple[float, float]:
    """The grid value of beta whose Hamming attention is closest (mean squared error) to the exact output."""
    best = (math.inf, 1.0)
    same = effops.hamming_similarity(q @ proj, k @ proj)
    for beta in BETA_GRID:
        err = (effops.hamming_weighted_sum(same, v, mask, beta) - exact).pow(2).mean().item()
        if err < best[0]:
            best = (err, beta)
    return best[1], best[0]


class AttentionPass(GuardedPass):
    """The `attention` option: gm's attention sites as the configured approximate attention, guarded.
    Hamming's temperature is fitted per layer on the first calibration input (or the example inputs
    without calibration). `trainable` (effopt.reparameterize): Hamming's projections become parameters."""

    name = "attention"

    def __init__(self, config: AttentionConfig, ctx: GuardContext, trainable: bool = False,
                 record_name: str | None = None):
        super().__init__(config, ctx)
        self.trainable, self._record_name = trainable, record_name

    def record_name(self) -> str:
        return self._record_name or f"attention_{self.config.kind}"

    def sites(self, gm, record):
        sites, self.skipped = attention_sites(gm)
        return sites

    def rewriter(self, gm, sites, record):
        rewriter = ApproximateAttention(gm, self.config)
        if "hamming" in self.config.kinds and sites:
            ctx = self.ctx
            args = ctx.calibration[0] if ctx.calibration and not self.trainable else ctx.examples
            record.notes += rewriter.prepare_hamming(sites, args, trainable=self.trainable)
        return rewriter

    def finish(self, gm, sites, rewriter, guard, record):
        rewriter.finish(sites)  # also drops the projections of rolled-back layers
        for s in sites:
            if s.new is not None:
                record.add_match(s.node)
        record.notes[:0] = [guard.summary()] + [f"skipped {w}" for w in self.skipped]
        if self.config.fallback:
            kinds = [f"{s.name.split(' ')[0]}: {s.extra.get('kind', self.config.kind)}" for s in sites if s.new is not None]
            record.notes.append("per layer: " + (", ".join(kinds) or "none kept"))
        return gm


__all__ = ["AttentionConfig", "AttentionSite", "ApproximateAttention", "AttentionPass", "attention_sites",
           "fit_beta", "record_site_inputs", "KINDS", "Kind"]

"""ShiftAddViT's mixture of experts as a reparameterization: `effopt.reparameterize(model, inputs,
shift_add="moe")` replaces each MLP (linear -> GELU/ReLU/SiLU -> linear) of the exported graph by a
`ShiftMoE` (effopt/ops/moe.py: the router, the two experts, the load-balancing loss and the op)."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..graph import attr, through_views
from ..ops import shift as so
from ..ops.moe import ShiftMoE, expert_latency
from ..options.common import check_parameters
from ..options.shift_add import ShiftConfig
from .records import PassRecord
from .shift_add import linear_sites

_PARAMS = ("kind", "terms", "latency")


_ACT_NODES = {torch.ops.aten.gelu.default: "gelu", torch.ops.aten.relu.default: "relu",
              torch.ops.aten.silu.default: "silu"}


def _linear(gm, site) -> torch.nn.Linear:
    w = site.weight
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=site.bias is not None)
    with torch.no_grad():
        lin.weight.copy_(w)
        if site.bias is not None:
            lin.bias.copy_(attr(gm, site.bias.target))
    return lin


def mixture_of_experts(gm: fx.GraphModule, spec) -> PassRecord:
    """Replace each MLP of the exported graph `gm` by a ShiftMoE submodule (see `effopt.reparameterize`)."""
    spec = {"kind": "moe"} if spec == "moe" else dict(spec)
    check_parameters("shift_add moe", spec, _PARAMS)
    terms = spec.get("terms", 1)
    if terms not in so.TERMS:
        raise ValueError(f"shift_add moe terms={terms!r}; valid: {list(so.TERMS)}")
    latency = spec.get("latency", "measure")
    if latency != "measure" and not (isinstance(latency, (tuple, list)) and len(latency) == 2
                                     and all(isinstance(v, (int, float)) and v > 0 for v in latency)):
        raise ValueError(f"shift_add moe latency={latency!r}; valid: 'measure' or (mult_us, shift_us) > 0")
    record = PassRecord("reparameterize_moe")
    sites = linear_sites(gm, ShiftConfig("mlp"))
    by_act = {}
    for s in sites:
        after = through_views(s.node, True)
        if after is not None and after.target in _ACT_NODES:
            by_act.setdefault(after, {})["fc1"] = s
        before = through_views(s.x, False)
        if before.target in _ACT_NODES:
            by_act.setdefault(before, {})["fc2"] = s
    pairs = [(a, p["fc1"], p["fc2"]) for a, p in by_act.items() if len(p) == 2]
    if not pairs:
        raise ValueError("reparameterize(shift_add='moe'): no MLP (linear -> GELU/ReLU/SiLU -> linear) found")
    for i, (act_node, fc1, fc2) in enumerate(pairs):
        act = _ACT_NODES[act_node.target]
        if act == "gelu" and act_node.kwargs.get("approximate", "none") == "tanh":
            act = "gelu_tanh"
        lin1, lin2 = _linear(gm, fc1), _linear(gm, fc2)
        lat = latency if latency != "measure" else expert_latency(lin1, lin2, act, terms, fc1.shape[0])
        name = f"effopt_moe_{i}"
        gm.add_submodule(name, ShiftMoE(lin1, lin2, act, terms, lat, seed=i))
        with gm.graph.inserting_before(fc2.node):
            node = gm.graph.call_module(name, (fc1.x,))
        node.meta = dict(fc2.node.meta)
        fc2.node.replace_all_uses_with(node)
        record.add_match(fc1.node)
        record.notes.append(f"{fc1.name} / {fc2.name} ({act}): experts mult {lat[0]:.0f} us, shift {lat[1]:.0f} us"
                            f" at {fc1.shape[0]} tokens")
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for _, fc1, fc2 in pairs:  # the replaced layers' own parameters (the experts hold copies)
        for node in (fc1.wt.args[0], fc1.bias, fc2.wt.args[0], fc2.bias):
            if node is not None and node.target not in used:
                owner, _, leaf = node.target.rpartition(".")
                delattr(gm.get_submodule(owner) if owner else gm, leaf)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return record


__all__ = ["mixture_of_experts"]

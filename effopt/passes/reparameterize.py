"""`effopt.reparameterize`: an approximate model that a user fine-tunes in plain PyTorch.

The model is exported (torch.export, ATen graph), its softmax attentions fused into SDPA nodes by the same
exact pass the backend runs, and each attention replaced by one of effopt's approximate ops. The result is
an ordinary trainable nn.Module (an fx GraphModule with the model's parameters, plus the new ones such as
Hamming projections): its custom ops pass straight-through gradients, so `loss.backward()` and any
optimizer work. `torch.compile(result, backend="effopt")` then lowers those ops to effopt's TVM kernels.
`attention_parameters(result)` lists the parameters that feed the approximate attentions (q, k, v
projections, Hamming code projections): fine-tuning only those is the safe default recipe.

With `shift_add`, linear layers' weights go through `effopt::shift_weight` (power-of-two rounding, with a
straight-through gradient, as DeepShift and ShiftAddViT fine-tune), and `shift_parameters(result)` lists
them; with shift_add='moe', MLPs become ShiftAddViT's mixture of experts (effopt/ops/moe.py).
"""
from __future__ import annotations

import copy
import operator
import warnings

import torch
import torch.fx as fx

from ..ops.spec import spec_of
from ..options.attention import KINDS
from .approximate import AttentionPass, Kind, attention_sites
from .attention import FuseAttention
from .guarded import GuardContext
from .records import PassRecord


def _split(inputs) -> tuple[tuple, dict]:
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, dict):
        return (), dict(inputs)
    return tuple(inputs), {}


def _export(model: torch.nn.Module, example_inputs) -> fx.GraphModule:
    args, kwargs = _split(example_inputs)
    ep = torch.export.export(model, args, kwargs)
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)  # keep fused attention whole
    gm = ep.run_decompositions(table).module()
    # a plain GraphModule (same graph, parameters and pytree calling convention): export's module refuses
    # train()/eval(), which fine-tuning code calls; the graph is the eval-mode model either way
    return fx.GraphModule(gm, gm.graph)


def reparameterize(model: torch.nn.Module, example_inputs, attention=None, *, shift_add=None, calibration=None,
                   accuracy_budget: float | None = None, metric="cosine") -> torch.nn.Module:
    """A trainable copy of `model` whose attention layers and/or linear layers are approximate.

    attention: 'hamming', 'linear', 'lmul' or a dict {'kind': ..., parameters} (as the backend option).
    shift_add: 'mlp', 'all' or a dict {'layers', 'terms', 'activation_bits'} (as the backend option): the
    linear layers' weights go through power-of-two rounding with straight-through gradients (and their
    inputs through per-token quantization for activation_bits > 0); or 'moe' (or a dict {'kind': 'moe',
    ...}, see effopt.ops.moe): each MLP becomes ShiftAddViT's mixture of a multiplication expert and a shift
    expert with a trained router. With neither given, attention='hamming'.
    example_inputs: a tuple of positional inputs, a dict of keyword inputs, or one tensor; the result is
    specialized to their shapes. calibration/accuracy_budget/metric: the accuracy guard, as in the backend
    options: layers whose rewrite costs more than the budget stay exact.
    Returns an nn.Module with the model's call signature; `.effopt_records` are the pass records
    ({'attention': ..., 'shift_add': ...}), `.effopt_record` the first of them."""
    from ..options import Options

    if attention is None and shift_add is None:
        attention = "hamming"
    moe = shift_add == "moe" or (isinstance(shift_add, dict) and shift_add.get("kind") == "moe")
    opts = Options.from_dict({"attention": attention or "exact", "shift_add": None if moe else shift_add,
                              "calibration": calibration, "accuracy_budget": accuracy_budget, "metric": metric})
    if attention is not None and opts.attention.kind == "exact":
        raise ValueError("reparameterize needs an approximate attention: one of 'hamming', 'linear', 'lmul'")
    # a copy: the exported module would otherwise share the model's parameters, and fine-tuning it would
    # change the original model too
    gm = _export(copy.deepcopy(model).eval(), example_inputs)
    args, kwargs = _split(example_inputs)
    cal = None if opts.calibration is None else [_split(c) for c in opts.calibration]
    run = lambda ak: gm(*ak[0], **ak[1])  # noqa: E731
    records = {}
    if attention is not None:
        records["attention"] = _attention(gm, opts, torch.utils._pytree.tree_leaves((args, kwargs)), cal, run)
    if moe:
        from .moe import mixture_of_experts

        records["shift_add"] = mixture_of_experts(gm, shift_add)
    elif shift_add is not None:
        records["shift_add"] = _shift(gm, opts, cal, run)
    gm.effopt_records = records
    gm.effopt_record = next(iter(records.values()))
    return gm


def _context(opts, example_leaves, cal, run) -> GuardContext:
    return GuardContext(example_leaves, cal, opts.accuracy_budget, opts.metric, run=lambda g, ak: run(ak))


def _attention(gm, opts, example_leaves, cal, run) -> PassRecord:
    config = opts.attention
    FuseAttention()(gm)
    sites, skipped = attention_sites(gm)
    if not sites:
        raise ValueError(f"reparameterize: no attention layer of this model can take attention={config}"
                         + (f" ({'; '.join(skipped)})" if skipped else " (no softmax attention found)"))
    p = AttentionPass(config, _context(opts, example_leaves, cal, run), trainable=True,
                      record_name=f"reparameterize_{config.kind}")
    _, record = p.run(gm)
    if not record.matches:
        warnings.warn("effopt.reparameterize: every attention layer was rolled back by the accuracy guard; the "
                      "module computes exact attention", UserWarning, stacklevel=3)
    return record


def _shift(gm, opts, cal, run) -> PassRecord:
    from .shift_add import ShiftAddPass, linear_sites

    config = opts.shift_add
    if not linear_sites(gm, config):
        raise ValueError(f"reparameterize: no linear layer of this model matches shift_add={config}")
    _, record = ShiftAddPass(config, _context(opts, [], cal, run), trainable=True,
                             record_name="reparameterize_shift_add").run(gm)
    return record


def shift_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights of a `reparameterize`d module that go through power-of-two rounding (shift_weight),
    with their layers' biases: the parameters to fine-tune for shift_add."""
    from .shift_add import SHIFT_WEIGHT

    graph = getattr(module, "graph", None)
    if not isinstance(graph, fx.Graph):
        raise TypeError("shift_parameters takes the module effopt.reparameterize returned")
    params = dict(module.named_parameters())
    found = set()
    for n in graph.nodes:
        weight = spec_of(n.target).bind(n)["weight"] if n.op == "call_function" and n.target is SHIFT_WEIGHT else None
        if weight is not None and weight.op == "get_attr":
            found.add(weight.target)
            for u in n.users:  # a convolution's bias, or through the transpose, a linear's (addmm)
                layers = [u] if u.target is _aten.convolution.default else list(u.users)
                for layer in layers:
                    bias = layer.args[2] if layer.target is _aten.convolution.default else \
                        layer.args[0] if layer.target is _aten.addmm.default else None
                    if isinstance(bias, fx.Node) and bias.op == "get_attr":
                        found.add(bias.target)
    if not found:
        raise ValueError("shift_parameters: this module has no shift layer (was every layer rolled back?)")
    return [p for name, p in params.items() if name in found]


_aten = torch.ops.aten
_GEMMS = {_aten.linear, _aten.addmm, _aten.mm, _aten.matmul, _aten.bmm, _aten.baddbmm}
# ops between a projection's GEMM and the attention's q/k/v (head split, bias add, scaling, copies)
_BETWEEN = {_aten.view, _aten._unsafe_view, _aten.reshape, _aten.permute, _aten.transpose, _aten.t, _aten.expand,
            _aten.clone, _aten.contiguous, _aten.unsqueeze, _aten.squeeze, _aten.slice, _aten.select,
            _aten.unbind, _aten.split, _aten.split_with_sizes, _aten.chunk, _aten.alias, _aten._to_copy,
            _aten.add, _aten.mul, _aten.div}


def _kind(n: fx.Node):
    if n.op != "call_function":
        return None
    if n.target is operator.getitem:
        return _BETWEEN
    packet = getattr(n.target, "overloadpacket", None)
    return _GEMMS if packet in _GEMMS else _BETWEEN if packet in _BETWEEN else None


def attention_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters of a `reparameterize`d module that feed its approximate attention ops: the q, k and v
    projections (weights and biases) and Hamming's code projections. Fine-tuning only these adapts the
    model to the approximation without moving the rest of it (Adam moves every parameter it is given by
    about the learning rate from its first steps; DINOv2's patch embedding and layer scales do not take
    that):

        opt = torch.optim.AdamW(effopt.attention_parameters(student), lr=1e-5)
    """
    graph = getattr(module, "graph", None)
    if not isinstance(graph, fx.Graph):
        raise TypeError("attention_parameters takes the module effopt.reparameterize returned")
    params = dict(module.named_parameters())
    found: dict[str, torch.nn.Parameter] = {}
    seen: set[fx.Node] = set()

    def weights(n: fx.Node):  # a GEMM operand: a parameter, possibly through transposes and views
        while _kind(n) is _BETWEEN and len(n.all_input_nodes) == 1:
            n = n.all_input_nodes[0]
        if n.op == "get_attr" and n.target in params:
            found[n.target] = params[n.target]

    def walk(n: fx.Node):
        if n in seen:
            return
        seen.add(n)
        if n.op == "get_attr" and n.target in params:
            found[n.target] = params[n.target]
        elif _kind(n) is _GEMMS:
            for a in n.all_input_nodes:
                weights(a)
        elif _kind(n) is _BETWEEN:
            for a in n.all_input_nodes:
                walk(a)

    approximate = {k.op for k in KINDS.values() if isinstance(k, Kind)}  # every approximate attention kind's op
    sites = [n for n in graph.nodes if n.op == "call_function" and n.target in approximate]
    if not sites:
        raise ValueError("attention_parameters: this module has no approximate attention op (was every layer "
                         "rolled back by the accuracy guard?)")
    for node in sites:
        for a in [x for name, x in spec_of(node.target).bind(node).items() if name != "mask"
                  and isinstance(x, fx.Node)]:
            walk(a)
    order = {name: i for i, name in enumerate(params)}
    return [found[name] for name in sorted(found, key=order.get)]

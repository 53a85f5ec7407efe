"""`effopt.reparameterize`: an approximate model that a user fine-tunes in plain PyTorch.

The model is exported (torch.export, ATen graph), its softmax attentions fused into SDPA nodes by the same
exact pass the backend runs, and each attention replaced by one of effopt's approximate ops. The result is
an ordinary trainable nn.Module (an fx GraphModule with the model's parameters, plus the new ones such as
Hamming projections): its custom ops pass straight-through gradients, so `loss.backward()` and any
optimizer work. `torch.compile(result, backend="effopt")` then lowers those ops to effopt's TVM kernels.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.fx as fx

from .guard import guarded_apply
from .passes.approximate import ApproximateAttention, attention_sites
from .passes.attention import FuseAttention
from .passes.records import PassRecord


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


def reparameterize(model: torch.nn.Module, example_inputs, attention="hamming", *, calibration=None,
                   accuracy_budget: float | None = None, metric="cosine") -> torch.nn.Module:
    """A trainable copy of `model` whose attention layers are approximate.

    attention: 'hamming', 'linear', 'lmul' or a dict {'kind': ..., parameters} (as the backend option).
    example_inputs: a tuple of positional inputs, a dict of keyword inputs, or one tensor; the result is
    specialized to their shapes. calibration/accuracy_budget/metric: the accuracy guard, as in the backend
    options: layers whose rewrite costs more than the budget keep exact attention.
    Returns an nn.Module with the model's call signature; `.effopt_record` is the pass record."""
    from .options import Options

    opts = Options.from_dict({"attention": attention, "calibration": calibration,
                              "accuracy_budget": accuracy_budget, "metric": metric})
    config = opts.attention
    if config.kind == "exact":
        raise ValueError("reparameterize needs an approximate attention: one of 'hamming', 'linear', 'lmul'")
    # a copy: the exported module would otherwise share the model's parameters, and fine-tuning it would
    # change the original model too
    gm = _export(copy.deepcopy(model).eval(), example_inputs)
    FuseAttention()(gm)
    record = PassRecord(f"reparameterize_{config.kind}")
    sites, skipped = attention_sites(gm)
    if not sites:
        raise ValueError(f"reparameterize: no attention layer of this model can take attention={config}"
                         + (f" ({'; '.join(skipped)})" if skipped else " (no softmax attention found)"))
    rewriter = ApproximateAttention(gm, config)
    args, kwargs = _split(example_inputs)
    fits = []
    if config.kind == "hamming":
        fits = rewriter.prepare_hamming(sites, torch.utils._pytree.tree_leaves((args, kwargs)), trainable=True)
    cal = None if opts.calibration is None else [_split(c) for c in opts.calibration]
    guard = guarded_apply(lambda ak: gm(*ak[0], **ak[1]), sites, rewriter.apply, rewriter.revert, cal,
                          opts.accuracy_budget, opts.metric, f"reparameterize({config})")
    rewriter.finish(sites)  # also drops the projections of rolled-back layers
    for s in sites:
        if s.new is not None:
            record.add_match(s.node)
    record.notes = [guard.summary()] + [f"skipped {w}" for w in skipped] + fits
    record.guard = guard
    gm.effopt_record = record
    if not record.matches:
        warnings.warn("effopt.reparameterize: every attention layer was rolled back by the accuracy guard; the "
                      "module computes exact attention", UserWarning, stacklevel=2)
    return gm

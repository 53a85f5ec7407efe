"""Constant folding: evaluate nodes whose inputs are all frozen constants (weight transposes, BN scale/shift).

Folding is skipped where it would grow memory, e.g. an `expand` of a constant to the batch size, which is
free as a view but costly as a stored tensor.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..graph import add_constant
from .manager import GraphPass
from .records import PassRecord

_GROWTH_LIMIT = 2  # a folded result may be at most this many times the size of its constant inputs


def constant_value(gm: fx.GraphModule, node) -> object:
    if isinstance(node, fx.Node):
        return getattr(gm, node.target)
    return node


def _is_const(arg) -> bool:
    return not isinstance(arg, fx.Node) or arg.op == "get_attr"


class ConstantFolding(GraphPass):
    name = "constant_fold"

    def apply(self, gm: fx.GraphModule, record: PassRecord) -> None:
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target is operator.getitem:
                continue
            if isinstance(node.target, torch._ops.OpOverload) and (
                    node.target._schema.is_mutable or node.target.namespace in ("effopt", "quantized_decomposed")):
                continue  # effopt's ops on constants (a trained shift_weight) and PT2E's dequantized int8 weights
                # are rewritten by effopt's passes
            flat = fx.node.map_arg((node.args, node.kwargs), lambda n: n)
            leaves = [a for a in torch.utils._pytree.tree_leaves(flat) if isinstance(a, fx.Node)]
            if not leaves or not all(_is_const(a) for a in leaves):
                continue
            if _nondeterministic(node):
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: getattr(gm, n.target))
            out = node.target(*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                continue
            in_numel = sum(getattr(gm, a.target).numel() for a in leaves)
            if out.numel() > _GROWTH_LIMIT * max(in_numel, 1):
                continue
            const = add_constant(gm, out, node, "fold")
            node.replace_all_uses_with(const)
            gm.graph.erase_node(node)
            record.add_match(node)


def _nondeterministic(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags

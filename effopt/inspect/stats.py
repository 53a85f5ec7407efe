"""What a graph computes, counted from its nodes' fake values: the operator histogram, multiply-accumulates
(MACs) of its GEMMs, convolutions and attentions, how many of those are float multiplications (an int8 GEMM
multiplies integers, a shift layer none), and the bytes of its constant weights.

Also which pass produced each node: `tag_new_nodes` marks the nodes a pass added with the pass's name
(node.meta["effopt_pass"]), so the report can highlight rewritten nodes by pass.
"""
from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.fx as fx

from ..ops.spec import attention_macs, numel, shape, spec_of

aten = torch.ops.aten
PASS_KEY = "effopt_pass"
# ops that cost nothing to run in torch (views, tuple access): left out of profiles and drawings
FREE_OPS = frozenset({"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "unsqueeze", "squeeze",
                      "expand", "slice", "select", "getitem", "alias", "detach"})
_KNOWN = "effopt_known_as"


def op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._opname if t.namespace == "aten" else f"{t.namespace}::{t._opname}"
    if t is operator.getitem:
        return "getitem"
    return getattr(t, "__name__", str(t))


def _shape(n) -> list[int]:
    return list(shape(n) or [])


def macs(node: fx.Node) -> tuple[int, bool]:
    """(multiply-accumulates of the node, whether they are float multiplications)."""
    if node.op != "call_function":
        return 0, True
    t, a = node.target, node.args
    out = _shape(node)
    if t in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default):
        x = a[1] if t in (aten.addmm.default, aten.baddbmm.default) else a[0]
        return numel(out) * (_shape(x)[-1] if _shape(x) else 0), True
    if t is aten._int_mm.default:
        return numel(out) * (_shape(a[0])[-1] if _shape(a[0]) else 0), False
    if t is aten.convolution.default:
        w = _shape(a[1])
        return (numel(out) * numel(w[1:]) if w else 0), True
    spec = spec_of(t)
    if spec is not None:  # effopt's own ops declare their cost (effopt/ops/)
        m, float_mults = spec.macs(node)
        return m, float_mults == m
    if "attention" in op_name(node) and len(a) >= 3 and all(isinstance(x, fx.Node) for x in a[:3]):
        return attention_macs(*a[:3]), True
    return 0, True


def graph_stats(gm: fx.GraphModule) -> dict:
    """{"ops": {op: count}, "nodes", "macs", "float_macs", "weight_bytes"} of a graph."""
    ops, total, floats = Counter(), 0, 0
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        ops[op_name(n)] += 1
        m, is_float = macs(n)
        total += m
        floats += m if is_float else 0
    weights = 0
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            try:
                v = operator.attrgetter(n.target)(gm)
            except AttributeError:
                continue
            if isinstance(v, torch.Tensor):
                weights += v.numel() * v.element_size()
    return {"ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))), "nodes": sum(ops.values()),
            "macs": int(total), "float_macs": int(floats), "weight_bytes": int(weights)}


def tag_new_nodes(gm: fx.GraphModule, seen: set, pass_name: str | None) -> int:
    """Mark the nodes of gm a pass added with its name (pass_name None: the captured graph, unmarked);
    returns how many. A node counts as known if it is in `seen` or carries its own name in
    meta[_KNOWN] (a pass that rebuilds the graph copies nodes with their meta and names); a new node
    that copied another node's meta carries that node's name there, so it still counts as new."""
    new = 0
    for n in gm.graph.nodes:
        if n in seen or n.meta.get(_KNOWN) == n.name:
            seen.add(n)
            continue
        seen.add(n)
        n.meta[_KNOWN] = n.name
        if pass_name is not None and n.op not in ("placeholder", "output"):
            n.meta[PASS_KEY] = pass_name
            new += 1
        elif pass_name is None:
            n.meta.pop(PASS_KEY, None)
    return new


__all__ = ["graph_stats", "macs", "op_name", "tag_new_nodes", "PASS_KEY", "FREE_OPS"]

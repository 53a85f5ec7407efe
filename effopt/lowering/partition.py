"""Partitioning: which nodes go to TVM, which stay on library kernels, which fall back to eager."""
from __future__ import annotations

import warnings

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.fx.passes.operator_support import OperatorSupportBase

from ..graph import source_location
from .records import EffoptFallbackWarning
from .library import LIBRARY_OPS, VIEW_OPS, is_symbolic_scalar_op
from .to_relax import CONVERTERS, DTYPES, ISOLATED, LOWERABLE


def _tensor_vals(node: fx.Node):
    val = node.meta.get("val")
    vals = val if isinstance(val, (tuple, list)) else [val]
    return [v for v in vals if isinstance(v, torch.Tensor)]


class TVMSupport(OperatorSupportBase):
    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        if node.op != "call_function":
            return False
        if node.target is operator.getitem:
            src = node.args[0]
            return isinstance(src, fx.Node) and self.is_node_supported(submodules, src)
        if node.target not in CONVERTERS or not LOWERABLE.get(node.target, bool)(node):
            return False
        vals = _tensor_vals(node)
        if not vals or any(v.dtype not in DTYPES or v.device.type != "cpu" for v in vals):
            return False
        return all(v.dtype in DTYPES for a in node.all_input_nodes for v in _tensor_vals(a))


def unsupported_ops(gm: fx.GraphModule) -> dict[str, list[str]]:
    """Ops that neither lower to TVM nor run on a library kernel: op name -> source locations."""
    found: dict[str, list[str]] = defaultdict(list)
    support = TVMSupport()
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target in LIBRARY_OPS or is_symbolic_scalar_op(n):
            continue
        if n.target is operator.getitem or getattr(n.target, "is_view", False):  # free in torch: not a fallback
            continue
        if not support.is_node_supported({}, n):
            loc = source_location(n)
            found[str(n.target)].append(loc or "?")
    return dict(found)


@dataclass
class Region:
    """Convex set of TVM-convertible nodes of the main graph, in graph order."""
    nodes: list[fx.Node]
    inputs: list[fx.Node]  # nodes outside the region that it reads, in order of first use
    outputs: list[fx.Node]  # region nodes read outside it

    def graph(self) -> fx.Graph:
        """The region as a standalone graph: one placeholder per input, the outputs returned (a tuple if
        more than one). Node meta (fake values, source) is kept."""
        g, env = fx.Graph(), {}
        for i, a in enumerate(self.inputs):
            env[a] = g.placeholder(f"in{i}")
            env[a].meta = dict(a.meta)
        for n in self.nodes:
            env[n] = g.node_copy(n, lambda x: env[x])
        g.output(env[self.outputs[0]] if len(self.outputs) == 1 else tuple(env[o] for o in self.outputs))
        return g


def partition(gm: fx.GraphModule) -> list[Region]:
    """Greedy, linear-time partitioning into convex regions of TVM-convertible nodes.

    Nodes are visited in graph order; a supported node joins the region of one of its inputs when no
    other input of it is reachable from that region through a node outside it (which keeps every region
    convex, so contracting regions into single calls cannot create a cycle), else it starts a region.
    Regions made only of view ops are dropped: torch makes views for free, a TVM kernel would copy.
    """
    support = TVMSupport()
    group_of: dict[fx.Node, int] = {}
    closed: set[int] = set()  # regions of one ISOLATED op: nothing joins them
    reach: dict[fx.Node, set[int]] = {}  # regions with a path to the node (its own included)
    groups: list[list[fx.Node]] = []
    for n in gm.graph.nodes:
        ins = n.all_input_nodes
        r: set[int] = set()
        for a in ins:
            r |= reach[a]
        if support.is_node_supported({}, n):
            gid = None
            for a in ins if n.target not in ISOLATED else ():
                g = group_of.get(a)
                if n.target is operator.getitem and g in closed:  # the outputs of an isolated op join it
                    gid = g
                    break
                if g is not None and g not in closed and all(group_of.get(b) == g or g not in reach[b] for b in ins):
                    gid = g
                    break
            if gid is None:
                gid = len(groups)
                groups.append([])
                if n.target in ISOLATED:
                    closed.add(gid)
            groups[gid].append(n)
            group_of[n] = gid
            r.add(gid)
        reach[n] = r
    regions = []
    for nodes in groups:
        if all(n.target in VIEW_OPS for n in nodes):
            continue
        members = set(nodes)
        inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in members))
        outputs = [n for n in nodes if any(u not in members for u in n.users)]
        if outputs:
            regions.append(Region(nodes, inputs, outputs))
    return regions


def warn_fallbacks(gm, record) -> None:
    """One warning per op that has no TVM lowering (it runs in eager PyTorch); the record lists them."""
    record.fallbacks = unsupported_ops(gm)
    for op, locs in record.fallbacks.items():
        where = sorted({l for l in locs if l != "?"})
        warnings.warn(f"effopt: {op} has no TVM lowering; it runs in eager PyTorch ({len(locs)} use(s)"
                      + (f", e.g. {where[0]})" if where else ")"), EffoptFallbackWarning, stacklevel=2)

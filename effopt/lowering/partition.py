"""Partitioning: which nodes go to TVM, which stay on library kernels, which fall back to eager."""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase

from ..passes.records import source_location
from .library import LIBRARY_OPS, VIEW_OPS, is_symbolic_scalar_op
from .to_relax import CONVERTERS, DTYPES


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
        if node.target not in CONVERTERS:
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


def partition(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """Cut TVM-convertible regions out as submodules `fused_*`; returns the graph and their names.

    Regions made only of view ops are left alone: torch makes views for free, a TVM kernel would copy.
    """
    part = CapabilityBasedPartitioner(gm, TVMSupport(), allows_single_node_partition=True)
    proposed = part.propose_partitions()
    kept = [p for p in proposed if any(n.target not in VIEW_OPS for n in p.nodes)]
    if not kept:
        return gm, []
    fused = part.fuse_partitions(kept)
    names = [n.target for n in fused.graph.nodes if n.op == "call_module" and n.target.startswith("fused_")]
    return fused, names

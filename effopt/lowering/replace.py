"""Lowering step 6, replace: each region's chosen form (select.choose's decisions) takes its place in the graph:
its TVM kernel, or the float32 layers its rewritten ops replaced; the rest stays inline as torch ops. This step
measures nothing."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .partition import Region
from .select import FloatRegion


def replace_region(gm: fx.GraphModule, region: Region, name: str, module: torch.nn.Module,
                   replaced: dict[fx.Node, fx.Node]) -> None:
    """Swap the region's nodes for one call to `module` (registered as `name`). `replaced` maps the
    outputs of regions replaced before to the nodes that now stand for them, and is extended. The graph
    needs `topological_sort` once all regions are replaced."""
    gm.add_submodule(name, module)
    graph = gm.graph
    with graph.inserting_before(region.nodes[0]):
        call = graph.call_module(name, tuple(replaced.get(a, a) for a in region.inputs))
        if len(region.outputs) == 1:
            region.outputs[0].replace_all_uses_with(call)
            call.meta = dict(region.outputs[0].meta)
            replaced[region.outputs[0]] = call
        else:
            for i, o in enumerate(region.outputs):
                item = graph.call_function(operator.getitem, (call, i))
                item.meta = dict(o.meta)
                o.replace_all_uses_with(item)
                replaced[o] = item
            call.meta["val"] = tuple(o.meta.get("val") for o in region.outputs)
    for n in reversed(region.nodes):
        graph.erase_node(n)


def topological_sort(graph: fx.Graph) -> None:
    """Reorder nodes so every node follows its inputs, keeping the existing order where it is valid.
    (torch.fx's stable_topological_sort does the same but took 0.1 s on ViT-S; this takes about 1 ms.)"""
    done: set[fx.Node] = set()
    order: list[fx.Node] = []
    for root in list(graph.nodes):
        stack = [(root, False)]
        while stack:
            n, expanded = stack.pop()
            if n in done:
                continue
            if expanded:
                done.add(n)
                order.append(n)
                continue
            stack.append((n, True))
            stack.extend((a, False) for a in reversed(n.all_input_nodes) if a not in done)
    prev = None
    for n in order:
        if prev is not None and prev.next is not n:
            prev.append(n)
        prev = n


def replace(gm: fx.GraphModule, regions, picks: dict) -> None:
    """The decisions of the choose step (select.choose: {region index: Pick}) applied to gm: a TVM kernel or the
    float32 layers in each region's place; a region picked "eager" stays inline as its torch ops."""
    replaced: dict = {}
    for i, p in picks.items():
        if p.choice.form == "float32":
            replace_region(gm, regions[i], f"float_region{i}", FloatRegion(p.graph), replaced)
        elif p.choice.form == "tvm":
            replace_region(gm, regions[i], f"tvm_region{i}", p.kernel, replaced)
    topological_sort(gm.graph)
    gm.graph.lint()


__all__ = ["replace", "replace_region", "topological_sort"]

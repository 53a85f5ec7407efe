"""Lowering step 6, replace: each region's chosen form (select.choose's decisions) takes its place in the graph:
its TVM kernel, or the float32 layers its rewritten ops replaced; the rest stays inline as torch ops. This step
measures nothing."""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .buckets import BucketedRegion, close_call
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


def symbolic(region: Region) -> bool:
    """Whether the region's inputs have a symbolic size (a graph that serves every batch and length)."""
    return any(isinstance(d, torch.SymInt) for a in region.inputs
               for d in getattr(a.meta.get("val"), "shape", ()))


def bucketed(p, region: Region, store=None) -> BucketedRegion | None:
    """The region as a BucketedRegion (its forms chosen per size bucket) where its sizes are symbolic and its
    compile-time choice was a close call; else None."""
    times = p.times_us()
    if not symbolic(region) or not close_call(times):
        return None
    forms = {"eager": fx.GraphModule(torch.nn.Module(), p.graph)}
    if "tvm" in times:
        forms["tvm"] = p.kernel
    if "float32" in times:
        forms["float32"] = FloatRegion(p.graph)
    return BucketedRegion(forms, p.choice.form, store, p.key)


def replace(gm: fx.GraphModule, regions, picks: dict, per_bucket: bool = False, store=None) -> list[str]:
    """The decisions of the choose step (select.choose: {region index: Pick}) applied to gm: a TVM kernel or the
    float32 layers in each region's place; a region picked "eager" stays inline as its torch ops. With
    `per_bucket`, in a graph of symbolic sizes, a region whose choice was close keeps every form and chooses per
    size bucket (buckets.py; `store`: the decision store they are kept in). Returns the names of those regions."""
    replaced: dict = {}
    names = []
    for i, p in picks.items():
        b = bucketed(p, regions[i], store) if per_bucket else None
        if b is not None:
            replace_region(gm, regions[i], f"bucketed_region{i}", b, replaced)
            names.append(f"bucketed_region{i}")
        elif p.choice.form == "float32":
            replace_region(gm, regions[i], f"float_region{i}", FloatRegion(p.graph), replaced)
        elif p.choice.form == "tvm":
            replace_region(gm, regions[i], f"tvm_region{i}", p.kernel, replaced)
    topological_sort(gm.graph)
    gm.graph.lint()
    return names


__all__ = ["bucketed", "replace", "replace_region", "symbolic", "topological_sort"]

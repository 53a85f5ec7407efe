"""Lowering step 6, replace: each region's chosen form takes its place in the graph: its TVM kernel, or the
float32 layers its rewritten ops replaced where those measured faster; the rest stays inline as torch ops."""
from __future__ import annotations

import operator
import warnings

import torch
import torch.fx as fx

from .partition import Region
from .records import EffoptSlowerWarning, KernelRecord, LoweringRecord, region_ops
from .select import Choice, FloatRegion, concrete, versus_float


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


def float_instead(gm, regions, graphs: dict, record: LoweringRecord, force: bool, gen, replaced) -> None:
    """Regions with rewritten ops that run eager (no TVM kernel for them on this target): their eager form
    timed against the float32 layers they replaced, which run instead where faster (an int8 GEMM without a
    fast int8 dot product, torch._int_mm's reference loop on AVX2, is 20-50x slower than float32). Then one
    warning for every region of rewritten ops that stays float32."""
    for i, graph in ({} if force else graphs).items():
        region = regions[i]
        args = [getattr(gm, a.target) if a.op == "get_attr" else concrete(a.meta.get("val"), gen)
                for a in region.inputs]
        eager = fx.GraphModule(torch.nn.Module(), graph)
        c = versus_float(eager, FloatRegion(graph), args, Choice(False, reason="no TVM kernel"))
        record.kernels.append(KernelRecord(f"eager_region{i}", region_ops(graph), "float32" if c.use_float
                                           else "eager", None, None, c.reason, float_us=c.float_us))
        if c.use_float:
            replace_region(gm, region, f"float_region{i}", FloatRegion(graph), replaced)
    kept = [k for k in record.kernels if k.choice == "float32"]
    if kept:
        rewritten = [k for k in record.kernels if k.float_us is not None]
        ops = sorted({o for k in kept for o in k.ops})
        warnings.warn(f"effopt: on this CPU, {len(kept)} of {len(rewritten)} rewritten layer(s) ({', '.join(ops)}) "
                      "measured slower than the float32 layers they replace, which run instead (the report's "
                      "lowering lists them)", EffoptSlowerWarning, stacklevel=3)


def replace(gm: fx.GraphModule, regions, picks: dict, conv, record: LoweringRecord, force: bool,
            gen: torch.Generator) -> None:
    """The choices of `picks` (select.choose_kernels) into gm; then the regions TVM could not take that hold
    rewritten ops (conv.unconverted) against their float32 layers."""
    replaced: dict = {}
    for i, (kernel, c) in picks.items():
        if c.use_float:
            replace_region(gm, regions[i], f"float_region{i}", FloatRegion(conv.converted[i][0]), replaced)
        elif c.use_candidate:  # regions that lose stay inline in the graph, as plain torch ops
            replace_region(gm, regions[i], f"tvm_region{i}", kernel, replaced)
    float_instead(gm, regions, conv.unconverted, record, force, gen, replaced)
    topological_sort(gm.graph)
    gm.graph.lint()


__all__ = ["replace", "replace_region", "topological_sort", "float_instead"]

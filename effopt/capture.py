"""Capture: dynamo's FX graph -> one canonical, functional ATen graph, with parameters frozen.

AOTAutograd does the heavy lifting (functionalization, decomposition of composite ops, fake/symbolic
shapes, output aliasing); this module decides which inputs are parameters and turns them into constants.
"""
from __future__ import annotations

import torch
import torch.fx as fx

_PARAM_SOURCES = ("._parameters[", "._buffers[")


def frozen_input_indices(gm: fx.GraphModule, example_inputs) -> list[int]:
    """Inputs that dynamo lifted from module parameters or buffers (it passes them as graph inputs)."""
    out = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor):
            continue
        ga = node.meta.get("grapharg")
        src = ga.source.name if ga is not None and getattr(ga, "source", None) is not None else ""
        if isinstance(value, torch.nn.Parameter) or any(s in src for s in _PARAM_SOURCES):
            out.append(i)
    return out


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A structural copy (node meta shared, not deep-copied: it holds fake tensors)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return fx.GraphModule(gm, graph)


def freeze(gm: fx.GraphModule, values: dict[int, torch.Tensor]) -> fx.GraphModule:
    """Replace the placeholders at `values`' indices with constants holding those tensors."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    first = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for i, value in values.items():
        node = placeholders[i]
        name = f"_effopt_const_p{i}"
        gm.register_buffer(name, value.detach(), persistent=False)
        with gm.graph.inserting_before(first):
            const = gm.graph.get_attr(name)
        const.meta = dict(node.meta)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm

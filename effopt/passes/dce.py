"""Dead-code elimination: nodes whose results nobody uses (after freezing and folding, many are)."""
from __future__ import annotations

import torch.fx as fx

from .manager import GraphPass
from .records import PassRecord


class DeadCodeElimination(GraphPass):
    name = "dead_code"

    def apply(self, gm: fx.GraphModule, record: PassRecord) -> None:
        # fx's own DCE keeps impure nodes (in-place ops, RNG); we only count what it removed.
        before = {n for n in gm.graph.nodes if n.op == "call_function"}
        gm.graph.eliminate_dead_code()
        after = {n for n in gm.graph.nodes if n.op == "call_function"}
        for n in before - after:
            record.add_match(n)
        # Constants that are no longer referenced would otherwise keep their memory alive.
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for name in [k for k in gm._buffers if k.startswith("_effopt_const_") and k not in used]:
            del gm._buffers[name]

"""The pass manager: an ordered list of graph passes, each GraphModule -> GraphModule + PassRecord."""
from __future__ import annotations

import time
from typing import ClassVar

import torch.fx as fx

from .records import PassRecord


def count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))


class GraphPass:
    """One rewrite. Subclasses set `name` and implement `apply`, calling `record.add_match(node)` per rewrite."""

    name: ClassVar[str]
    exact: ClassVar[bool] = True  # exact passes never change results beyond float rounding

    def apply(self, gm: fx.GraphModule, record: PassRecord) -> None:
        raise NotImplementedError

    def run(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, PassRecord]:
        """The pass manager's entry: the graph after the pass (this one, rewritten in place) and its record."""
        return gm, self(gm)

    def __call__(self, gm: fx.GraphModule) -> PassRecord:
        record = PassRecord(self.name, nodes_before=count_nodes(gm))
        t0 = time.perf_counter()
        self.apply(gm, record)
        gm.graph.lint()
        gm.recompile()
        record.seconds = time.perf_counter() - t0
        record.nodes_after = count_nodes(gm)
        return record


class PassManager:
    """Runs passes in order. A pass is anything with `run(gm) -> (gm, record)`: the exact GraphPasses, and
    the guarded approximate passes (effopt.passes.guarded.GuardedPass), which may return a new graph.
    `on_record(record, gm)` is called after each pass with the graph as it left it."""

    def __init__(self, passes: list):
        self.passes = list(passes)

    def run(self, gm: fx.GraphModule, on_record=None) -> tuple[fx.GraphModule, list[PassRecord]]:
        records = []
        for p in self.passes:
            gm, record = p.run(gm)
            records.append(record)
            if on_record is not None:
                on_record(record, gm)
        return gm, records

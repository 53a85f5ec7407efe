"""The protocol every approximate (guarded) pass follows, and its one driver.

An approximate pass finds its sites in the graph (attention layers, linear layers, a token schedule),
makes a rewriter that applies and reverts one site (and may `retry` a site over budget in a more careful
form), and writes its record when the guard is done. `GuardedPass.run` is the driver: the accuracy guard
(effopt.passes.guard.guarded_apply) applies the sites on the calibration inputs, keeping those within budget
against the original model's outputs, and rolls back the rest, the costliest first.

The backend runs the approximate passes as one pipeline (`effopt.passes.approximate_passes`), in this order:
tokens -> attention -> shift/add -> quantize. Token reduction first: it changes the sequence length every
later layer sees, and the guards after it measure their layers at the reduced length; quantize last: its
int8 layers replace the float linears that shift/add left, and its activation scales are calibrated on the
graph as the earlier passes left it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch.fx as fx

from .guard import guarded_apply
from .manager import count_nodes
from .records import PassRecord


@dataclass
class GuardContext:
    """What a guarded pass measures with: example inputs (argument lists of the graph), calibration inputs
    (a guard.CalibrationSet: the original model's outputs are the reference) or None, the budget and the
    metric; `run(gm, args)` evaluates a graph on one calibration item."""
    examples: list | None
    calibration: list | None
    budget: float | None
    metric: Any = "cosine"
    run: Callable[[fx.GraphModule, Any], Any] | None = None

    def evaluate(self, gm: fx.GraphModule, args):
        return self.run(gm, args) if self.run is not None else gm(*args)


class GuardedPass:
    """One approximate pass. Subclasses set `name` (the option it serves, and its name in disable_passes)
    and implement `sites`, `rewriter` and `finish`; `run` drives them under the accuracy guard."""

    name: ClassVar[str]
    exact: ClassVar[bool] = False
    # whether the guard runs when there are no sites (it then only measures the loss that remains)
    guard_without_sites: ClassVar[bool] = True

    def __init__(self, config, ctx: GuardContext):
        self.config, self.ctx = config, ctx

    def record_name(self) -> str:
        return self.name

    def what(self) -> str:
        """How the guard's log lines and warnings name this rewrite."""
        return f"{self.name}={self.config}"

    def sites(self, gm: fx.GraphModule, record: PassRecord) -> list:
        """The places this pass may rewrite, each with a `name` (notes on what it skipped go to `record`);
        None where the pass does not apply to this graph at all (it says why in `record`)."""
        raise NotImplementedError

    def rewriter(self, gm: fx.GraphModule, sites: list, record: PassRecord):
        """An object with apply(site) and revert(site), optionally retry(site) -> bool (a more careful form
        of a site over budget) and `current` (the graph to evaluate, where the pass builds a new one)."""
        raise NotImplementedError

    def finish(self, gm: fx.GraphModule, sites: list, rewriter, guard, record: PassRecord) -> fx.GraphModule:
        """Clean up after the guard, count the matches and write the notes; returns the resulting graph."""
        raise NotImplementedError

    def run(self, gm: fx.GraphModule) -> tuple[fx.GraphModule, PassRecord]:
        t0 = time.perf_counter()
        record = PassRecord(self.record_name(), nodes_before=count_nodes(gm))
        sites = self.sites(gm, record)
        if sites is None:  # not applicable to this graph: the pass said why in its record
            record.nodes_after = record.nodes_before
            record.seconds = time.perf_counter() - t0
            return gm, record
        rw = self.rewriter(gm, sites, record)
        guard = None
        if sites or self.guard_without_sites:
            guard = guarded_apply(lambda args: self.ctx.evaluate(getattr(rw, "current", gm), args), sites, rw.apply,
                                  rw.revert, self.ctx.calibration, self.ctx.budget, self.ctx.metric, self.what(),
                                  retry=getattr(rw, "retry", None))
        record.guard = guard
        gm = self.finish(gm, sites, rw, guard, record)
        record.seconds = time.perf_counter() - t0
        record.nodes_after = count_nodes(gm)
        return gm, record


__all__ = ["GuardContext", "GuardedPass"]

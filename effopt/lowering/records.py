"""What the lowering did: a record per region (KernelRecord) and one per graph (LoweringRecord), read by the
report; and the warnings it raises."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx


class EffoptFallbackWarning(UserWarning):
    """Part of a graph runs in eager PyTorch instead of a compiled kernel."""


class EffoptSlowerWarning(UserWarning):
    """A rewrite (or the whole compiled graph) measured slower on this CPU than what it replaced, which runs
    instead."""


@dataclass
class KernelRecord:
    name: str
    ops: list[str]
    choice: str  # "tvm" | "eager"
    tvm_us: float | None = None
    eager_us: float | None = None
    reason: str = ""
    relax: str = ""  # the region as a Relax function (TVMScript), for the inspection report
    kernel: str = ""  # the compiled kernel it calls (structurally equal regions share one); the TIR kernels
    # in it that run tuned schedules or tiles are listed in LoweringRecord.tuned
    float_us: float | None = None  # rewritten ops: the float32 layers they replaced, timed beside them


@dataclass
class LoweringRecord:
    target: dict = field(default_factory=dict)
    kernels: list[KernelRecord] = field(default_factory=list)
    library_calls: dict[str, int] = field(default_factory=dict)
    gemms: list[dict] = field(default_factory=list)
    tuned: list[dict] = field(default_factory=list)  # kernels built with tuned schedules or tiles (effopt tune)
    tuning_db: str = ""  # the tuning database consulted ("" where this target has none)
    fallbacks: dict[str, list[str]] = field(default_factory=dict)
    eager_regions: list[dict] = field(default_factory=list)  # regions TVM could not take: their ops and why
    tir: dict[str, str] = field(default_factory=dict)  # effopt's custom TIR kernels by name (TVMScript)
    modules: dict = field(default_factory=dict, repr=False)  # kernel name -> its IRModule (for kernel_tir)
    _tvm_target: object = field(default=None, repr=False)
    _tuned: object = field(default=None, repr=False)
    _schedule: object = field(default=None, repr=False)  # build.scheduled_tir, set by the convert step

    def kernel_tir(self, kernel: str) -> str:
        """The scheduled TIR that kernel `kernel` (a KernelRecord.kernel) compiles to, computed on demand."""
        if kernel not in self.modules:
            raise KeyError(f"no kernel {kernel!r}; kernels: {sorted(self.modules)}")
        return self._schedule(self.modules[kernel], self._tvm_target, self._tuned)
    unique_kernels: int = 0
    cache_hit: bool = False
    parallel: str = ""  # "omp": TVM's parallel loops run on torch's OpenMP threads; "serial": on one thread
    seconds: float = 0.0
    # graphs of symbolic sizes: the regions whose compile-time choice was close, chosen per size bucket
    # (buckets.BucketedRegion, named in the graph)
    per_bucket: list = field(default_factory=list)

    def __str__(self) -> str:
        tvm_n = sum(k.choice == "tvm" for k in self.kernels)
        lines = [f"lowering for {self.target.get('kind')} ({self.target.get('mcpu', '')}): {len(self.kernels)} regions, "
                 f"{tvm_n} on TVM kernels ({self.unique_kernels} unique, {self.parallel or 'no'} threads), "
                 f"{len(self.kernels) - tvm_n} kept eager; "
                 f"library calls {dict(sorted(self.library_calls.items()))}; "
                 + (f"{len(self.tuned)} kernel(s) tuned; " if self.tuned else "") +
                 f"{'cache hit' if self.cache_hit else 'compiled'} in {self.seconds:.1f} s"
                 + (f"; {len(self.per_bucket)} region(s) choose per size bucket" if self.per_bucket else "")]
        for op, locs in self.fallbacks.items():
            lines.append(f"  fallback to eager: {op} x{len(locs)}")
        return "\n".join(lines)


def region_ops(graph: fx.Graph) -> list[str]:
    """The ops of a region's graph by name, for records and warnings."""
    return [n.target._opname if isinstance(n.target, torch._ops.OpOverload) else str(n.target)
            for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem]


__all__ = ["EffoptFallbackWarning", "EffoptSlowerWarning", "KernelRecord", "LoweringRecord", "region_ops"]

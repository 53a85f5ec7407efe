"""Typed, validated backend options.

Every option a user can pass in `torch.compile(..., backend="effopt", options={...})` is a field here;
an unknown key or an invalid value raises ValueError naming what is valid.
"""
from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any


class KernelChoice(str, enum.Enum):
    """How each lowered region picks between its TVM kernel and eager PyTorch."""

    MEASURE = "measure"  # time both on the example shapes, keep the faster (the default: never slower than eager)
    TVM = "tvm"  # always use the TVM kernel where one could be built (for testing and tuning)


@dataclass(frozen=True)
class Options:
    target: Any = "host"
    """'host' (this CPU, its features, its physical cores), 'llvm', 'cuda', or a TVM JSON target dict."""
    strict: bool = False
    """Raise instead of falling back to eager when compilation fails (for debugging)."""
    cache: bool = True
    """Keep compiled kernels on disk so that another process compiling the same model is fast."""
    cache_dir: str | None = None
    """Where the disk cache lives; default $EFFOPT_CACHE_DIR or ~/.cache/effopt."""
    freeze: bool = True
    """Treat parameters and buffers as constants (inference); a changed weight triggers a refreeze."""
    kernel_choice: KernelChoice = KernelChoice.MEASURE
    """'measure' keeps a TVM kernel only where it is measured faster than eager; 'tvm' always uses it."""
    disable_passes: tuple[str, ...] = field(default_factory=tuple)
    """Names of graph passes to skip (see effopt.passes.PASSES)."""
    lower: bool = True
    """Lower to TVM at all; False runs the rewritten graph in eager PyTorch."""

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "Options":
        if d is None:
            return cls()
        if isinstance(d, Options):
            return d
        if not isinstance(d, dict):
            raise ValueError(f"options must be a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"unknown effopt option(s) {unknown}; valid options: {names}")
        kw = dict(d)
        for b in ("strict", "cache", "freeze", "lower"):
            if b in kw and not isinstance(kw[b], bool):
                raise ValueError(f"option {b!r} must be True or False, got {kw[b]!r}")
        if "kernel_choice" in kw:
            try:
                kw["kernel_choice"] = KernelChoice(kw["kernel_choice"])
            except ValueError:
                raise ValueError(f"kernel_choice={kw['kernel_choice']!r} is invalid; valid: "
                                 f"{[c.value for c in KernelChoice]}") from None
        if "cache_dir" in kw and kw["cache_dir"] is not None and not isinstance(kw["cache_dir"], str):
            raise ValueError(f"cache_dir must be a path string, got {kw['cache_dir']!r}")
        if "disable_passes" in kw:
            from .passes import PASSES

            dp = kw["disable_passes"]
            if isinstance(dp, str) or not all(isinstance(p, str) for p in dp):
                raise ValueError(f"disable_passes must be a list of pass names from {sorted(PASSES)}")
            bad = sorted(set(dp) - set(PASSES))
            if bad:
                raise ValueError(f"unknown pass(es) {bad} in disable_passes; valid: {sorted(PASSES)}")
            kw["disable_passes"] = tuple(dp)
        if "target" in kw:
            from .autotune.targets import target_dict

            target_dict(kw["target"])  # raises ValueError naming the valid spellings
        return cls(**kw)

    def key(self) -> str:
        """The options that change compiled code, for cache keys."""
        from .autotune.targets import target_dict

        return json.dumps({"target": target_dict(self.target), "kernel_choice": self.kernel_choice.value,
                           "freeze": self.freeze, "disable_passes": sorted(self.disable_passes)}, sort_keys=True)

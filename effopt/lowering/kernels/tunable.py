"""Tile-size knobs of effopt's hand-scheduled kernels, for the autotuner.

MetaSchedule cannot search a kernel that is scheduled by hand (flash attention, the int8 and shift
linears: "tirx.is_scheduled"), but their generators take tile sizes. Each emit function asks `choose`
for them, naming the kernel, the parameters that fix its code, the concrete shapes of its arguments
(inputs, then outputs; None where a size is symbolic) and the candidate settings. Outside a `using`
block, the default comes back. The lowering stage installs the tuning database's lookup (the measured
best setting for this target, where it beat the default); task extraction installs a collector that
records every call as a tuning task.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("effopt_tunable", default=None)


@dataclass
class KnobTask:
    kernel: str  # the generator, e.g. "flash_attention"
    params: dict  # what fixes the code apart from the knobs (head dims, scale, activation, ...)
    shapes: list | None  # [(shape, dtype)] per PrimFunc parameter, or None where a size is symbolic
    space: list[dict]  # candidate knob settings, the default first
    make: Callable = field(repr=False, default=None)  # knobs -> PrimFunc

    @property
    def key(self) -> str:
        body = json.dumps({"kernel": self.kernel, "params": self.params, "shapes": self.shapes}, sort_keys=True,
                          default=str)
        return f"knobs:{self.kernel}:{hashlib.sha256(body.encode()).hexdigest()[:16]}"

    @property
    def default(self) -> dict:
        return self.space[0]


def choose(kernel: str, params: dict, shapes, space: list[dict], make: Callable) -> dict:
    """The knob setting to build `kernel` with: space[0] (the default) unless a lookup is installed."""
    hook = _ACTIVE.get()
    if hook is None:
        return space[0]
    knobs = hook(KnobTask(kernel, params, shapes, space, make))
    return knobs if knobs is not None else space[0]


@contextlib.contextmanager
def using(hook: Callable[[KnobTask], dict | None]):
    """Within the block, `choose` asks `hook` (None: the default)."""
    token = _ACTIVE.set(hook)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def static_shapes(exprs) -> list | None:
    """[(shape, dtype)] of Relax expressions (or TensorTypes), or None if any size is symbolic."""
    from tvm import relax, tirx

    out = []
    for e in exprs:
        ty = e if isinstance(e, relax.TensorType) else e.ty
        if not isinstance(ty, relax.TensorType) or ty.shape is None:
            return None
        dims = list(ty.shape.values)
        if not all(isinstance(d, (int, tirx.IntImm)) for d in dims):
            return None
        out.append(([int(d) for d in dims], str(ty.dtype)))
    return out

"""One declaration per custom op: what every stage reads of it.

Each op module (attention.py, tokens.py, shift.py, int8.py, moe.py) defines its op with
`torch.library.custom_op` and its fake with `register_fake`, then declares it here with `declare(...)`.
The op's own body is its plain-PyTorch reference: the oracle of the lowering's self-check, which runs it under
`ops.attention.reference_kernels()` (so no op forward calls a compiled kernel there), and of the tests.

    tolerance    how far a compiled kernel may be from the reference in the self-check (None: float rounding;
                 a dict of the keys `lowering.select.TOLERANCES` takes, e.g. {"relative_l2": 1e-3})
    alone        lowered in a region of its own, so its kernel is measured alone against its eager form
    library      no TVM kernel: it runs as its torch implementation, as a library call does
    cost         (bound arguments, output) -> (multiply-accumulates, of them float multiplications) of one
                 call; the output is the call's fx node (its value's shape), or None. Products that are not
                 float multiplications (shifts, int8, Hamming, L-Mul) are what the report counts apart.

Nothing reads an op's arguments by position: `spec.bind(node)` gives them by the names of the op's schema,
and `spec.arguments(**named)` puts named values back in the schema's order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx


@dataclass(frozen=True)
class OpSpec:
    op: Any
    tolerance: dict | None = None
    alone: bool = False
    library: bool = False
    cost: Callable[[dict, Any], tuple[int, int]] | None = None

    @property
    def name(self) -> str:
        return self.op._schema.name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.op._schema.arguments)

    def bind(self, args, kwargs=None) -> dict:
        """{argument name: value} of a call (an fx node, or its args and kwargs), defaults filled in."""
        if isinstance(args, fx.Node):
            args, kwargs = args.args, args.kwargs
        out = {}
        for i, a in enumerate(self.op._schema.arguments):
            if i < len(args):
                out[a.name] = args[i]
            elif kwargs and a.name in kwargs:
                out[a.name] = kwargs[a.name]
            elif a.has_default_value():
                out[a.name] = a.default_value
            else:
                raise TypeError(f"{self.name}: missing argument {a.name!r}")
        return out

    def arguments(self, **named) -> tuple:
        """The positional arguments of a call from named values (every argument named)."""
        missing = [n for n in self.names if n not in named]
        extra = sorted(set(named) - set(self.names))
        if missing or extra:
            raise TypeError(f"{self.name}: missing {missing}, unknown {extra}; arguments: {list(self.names)}")
        return tuple(named[n] for n in self.names)

    def replace(self, node: fx.Node, **changes) -> None:
        """Set some of a node's arguments by name."""
        node.args, node.kwargs = self.arguments(**{**self.bind(node), **changes}), {}

    def macs(self, node_or_args) -> tuple[int, int]:
        """(multiply-accumulates, float multiplications) of one call (0, 0 without a declared cost)."""
        if self.cost is None:
            return 0, 0
        return self.cost(self.bind(node_or_args), node_or_args if isinstance(node_or_args, fx.Node) else None)


SPECS: dict[Any, OpSpec] = {}


def declare(op, **facts) -> OpSpec:
    """Declare a custom op (torch.ops.effopt.<name>.default, or the custom_op object) once."""
    if not isinstance(op, torch._ops.OpOverload):  # a custom_op object: its default overload
        op = getattr(getattr(torch.ops, op._namespace), op._name).default
    spec = SPECS[op] = OpSpec(op, **facts)
    return spec


def spec_of(target) -> OpSpec | None:
    return SPECS.get(target)


def specs() -> list[OpSpec]:
    return list(SPECS.values())


# ---- helpers for the declarations' costs: the shapes of bound arguments (fx nodes with values, or tensors) ----
def size(d) -> int:
    """A dim's size; a symbolic one at its example value."""
    if isinstance(d, torch.SymInt):
        return int(d.node.hint) if d.node.hint is not None else 1
    return int(d)


def shape(x) -> tuple | None:
    """The sizes of a tensor, or of an fx node's value (the first, for a tuple of values); None otherwise."""
    v = x.meta.get("val") if isinstance(x, fx.Node) else x
    if isinstance(v, (tuple, list)) and v:
        v = v[0]
    return tuple(size(d) for d in v.shape) if isinstance(v, torch.Tensor) else None


def numel(s) -> int:
    return int(math.prod(s)) if s else 0


def attention_macs(q, k, v) -> int:
    """q.k^T and p.v: B*H*N*M*(D + Dv)."""
    sq, sk, sv = shape(q), shape(k), shape(v)
    if not sq or not sk or not sv or min(len(sq), len(sk), len(sv)) < 2:
        return 0
    return numel(sq[:-1]) * sk[-2] * (sq[-1] + sv[-1])


__all__ = ["OpSpec", "SPECS", "declare", "spec_of", "specs", "size", "shape", "numel", "attention_macs"]

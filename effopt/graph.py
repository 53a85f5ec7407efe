"""Helpers on FX graphs that every stage shares: where a node came from, graph constants, fake values,
views, and the graphs the backend compiles (for the tools that compile a model to read them)."""
from __future__ import annotations

import contextlib
import re

import torch
import torch.fx as fx

aten = torch.ops.aten
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}


def source_location(node: fx.Node) -> str | None:
    """file:line of the innermost frame of the user's code that produced `node` (dynamo's stack trace)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = _FRAME.findall(trace)
    return f"{frames[-1][0]}:{frames[-1][1]}" if frames else None


def add_constant(gm: fx.GraphModule, value: torch.Tensor, before: fx.Node, hint: str = "c") -> fx.Node:
    """A new constant (a non-persistent buffer of gm) read by a get_attr node placed before `before`."""
    i = 0
    while hasattr(gm, f"_effopt_const_{hint}_{i}"):
        i += 1
    name = f"_effopt_const_{hint}_{i}"
    gm.register_buffer(name, value, persistent=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = value
    return node


def attr(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The tensor a get_attr node names (a dotted path in exported modules)."""
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def fake_mode(*vals, fresh: bool = False):
    """The fake mode these values live in (dynamo's, with its shape environment); where they have none, None,
    or with `fresh` a new mode that also takes real tensors."""
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    if mode is None and fresh:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    return mode


def as_fake(mode, v):
    """A value in `mode`: a real tensor (a graph constant) becomes a fake one of its static sizes."""
    from torch._subclasses.fake_tensor import FakeTensor

    return mode.from_tensor(v, static_shapes=True) if isinstance(v, torch.Tensor) and not isinstance(v, FakeTensor) \
        else v


def fake_call(target, args, kwargs=None, mode=None, real: bool = False):
    """What `target(*args, **kwargs)` returns on the graph's fake values (args may be nodes), for a new node's
    meta["val"]. The mode is the values' (or `mode`); without one, None, or with `real` the call on the
    values as they are (a graph whose meta holds real tensors)."""
    vals, kw = fx.node.map_arg((tuple(args), dict(kwargs or {})), lambda a: a.meta.get("val"))
    mode = mode or fake_mode(*vals, *kw.values())
    if mode is None:
        return target(*vals, **kw) if real else None
    vals, kw = [as_fake(mode, v) for v in vals], {k: as_fake(mode, v) for k, v in kw.items()}  # constants: sized
    with mode:
        return target(*vals, **kw)


def through_views(node: fx.Node, forward: bool) -> fx.Node | None:
    """The node past single-use views, toward users (forward) or inputs."""
    while True:
        if forward:
            users = list(node.users)
            if len(users) != 1 or users[0].target not in VIEWS:
                return users[0] if len(users) == 1 else None
            node = users[0]
        else:
            if node.op != "call_function" or node.target not in VIEWS:
                return node
            node = node.args[0]


def split_inputs(example_inputs) -> tuple[tuple, dict]:
    """A model's example inputs (a tuple of arguments, a dict of keyword arguments, or one tensor) as
    (args, kwargs)."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


_SINKS: dict[str, list[list]] = {}


@contextlib.contextmanager
def collect(kind: str):
    """What is published under `kind` inside the block: "graphs", the rewritten graphs the backend compiles
    (effopt.autotune reads its tasks from them); "reports", their reports (effopt.explain)."""
    sink: list = []
    _SINKS.setdefault(kind, []).append(sink)
    try:
        yield sink
    finally:
        _SINKS[kind].remove(sink)


def publish(kind: str, item) -> None:
    for sink in _SINKS.get(kind, ()):
        sink.append(item)

"""The accuracy guard, shared by every approximate pass.

On the user's calibration inputs, the graph as it was before any approximate rewrite, run eagerly, is the
reference. Approximate rewrites are applied one layer at a time; a layer whose rewrite pushes the metric
past `accuracy_budget` is rolled back. The pass record says which layers were kept, which were rolled back,
and the measured metric. Without calibration data the rewrites are applied as configured, with a one-time
warning that their accuracy is unverified.
"""
from __future__ import annotations

import logging
import math
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx

log = logging.getLogger("effopt.guard")

DEFAULT_BUDGET = 0.01
_warned_unverified: set = set()


class EffoptAccuracyWarning(UserWarning):
    """An approximate rewrite was applied whose accuracy effopt could not measure."""


# ---- metrics: the loss of the optimized output against the reference (0 = identical) ---------------------
def _tensors(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def cosine_loss(ref, got) -> float:
    """1 - cosine similarity, per sample (dim 0) and output, averaged."""
    sims = []
    for r, g in zip(_tensors(ref), _tensors(got)):
        if r.dim() == 0:
            r, g = r.reshape(1, 1), g.reshape(1, 1)
        r, g = r.reshape(r.shape[0], -1).double(), g.reshape(g.shape[0], -1).double()
        sims.append(torch.nn.functional.cosine_similarity(r, g, dim=1, eps=1e-12).mean().item())
    if not sims:
        raise ValueError("metric 'cosine' needs floating-point outputs")
    return 1.0 - sum(sims) / len(sims)


def top1_loss(ref, got) -> float:
    """The fraction of predictions (argmax over the last dim of the first output) that changed."""
    r, g = _tensors(ref), _tensors(got)
    if not r:
        raise ValueError("metric 'top1' needs a floating-point output (logits)")
    return (r[0].argmax(-1) != g[0].argmax(-1)).double().mean().item()


def _unwrap(out):
    return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out


def metric_fn(metric) -> Callable[[Any, Any], float]:
    if callable(metric):  # the graph's output: one tensor, or a tuple of them
        return lambda ref, got: float(metric(_unwrap(ref), _unwrap(got)))
    return {"cosine": cosine_loss, "top1": top1_loss}[metric]


# ---- calibration inputs in the graph's argument order --------------------------------------------------------
def calibration_arguments(gm: fx.GraphModule, example_inputs, calibration) -> list[list]:
    """Each calibration item as the full argument list of dynamo's graph.

    Dynamo's placeholders carry the source expression they were read from, e.g. L['x'] or
    L['kwargs']['attention_mask'] (locals of the compiled frame) or L['self']._modules[...] (parameters).
    Each item is bound to the compiled function's signature and every user-input source is evaluated on
    it; the other placeholders (parameters, globals) keep their example values."""
    from torch._guards import TracingContext

    codes = TracingContext.get_traced_code() or []
    if not codes:
        raise ValueError("calibration: cannot see the compiled function's signature")
    code: types.CodeType = codes[0]
    n_pos, n_kw = code.co_argcount, code.co_kwonlyargcount
    names = list(code.co_varnames[:n_pos + n_kw])
    has_varargs, has_varkw = bool(code.co_flags & 0x04), bool(code.co_flags & 0x08)
    sources = [ga.source.name if (ga := n.meta.get("grapharg")) is not None and ga.source is not None else None
               for n in gm.graph.nodes if n.op == "placeholder"]
    skip_self = bool(names) and (names[0] in ("self", "cls") or any(
        s and s.startswith(f"L['{names[0]}'].") for s in sources))
    positional = names[1 if skip_self else 0:n_pos]
    out = []
    for idx, item in enumerate(calibration):
        args, kwargs = ((item,), {}) if isinstance(item, torch.Tensor) else \
            ((), dict(item)) if isinstance(item, dict) else (tuple(item), {})
        local = {}
        if len(args) > len(positional) and not has_varargs:
            raise ValueError(f"calibration item {idx} has {len(args)} positional inputs; the compiled function "
                             f"takes {len(positional)} ({positional})")
        local.update(zip(positional, args))
        if has_varargs:
            local[code.co_varnames[n_pos + n_kw]] = tuple(args[len(positional):])
        extra = {}
        for k, v in kwargs.items():
            if k in names:
                local[k] = v
            else:
                extra[k] = v
        if extra:
            if not has_varkw:
                raise ValueError(f"calibration item {idx}: unknown keyword input(s) {sorted(extra)}; the compiled "
                                 f"function takes {names[1 if skip_self else 0:]}")
            local[code.co_varnames[n_pos + n_kw + int(has_varargs)]] = extra
        full = []
        for src, ex in zip(sources, example_inputs):
            rooted = src is not None and src.startswith("L[") and not (skip_self and src.startswith(f"L['{names[0]}']"))
            if not rooted:
                full.append(ex)
                continue
            try:
                value = eval(src, {"__builtins__": {}}, {"L": local})  # noqa: S307 - dynamo's own source expression
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"calibration item {idx} does not provide the graph input {src} "
                                 f"({type(e).__name__}: {e})") from None
            if isinstance(ex, torch.Tensor):
                if not isinstance(value, torch.Tensor) or value.shape != ex.shape or value.dtype != ex.dtype:
                    got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"calibration item {idx}: input {src} is {got}, but the model was compiled "
                                     f"for {tuple(ex.shape)} {ex.dtype}; calibration inputs must have the shapes "
                                     "of the compiled inputs")
            elif value != ex:
                raise ValueError(f"calibration item {idx}: non-tensor input {src}={value!r} differs from the "
                                 f"compiled {ex!r}")
            full.append(value)
        out.append(full)
    return out


# ---- the guard ----------------------------------------------------------------------------------------------
@dataclass
class GuardResult:
    metric: str
    budget: float | None
    kept: list[str] = field(default_factory=list)
    rolled_back: list[tuple[str, float]] = field(default_factory=list)  # (layer, metric loss with it applied)
    loss: float | None = None  # the final metric loss on the calibration data (None: unverified)
    retried: list[float] = field(default_factory=list)  # losses over budget of forms a retry replaced
    evaluations: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        if self.loss is None:
            return f"{len(self.kept)} layer(s) rewritten, accuracy unverified (no calibration data)"
        s = (f"{self.metric} loss {self.loss:.4g} <= budget {self.budget:g}: kept {len(self.kept)}/"
             f"{len(self.kept) + len(self.rolled_back)} layers")
        if self.rolled_back:
            s += "; rolled back " + ", ".join(f"{n} (loss {l:.3g})" for n, l in self.rolled_back)
        return s


def warn_unverified(what: str, stacklevel: int = 3) -> None:
    """The one-time warning that an approximate rewrite `what` runs without calibration data."""
    if what in _warned_unverified:
        return
    _warned_unverified.add(what)
    warnings.warn(f"effopt: {what} is applied without calibration data, so its accuracy is unverified; "
                  "pass options={'calibration': [inputs, ...], 'accuracy_budget': 0.01} to measure it and "
                  "roll back what costs too much", EffoptAccuracyWarning, stacklevel=stacklevel)


def metric_name(metric) -> str:
    return metric if isinstance(metric, str) else getattr(metric, "__name__", "callable")


class CalibrationSet(list):
    """The calibration inputs (argument lists) with the original model's outputs on them: every guarded
    pass measures its loss against `reference`, not against the graph an earlier pass left, so one
    accuracy budget bounds all approximate rewrites together (their losses do not add up past it)."""

    reference: list | None = None

    @classmethod
    def of(cls, inputs: list[list], run: Callable[[list], Any]) -> "CalibrationSet":
        out = cls(inputs)
        with torch.no_grad():
            out.reference = [run(args) for args in inputs]
        return out


class Calibrated:
    """The reference outputs on the calibration inputs (the original model's where the calibration is a
    CalibrationSet, else `run`'s), and the metric loss of a candidate against them (averaged over the
    inputs; inf if not finite). Counts its evaluations in `result`."""

    def __init__(self, run: Callable[[list], Any], calibration: list[list], metric, result: GuardResult):
        self.calibration, self.loss_of, self.result = calibration, metric_fn(metric), result
        shared = getattr(calibration, "reference", None)
        with torch.no_grad():
            self.refs = shared if shared is not None else [run(args) for args in calibration]

    def loss(self, run: Callable[[list], Any]) -> float:
        self.result.evaluations += 1
        with torch.no_grad():
            losses = [self.loss_of(r, run(args)) for r, args in zip(self.refs, self.calibration)]
        loss = sum(losses) / len(losses)
        return loss if math.isfinite(loss) else math.inf


def guarded_apply(run: Callable[[list], Any], layers: list, apply: Callable, revert: Callable,
                  calibration: list[list] | None, budget: float | None, metric, what: str,
                  retry: Callable[[Any], bool] | None = None) -> GuardResult:
    """Apply each layer's rewrite, keeping those that hold the metric within budget on the calibration data.

    `run(args)` evaluates the graph as it currently is; `apply(layer)`/`revert(layer)` change it. All layers
    at once first (one evaluation); over budget, each layer's own loss is measured, and the layers are
    added back cheapest first, each kept while the whole stays within budget, so that what is rolled back
    is what costs most. A layer over budget is offered to `retry(layer)`, which may replace its rewrite by
    the next, more careful form and return True (then it is measured again), or return False (then it is
    rolled back). A layer's name is read when it is kept or rolled back (a retry may rename it)."""
    t0 = time.perf_counter()
    mname = metric_name(metric)

    def name(layer) -> str:
        return getattr(layer, "name", str(layer))

    if not calibration:
        warn_unverified(what, stacklevel=4)
        for l in layers:
            apply(l)
        return GuardResult(mname, None, kept=[name(l) for l in layers], seconds=time.perf_counter() - t0)
    budget = DEFAULT_BUDGET if budget is None else budget
    result = GuardResult(mname, budget)
    cal = Calibrated(run, calibration, metric, result)

    def measured(layer) -> float:
        """The loss with `layer` applied, retried in more careful forms while over budget."""
        trial = cal.loss(run)
        while trial > budget and retry is not None:
            before = trial
            if not retry(layer):
                break
            result.retried.append(before)
            trial = cal.loss(run)
        return trial

    order = list(range(len(layers)))
    if len(layers) > 1:  # the common case first: every layer at once within budget costs one evaluation
        for l in layers:
            apply(l)
        loss = cal.loss(run)
        if loss <= budget:
            result.kept, result.loss = [name(l) for l in layers], loss
            log.info("effopt: %s: all %d layers kept (%s loss %.4g)", what, len(layers), mname, loss)
            result.seconds = time.perf_counter() - t0
            return result
        for l in layers:
            revert(l)
        alone = []
        for l in layers:  # each layer's own cost (in its most careful form needed): the order they are added in
            apply(l)
            alone.append(measured(l))
            revert(l)
        order.sort(key=lambda i: alone[i])
    loss, kept, rolled = None, {}, {}
    for step, i in enumerate(order):
        l = layers[i]
        apply(l)
        trial = measured(l)
        if trial <= budget:
            kept[i] = name(l)
            loss = trial
        else:
            revert(l)
            rolled[i] = (name(l), trial)
        log.info("effopt: %s: layer %d/%d (%s) %s (%s loss %.4g)", what, step + 1, len(layers), name(l),
                 "kept" if trial <= budget else "rolled back", mname, trial)
    result.kept = [kept[i] for i in sorted(kept)]
    result.rolled_back = [rolled[i] for i in sorted(rolled)]
    if loss is not None:
        result.loss = loss
    else:  # nothing kept: against the original model, the earlier passes' loss remains
        result.loss = cal.loss(run) if getattr(calibration, "reference", None) is not None else 0.0
    result.seconds = time.perf_counter() - t0
    return result

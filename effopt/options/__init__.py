"""Typed, validated backend options.

Every option a user can pass in `torch.compile(..., backend="effopt", options={...})` is a field of
`Options`, typed by the class that holds its value (torchao style): `AttentionConfig`, `TokenConfig`,
`ShiftConfig`, `QuantConfig`, `AutoConfig` (one module each here), or a plain type. `Options.from_dict` parses
each given value with the parser of its field's type (`PARSERS`; a field may name its own in its metadata),
then checks the rules that tie options together (`RULES`). An unknown key or an invalid value raises
ValueError naming what is valid.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..target import target_dict
from .attention import AttentionConfig
from .auto import AutoConfig
from .common import check_parameters
from .quantize import QuantConfig
from .shift_add import ShiftConfig
from .tokens import TokenConfig

METRICS = ("cosine", "top1")
PASS_NAMES: set[str] = set()  # every name disable_passes accepts; effopt.passes registers them on import


class KernelChoice(str, enum.Enum):
    """How each lowered region picks between its TVM kernel and eager PyTorch."""

    MEASURE = "measure"  # time both on the example shapes, keep the faster (the default: never slower than eager)
    TVM = "tvm"  # always use the TVM kernel where one could be built (for testing and tuning)


# ---- parsers of plain values (name, value) -> value; config classes parse themselves (Config.parse) ----------
def _flag(name: str, v) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"option {name!r} must be True or False, got {v!r}")
    return v


def _kernel_choice(name: str, v) -> KernelChoice:
    try:
        return KernelChoice(v)
    except ValueError:
        raise ValueError(f"kernel_choice={v!r} is invalid; valid: {[c.value for c in KernelChoice]}") from None


def _target(name: str, v):
    target_dict(v)  # raises ValueError naming the valid spellings
    return v


def _path(name: str, v):
    if v is not None and not isinstance(v, str):
        raise ValueError(f"{name} must be a path string, got {v!r}")
    return v


def _pass_names(name: str, v) -> tuple[str, ...]:
    names = sorted(PASS_NAMES)
    if isinstance(v, str) or not all(isinstance(p, str) for p in v):
        raise ValueError(f"disable_passes must be a list of pass names from {names}")
    bad = sorted(set(v) - PASS_NAMES)
    if bad:
        raise ValueError(f"unknown pass(es) {bad} in disable_passes; valid: {names}")
    return tuple(v)


def _budget(name: str, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0):
        raise ValueError(f"accuracy_budget must be a number >= 0 (e.g. 0.01), got {v!r}")
    return v


def _inputs(name: str, v):
    if v is None or v is False:  # validation=False: no automatic hold-out
        return v
    if isinstance(v, (torch.Tensor, dict, str)) or not hasattr(v, "__iter__"):
        raise ValueError(f"{name} must be a list of example inputs (each a tuple of arguments, "
                         f"a dict of keyword arguments or one tensor), got {type(v).__name__}")
    v = list(v)
    if not v:
        raise ValueError(f"{name} is an empty list")
    return v


def _metric(name: str, v):
    if v not in METRICS and not callable(v):
        raise ValueError(f"metric={v!r} is invalid; valid: {list(METRICS)} or a callable "
                         "(reference_output, optimized_output) -> loss")
    return v


Target = typing.Union[str, dict]
Inputs = typing.Optional[list]
Metric = typing.Union[str, Callable]

# the parser of each field's type (for `X | None` fields, of X; None stays None)
PARSERS: dict[Any, Callable] = {bool: _flag, KernelChoice: _kernel_choice, Target: _target, Inputs: _inputs,
                                Metric: _metric, float: _budget, str: _path, tuple[str, ...]: _pass_names}
for _config in (AttentionConfig, TokenConfig, ShiftConfig, QuantConfig, AutoConfig):
    PARSERS[_config] = lambda name, v, _c=_config: _c.parse(v)


def _parse_with(parse):
    return {"parse": lambda name, v: parse(v)}


@dataclass(frozen=True)
class Options:
    target: Target = "host"
    """'host' (this CPU, its features, its physical cores), 'llvm', 'cuda', or a TVM JSON target dict."""
    strict: bool = False
    """Raise instead of falling back to eager when compilation fails (for debugging)."""
    cache: bool = True
    """Keep compiled kernels on disk so that another process compiling the same model is fast."""
    cache_dir: typing.Optional[str] = None
    """Where the disk cache lives; default $EFFOPT_CACHE_DIR or ~/.cache/effopt."""
    tuning: bool = True
    """Use the tuning database of this target (`effopt tune`, effopt.autotune) where it has measured
    faster schedules, tile sizes or GEMM kernels; False compiles with the default schedules."""
    freeze: bool = True
    """Treat parameters and buffers as constants (inference); a changed weight triggers a refreeze."""
    kernel_choice: KernelChoice = KernelChoice.MEASURE
    """'measure' keeps a TVM kernel only where it is measured faster than eager; 'tvm' always uses it."""
    disable_passes: tuple[str, ...] = ()
    """Names of graph passes to skip: the exact passes (effopt.passes.PASSES) and the approximate ones
    ('tokens', 'attention', 'shift_add', 'quantize'; effopt.passes.GUARDED_ORDER)."""
    lower: bool = True
    """Lower to TVM at all; False runs the rewritten graph in eager PyTorch."""
    attention: AttentionConfig = AttentionConfig()
    """'exact' (fused softmax attention, the default), or an approximate attention: 'hamming', 'linear',
    'lmul', or a dict {'kind': ..., parameters} (see effopt.options.attention.AttentionConfig)."""
    token_merge: typing.Optional[TokenConfig] = field(default=None, metadata=_parse_with(TokenConfig.parse_merge))
    """ToMe token merging: r (tokens merged per encoder block), a per-block list, or a dict {'r': ...,
    'inflect': -0.5 (decreasing schedule), 'proportional': True, 'protected': 1} (TokenConfig)."""
    token_prune: typing.Optional[TokenConfig] = field(default=None, metadata=_parse_with(TokenConfig.parse_prune))
    """EViT token pruning: a keep rate in (0, 1], or a dict {'keep_rate': 0.7, 'layers': [3, 6, 9],
    'protected': 1} (TokenConfig)."""
    shift_add: typing.Optional[ShiftConfig] = None
    """Power-of-two weights on linear layers: 'mlp' (the MLP linears), 'all', or a dict {'layers': 'mlp'|'all',
    'terms': 1|2|3|'auto', 'activation_bits': 0 (float path)|8|4 (MatShift's integer path)} (ShiftConfig).
    Layers of an effopt.reparameterize'd model are converted without this option."""
    quantize: typing.Optional[QuantConfig] = None
    """Int8 post-training quantization of linear layers: 'int8' (activation scales calibrated on
    `calibration`, per tensor), 'int8-dynamic' (per token at run time), or a dict {'mode': 'static'|'dynamic'|
    'mixed', 'layers': 'all'|'mlp', 'smooth': alpha} (QuantConfig). Weights per output channel, symmetric."""
    accuracy_budget: typing.Optional[float] = None
    """Largest allowed loss of `metric` against the original model on `calibration`; approximate rewrites
    that exceed it are rolled back layer by layer. Default with calibration data: 0.01."""
    calibration: Inputs = None
    """A list of example inputs (each a tuple of positional arguments, a dict of keyword arguments, or one
    tensor), with the same shapes as the inputs the model is compiled for."""
    validation: Inputs = None
    """Held-out inputs, in calibration's form, that the guards never decide on: after the approximate passes
    the loss against the original model is measured on them too (the report gives both), and where it
    exceeds the budget the passes run again with the guards' budget scaled down, until it holds or no
    approximate rewrite is left. Needs calibration. Default (None): with 4 or more calibration inputs, the
    last quarter of them is held out this way; False: the guards decide on all of them, nothing held out."""
    approximate: typing.Optional[AutoConfig] = None
    """'auto' (or {'kind': 'auto', 'families': [...], 'time_budget': '10m'}): search the approximate options
    of every family ('tokens', 'attention', 'shift_add', 'quantize') for the fastest compiled model within
    accuracy_budget on held-out inputs (effopt.auto, AutoConfig); needs calibration. The choice is stored,
    and a later compile of the same graph, target, budget and calibration applies it without searching."""
    metric: Metric = "cosine"
    """'cosine' (1 - cosine similarity of outputs), 'top1' (fraction of changed argmax predictions), or a
    callable (reference_output, optimized_output) -> loss (a float, 0 = no loss)."""

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
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name in d:
                kw[f.name] = parser_of(f, hints[f.name])(f.name, d[f.name])
        options = cls(**kw)
        for rule in RULES:
            rule(options)
        return options

    def key(self) -> str:
        """The options that change compiled code, for cache keys."""
        return json.dumps({"target": target_dict(self.target), "kernel_choice": self.kernel_choice.value,
                           "freeze": self.freeze, "tuning": self.tuning, "disable_passes": sorted(self.disable_passes),
                           "attention": str(self.attention), "tokens": str(self.tokens),
                           "shift_add": str(self.shift_add), "quantize": str(self.quantize),
                           "approximate": str(self.approximate)}, sort_keys=True)

    @property
    def any_approximate(self) -> bool:
        """Whether any approximate rewrite is requested (or searched for: approximate='auto')."""
        return str(self.attention) != "exact" or self.tokens is not None or self.shift_add is not None \
            or self.quantize is not None or self.approximate is not None

    @property
    def tokens(self):
        """The token reduction requested (a TokenConfig), or None."""
        return self.token_merge if self.token_merge is not None else self.token_prune


def parser_of(f: dataclasses.Field, hint) -> Callable:
    """The parser of a field: its metadata's, else that of its type (of X, for an optional X)."""
    if "parse" in f.metadata:
        parse = f.metadata["parse"]
    else:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        parse = PARSERS.get(hint) or (PARSERS.get(args[0]) if typing.get_origin(hint) is typing.Union
                                      and len(args) == 1 else None)
        if parse is None:
            raise TypeError(f"effopt.Options.{f.name}: no parser for its type {hint}")
    return lambda name, v: None if v is None and f.default is None else parse(name, v)


# ---- the rules that tie options together: each raises ValueError saying what to pass --------------------------
def _needs_calibration(given: Callable[[Options], bool], why: str):
    """A rule: where `given(options)`, calibration data must be passed too."""
    def rule(o: Options) -> None:
        if o.calibration is None and given(o):
            raise ValueError(f"{why}: pass options={{'calibration': [inputs, ...]}} as well")
    return rule


def _one_token_reduction(o: Options) -> None:
    if o.token_merge is not None and o.token_prune is not None:
        raise ValueError("token_merge and token_prune are alternatives; pass one of them")


def _auto_alone(o: Options) -> None:
    given = [k for k in ("token_merge", "token_prune", "shift_add", "quantize") if getattr(o, k) is not None]
    given += ["attention"] if str(o.attention) != "exact" else []
    if o.approximate is not None and given:
        raise ValueError(f"approximate='auto' chooses the approximate options itself; drop {given} (or "
                         "narrow the search with {'kind': 'auto', 'families': [...]})")


RULES: list[Callable[[Options], None]] = [
    _needs_calibration(lambda o: o.quantize is not None and o.quantize.mode in ("static", "mixed"),
                       "quantize='int8' (static activation scales) needs calibration data, or use "
                       "quantize='int8-dynamic'"),
    _needs_calibration(lambda o: o.quantize is not None and o.quantize.smooth is not None,
                       "quantize smooth (SmoothQuant) needs calibration data for the activation ranges"),
    _one_token_reduction,
    _needs_calibration(lambda o: o.approximate is not None,
                       "approximate='auto' searches within the accuracy budget on calibration data"),
    _auto_alone,
    _needs_calibration(lambda o: o.accuracy_budget is not None,
                       "accuracy_budget needs calibration data to be measured on"),
    _needs_calibration(lambda o: o.validation is not None and o.validation is not False,
                       "validation (held-out inputs) checks what the guards decided on calibration data"),
]

__all__ = ["Options", "KernelChoice", "AttentionConfig", "TokenConfig", "ShiftConfig", "QuantConfig", "AutoConfig",
           "METRICS", "PARSERS", "RULES", "PASS_NAMES", "check_parameters"]

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

import torch

METRICS = ("cosine", "top1")


def check_parameters(option: str, given: dict, valid, implicit=()) -> None:
    """ValueError naming the keys of an option's dict that are not among `valid` (nor `implicit`, keys such
    as 'kind' that select the form and are not listed as parameters)."""
    bad = sorted(set(given) - set(valid) - set(implicit))
    if bad:
        raise ValueError(f"{option} has no parameter(s) {bad}; valid: {list(valid)}")

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
    tuning: bool = True
    """Use the tuning database of this target (`effopt tune`, effopt.autotune) where it has measured
    faster schedules, tile sizes or GEMM kernels; False compiles with the default schedules."""
    freeze: bool = True
    """Treat parameters and buffers as constants (inference); a changed weight triggers a refreeze."""
    kernel_choice: KernelChoice = KernelChoice.MEASURE
    """'measure' keeps a TVM kernel only where it is measured faster than eager; 'tvm' always uses it."""
    disable_passes: tuple[str, ...] = field(default_factory=tuple)
    """Names of graph passes to skip: the exact passes (effopt.passes.PASSES) and the approximate ones
    ('tokens', 'attention', 'shift_add', 'quantize'; effopt.passes.GUARDED_ORDER)."""
    lower: bool = True
    """Lower to TVM at all; False runs the rewritten graph in eager PyTorch."""
    attention: Any = "exact"
    """'exact' (fused softmax attention, the default), or an approximate attention: 'hamming', 'linear',
    'lmul', or a dict {'kind': ..., parameters} (see effopt.passes.approximate.AttentionConfig)."""
    token_merge: Any = None
    """ToMe token merging: r (tokens merged per encoder block), a per-block list, or a dict {'r': ...,
    'inflect': -0.5 (decreasing schedule), 'proportional': True, 'protected': 1} (TokenConfig)."""
    token_prune: Any = None
    """EViT token pruning: a keep rate in (0, 1], or a dict {'keep_rate': 0.7, 'layers': [3, 6, 9],
    'protected': 1} (TokenConfig)."""
    shift_add: Any = None
    """Power-of-two weights on linear layers: 'mlp' (the MLP linears), 'all', or a dict {'layers': 'mlp'|'all',
    'terms': 1|2|3, 'activation_bits': 0 (float path)|8|4 (MatShift's integer path)} (ShiftConfig). Layers of
    an effopt.reparameterize'd model are converted without this option."""
    quantize: Any = None
    """Int8 post-training quantization of linear layers: 'int8' (activation scales calibrated on
    `calibration`, per tensor), 'int8-dynamic' (per token at run time), or a dict {'mode': 'static'|'dynamic',
    'layers': 'all'|'mlp'} (QuantConfig). Weights per output channel, symmetric; the GEMM runs in int8."""
    accuracy_budget: float | None = None
    """Largest allowed loss of `metric` against the original model on `calibration`; approximate rewrites
    that exceed it are rolled back layer by layer. Default with calibration data: 0.01."""
    calibration: Any = None
    """A list of example inputs (each a tuple of positional arguments, a dict of keyword arguments, or one
    tensor), with the same shapes as the inputs the model is compiled for."""
    validation: Any = None
    """Held-out inputs, in calibration's form, that the guards never decide on: after the approximate passes
    the loss against the original model is measured on them too (the report gives both), and where it
    exceeds the budget the passes run again with the guards' budget scaled down, until it holds or no
    approximate rewrite is left. Needs calibration. Default (None): with 4 or more calibration inputs, the
    last quarter of them is held out this way; False: the guards decide on all of them, nothing held out."""
    approximate: Any = None
    """'auto' (or {'kind': 'auto', 'families': [...], 'time_budget': '10m'}): search the approximate options
    of every family ('tokens', 'attention', 'shift_add', 'quantize') for the fastest compiled model within
    accuracy_budget on held-out inputs (effopt.auto.AutoConfig); needs calibration. The choice is stored,
    and a later compile of the same graph, target, budget and calibration applies it without searching."""
    metric: Any = "cosine"
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
        kw = dict(d)
        for b in ("strict", "cache", "freeze", "lower", "tuning"):
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
            from .passes import pass_names

            dp, names = kw["disable_passes"], pass_names()
            if isinstance(dp, str) or not all(isinstance(p, str) for p in dp):
                raise ValueError(f"disable_passes must be a list of pass names from {names}")
            bad = sorted(set(dp) - set(names))
            if bad:
                raise ValueError(f"unknown pass(es) {bad} in disable_passes; valid: {names}")
            kw["disable_passes"] = tuple(dp)
        if "attention" in kw:
            from .passes.approximate import AttentionConfig

            kw["attention"] = AttentionConfig.parse(kw["attention"])
        if kw.get("shift_add") is not None:
            from .passes.shift_add import ShiftConfig

            kw["shift_add"] = ShiftConfig.parse(kw["shift_add"])
        if kw.get("quantize") is not None:
            from .passes.quantize import QuantConfig

            kw["quantize"] = QuantConfig.parse(kw["quantize"])
            if kw["quantize"].mode in ("static", "mixed") and kw.get("calibration") is None:
                raise ValueError("quantize='int8' (static activation scales) needs calibration data: pass "
                                 "options={'calibration': [inputs, ...]}, or use quantize='int8-dynamic'")
            if kw["quantize"].smooth is not None and kw.get("calibration") is None:
                raise ValueError("quantize smooth (SmoothQuant) needs calibration data for the activation ranges: "
                                 "pass options={'calibration': [inputs, ...]}")
        if kw.get("token_merge") is not None and kw.get("token_prune") is not None:
            raise ValueError("token_merge and token_prune are alternatives; pass one of them")
        if kw.get("token_merge") is not None or kw.get("token_prune") is not None:
            from .passes.token_reduction import TokenConfig

            if kw.get("token_merge") is not None:
                kw["token_merge"] = TokenConfig.parse_merge(kw["token_merge"])
            else:
                kw["token_prune"] = TokenConfig.parse_prune(kw["token_prune"])
        if kw.get("approximate") is not None:
            from .auto import AutoConfig

            kw["approximate"] = AutoConfig.parse(kw["approximate"])
            if kw["approximate"] is not None and kw.get("calibration") is None:
                raise ValueError("approximate='auto' searches within the accuracy budget on calibration data: pass "
                                 "options={'calibration': [inputs, ...]} as well")
            given = [k for k in ("token_merge", "token_prune", "shift_add", "quantize") if kw.get(k) is not None]
            given += ["attention"] if str(kw.get("attention", "exact")) != "exact" else []
            if kw["approximate"] is not None and given:
                raise ValueError(f"approximate='auto' chooses the approximate options itself; drop {given} (or "
                                 "narrow the search with {'kind': 'auto', 'families': [...]})")
        if kw.get("metric", "cosine") not in METRICS and not callable(kw.get("metric")):
            raise ValueError(f"metric={kw['metric']!r} is invalid; valid: {list(METRICS)} or a callable "
                             "(reference_output, optimized_output) -> loss")
        budget = kw.get("accuracy_budget")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
                raise ValueError(f"accuracy_budget must be a number >= 0 (e.g. 0.01), got {budget!r}")
            if kw.get("calibration") is None:
                raise ValueError("accuracy_budget needs calibration data to be measured on: pass "
                                 "options={'calibration': [example inputs, ...]} as well")
        # validation=False: no automatic hold-out (the guards decide on every calibration input)
        given_validation = kw.get("validation") is not None and kw.get("validation") is not False
        if given_validation and kw.get("calibration") is None:
            raise ValueError("validation (held-out inputs) checks what the guards decided on calibration data: pass "
                             "options={'calibration': [inputs, ...]} as well")
        for name, given in (("calibration", kw.get("calibration") is not None), ("validation", given_validation)):
            if given:
                cal = kw[name]
                if isinstance(cal, (torch.Tensor, dict, str)) or not hasattr(cal, "__iter__"):
                    raise ValueError(f"{name} must be a list of example inputs (each a tuple of arguments, "
                                     f"a dict of keyword arguments or one tensor), got {type(cal).__name__}")
                kw[name] = list(cal)
                if not kw[name]:
                    raise ValueError(f"{name} is an empty list")
        if "target" in kw:
            from .autotune.targets import target_dict

            target_dict(kw["target"])  # raises ValueError naming the valid spellings
        return cls(**kw)

    def key(self) -> str:
        """The options that change compiled code, for cache keys."""
        from .autotune.targets import target_dict

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

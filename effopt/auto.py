"""`approximate="auto"`: the fastest combination of approximate options whose loss stays within the budget.

Each family (tokens, attention, shift/add, quantize) has a few candidate settings. Each is first run alone:
its guarded pass on the calibration inputs, then lowered and timed against the exact compile (interleaved
medians), taken round robin over the families so that a time budget that stops early has tried every
family. Those that are faster and within budget on the held-out inputs are ordered by their
latency gain per unit of loss, and added one at a time to the chosen set, each kept only where the whole
compiled model gets faster than the best so far (and the held-out loss still holds). The choice is stored
(per graph, target, budget, metric and calibration digest: the decision store beside the tuning database),
so a second compile applies it without searching. Every candidate tried is in `report.auto`, drawn as an
accuracy/latency scatter on the HTML page.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time

import torch

from .options.auto import FAMILIES, AutoConfig

# the settings tried per family (the option dicts they add)
# (the guards then keep or roll back each layer of a setting on its own; the per-layer settings retry a layer
# over budget in the next form: attention kinds in order, 1 -> 2 -> 3 shift terms, static -> dynamic int8)
CANDIDATES = {"tokens": [{"token_merge": 4}, {"token_merge": 8}, {"token_merge": {"r": 8, "inflect": -0.5}},
                         {"token_prune": 0.7}],
              "attention": [{"attention": "hamming"}, {"attention": "linear"}, {"attention": "lmul"},
                            {"attention": {"kind": "linear", "fallback": ["hamming", "lmul"]}}],
              "shift_add": [{"shift_add": "mlp"}, {"shift_add": {"layers": "mlp", "terms": "auto"}},
                            {"shift_add": {"layers": "all", "terms": "auto"}}],
              "quantize": [{"quantize": "int8-dynamic"}, {"quantize": "int8"}, {"quantize": {"mode": "mixed"}},
                           {"quantize": {"mode": "mixed", "smooth": 0.5}}]}
FASTER = 0.98  # a candidate is kept only where it takes at most this fraction of the best time so far
ALONE_SHARE = 0.7  # of the time budget, for trying the settings alone (the rest: combining them)


def digest(calibration, budget: float, metric) -> str:
    """The calibration inputs, budget and metric, as one key part."""
    h = hashlib.sha256(json.dumps([budget, str(metric)]).encode())
    for args in calibration or []:
        for a in args:
            if isinstance(a, torch.Tensor):
                h.update(str((a.dtype, tuple(a.shape))).encode())
                h.update(a.detach().contiguous().cpu().numpy().tobytes())
            else:
                h.update(repr(a).encode())
    return h.hexdigest()


def _label(settings: dict) -> str:
    return " + ".join(f"{k}={v}" for k, v in settings.items()) or "exact"


class Progress:
    """One line on stderr, rewritten per candidate (a plain line per step where stderr is not a terminal)."""

    def __init__(self, total: int):
        self.total, self.done, self.tty = total, 0, sys.stderr.isatty()

    def step(self, what: str) -> None:
        self.done += 1
        bar = "#" * int(20 * self.done / max(self.total, 1))
        line = f"effopt auto: [{bar:<20s}] {self.done}/{self.total} {what}"
        print(("\r" + line[:120].ljust(120)) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr,
              flush=True)

    def close(self) -> None:
        if self.tty:
            print(file=sys.stderr)


def search(evaluate, config: AutoConfig) -> dict:
    """The search. `evaluate(settings)` -> {"ms", "loss", "held_out", "within", "matches"} runs the options
    `settings` (a dict) through the guarded passes, lowers, and times the result against the exact compile
    in the same process ("ms" relative: the exact compile's time is 1.0 there). Returns {"chosen": settings,
    "candidates": [every evaluation, with its settings and figures]}."""
    t0 = time.perf_counter()
    # round robin over the families (each family's first setting, then each one's second, ...), so that a
    # time budget that stops the search early has still tried every family
    fams = config.families
    cands = [(f, CANDIDATES[f][i]) for i in range(max(len(CANDIDATES[f]) for f in fams)) for f in fams
             if i < len(CANDIDATES[f])]
    progress = Progress(len(cands) + max(len(config.families) - 1, 0))
    tried = []

    def run(settings: dict, stage: str) -> dict:
        r = dict(evaluate(settings), settings=settings, label=_label(settings), stage=stage)
        tried.append(r)
        progress.step(f"{r['label']}: {1 / r['ms']:.2f}x exact, loss {r['held_out']:.4g}")
        return r

    alone = []
    for fam, s in cands:
        if time.perf_counter() - t0 > ALONE_SHARE * config.time_budget_s:  # the rest is for combining
            break
        r = run(s, "alone")
        if r["matches"] and r["within"] and r["ms"] < FASTER:
            alone.append((fam, r))
    # best gain per unit of loss first; one setting per family (the first, best-ranked one that fits)
    alone.sort(key=lambda fr: -(1 - fr[1]["ms"]) / max(fr[1]["held_out"], 1e-6))
    chosen, best, used = {}, 1.0, set()
    first = next(iter(alone), None)
    if first is not None:
        chosen, best = dict(first[1]["settings"]), first[1]["ms"]
        used.add(first[0])
    for fam, r in alone[1:]:
        if fam in used or time.perf_counter() - t0 > config.time_budget_s:
            continue
        both = run({**chosen, **r["settings"]}, "combined")
        if both["within"] and both["ms"] < best * FASTER:
            chosen, best = dict(both["settings"]), both["ms"]
            used.add(fam)
    progress.close()
    return {"chosen": chosen, "candidates": tried, "seconds": time.perf_counter() - t0,
            "speedup_over_exact": 1 / best}


def with_settings(options, settings: dict):
    """`options` with the approximate options of `settings` (parsed as the backend options parse them)."""
    from .options import Options

    parsed = Options.from_dict({**settings, "calibration": [()]})  # static int8 needs calibration: the search has it
    return dataclasses.replace(options, attention=parsed.attention, token_merge=parsed.token_merge,
                               token_prune=parsed.token_prune, shift_add=parsed.shift_add, quantize=parsed.quantize,
                               approximate=None)


__all__ = ["AutoConfig", "CANDIDATES", "FAMILIES", "digest", "search", "with_settings"]

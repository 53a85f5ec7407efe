"""Interleaved median timing: every candidate runs once per round, so machine noise hits all alike."""
from __future__ import annotations

import statistics
import time


def interleaved_medians(fns: dict, args, rounds: int = 15, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call for each callable in `fns`, measured round-robin in one process."""
    for _ in range(warmup):
        for f in fns.values():
            f(*args)
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f(*args)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}

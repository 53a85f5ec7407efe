"""Interleaved median timing: every candidate runs in each round, so machine noise hits all alike.

Used both by the lowering stage (kernel choice at compile time) and by the benchmark and examples.
"""
from __future__ import annotations

import statistics
import time


def interleaved_medians(fns: dict, args, rounds: int = 15, warmup: int = 2, reps: int = 1,
                        budget_s: float | None = None, min_rounds: int = 3) -> dict[str, float]:
    """Median seconds per call for each callable in `fns`, measured round-robin in one process.

    Each round runs every candidate `reps` times back to back; with `budget_s`, rounds stop once that
    many seconds have passed and at least `min_rounds` are done."""
    for _ in range(warmup):
        for f in fns.values():
            f(*args)
    times = {k: [] for k in fns}
    start = time.perf_counter()
    for r in range(rounds):
        for k, f in fns.items():
            for _ in range(reps):
                t = time.perf_counter()
                f(*args)
                times[k].append(time.perf_counter() - t)
        if budget_s is not None and r + 1 >= min_rounds and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}


def merge_results(path: str, rows: list[dict], key) -> list[dict]:
    """Write benchmark `rows` to the JSON file `path`, keeping the rows of an earlier run whose `key(row)`
    this run did not measure (a benchmark run on a subset of models or options); returns all rows."""
    import json
    import os

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            done = {key(r) for r in rows}
            rows = [r for r in json.load(f) if key(r) not in done] + rows
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)
    return rows

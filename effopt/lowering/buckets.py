"""Per size bucket choices in a graph of symbolic sizes (one compiled graph serving every batch and length).

The choose step measures each region's forms (its TVM kernel, its torch ops, the float32 layers its rewritten
ops replaced) once, at the sizes of the request that compiled the graph. Where that was a close call (the best
form within MARGIN of the next), the region becomes a BucketedRegion: it holds every form and decides per size
bucket of the call it serves. The backend names the bucket of each call (`size_bucket`, a context variable):

- the first bucket it sees is the compile's: the compile-time choice, nothing measured;
- each other bucket takes the choice stored for it in the decision store by an earlier process, or times the
  forms once on the region's own arguments (3 interleaved rounds after one warm-up call each), keeps the
  fastest and stores it.

A region whose compile-time choice was clear keeps it for every bucket (an int8 GEMM 1.7x faster than its
float32 layer at 128 rows is not measured again at 4096).
"""
from __future__ import annotations

import contextlib
import contextvars

import torch

from ..timing import interleaved_medians

# a compile-time choice closer than this factor (best form against the next) is measured again per bucket
MARGIN = 1.25
_BUCKET: contextvars.ContextVar = contextvars.ContextVar("effopt_size_bucket", default=None)


@contextlib.contextmanager
def size_bucket(bucket: int | None):
    """Within the block, the regions of a compiled graph serve calls of this size bucket (None: no bucket,
    the compile-time choices)."""
    token = _BUCKET.set(bucket)
    try:
        yield
    finally:
        _BUCKET.reset(token)


def close_call(times_us: dict[str, float | None]) -> bool:
    """Whether the forms' compile-time times (microseconds, None where a form was not timed) leave the choice
    open: the fastest within MARGIN of the next."""
    t = sorted(v for v in times_us.values() if v is not None and v > 0)
    return len(t) >= 2 and t[1] <= t[0] * MARGIN


class BucketedRegion(torch.nn.Module):
    """A region that runs one of its `forms` ({"tvm" | "eager" | "float32": module}) per size bucket; `chosen`
    is the compile-time choice. `store` (a DecisionStore) and `key` keep the choices across processes."""

    def __init__(self, forms: dict[str, torch.nn.Module], chosen: str, store=None, key: str | None = None):
        super().__init__()
        self.forms = torch.nn.ModuleDict(forms)
        self.chosen, self.store, self.key = chosen, store, key
        self.decisions: dict[int, dict] = {}  # bucket -> {"form", "us": {form: microseconds}, "reused"}

    def forward(self, *args):
        bucket = _BUCKET.get()
        if bucket is None:
            return self.forms[self.chosen](*args)
        d = self.decisions.get(bucket)
        if d is None:
            d = self.decisions[bucket] = self._decide(bucket, args)
        return self.forms[d["form"]](*args)

    def _decide(self, bucket: int, args) -> dict:
        if not self.decisions:  # the call that compiled the graph: its sizes were measured then
            return {"form": self.chosen, "us": None, "reused": False}
        key = f"{self.key} rows <= {bucket}" if self.key else None
        saved = self.store.load("region_buckets").get(key) if self.store is not None and key else None
        if isinstance(saved, dict) and saved.get("form") in self.forms:
            return dict(saved, reused=True)
        with torch.no_grad():
            m = interleaved_medians(dict(self.forms.items()), args, rounds=3, warmup=1, min_rounds=3)
        d = {"form": min(m, key=m.get), "us": {k: v * 1e6 for k, v in m.items()}}
        if self.store is not None and key:
            self.store.save("region_buckets", {key: d})
        return dict(d, reused=False)

    def extra_repr(self) -> str:
        return f"per size bucket, compiled choice {self.chosen}"


__all__ = ["BucketedRegion", "MARGIN", "close_call", "size_bucket"]

"""The tuning database: one append-only JSON-lines file per target, crash-safe and shared by processes.

TVM's own JSONDatabase is not target-aware (a record tuned for one CPU is applied on another,
apache/tvm#15549) and its loader aborts on one bad line, so effopt keeps its own:

* **One file per target** under `<cache_dir>/tuning/`, named by a digest of the target's canonical form
  (TVM's `Target.export()`, every default filled in) and the effopt and TVM versions. Every line repeats
  the target digest and versions, so a record copied into another file is still never applied there.
* **Lines, not a document:** each record is one JSON object with its own SHA-256, appended under an
  exclusive file lock with one `write` and an fsync. A crash leaves at most one partial last line; a
  damaged line (truncated, flipped bytes, not JSON) is skipped with a warning and the rest is read. The
  file is never rewritten, so no fault loses the records already in it. Concurrent tuners lose nothing:
  each append happens under the lock, after a newline if the file ends in a partial line.
* **No pickle:** schedules are MetaSchedule traces in their JSON form; custom-kernel choices are dicts.
* The directory is created private to the user (0700), and one that other users can write is refused
  (tuning and compiling go on without the database, with a warning): see `lowering.cache.unsafe`.

Record kinds (`"type"`):

* `"trace"`: one measured MetaSchedule candidate of a TIR workload (its structural hash): the trace and
  the run times. All of them are kept: a resumed tuning run starts its search from the best.
* `"choice"`: the outcome for one task, written when its tuning ends: the default schedule's (and, for a
  GEMM, the library kernel's) latency, the tuned latency, measured side by side by the same runner, and
  whether the tuned schedule is used (only where it was measured faster). The newest choice wins.
* `"knobs"`: for effopt's hand-scheduled kernels (flash attention, int8 linear, shift linear), the
  measured latency of one setting of their tile sizes.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field

# 2: local measurements on torch's thread count (format 1 timed TVM candidates on one thread) and GEMM
# choices that may name the packed kernel; a format-1 database is not used
FORMAT = 2


def canonical_target(target) -> dict:
    """A target (tvm Target or JSON dict) with every default filled in, as plain JSON values."""
    import tvm

    t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)

    def plain(v):
        if isinstance(v, (bool, int, float, str)) or v is None:
            return v
        if hasattr(v, "items"):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, tvm.target.Target):
            return canonical_target(v)
        try:
            return [plain(x) for x in v]
        except TypeError:
            return str(v)

    return plain(t.export())


def versions() -> dict:
    import tvm

    from ..version import __version__

    return {"effopt": __version__, "tvm": tvm.__version__, "format": FORMAT}


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def workload_hash(func) -> str:
    """The structural hash of a PrimFunc (its name left out): the key its records are stored under."""
    import tvm
    import tvm_ffi

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")}) if isinstance(func, tvm.tirx.PrimFunc) \
        else func
    return f"{tvm_ffi.structural_hash(mod) & (2**64 - 1):016x}"


@dataclass
class TuningDatabase:
    """The records tuned for one target; `path` is its file. Reading never raises."""

    root: str
    target: dict
    path: str = ""
    skipped: int = 0  # damaged lines seen by the last read
    _cache: tuple | None = field(default=None, repr=False)

    def __post_init__(self):
        self.target = canonical_target(self.target)
        self.key = _digest({"target": self.target, "versions": versions()})[:24]
        self.path = os.path.join(self.root, "tuning", f"{self.key}.jsonl")

    @classmethod
    def open(cls, target, cache_dir: str | None = None) -> "TuningDatabase":
        from .cache import default_dir

        return cls(cache_dir or default_dir(), target)

    # ---- writing --------------------------------------------------------------------------------
    def append(self, records: list[dict]) -> bool:
        """Append records (dicts with a "type"); False (with a warning) where the file cannot be written."""
        from .cache import checked, file_lock

        if not records:
            return True
        if not checked(self.root):
            return False
        lines = []
        for r in records:
            body = dict(r, db=self.key, versions=versions())
            body["sha256"] = _digest(body)
            lines.append(json.dumps(body, sort_keys=True, separators=(",", ":")))
        data = ("\n".join(lines) + "\n").encode()
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            with file_lock(self.path):
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    size = os.fstat(fd).st_size
                    if size:  # a crashed writer may have left a partial line: start on a fresh one
                        with open(self.path, "rb") as f:
                            f.seek(size - 1)
                            if f.read(1) != b"\n":
                                data = b"\n" + data
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as e:
            warnings.warn(f"effopt: could not write the tuning database {self.path} ({e}); "
                          "the records of this run are not kept", RuntimeWarning)
            return False
        self._cache = None
        return True

    # ---- reading --------------------------------------------------------------------------------
    def records(self, kind: str | None = None) -> list[dict]:
        """Every valid record (of one type), oldest first; damaged lines are skipped with one warning."""
        from .cache import checked

        try:
            st = os.stat(self.path)
        except OSError:
            return []
        stamp = (st.st_size, st.st_mtime_ns)
        if self._cache is None or self._cache[0] != stamp:
            if not checked(self.root):
                return []
            self._cache = (stamp, self._read())
        recs = self._cache[1]
        return recs if kind is None else [r for r in recs if r.get("type") == kind]

    def _read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except OSError as e:
            warnings.warn(f"effopt: cannot read the tuning database {self.path} ({e}); tuning records not used",
                          RuntimeWarning)
            return []
        out, bad = [], []
        for i, line in enumerate(raw.split(b"\n")):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if not isinstance(r, dict):
                    raise ValueError("not an object")
                digest = r.pop("sha256", None)
                if digest != _digest(r):
                    raise ValueError("checksum mismatch")
            except (ValueError, UnicodeDecodeError) as e:
                bad.append((i + 1, str(e)[:80]))
                continue
            if r.get("db") != self.key or r.get("versions") != versions():
                continue  # another target's or version's record: never applied here
            out.append(r)
        self.skipped = len(bad)
        if bad:
            warnings.warn(f"effopt: skipped {len(bad)} damaged record(s) in the tuning database {self.path} "
                          f"(line {bad[0][0]}: {bad[0][1]}); the other {len(out)} are used", RuntimeWarning)
        return out

    # ---- queries ----------------------------------------------------------------------------------
    def traces(self, workload: str) -> list[dict]:
        """A workload's measured candidates, fastest first (failed builds and runs last)."""
        recs = [r for r in self.records("trace") if r.get("workload") == workload]
        return sorted(recs, key=lambda r: mean_seconds(r.get("run_secs")))

    def choices(self) -> dict[str, dict]:
        """The newest choice record per task key."""
        out = {}
        for r in self.records("choice"):
            out[r["task"]] = r
        return out

    def best_knobs(self, key: str) -> tuple[dict, float] | None:
        """The fastest measured tile setting of a custom kernel, if its tuning chose it over the default."""
        c = self.choices().get(key)
        if c is None or not c.get("use_tuned") or not isinstance(c.get("knobs"), dict):
            return None
        return c["knobs"], c.get("tuned_us")

    def digest(self) -> str:
        """What compiles depend on (the choices): part of the kernel cache key."""
        return _digest(sorted(self.choices().items()))[:16]


def mean_seconds(run_secs) -> float:
    """A record's mean run time; inf for a failed measurement (MetaSchedule writes 1e10 there)."""
    try:
        vals = [float(s) for s in run_secs]
    except (TypeError, ValueError):
        return float("inf")
    if not vals or any(v >= 1e9 or v != v for v in vals):
        return float("inf")
    return sum(vals) / len(vals)

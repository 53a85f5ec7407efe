"""Tuned schedules at compile time: what the lowering stage takes from the tuning database.

* TIR kernels: a PrimFunc whose structural hash has a choice with `use_tuned` gets that choice's
  trace replayed on it (a pass before effopt's default schedules, which then leave it alone).
* Hand-scheduled kernels: `knobs(task)` gives their tile setting (kernels/tunable.py).
* GEMMs: `gemm(m, n, k, bias)` says whether a tuned TIR matmul beat the library for that shape.
A record that no longer replays (another TVM build, a changed kernel) is skipped with a warning.
"""
from __future__ import annotations

import warnings

import torch

from .tuning_db import TuningDatabase, workload_hash


def normalized(func):
    """{"main": func}, the module MetaSchedule tunes and the database keys."""
    import tvm

    return tvm.IRModule({"main": func.with_attr("global_symbol", "main")})


def gemm_func(m: int, n: int, k: int, bias: bool):
    """y[M, N] = x[M, K] @ w[N, K]^T (+ b[N]) in float32, as TE writes it: the GEMM task's workload."""
    from tvm import te

    x = te.placeholder((m, k), "float32", name="x")
    w = te.placeholder((n, k), "float32", name="w")
    r = te.reduce_axis((0, k), name="r")
    y = te.compute((m, n), lambda i, j: te.sum(x[i, r] * w[j, r], axis=r), name="matmul")
    args = [x, w]
    if bias:
        b = te.placeholder((n,), "float32", name="b")
        y = te.compute((m, n), lambda i, j: y[i, j] + b[j], name="bias_add")
        args.append(b)
    return te.create_prim_func([*args, y])


def gemm_key(m: int, n: int, k: int, bias: bool) -> str:
    return f"gemm:{m}x{n}x{k}" + ("+bias" if bias else "")


def gemm_parts(gm, node):
    """(x node, weight [N, K], bias node or None, (M, N, K, has_bias)) for a frozen-weight float32 linear
    (addmm/mm) of static shape, the GEMMs tuning covers and a compile may replace; else None."""
    from .library import linear_parts

    parts = linear_parts(gm, node) if node.op == "call_function" else None
    if parts is None:
        return None
    x, w, b = parts
    xv = x.meta.get("val")
    if xv is None or xv.dtype != torch.float32 or w.dtype != torch.float32 or xv.dim() != 2 or \
            not all(isinstance(s, int) for s in xv.shape):
        return None
    return x, w, b, (int(xv.shape[0]), int(w.shape[0]), int(w.shape[1]), b is not None)


def apply_trace(mod, trace_json, target):
    """{"main": func} with a MetaSchedule trace (JSON form) replayed on it; marked scheduled."""
    import tvm
    from tvm.s_tir import Schedule
    from tvm.s_tir.schedule import Trace

    sch = Schedule(tvm.IRModule({"main": mod["main"].with_attr("global_symbol", "main")}))
    with target:
        Trace.apply_json_to_schedule(trace_json, sch)
    return tvm.IRModule({"main": sch.mod["main"].with_attr("tirx.is_scheduled", True)})


class TunedSchedules:
    def __init__(self, db: TuningDatabase):
        self.db = db
        self.choices = {k: c for k, c in db.choices().items() if c.get("use_tuned")}
        self.applied: list[dict] = []  # {"kernel", "task", "default_us", "tuned_us"} per replaced PrimFunc

    @classmethod
    def for_target(cls, target: dict, cache_dir: str | None) -> "TunedSchedules | None":
        """The tuned choices for `target` (None where the database has none)."""
        import os

        db = TuningDatabase.open(target, cache_dir)
        if not os.path.exists(db.path):
            return None
        tuned = cls(db)
        return tuned if tuned.choices else None

    def digest(self) -> str:
        return self.db.digest()

    def knobs(self, task) -> dict | None:
        c = self.choices.get(task.key)
        return dict(c["knobs"]) if c and isinstance(c.get("knobs"), dict) and c["knobs"] in task.space else None

    def gemm(self, m: int, n: int, k: int, bias: bool) -> dict | None:
        return self.choices.get(gemm_key(m, n, k, bias))

    def as_pass(self, target):
        import tvm

        @tvm.transform.module_pass(opt_level=0, name="EffoptApplyTuned")
        def _pass(mod, ctx):
            for gv, f in list(mod.functions_items()):
                if not isinstance(f, tvm.tirx.PrimFunc) or (f.attrs is not None and f.attrs.get("tirx.is_scheduled")):
                    continue
                key = "tir:" + workload_hash(f)
                c = self.choices.get(key)
                if c is None or not c.get("best"):
                    continue
                try:
                    new = apply_trace(tvm.IRModule({"main": f}), c["best"], target)["main"]
                except Exception as e:  # noqa: BLE001 - TVM's errors
                    warnings.warn(f"effopt: tuned schedule for {gv.name_hint} ({key}) does not replay ({e}); "
                                  "using the default schedule", RuntimeWarning)
                    continue
                attrs = dict(f.attrs) if f.attrs is not None else {}
                new = new.without_attr("global_symbol")
                if "global_symbol" in attrs:
                    new = new.with_attr("global_symbol", attrs["global_symbol"])
                mod[gv] = new
                self.applied.append({"kernel": gv.name_hint, "task": key, "default_us": c.get("default_us"),
                                     "tuned_us": c.get("tuned_us")})
            return mod

        return _pass


class TunedLinear(torch.nn.Module):
    """A frozen-weight linear on a tuned TIR kernel: y = x @ w^T (+ b), called through DLPack. `weight`
    and `bias` are what the kernel takes: [N, K] and [N] (a MetaSchedule-tuned matmul), or packed
    [N/16, K, 16] and padded (effopt's packed kernel, which always takes a bias)."""

    def __init__(self, fn, weight, bias, shape, k: int, packed: dict | None = None):
        super().__init__()
        self.fn, self.shape, self.k, self.packed = fn, shape, k, packed
        self.register_buffer("weight", weight.contiguous(), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.contiguous(), persistent=False)

    def forward(self, x):
        from .runtime import compact

        y = torch.empty(self.shape[0], self.shape[1], dtype=x.dtype)
        args = [compact(x), self.weight] + ([self.bias] if self.bias is not None else [])
        self.fn(*args, y)
        return y

    @classmethod
    def for_choice(cls, c: dict, fn, weight, bias, m: int, n: int, k: int) -> "TunedLinear":
        """The module for a GEMM choice's kernel `fn` (build_tuned_gemm), on the model's weight [N, K] and
        bias: packed and padded where the choice is the packed kernel."""
        from .kernels import gemm as packed_gemm

        if c.get("packed"):
            weight, bias = packed_gemm.pack_weight(weight), packed_gemm.pad_bias(bias, n)
        return cls(fn, weight, bias, (m, n), k, c.get("packed"))

    def extra_repr(self):
        from .kernels import gemm as packed_gemm

        how = packed_gemm.describe(self.packed) if self.packed else "MetaSchedule schedule"
        return f"tuned TIR matmul {self.shape[0]}x{self.shape[1]}x{self.k} ({how})"


def _gemm_module(c: dict, m: int, n: int, k: int, bias: bool, target):
    """The tuned kernel of a GEMM choice: effopt's packed kernel with its tiles, or the matmul with its trace."""
    from .kernels import gemm as packed_gemm
    if c.get("packed"):
        return normalized(packed_gemm.linear_func(m, n, k, **c["packed"], unit=packed_gemm.unit_of(target)))
    return apply_trace(normalized(gemm_func(m, n, k, bias)), c["best"], target)


def build_tuned_gemm(c: dict, m: int, n: int, k: int, bias: bool, target, root: str):
    """The tuned kernel of a GEMM choice, compiled into `<root>/runtime` (once per kernel; later compiles
    load it) with its parallel loops on torch's threads, as a callable (x, weight, bias, y)."""
    import os

    import tvm

    from . import threads
    from .cache import checked, make_key

    mod = _gemm_module(c, m, n, k, bias, target)
    path = os.path.join(root, "runtime", f"gemm-{make_key(mod.script())[:24]}.so")
    if not os.path.exists(path):
        if not checked(root):
            raise RuntimeError(f"cache directory {root} refused")
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        tvm.compile(mod, target=target).export_library(tmp)
        os.replace(tmp, path)
    lib = tvm.runtime.load_module(path)
    launch = threads.launcher(os.path.join(root, "runtime"))
    if launch is not None:
        threads.attach(path, launch)
    return lib["main"]


def use_tuned_gemms(gm, tuned: TunedSchedules, target) -> list[dict]:
    """Replace frozen-weight float32 linears (addmm/mm) whose shape has a tuned TIR matmul that tuning
    measured faster than the library kernel with calls of that kernel; returns one record per shape."""
    if not any(k.startswith("gemm:") for k in tuned.choices):
        return []
    built: dict = {}
    records = []
    for node in list(gm.graph.nodes):
        parts = gemm_parts(gm, node)
        if parts is None:
            continue
        x, w, b, key = parts
        m, n, k, _ = key
        c = tuned.gemm(*key)
        if c is None or not (c.get("best") or c.get("packed")):
            continue
        if key not in built:
            try:
                built[key] = build_tuned_gemm(c, *key, target, tuned.db.root)
            except Exception as e:  # noqa: BLE001 - keep the library kernel
                warnings.warn(f"effopt: tuned GEMM {m}x{n}x{k} could not be built ({e}); using the library kernel",
                              RuntimeWarning)
                built[key] = None
        if built[key] is None:
            continue
        name = f"tuned_linear_{len(records)}"
        bias = getattr(gm, b.target) if b is not None else None
        setattr(gm, name, TunedLinear.for_choice(c, built[key], w, bias, m, n, k))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (x,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        records.append({"kernel": f"linear {m}x{n}x{k}", "task": gemm_key(*key),
                        "kind": "gemm", "default_us": c.get("library_us"), "tuned_us": c.get("tuned_us")})
    if records:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return records


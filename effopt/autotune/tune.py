"""`effopt.autotune`: tune every kernel of a model for a target, into the persistent tuning database.

For each task (tasks.py), heaviest first (runs per forward x FLOPs):

* `tir` and `gemm`: MetaSchedule's evolutionary search with its XGBoost cost model, in rounds of
  `trials_per_round` candidates; each round's measured records are appended to the database at once,
  so an interrupted run loses at most the round in flight, and a second run resumes: the trials already
  in the database count against the task's budget and seed the search. A task's share of `trials` is
  proportional to its weight x FLOPs (at least one round).
* `knobs` (effopt's hand-scheduled kernels): every tile setting in the kernel's space, measured once;
  these come first. With a time budget, each search gets the share of the time left that its trials
  have of the trials left (time a task does not use passes on), so a short budget still reaches every task.

Then the default schedule (effopt's, as an untuned compile uses) and the best tuned one are built and
measured side by side by the same runner (local, or the remote device over RPC), interleaved; for a GEMM
on a CPU with AVX-512, AVX2 + FMA or NEON, so is every tile setting of effopt's packed kernel (lowering/kernels/gemm.py: register
tiles over weights packed at compile time), and the faster of it and MetaSchedule's schedule is the tuned
candidate; the library kernel (torch's addmm on MKL, or oneDNN) is timed too, on this machine only. Local
measurements run each kernel on torch's thread count, as a compiled model runs it. The tuned schedule is chosen
only where it was measured faster than each of them (by more than 3%, measurement noise); that choice is written to the database, and every
later compile for this target (`torch.compile(model, backend="effopt")`) applies it.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

# a tuned kernel must beat the default (and the library) by more than measurement noise to be used
MARGIN = 0.97

log = logging.getLogger("effopt.tune")  # EFFOPT_LOG=tune prints each task's outcome


@dataclass
class TaskResult:
    key: str
    kind: str
    name: str
    weight: int
    flops: float
    trials: int = 0
    default_us: float | None = None
    tuned_us: float | None = None
    library_us: float | None = None
    use_tuned: bool = False
    note: str = ""

    @property
    def gflops(self) -> float | None:
        best = self.tuned_us if self.use_tuned else (self.library_us or self.default_us)
        return self.flops / best / 1e3 if best and self.flops else None


@dataclass
class TuneReport:
    target: dict
    database: str
    results: list[TaskResult] = field(default_factory=list)
    skipped: list = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = ""  # why tuning stopped early ("time budget", "interrupted"), or ""
    compile_only: bool = False
    records_written: int = 0  # measured candidates this run added to the database

    def to_json(self) -> dict:
        return {"target": self.target, "database": self.database, "seconds": self.seconds, "stopped": self.stopped,
                "compile_only": self.compile_only, "skipped": self.skipped, "records_written": self.records_written,
                "results": [dict(asdict(r), gflops=r.gflops) for r in self.results]}

    def __str__(self) -> str:
        return format_table(self.results, self.target, self.database, self.seconds, self.stopped, self.compile_only)


def _fmt(us):
    return f"{us:9.1f}" if isinstance(us, (int, float)) else f"{'-':>9}"


def format_table(results, target, database, seconds=0.0, stopped="", compile_only=False) -> str:
    lines = [f"tuning for {target.get('kind')} {target.get('mcpu', target.get('arch', ''))}: {len(results)} tasks, "
             f"database {database}" + (f", {seconds:.0f} s" if seconds else "") + (f" (stopped: {stopped})" if stopped else ""),
             f"{'kernel':34} {'kind':5} {'runs':>4} {'trials':>6} {'default us':>10} {'tuned us':>9} {'library us':>10} "
             f"{'GFLOPS':>7}  used"]
    for r in results:
        used = ("compiled" if compile_only and not r.note.startswith("failed") else
                "tuned" if r.use_tuned else ("library" if r.kind == "gemm" else "default"))
        g = f"{r.gflops:7.1f}" if r.gflops else f"{'-':>7}"
        lines.append(f"{r.name[:34]:34} {r.kind:5} {r.weight:4d} {r.trials:6d} {_fmt(r.default_us)} {_fmt(r.tuned_us)[-9:]} "
                     f"{_fmt(r.library_us):>10} {g}  {used}" + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr: trials done, ETA, the current task and its best latency."""

    def __init__(self, total: int, enabled: bool = True, stream=None):
        self.total, self.done, self.t0 = max(total, 1), 0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def update(self, n: int, task: str, best_us: float | None, default_us: float | None = None) -> str:
        self.done += n
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done) if self.done else float("nan")
        frac = min(1.0, self.done / self.total)
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        best = f"best {best_us:.1f} us" if best_us and math.isfinite(best_us) else "best -"
        line = (f"[{bar}] {self.done}/{self.total} trials  {_clock(el)} elapsed, ETA {_clock(eta)}  "
                f"{task[:28]}: {best}" + (f" (default {default_us:.1f})" if default_us else ""))
        if self.enabled:
            self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
            self.stream.flush()
        return line

    def close(self):
        if self.enabled and self.tty:
            self.stream.write("\n")


def _clock(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def tuning_target(target, rpc: bool) -> dict:
    """The target dict to tune for: 'host', a named target or a JSON dict; a CPU target without
    'num-cores' gets this machine's physical cores (MetaSchedule needs them), unless measured remotely; a
    CUDA target without block limits gets CUDA's (CUDA_LIMITS)."""
    from ..target import physical_cores as _physical_cores, target_dict

    d = target_dict(target)
    if d.get("kind") == "llvm" and "num-cores" not in d:
        if rpc:
            raise ValueError("a CPU target tuned over RPC needs 'num-cores' (the remote device's physical cores), "
                             "e.g. {\"kind\": \"llvm\", \"mcpu\": \"znver4\", \"num-cores\": 8}")
        d["num-cores"] = _physical_cores()
    if d.get("kind") == "cuda":  # MetaSchedule's GPU rules need the block limits (every CUDA GPU since sm_20)
        for k, v in CUDA_LIMITS.items():
            d.setdefault(k, v)
    return d


CUDA_LIMITS = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 49152}


def _quiet_meta_schedule():
    """MetaSchedule logs every round at INFO (and XGBoost at DEBUG); effopt's progress bar replaces them."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("tvm.s_tir.meta_schedule"):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)


def _plain(obj):
    """TVM's JSON values (IntImm, FloatImm, Array, Map) as Python JSON."""
    return json.loads(json.dumps(obj, default=lambda v: v.value if hasattr(v, "value") else
                                 (list(v) if hasattr(v, "__iter__") else str(v))))


class Tuner:
    def __init__(self, target: dict, db, run, trials_per_round: int, deadline: float | None, progress: Progress):
        import tvm

        self.target_dict, self.db, self.run = target, db, run
        self.target = tvm.target.Target(target)
        self.per_round, self.deadline, self.progress = trials_per_round, deadline, progress
        self.cost_models: dict = {}
        self.remeasure = False  # compare default and tuned again even where nothing changed (a busy machine)
        self.written = 0  # trace records this run appended

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() >= self.deadline

    # ---- MetaSchedule search ------------------------------------------------------------------------
    def _round(self, task, n: int, stored: list[dict]) -> list[dict]:
        from tvm.s_tir import meta_schedule as ms

        from .measure import builder, physical_cores

        mem = ms.database.MemoryDatabase()
        wl = mem.commit_workload(task.mod)
        seen = set()
        for r in stored:
            try:
                mem.commit_tuning_record(ms.database.TuningRecord.from_json(r["record"], wl))
                seen.add(json.dumps(r["record"][0], sort_keys=True))
            except Exception:  # noqa: BLE001 - a record this TVM cannot replay: not a seed
                continue
        cores = physical_cores()
        if task.key not in self.cost_models:
            self.cost_models[task.key] = ms.cost_model.XGBModel(num_tuning_cores=cores, verbose_eval=1000)
        # a small population keeps the evolutionary step to seconds on a small machine
        strategy = ms.search_strategy.EvolutionarySearch(population_size=128 if cores <= 4 else 512,
                                                         init_min_unmeasured=16, genetic_num_iters=3)
        with tempfile.TemporaryDirectory(prefix="effopt-tune-") as work_dir:
            _quiet_meta_schedule()
            ms.tune_tir(task.mod, self.target, work_dir, max_trials_global=n, num_trials_per_iter=n,
                        builder=builder(), runner=self.run, database=mem, cost_model=self.cost_models[task.key],
                        strategy=strategy, task_scheduler="round-robin", num_tuning_cores=cores)
        new = []
        for rec in mem.get_all_tuning_records():
            j = _plain(rec.as_json())
            if json.dumps(j[0], sort_keys=True) in seen:
                continue
            new.append({"type": "trace", "task": task.key, "workload": task.key.split(":", 1)[1] if task.kind == "tir"
                        else task.key, "record": j, "run_secs": j[1]})
        return new

    def search(self, task, budget: int, until: float | None = None) -> int:
        """Rounds of MetaSchedule search until the task's stored trials reach `budget`; returns the trials."""
        from ..lowering.tuning_db import mean_seconds

        wkey = task.workload or task.key
        done = len(self.db.traces(wkey))  # trials of earlier runs count: a second run resumes
        while done < budget and not self.out_of_time() and (until is None or time.perf_counter() < until):
            n = min(self.per_round, budget - done)
            stored = self.db.traces(wkey)
            new = self._round(task, n, stored)
            if self.db.append(new):
                self.written += len(new)
            done += n  # trials spent (MetaSchedule may measure fewer candidates than asked for)
            best = min((mean_seconds(r["run_secs"]) for r in self.db.traces(wkey)), default=float("inf"))
            self.progress.update(n, task.name, best * 1e6)
        return max(done, len(self.db.traces(wkey)))

    # ---- comparisons ------------------------------------------------------------------------------
    def default_module(self, task):
        import tvm

        from ..lowering.schedules import default_schedule_pass

        return default_schedule_pass(self.target)(tvm.IRModule({"main": task.mod["main"]}))

    def finish_search_task(self, task, trials: int, local: bool) -> TaskResult:
        from ..lowering.kernels import gemm as packed_gemm
        from ..lowering.tuned import apply_trace
        from ..lowering.tuning_db import mean_seconds
        from .measure import measure
        from ..lowering.tuned import normalized

        res = TaskResult(task.key, task.kind, task.name, task.weight, task.flops, trials)
        traces = [r for r in self.db.traces(task.workload or task.key) if math.isfinite(mean_seconds(r["run_secs"]))]
        packed = _packed_space(task, self.target)
        prev = None if self.remeasure else self.db.choices().get(task.key)
        if prev is not None and prev.get("trials") == trials and prev.get("best") == (traces[0]["record"][0] if traces else None) \
                and (not packed or "packed" in prev):
            return result_from_choice(res, prev)  # nothing new since the last comparison
        mods, names = [self.default_module(task)], ["default"]
        if traces:
            try:
                mods.append(apply_trace(task.mod, traces[0]["record"][0], self.target))
                names.append("tuned")
            except Exception as e:  # noqa: BLE001
                res.note = f"best trace does not replay: {str(e)[:80]}"
        tile_names = [json.dumps(t, sort_keys=True) for t in packed]
        if packed:  # effopt's register-tiled kernel over packed weights, each tile setting (kernels/gemm.py)
            m, n, k, _ = task.gemm
            unit = packed_gemm.unit_of(self.target)
            mods += [normalized(packed_gemm.linear_func(m, n, k, **t, unit=unit)) for t in packed]
            names += tile_names
        lib_before = _library_us(*task.gemm) if task.kind == "gemm" and local else None
        us = dict(zip(names, measure(mods, self.target, self.run)))
        res.default_us, res.tuned_us = us.get("default"), us.get("tuned")
        tile = None
        if packed:
            best_us, best = min(((us[nm], t) for nm, t in zip(tile_names, packed) if us.get(nm)),
                                key=lambda d: d[0], default=(None, None))
            self.progress.update(0, task.name, best_us, res.default_us)
            if best is not None and (res.tuned_us is None or best_us < res.tuned_us):
                res.tuned_us, tile = best_us, best
                res.note = packed_gemm.describe(tile)
        if task.kind == "gemm":
            if local:  # timed before and after the TVM kernels, the better kept: load in between cannot favour TVM
                res.library_us = min(lib_before, _library_us(*task.gemm))
            else:
                res.note = "library kernel not timed on the remote device: kept"
        rivals = [v for v in (res.default_us, res.library_us) if v is not None]
        res.use_tuned = bool(res.tuned_us is not None and rivals and res.tuned_us < MARGIN * min(rivals)
                             and not (task.kind == "gemm" and not local))
        if not traces and tile is None:
            res.note = res.note or "no candidate built and ran"
        self.db.append([{"type": "choice", "task": task.key, "kind": task.kind, "name": task.name,
                         "trials": trials, "best": traces[0]["record"][0] if traces else None,
                         **({"packed": tile, "packed_measured": {nm: us.get(nm) for nm in tile_names}} if packed else {}),
                         "default_us": res.default_us, "tuned_us": res.tuned_us, "library_us": res.library_us,
                         "use_tuned": res.use_tuned, "flops": task.flops, "gemm": task.gemm, "weight": task.weight}])
        return res

    def knobs(self, task) -> TaskResult:
        import tvm

        from .measure import measure, tensor_infos

        k = task.knob
        res = TaskResult(task.key, task.kind, task.name, task.weight, task.flops, len(k.space))
        prev = None if self.remeasure else self.db.choices().get(task.key)
        if prev is not None and prev.get("trials") == len(k.space):
            return result_from_choice(res, prev)
        mods = [tvm.IRModule({"main": k.make(kn).with_attr("global_symbol", "main")}) for kn in k.space]
        us = measure(mods, self.target, self.run, args_info=tensor_infos(k.shapes))
        self.progress.update(len(k.space), task.name, min((u for u in us if u), default=None), us[0])
        ok = [(u, i) for i, u in enumerate(us) if u is not None]
        if not ok:
            res.note = "no setting built and ran"
            return res
        best_us, best = min(ok)
        res.default_us, res.tuned_us = us[0], best_us
        res.use_tuned = best != 0 and us[0] is not None and best_us < MARGIN * us[0]
        res.note = f"tiles {k.space[best]}"
        self.db.append([{"type": "choice", "task": task.key, "kind": "knobs", "name": task.name,
                         "weight": task.weight, "trials": len(k.space), "knobs": k.space[best], "default_us": us[0], "tuned_us": best_us,
                         "use_tuned": res.use_tuned, "measured": {json.dumps(kn, sort_keys=True): u
                                                                  for kn, u in zip(k.space, us)}}])
        return res


def result_from_choice(res: TaskResult, c: dict) -> TaskResult:
    res.default_us, res.tuned_us, res.library_us = c.get("default_us"), c.get("tuned_us"), c.get("library_us")
    res.use_tuned = bool(c.get("use_tuned"))
    from ..lowering.kernels import gemm as packed_gemm

    res.note = (packed_gemm.describe(c["packed"]) if c.get("packed") else
                f"tiles {c['knobs']}" if c.get("knobs") else "")
    return res


def _packed_space(task, target) -> list[dict]:
    """The packed GEMM kernel's tile settings for a GEMM task on a target that can run it, else []."""
    if task.kind != "gemm":
        return []
    from ..lowering.kernels import gemm as packed_gemm

    if packed_gemm.supported(target) is not None:
        return []
    m, n, _, _ = task.gemm
    return packed_gemm.space(m, n, packed_gemm.unit_of(target))


def library_linears(w: torch.Tensor, b: torch.Tensor | None) -> dict:
    """The library kernels the lowering stage picks between for x @ w^T (+ b) (w [N, K]): torch's addmm
    (mm) on MKL, and oneDNN's linear where torch has it; name -> callable(x)."""
    from ..lowering.library import onednn_supported

    wkn = w.t().contiguous()
    fns = {"mkl": (lambda x_: torch.addmm(b, x_, wkn)) if b is not None else (lambda x_: torch.mm(x_, wkn))}
    if onednn_supported():
        fns["onednn"] = lambda x_: torch.ops.mkldnn._linear_pointwise(x_, w, b, "none", [], "")
    return fns


def _library_us(m: int, n: int, k: int, bias: bool) -> float:
    """The faster library kernel on this machine (MKL or oneDNN, as the lowering stage picks per shape),
    median of interleaved rounds."""
    from ..timing import interleaved_medians

    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g) for s in ((m, k), (n, k), (n,)))
    fns = library_linears(w, b if bias else None)
    return min(interleaved_medians(fns, [x], rounds=15, reps=5).values()) * 1e6


def _allocate(tasks, trials: int, per_round: int) -> dict[str, int]:
    """Each search task's trial budget: `trials` split by weight x FLOPs, at least one round each."""
    search = [t for t in tasks if t.kind in ("tir", "gemm")]
    cost = {t.key: t.weight * max(t.flops, 1e3) for t in search}
    total = sum(cost.values()) or 1.0
    return {t.key: max(per_round, int(round(trials * cost[t.key] / total / per_round)) * per_round) for t in search}


def autotune(model: torch.nn.Module, example_inputs, target="host", trials: int = 500, time_budget: float | None = None,
             rpc_tracker: str | None = None, rpc_key: str | None = None, cache_dir: str | None = None,
             options: dict | None = None, kinds=("tir", "gemm", "knobs"), trials_per_round: int = 8,
             progress: bool = True, stream=None, remeasure: bool = False) -> TuneReport:
    """Tune every kernel `model` compiles to (with the backend's `options`) for `target` ('host', 'llvm',
    'cuda', or a TVM JSON target dict), `trials` MetaSchedule trials in all and at most `time_budget`
    seconds; measured locally, or on a device registered with the TVM RPC tracker `rpc_tracker`
    ("host:port") under `rpc_key`. Records go to the tuning database of that target (in `cache_dir`, by
    default effopt's cache), which later compiles for the same target use. A CUDA target without a GPU
    here (and no RPC) is compile-checked only: every task's default and MetaSchedule candidates are built
    with TVM's CUDA code generator, nothing is measured or written. Returns a TuneReport."""
    from ..lowering.cache import default_dir
    from ..lowering.tuning_db import TuningDatabase
    from .measure import load_tensor_intrinsics, runner
    from .tasks import extract_tasks

    t0 = time.perf_counter()
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 0:
        raise ValueError(f"trials must be an int >= 0, got {trials!r}")
    if time_budget is not None and not (isinstance(time_budget, (int, float)) and time_budget > 0):
        raise ValueError(f"time_budget must be a number of seconds > 0, got {time_budget!r}")
    bad = sorted(set(kinds) - {"tir", "gemm", "knobs"})
    if bad:
        raise ValueError(f"unknown task kind(s) {bad}; valid: ['tir', 'gemm', 'knobs']")
    if (rpc_tracker is None) != (rpc_key is None):
        raise ValueError("rpc_tracker and rpc_key go together: the tracker's host:port and the device key")
    tdict = tuning_target(target, rpc_tracker is not None)
    import tvm

    tvm_target = tvm.target.Target(tdict)
    kind = tvm_target.kind.name
    load_tensor_intrinsics(kind)
    db = TuningDatabase(cache_dir or default_dir(), tdict)
    ext = extract_tasks(model, example_inputs, tvm_target, dict(options or {}, cache_dir=cache_dir), tdict)
    # the hand-scheduled kernels first (a fixed, small number of measurements), then the searches, heaviest first
    tasks = sorted((t for t in ext.tasks if t.kind in kinds), key=lambda t: t.kind != "knobs")
    report = TuneReport(db.target, db.path, skipped=ext.skipped)
    has_gpu = kind == "cuda" and torch.cuda.is_available()
    if kind != "llvm" and rpc_tracker is None and not has_gpu:
        report.compile_only = True
        report.results = _compile_only(tasks, tvm_target, min(trials, 8))
        report.seconds = time.perf_counter() - t0
        return report
    budgets = _allocate(tasks, trials, trials_per_round)
    knob_trials = sum(len(t.knob.space) for t in tasks if t.kind == "knobs")
    prog = Progress(sum(budgets.values()) + knob_trials, progress, stream)
    deadline = t0 + time_budget if time_budget else None
    tuner = Tuner(tdict, db, runner(rpc_tracker, rpc_key), trials_per_round, deadline, prog)
    tuner.remeasure = remeasure
    local = rpc_tracker is None
    try:
        for task in tasks:
            if tuner.out_of_time():
                report.stopped = "time budget"
            if task.kind == "knobs":
                if report.stopped:
                    report.results.append(TaskResult(task.key, task.kind, task.name, task.weight, task.flops,
                                                      note="not tuned: time budget"))
                    continue
                report.results.append(tuner.knobs(task))
                continue
            until = None
            if deadline is not None:  # a time budget is shared like the trials: each search gets its share
                left = sum(budgets[t.key] for t in tasks[tasks.index(task):] if t.kind != "knobs")
                until = time.perf_counter() + (deadline - time.perf_counter()) * budgets[task.key] / max(left, 1)
            n = tuner.search(task, budgets[task.key], until)
            if tuner.out_of_time() and n < budgets[task.key]:
                report.stopped = "time budget"
            res = tuner.finish_search_task(task, n, local)
            if n < budgets[task.key]:
                res.note = (res.note + "; " if res.note else "") + f"time budget: {n} of {budgets[task.key]} trials"
            report.results.append(res)
    except KeyboardInterrupt:
        report.stopped = "interrupted (the records measured so far are kept; run again to resume)"
    finally:
        prog.close()
        report.records_written = tuner.written
    report.seconds = time.perf_counter() - t0
    log.info("%s", report)
    return report


def _compile_only(tasks, target, candidates: int) -> list[TaskResult]:
    """Build each TIR task for a target that cannot run here: its default schedule and up to
    `candidates` MetaSchedule samples of its design space."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from ..lowering.schedules import default_schedule_pass
    from .measure import compile_only

    out = []
    for task in tasks:
        res = TaskResult(task.key, task.kind, task.name, task.weight, task.flops)
        if task.kind == "knobs":
            res.note = "skipped: a CPU kernel"
            out.append(res)
            continue
        mods = [default_schedule_pass(target)(tvm.IRModule({"main": task.mod["main"]}))]
        try:
            ctx = ms.TuneContext(mod=task.mod, target=target, space_generator="post-order-apply",
                                 search_strategy="replay-trace", task_name=task.name, num_threads=1)
            for sch in ctx.generate_design_space()[:candidates]:
                mods.append(sch.mod)
        except Exception as e:  # noqa: BLE001
            res.note = f"no design space: {str(e)[:80]}"
        errors = compile_only(mods, target)
        res.trials = len(mods) - 1
        failed = [e for e in errors if e]
        res.note = res.note or (f"failed: {failed[0]}" if failed else f"{len(mods)} kernels built")
        out.append(res)
    return out


__all__ = ["autotune", "TuneReport", "TaskResult", "Progress", "tuning_target"]

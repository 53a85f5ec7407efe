"""MetaSchedule's builders and runners, sized for the machine, and side-by-side measurement of modules.

TVM's tuning builds each batch of candidates in fresh worker processes, and each worker imported
`tvm.s_tir.tensor_intrin` (every tensor intrinsic TVM has, CUDA's included): 44 s of a 57 s build of two
softmax candidates on this 2-core machine, against 0.04 s for the build itself. effopt registers only the
intrinsics of the target's kind (x86 for CPUs: 0.2 s) in the tuning process and in the build workers,
through a build function of its own (`effopt.autotune.build`: TVM's default build, minus that import).
"""
from __future__ import annotations

import os
import statistics
import sys
import types

_KIND_INTRINSICS = {"llvm": ("x86",), "cuda": ("cuda",)}


def load_tensor_intrinsics(kind: str = "llvm") -> None:
    """Register the tensor intrinsics of one target kind without importing all of TVM's (see above)."""
    import importlib

    import tvm.s_tir as s_tir

    name = "tvm.s_tir.tensor_intrin"
    pkg = sys.modules.get(name)
    if pkg is None:
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(os.path.dirname(s_tir.__file__), "tensor_intrin")]
        pkg.__effopt_partial__ = True
        sys.modules[name] = pkg
        s_tir.tensor_intrin = pkg
    if not getattr(pkg, "__effopt_partial__", False):
        return  # the whole registry is loaded already
    for sub in _KIND_INTRINSICS.get(kind, ()):
        importlib.import_module(f"{name}.{sub}")


def _build(mod, target, _params):
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    load_tensor_intrinsics(target.kind.name)
    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _worker_init():
    """Runs in each build worker: registers effopt's build function there."""
    import tvm

    tvm.register_global_func("effopt.autotune.build", _build, override=True)


def physical_cores() -> int:
    from ..target import physical_cores as _physical_cores

    return _physical_cores()


def builder(timeout_s: float | None = None):
    """A LocalBuilder with one worker per physical core; its timeout is generous on small machines
    (TVM's 30 s default killed 7 of 16 matmul candidates on 2 cores)."""
    from tvm.s_tir import meta_schedule as ms

    cores = physical_cores()
    return ms.builder.LocalBuilder(max_workers=cores, timeout_sec=timeout_s or (240.0 if cores <= 4 else 60.0),
                                   f_build="effopt.autotune.build", initializer=_worker_init)


def evaluator(number: int = 3, repeat: int = 1, min_repeat_ms: int = 20):
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                                     enable_cpu_cache_flush=False)


def _runner_init(threads: int):
    """Runs in each local runner worker before any kernel: TVM's thread pool gets `threads` threads. (The
    workers inherit effopt's TVM_NUM_THREADS=1, lowering/runtime.py, which would time every candidate on
    one thread, while a compiled model runs them on torch's threads and the library GEMM is timed on all.)"""
    os.environ["TVM_NUM_THREADS"] = str(threads)


def runner(rpc_tracker: str | None = None, rpc_key: str | None = None, timeout_s: float = 60.0,
           repeat: int = 1, threads: int | None = None):
    """A LocalRunner whose kernels run on `threads` threads (default: torch's), or an RPCRunner that asks
    the tracker `host:port` for devices under `rpc_key` (the device's server sets its own threads)."""
    import functools

    import torch
    from tvm.s_tir import meta_schedule as ms

    if rpc_tracker is None:
        return ms.runner.LocalRunner(timeout_sec=timeout_s, evaluator_config=evaluator(repeat=repeat),
                                     initializer=functools.partial(_runner_init, threads or torch.get_num_threads()))
    host, port = parse_tracker(rpc_tracker)
    if not rpc_key:
        raise ValueError("rpc_tracker needs rpc_key: the key the device servers registered with the tracker")
    cfg = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=rpc_key,
                              session_timeout_sec=int(timeout_s), session_priority=1)
    return ms.runner.RPCRunner(rpc_config=cfg, evaluator_config=evaluator(repeat=repeat), max_workers=1)


def parse_tracker(spec: str) -> tuple[str, int]:
    host, sep, port = str(spec).rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"rpc_tracker {spec!r} must be host:port, e.g. tracker.lan:9190")
    return host, int(port)


def tensor_infos(shapes):
    """MetaSchedule argument descriptions for [(shape, dtype)] (a kernel whose sizes are symbolic)."""
    from tvm.s_tir import meta_schedule as ms

    return [ms.arg_info.TensorInfo(dtype, shape) for shape, dtype in shapes]


def measure(mods: list, target, run, rounds: int = 3, args_info=None) -> list[float | None]:
    """Median microseconds of each single-PrimFunc module ("main"), built by effopt's builder and run by
    `run` (a MetaSchedule runner: local or over RPC; `args_info`: the arguments, where not the modules'
    own concrete buffers), the modules interleaved round by round so that
    the machine's drift hits all alike; None where one did not build or run."""
    from tvm.s_tir import meta_schedule as ms

    results = builder().build([ms.builder.BuilderInput(m, target) for m in mods])
    inputs, index = [], []
    for i, (m, r) in enumerate(zip(mods, results)):
        if r.error_msg is None:
            info = args_info if args_info is not None else ms.arg_info.ArgInfo.from_prim_func(m["main"])
            inputs.append(ms.runner.RunnerInput(r.artifact_path, device_type(target), info))
            index.append(i)
    times: dict[int, list] = {i: [] for i in index}
    for _ in range(rounds):
        for i, inp in zip(index, inputs):
            out = run.run([inp])[0].result()
            if out.error_msg is None and out.run_secs:
                times[i].extend(float(s) for s in out.run_secs)
    for r in results:
        if r.artifact_path:
            import shutil

            shutil.rmtree(os.path.dirname(r.artifact_path), ignore_errors=True)
    return [statistics.median(times[i]) * 1e6 if times.get(i) else None for i in range(len(mods))]


def device_type(target) -> str:
    return "cuda" if target.kind.name == "cuda" else "cpu"


def compile_only(mods: list, target) -> list[str | None]:
    """Build each module for `target` without running it (a CUDA target where no GPU is present): the
    error of each that fails, else None."""
    out = []
    for m in mods:
        try:
            _build(m, target, None)
            out.append(None)
        except Exception as e:  # noqa: BLE001 - TVM's and nvcc's errors
            out.append(str(e).splitlines()[0][:300] if str(e) else type(e).__name__)
    return out

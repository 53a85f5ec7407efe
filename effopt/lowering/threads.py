"""TVM kernels on torch's own OpenMP thread pool.

TVM's kernels call their parallel loops through a function pointer in each library,
`__TVMBackendParallelLaunch`, which TVM points at its own thread pool. That pool and torch's OpenMP pool
do not know about each other: with both multi-threaded, their spinning workers steal each other's cores
(ViT-S ran at 0.59x eager on 2 cores). So effopt points that function pointer at a small launcher that
runs the loop with `#pragma omp parallel` on torch's libgomp: one pool, torch's thread count
(`torch.set_num_threads` applies to TVM kernels too). The launcher is compiled once per machine with the C
compiler TVM already needs for exporting kernels. If that fails, TVM kernels run single-threaded, with a
warning, and the measured kernel choice keeps torch's kernels wherever they are faster.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings

import torch

_SOURCE = r"""
#include <omp.h>
#include <stdint.h>
typedef struct { void* sync_handle; int32_t num_task; } TVMParallelGroupEnv;
typedef int (*FTVMParallelLambda)(int task_id, TVMParallelGroupEnv* penv, void* cdata);

int effopt_parallel_launch(FTVMParallelLambda f, void* cdata, int num_task) {
  int n = num_task > 0 ? num_task : omp_get_max_threads();
  int failed = 0;
  if (n <= 1 || omp_in_parallel()) {
    TVMParallelGroupEnv env = {0, 1};
    return f(0, &env, cdata) ? -1 : 0;
  }
#pragma omp parallel num_threads(n)
  {
    TVMParallelGroupEnv env = {0, omp_get_num_threads()};
    if (f(omp_get_thread_num(), &env, cdata) != 0) {
#pragma omp atomic write
      failed = 1;
    }
  }
  return failed ? -1 : 0;
}
"""

_state: tuple | None = None  # (library handle, launcher address or None)


def _torch_libgomp() -> str | None:
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    return path if os.path.exists(path) else None


def _build(directory: str, gomp: str) -> str:
    digest = hashlib.sha256((_SOURCE + gomp + torch.__version__).encode()).hexdigest()[:16]
    out = os.path.join(directory, f"omp_launch-{digest}.so")
    if os.path.exists(out):
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        src, obj, lib = (os.path.join(tmp, n) for n in ("launch.c", "launch.o", "launch.so"))
        with open(src, "w") as f:
            f.write(_SOURCE)
        # compile with OpenMP, but link against torch's libgomp, not the system's: one OpenMP runtime
        subprocess.run([cc, "-O2", "-fPIC", "-fopenmp", "-c", src, "-o", obj], check=True, capture_output=True)
        subprocess.run([cc, "-shared", obj, "-o", lib, gomp, f"-Wl,-rpath,{os.path.dirname(gomp)}"],
                       check=True, capture_output=True)
        os.replace(lib, out)
    return out


def launcher(directory: str) -> int | None:
    """Address of the OpenMP launcher, building it into `directory` the first time; None if unavailable."""
    global _state
    if _state is None:
        try:
            gomp = _torch_libgomp()
            if gomp is None or not torch.backends.openmp.is_available():
                raise RuntimeError("this torch build does not use libgomp")
            from .cache import unsafe

            try:
                if unsafe(os.path.dirname(directory)):  # a library there could be anyone's: build a private one
                    raise OSError("cache directory refused")
                path = _build(directory, gomp)
            except OSError:  # an unwritable or refused cache directory: a private temporary one instead
                path = _build(tempfile.mkdtemp(prefix="effopt-runtime-"), gomp)
            lib = ctypes.CDLL(path)
            _state = (lib, ctypes.cast(lib.effopt_parallel_launch, ctypes.c_void_p).value)
        except Exception as e:  # noqa: BLE001 - no compiler, odd torch build: degrade, never fail
            detail = e.stderr.decode(errors="replace")[:300] if isinstance(e, subprocess.CalledProcessError) else e
            warnings.warn(f"effopt: TVM kernels run single-threaded: could not build the OpenMP launcher "
                          f"({detail})", RuntimeWarning, stacklevel=2)
            _state = (None, None)
    return _state[1]


def attach(lib_path: str, launch: int) -> bool:
    """Point the parallel loops of the loaded kernel library `lib_path` at the launcher at address `launch`
    (from `launcher`), so they run on torch's OpenMP pool."""
    handle = ctypes.CDLL(lib_path, mode=os.RTLD_NOLOAD | os.RTLD_LOCAL)  # the copy TVM already loaded
    try:
        ctypes.c_void_p.in_dll(handle, "__TVMBackendParallelLaunch").value = launch
    except ValueError:  # no parallel loop in this library
        return False
    return True

"""TVM kernels run their parallel loops on torch's OpenMP pool (one pool, torch's thread count), and
where the launcher cannot be had they run on one thread with a warning, never with a wrong result."""
import ctypes
import warnings

import torch

import effopt
from effopt.lowering import threads
from effopt.testing.compare import assert_same_as_eager
from tests.conftest import compile_effopt


def _softmax(x):
    return torch.softmax(x * 0.5, -1) + 1.0


def test_tvm_kernels_use_torch_threads():
    x = torch.randn(4, 6, 97, 97)
    f = compile_effopt(_softmax, kernel_choice="tvm")
    with torch.no_grad():
        assert_same_as_eager(f(x), _softmax(x))
        rec = effopt.last_report().lowering
        assert rec.parallel == "omp" and all(k.choice == "tvm" for k in rec.kernels)
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)  # the same kernels, on a one-thread pool, give the same answer
            assert_same_as_eager(f(x), _softmax(x))
        finally:
            torch.set_num_threads(old)


def test_loaded_library_calls_the_launcher(cache_dir):
    import glob
    import os

    x = torch.randn(2, 6, 33, 33)
    for _ in range(2):  # the second compile loads the library from the cache
        torch._dynamo.reset()
        f = compile_effopt(_softmax, kernel_choice="tvm", cache=True, cache_dir=cache_dir)
        with torch.no_grad():
            f(x)
    assert effopt.last_report().lowering.cache_hit
    (lib,) = glob.glob(os.path.join(cache_dir, "*", "*", "lib.so"))
    handle = ctypes.CDLL(lib, mode=os.RTLD_NOLOAD)
    pointer = ctypes.c_void_p.in_dll(handle, "__TVMBackendParallelLaunch").value
    assert pointer == threads.launcher(cache_dir) and pointer is not None


def test_no_launcher_means_one_thread_and_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "_state", None)
    monkeypatch.setattr(threads, "_torch_libgomp", lambda: None)  # a torch built without libgomp
    x = torch.randn(2, 6, 33, 33)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        f = compile_effopt(_softmax, kernel_choice="tvm", cache_dir=str(tmp_path / "cache"))
        with torch.no_grad():
            assert_same_as_eager(f(x), _softmax(x))
    assert effopt.last_report().lowering.parallel == "serial"
    assert any("run single-threaded" in str(m.message) for m in w)


def test_unwritable_cache_dir_still_gets_the_launcher(monkeypatch, tmp_path):
    monkeypatch.setattr(threads, "_state", None)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    x = torch.randn(2, 6, 33, 33)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kernel cache itself warns that it cannot write
        f = compile_effopt(_softmax, kernel_choice="tvm", cache_dir=str(blocker / "cache"))
        with torch.no_grad():
            assert_same_as_eager(f(x), _softmax(x))
    assert effopt.last_report().lowering.parallel == "omp"

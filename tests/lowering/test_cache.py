"""The on-disk kernel cache: a second compile of the same graph loads kernels instead of building them,
and a damaged entry is reported and rebuilt, never trusted."""
import glob
import os
import warnings

import pytest
import torch

import effopt
from effopt.testing.compare import assert_same_as_eager
from effopt.testing.models import vit_tiny_test


def _compile_and_run(model, x, cache_dir):
    torch._dynamo.reset()
    f = torch.compile(model, backend="effopt", options={"cache_dir": cache_dir, "kernel_choice": "tvm"})
    with torch.no_grad():
        assert_same_as_eager(f(x), model(x))
    return effopt.last_report().lowering


@pytest.mark.slow
def test_second_compile_hits_cache(cache_dir):
    model, x = vit_tiny_test().eval(), torch.randn(1, 3, 32, 32)
    first = _compile_and_run(model, x, cache_dir)
    assert not first.cache_hit and glob.glob(os.path.join(cache_dir, "*", "*", "lib.so"))
    second = _compile_and_run(model, x, cache_dir)
    assert second.cache_hit
    assert [k.choice for k in second.kernels] == [k.choice for k in first.kernels]


@pytest.mark.slow
def test_truncated_or_foreign_entries_are_rebuilt(cache_dir):
    model, x = vit_tiny_test().eval(), torch.randn(1, 3, 32, 32)
    _compile_and_run(model, x, cache_dir)
    lib = glob.glob(os.path.join(cache_dir, "*", "*", "lib.so"))[0]
    with open(lib, "r+b") as f:
        f.truncate(os.path.getsize(lib) // 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec = _compile_and_run(model, x, cache_dir)
    assert not rec.cache_hit and any("damaged cache entry" in str(m.message) for m in w)

    meta = glob.glob(os.path.join(cache_dir, "*", "*", "meta.json"))[0]
    with open(meta, "w") as f:
        f.write('{"versions": {"effopt": "0.0.0"}')  # another version, and cut short
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec = _compile_and_run(model, x, cache_dir)
    assert not rec.cache_hit and any("damaged cache entry" in str(m.message) for m in w)


def test_unwritable_cache_dir_does_not_fail_the_compile(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec = _compile_and_run(vit_tiny_test().eval(), torch.randn(1, 3, 32, 32), str(blocker / "cache"))
    assert rec.kernels and any("not using the cache directory" in str(m.message) and "cannot create it" in str(m.message)
                               for m in w)


def test_second_compile_reuses_measurements(cache_dir, monkeypatch):
    """A cache hit times nothing: kernel choices come with the kernels, GEMM library choices from the
    decision file. (This is what makes a second process's compile fast.)"""
    import effopt.lowering.select as select

    model, x = vit_tiny_test().eval(), torch.randn(2, 3, 32, 32)
    first = _compile_and_run(model, x, cache_dir)
    assert first.gemms and glob.glob(os.path.join(cache_dir, "decisions", "*.json"))

    def no_timing(*a, **k):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(select, "choose", no_timing)  # the choose step and the library step call it
    second = _compile_and_run(model, x, cache_dir)
    assert second.cache_hit
    assert [g["kernel"] for g in second.gemms] == [g["kernel"] for g in first.gemms]


@pytest.mark.slow
def test_damaged_decision_file_is_measured_again(cache_dir):
    model, x = vit_tiny_test().eval(), torch.randn(2, 3, 32, 32)
    first = _compile_and_run(model, x, cache_dir)
    path = glob.glob(os.path.join(cache_dir, "decisions", "*.json"))[0]
    with open(path, "w") as f:
        f.write("{not json")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        again = _compile_and_run(model, x, cache_dir)
    assert any("damaged decision file" in str(m.message) for m in w)
    assert len(again.gemms) == len(first.gemms)
    with open(path) as f:
        assert '"gemm"' in f.read()  # rewritten whole


def test_saving_over_a_damaged_decision_file_says_what_was_lost(cache_dir):
    from effopt.lowering.cache import DecisionStore

    store = DecisionStore(cache_dir, {"kind": "llvm", "mcpu": "znver3"})
    store.save("gemm", {"a": 1})
    with open(store.path, "w") as f:
        f.write("{not json")
    with pytest.warns(RuntimeWarning, match="was damaged .* earlier decisions are lost"):
        store.save("gemm", {"b": 2})
    assert store.load("gemm") == {"b": 2}

"""Caches under faults (effopt/lowering/cache.py): every truncation of a record, flipped bytes, empty files,
foreign versions, a directory others can write, eight processes writing at once, a full disk. Each is
detected and survived (compilation goes on, uncached if need be, with a warning): never a crash, never a
wrong kernel, never a pickle."""
import errno
import glob
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import effopt
from effopt.lowering import cache
from effopt.lowering.cache import DecisionStore, KernelCache
from effopt.testing.models import vit_tiny_test
from tests.conftest import FIGURES
from tests.lowering.test_cache import _compile_and_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SURVIVED: dict[str, int] = {}
TARGET = {"kind": "llvm", "mcpu": "test"}


def _count(kind: str, n: int = 1) -> None:
    SURVIVED[kind] = SURVIVED.get(kind, 0) + n
    FIGURES["fault cases survived"] = f"{sum(SURVIVED.values())} (" + ", ".join(
        f"{k} {v}" for k, v in SURVIVED.items()) + ")"


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    """A real cache entry (library + meta.json) of the tiny ViT, and the model/input that made it."""
    d = str(tmp_path_factory.mktemp("cache"))
    model, x = vit_tiny_test().eval(), torch.randn(1, 3, 32, 32)
    _compile_and_run(model, x, d)
    (meta,) = glob.glob(os.path.join(d, "*", "*", "meta.json"))
    return d, os.path.dirname(meta), model, x


def _entry_of(work, key: str, lib: bytes, meta: bytes):
    """A cache entry at `work` written from these bytes, and what loading it gives: (module or None, warnings)."""
    e = work / key[:2] / key
    e.mkdir(parents=True, exist_ok=True)
    (e / "lib.so").write_bytes(lib)
    (e / "meta.json").write_bytes(meta)
    return _load_quietly(KernelCache(str(work)), key) + (e,)


def _files(ent: str) -> tuple[str, bytes, bytes]:
    """(key, meta.json bytes, lib.so bytes) of a cache entry directory."""
    read = lambda name: open(os.path.join(ent, name), "rb").read()  # noqa: E731
    return os.path.basename(ent), read("meta.json"), read("lib.so")


def _load_quietly(kc: KernelCache, key: str):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = kc.load(key)
    return got, [str(m.message) for m in w]


def test_meta_record_truncated_at_every_byte_offset_is_rebuilt(entry, tmp_path):
    key, meta, lib = _files(entry[1])
    work = tmp_path / "c"
    for cut in range(len(meta)):  # every byte offset, the empty file included
        got, msgs, e = _entry_of(work, key, lib, meta[:cut])
        assert got is None and any("damaged cache entry" in m for m in msgs), cut
        assert not e.exists()  # dropped, to be rebuilt
    _count("truncated meta records", len(meta))


def test_library_truncated_or_with_flipped_bytes_is_never_loaded(entry, tmp_path):
    key, meta, lib = _files(entry[1])
    work = tmp_path / "c"
    cases = [lib[:cut] for cut in range(0, len(lib), max(1, len(lib) // 64))]  # truncations through the file
    for pos in range(0, len(lib), max(1, len(lib) // 64)):  # one flipped bit, through the file
        b = bytearray(lib)
        b[pos] ^= 0x10
        cases.append(bytes(b))
    for bad in cases:
        got, msgs, _ = _entry_of(work, key, bad, meta)
        assert got is None and any("damaged cache entry" in m for m in msgs)
    _count("damaged libraries", len(cases))


def test_a_damaged_entry_recompiles_with_right_results(entry, tmp_path):
    d, ent, model, x = entry
    import shutil

    work = str(tmp_path / "c")
    shutil.copytree(d, work)
    (lib,) = glob.glob(os.path.join(work, "*", "*", "lib.so"))
    b = bytearray(open(lib, "rb").read())
    b[len(b) // 2] ^= 0xFF
    open(lib, "wb").write(bytes(b))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec = _compile_and_run(model, x, work)  # results checked against eager inside
    assert not rec.cache_hit and any("does not match its checksum" in str(m.message) for m in w)
    assert _compile_and_run(model, x, work).cache_hit  # rebuilt whole
    _count("damaged entries recompiled")


def test_decision_file_truncated_at_every_byte_offset(tmp_path):
    store = DecisionStore(str(tmp_path), TARGET)
    store.save("gemm", {f"shape{i}": {"use_candidate": True} for i in range(5)})
    data = open(store.path, "rb").read()
    for cut in range(len(data)):
        with open(store.path, "wb") as f:
            f.write(data[:cut])
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert store.load("gemm") == {} or cut == len(data)
            store.save("gemm", {"again": {"use_candidate": False}})  # rewritten whole, never a crash
        assert json.load(open(store.path))["gemm"] == {"again": {"use_candidate": False}} or \
            "again" in json.load(open(store.path))["gemm"]
    _count("truncated decision files", len(data))


def _writer(path, proc, n):
    return (f"import sys; sys.path.insert(0, {ROOT!r})\n"
            "from effopt.lowering.cache import DecisionStore\n"
            f"s = DecisionStore({path!r}, {TARGET!r})\n"
            f"for i in range({n}):\n"
            f"    s.save('gemm', {{f'p{proc}-{{i}}': {{'proc': {proc}, 'i': i}}}})\n")


def test_eight_processes_writing_at_once_lose_nothing(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", _writer(str(tmp_path), p, 100)], stderr=subprocess.PIPE)
             for p in range(8)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read().decode()[-2000:]
    got = DecisionStore(str(tmp_path), TARGET).load("gemm")
    assert len(got) == 800  # none lost, none duplicated (keys are unique)
    assert all(got[f"p{p}-{i}"] == {"proc": p, "i": i} for p in range(8) for i in range(100))  # none mis-indexed
    _count("concurrent writers", 8)


def test_a_directory_others_can_write_is_refused(entry, tmp_path):
    d, _, model, x = entry
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    cache._refused.discard(str(shared))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec = _compile_and_run(model, x, str(shared))
    assert not rec.cache_hit and any("other users can write it" in str(m.message) for m in w)
    assert not glob.glob(os.path.join(shared, "*", "*", "lib.so"))  # nothing stored there either
    fresh = tmp_path / "fresh"
    assert cache.unsafe(str(fresh)) is None and (os.stat(fresh).st_mode & 0o777) == 0o700  # created private
    _count("unsafe directories")


def test_a_full_disk_does_not_fail_the_compile(entry, tmp_path, monkeypatch):
    _, _, model, x = entry

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.shutil, "copyfile", full)
    monkeypatch.setattr(cache.json, "dump", full)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        rec = _compile_and_run(model, x, str(tmp_path / "c"))
    msgs = [str(m.message) for m in w]
    assert rec.kernels and any("No space left on device" in m for m in msgs)
    assert not glob.glob(str(tmp_path / "c" / "*" / "*" / "lib.so")) and not glob.glob(str(tmp_path / "c" / "*" / ".tmp-*"))
    _count("full disks")


def test_no_pickle_anywhere():
    src = os.path.join(ROOT, "effopt")
    for d, _, files in os.walk(src):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(d, name)).read()
                assert "import pickle" not in text and "pickle.load" not in text and "torch.load(" not in text, name

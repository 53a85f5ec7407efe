"""The tuning database under faults: truncation at every byte of the last record, flipped bytes, foreign
targets and versions, concurrent writers, an unsafe directory. No tuning here (fast)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from effopt.lowering.tuning_db import TuningDatabase, canonical_target, mean_seconds
from effopt.target import host_target_dict
from tests.fuzz.test_faults import _count

HOST = host_target_dict()


def _rec(i: int) -> dict:
    return {"type": "trace", "task": "tir:abc", "workload": "abc", "record": [[[], []], [1e-6 * (i + 1)]],
            "run_secs": [1e-6 * (i + 1)]}


def test_records_round_trip_and_are_keyed_by_the_canonical_target(tmp_path):
    db = TuningDatabase(str(tmp_path), HOST)
    assert db.append([_rec(0), _rec(1)])
    again = TuningDatabase(str(tmp_path), dict(HOST))
    assert [r["run_secs"] for r in again.traces("abc")] == [[1e-6], [2e-6]]
    assert canonical_target(HOST)["keys"] == ["cpu"]  # defaults filled in: one spelling, one file
    other = TuningDatabase(str(tmp_path), dict(HOST, **{"num-cores": HOST["num-cores"] + 6}))
    assert other.path != db.path and other.records() == []


def test_a_record_copied_into_another_targets_file_is_never_read_there(tmp_path):
    db = TuningDatabase(str(tmp_path), HOST)
    db.append([_rec(0)])
    other = TuningDatabase(str(tmp_path), dict(HOST, mcpu="skylake-avx512"))
    os.makedirs(os.path.dirname(other.path), exist_ok=True)
    with open(db.path, "rb") as src, open(other.path, "wb") as dst:
        dst.write(src.read())  # a valid line, checksum and all, but keyed by the first target
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not damaged, so not even a warning: just not this target's
        assert other.records() == []
    assert len(db.records()) == 1


def test_records_of_another_version_are_ignored(tmp_path, monkeypatch):
    db = TuningDatabase(str(tmp_path), HOST)
    db.append([_rec(0)])
    import effopt.lowering.tuning_db as database

    monkeypatch.setattr(database, "FORMAT", database.FORMAT + 1)
    assert TuningDatabase(str(tmp_path), HOST).records() == []


def test_truncation_at_every_byte_of_the_last_record_is_survived(tmp_path):
    db = TuningDatabase(str(tmp_path), HOST)
    db.append([_rec(0), _rec(1)])
    with open(db.path, "rb") as f:
        two = f.read()
    db.append([_rec(2)])
    with open(db.path, "rb") as f:
        full = f.read()
    last = full[len(two):]
    assert last.endswith(b"\n") and last.count(b"\n") == 1
    for cut in range(len(two), len(full) + 1):
        with open(db.path, "wb") as f:
            f.write(full[:cut])
        fresh = TuningDatabase(str(tmp_path), HOST)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = fresh.records()
        complete = cut >= len(full) - 1  # the record without its newline is still whole
        assert len(got) == (3 if complete else 2), cut
        partial = len(two) < cut < len(full) - 1
        assert any("damaged" in str(w.message) for w in caught) == partial, cut
        _count("truncated tuning records")
    # a writer after a crash starts on a fresh line: the torn record does not swallow the new one
    with open(db.path, "wb") as f:
        f.write(full[:len(two) + len(last) // 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert db.append([_rec(3)])
        assert [r["run_secs"][0] for r in TuningDatabase(str(tmp_path), HOST).records()] == [1e-6, 2e-6, 4e-6]


def test_flipped_bytes_and_garbage_lines_are_skipped_with_a_warning(tmp_path):
    db = TuningDatabase(str(tmp_path), HOST)
    db.append([_rec(0), _rec(1), _rec(2)])
    raw = bytearray(open(db.path, "rb").read())
    lines = raw.split(b"\n")
    mid = bytearray(lines[1])
    i = mid.index(b"run_secs") + 12
    mid[i] = ord("7") if mid[i] != ord("7") else ord("3")  # still JSON, different value: the checksum catches it
    lines[1] = bytes(mid)
    lines.insert(0, b"\x00\xff not json at all")
    with open(db.path, "wb") as f:
        f.write(b"\n".join(lines))
    with pytest.warns(RuntimeWarning, match="skipped 2 damaged record"):
        got = TuningDatabase(str(tmp_path), HOST).records()
    assert [r["run_secs"][0] for r in got] == [1e-6, 3e-6]
    _count("damaged tuning records", 2)


def test_an_unreadable_or_unsafe_directory_never_fails(tmp_path):
    root = tmp_path / "shared"
    root.mkdir()
    os.chmod(root, 0o777)
    db = TuningDatabase(str(root), HOST)
    with pytest.warns(RuntimeWarning, match="other users can write it"):
        assert db.append([_rec(0)]) is False
    assert db.records() == [] and not os.path.exists(db.path)
    _count("unsafe directories")
    created = TuningDatabase(str(tmp_path / "new"), HOST)
    created.append([_rec(0)])
    assert oct(os.stat(tmp_path / "new").st_mode & 0o777) == "0o700"
    assert oct(os.stat(created.path).st_mode & 0o777) == "0o600"


_WRITER = """
import sys
from effopt.lowering.tuning_db import TuningDatabase
from effopt.target import host_target_dict
db = TuningDatabase(sys.argv[1], host_target_dict())
for i in range(int(sys.argv[3])):
    db.append([{"type": "trace", "task": "tir:w", "workload": "w", "record": [[[], []], [1.0]],
                "run_secs": [1.0], "writer": sys.argv[2], "i": i}])
"""


def test_eight_processes_appending_to_one_database_lose_no_records(tmp_path):
    n, writers = 100, "abcdefgh"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), w, str(n)]) for w in writers]
    assert all(p.wait(timeout=600) == 0 for p in procs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn or interleaved line
        recs = TuningDatabase(str(tmp_path), HOST).records()
    # none lost, none duplicated, none mis-indexed (each record's checksum held: its fields are its own)
    assert sorted((r["writer"], r["i"]) for r in recs) == [(w, i) for w in writers for i in range(n)]
    _count("concurrent tuning writers", len(writers))


def test_an_empty_file_and_a_full_disk_are_survived(tmp_path, monkeypatch):
    db = TuningDatabase(str(tmp_path), HOST)
    os.makedirs(os.path.dirname(db.path), exist_ok=True)
    open(db.path, "wb").close()
    assert db.records() == []
    import errno

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.warns(RuntimeWarning, match="No space left"):
        assert db.append([_rec(0)]) is False
    monkeypatch.undo()
    assert db.append([_rec(1)]) and len(db.records()) == 1
    _count("empty files")
    _count("full disks")


def test_compiling_with_a_damaged_database_continues_with_a_warning(tmp_path):
    import torch

    db = TuningDatabase(str(tmp_path), HOST)
    db.append([{"type": "choice", "task": "tir:0", "use_tuned": True, "best": [[], []]}])
    with open(db.path, "ab") as f:
        f.write(b'{"type": "choice", "task": "tir:1", "use_tu')  # a crash mid-record
    model = torch.nn.Sequential(torch.nn.LayerNorm(32), torch.nn.GELU()).eval()
    x = torch.randn(4, 32)
    torch._dynamo.reset()
    with pytest.warns(RuntimeWarning, match="damaged record"), torch.no_grad():
        y = torch.compile(model, backend="effopt", options={"cache_dir": str(tmp_path)})(x)
        torch.testing.assert_close(y, model(x))
    _count("damaged tuning records")


def test_mean_seconds_treats_failed_measurements_as_infinite():
    assert mean_seconds([1.0, 3.0]) == 2.0
    assert mean_seconds([1e10]) == float("inf") and mean_seconds(None) == float("inf")
    assert mean_seconds([]) == float("inf") and mean_seconds(["x"]) == float("inf")


def test_choices_take_the_newest_record_per_task(tmp_path):
    db = TuningDatabase(str(tmp_path), HOST)
    db.append([{"type": "choice", "task": "knobs:k:1", "knobs": {"mb": 4}, "use_tuned": True, "tuned_us": 2.0}])
    db.append([{"type": "choice", "task": "knobs:k:1", "knobs": {"mb": 2}, "use_tuned": False, "tuned_us": 3.0}])
    assert db.choices()["knobs:k:1"]["knobs"] == {"mb": 2}
    assert db.best_knobs("knobs:k:1") is None
    d1 = db.digest()
    db.append([{"type": "choice", "task": "knobs:k:1", "knobs": {"mb": 4}, "use_tuned": True, "tuned_us": 1.0}])
    assert db.best_knobs("knobs:k:1") == ({"mb": 4}, 1.0) and db.digest() != d1
    json.dumps(db.records())  # plain JSON all the way (no pickle)

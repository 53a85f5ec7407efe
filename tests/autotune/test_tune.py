"""Autotuning end to end, with a handful of trials on small shapes (MetaSchedule on 2 cores is slow):
records are written and resumed, a tuned choice is applied by later compiles (and only for its target),
hand-scheduled kernels' tiles and tuned GEMMs are applied exactly, RPC measurement through a tracker and
two servers, CUDA compile-only checks, the CLI."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import warnings

import pytest
import torch
import torch.nn as nn

import effopt
from effopt.lowering.tuning_db import TuningDatabase
from effopt.target import host_target_dict, resolve_target
from effopt.autotune.tune import Progress, autotune
from effopt.inspect.report import last_report
from effopt.testing.models import vit_tiny_test


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(64)
        self.fc = nn.Linear(64, 64)

    def forward(self, x):
        return self.fc(torch.softmax(self.ln(x) * 2.0, -1) + x)


def _inputs():
    return (torch.randn(16, 64, generator=torch.Generator().manual_seed(0)),)


@pytest.fixture(scope="module")
def tuned_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tune"))
    torch.manual_seed(0)
    out = io.StringIO()
    report = autotune(Tiny().eval(), _inputs(), target="host", trials=4, trials_per_round=4, cache_dir=d,
                      kinds=("tir", "gemm"), stream=out)
    return d, report, out.getvalue()


def _compile(model, inputs, **opts):
    torch._dynamo.reset()
    f = torch.compile(model, backend="effopt", options=opts)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = f(*inputs)
    return y, last_report().lowering


def test_tuning_writes_records_compares_with_the_default_and_shows_progress(tuned_dir):
    d, report, progress = tuned_dir
    kinds = {r.kind for r in report.results}
    assert kinds == {"tir", "gemm"}
    db = TuningDatabase.open(host_target_dict(), d)
    for r in report.results:
        assert r.trials == 4 and r.default_us and r.default_us > 0
        c = db.choices()[r.key]
        assert c["use_tuned"] == r.use_tuned
        if r.use_tuned:
            assert r.tuned_us < r.default_us and (r.library_us is None or r.tuned_us < r.library_us)
    gemm = next(r for r in report.results if r.kind == "gemm")
    assert gemm.library_us and gemm.library_us > 0  # the library kernel was timed: the GEMM's rival
    assert "ETA" in progress and "trials" in progress and "best" in progress
    assert "default us" in str(report) and "GFLOPS" in str(report)


def test_a_second_run_resumes_instead_of_searching_again(tuned_dir):
    d, report, _ = tuned_dir
    db = TuningDatabase.open(host_target_dict(), d)
    before = len(db.records("trace"))
    again = autotune(Tiny().eval(), _inputs(), target="host", trials=4, trials_per_round=4, cache_dir=d,
                     kinds=("tir", "gemm"), progress=False)
    assert len(TuningDatabase.open(host_target_dict(), d).records("trace")) == before
    assert [(r.key, r.use_tuned) for r in again.results] == [(r.key, r.use_tuned) for r in report.results]


def _force_tuned(db: TuningDatabase, kind: str) -> list[str]:
    """Mark every task of a kind that built a candidate as tuned (as if each had won), for applying them all;
    a task may already have won in the few trials, so the keys applied are all of these, not one."""
    keys = []
    for key, c in db.choices().items():
        if c.get("kind") == kind and c.get("best"):
            db.append([dict(c, use_tuned=True, tuned_us=0.5 * (c.get("default_us") or 1.0))])
            keys.append(key)
    if not keys:
        pytest.skip(f"no {kind} task built a candidate")
    return sorted(keys)


def _tuned_keys(rec, kind: str) -> list[str]:
    return sorted(t["task"] for t in rec.tuned if t["kind"] == kind)


def test_a_tuned_schedule_is_applied_by_later_compiles_and_is_exact(tuned_dir, tmp_path):
    d, _, _ = tuned_dir
    work = str(tmp_path / "c")
    shutil.copytree(d, work)
    db = TuningDatabase.open(host_target_dict(), work)
    keys = _force_tuned(db, "tir")
    model, inputs = Tiny().eval(), _inputs()
    ref = model(*inputs)
    y, rec = _compile(model, inputs, cache_dir=work)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert _tuned_keys(rec, "tir") == keys
    tuned_tir = [rec.kernel_tir(k.kernel) for k in rec.kernels]
    y0, rec0 = _compile(model, inputs, cache_dir=work, tuning=False)
    assert rec0.tuned == [] and [rec0.kernel_tir(k.kernel) for k in rec0.kernels] != tuned_tir
    torch.testing.assert_close(y0, ref, rtol=1e-4, atol=1e-5)
    # the kernel cache keeps what was applied: a second process's cache hit reports it too
    y2, rec2 = _compile(model, inputs, cache_dir=work)
    assert rec2.cache_hit and _tuned_keys(rec2, "tir") == keys


def test_a_record_for_another_target_is_ignored(tuned_dir, tmp_path):
    d, _, _ = tuned_dir
    work = str(tmp_path / "c")
    shutil.copytree(d, work)
    _force_tuned(TuningDatabase.open(host_target_dict(), work), "tir")
    other = dict(host_target_dict(), **{"num-cores": host_target_dict()["num-cores"] + 1})
    odb = TuningDatabase.open(other, work)
    shutil.copyfile(TuningDatabase.open(host_target_dict(), work).path, odb.path)  # the same lines, another target
    model = Tiny().eval()
    y, rec = _compile(model, _inputs(), cache_dir=work, target=other)
    assert rec.tuned == [] and rec.tuning_db == ""  # this target has no choices of its own
    torch.testing.assert_close(y, model(*_inputs()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernel", ["trace", "packed"])
def test_a_tuned_gemm_replaces_the_library_kernel_exactly(tuned_dir, tmp_path, kernel):
    """Either kind of tuned GEMM (MetaSchedule's schedule of the matmul, or effopt's packed kernel with a
    non-default tile setting), forced as the choice, is applied and matches eager."""
    from effopt.lowering.kernels import gemm

    d, _, _ = tuned_dir
    work = str(tmp_path / "c")
    shutil.copytree(d, work)
    db = TuningDatabase.open(host_target_dict(), work)
    (key, c), = [(k, c) for k, c in db.choices().items() if c.get("kind") == "gemm"]
    if gemm.supported(resolve_target("host")) is None:
        assert "packed" in c  # the packed kernel's tiles were measured (None: the MetaSchedule schedule won)
    elif kernel == "packed":
        pytest.skip(f"{gemm.supported(resolve_target('host'))}: this CPU cannot execute the packed kernel")
    if kernel == "trace" and not c.get("best"):
        pytest.skip("no MetaSchedule candidate built")
    tile = gemm.space(16, 64, gemm.unit_of(resolve_target("host")))[-1] if kernel == "packed" else None
    db.append([dict(c, use_tuned=True, tuned_us=0.5 * c["library_us"], packed=tile)])
    torch.manual_seed(0)
    model, inputs = Tiny().eval(), _inputs()
    ref = model(*inputs)
    y, rec = _compile(model, inputs, cache_dir=work)
    assert y.shape == ref.shape and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    assert _tuned_keys(rec, "gemm") == [key]
    graph = str(last_report().graph)
    assert "tuned TIR matmul 16x64x64" in graph
    assert (f"packed kernel, tiles {tile['mb']}x{tile['nb']}" if tile else "MetaSchedule schedule") in graph


def test_hand_scheduled_kernels_are_tuned_through_their_tiles(tmp_path):
    torch.manual_seed(0)
    model, inputs = vit_tiny_test().eval(), (torch.randn(2, 3, 32, 32),)
    report = autotune(model, inputs, target="host", trials=0, cache_dir=str(tmp_path), kinds=("knobs",),
                      progress=False)
    flash = [r for r in report.results if r.name == "flash_attention"]
    assert flash and flash[0].trials > 4 and flash[0].default_us > 0 and flash[0].tuned_us <= flash[0].default_us
    db = TuningDatabase.open(host_target_dict(), str(tmp_path))
    c = db.choices()[flash[0].key]
    assert len(c["measured"]) == flash[0].trials
    slowest = max((json.loads(k) for k, v in c["measured"].items() if v), key=lambda k: c["measured"][json.dumps(k, sort_keys=True)])
    db.append([dict(c, knobs=slowest, use_tuned=True)])  # any setting must be exact, so force a non-default one
    ref = model(*inputs)
    y, rec = _compile(model, inputs, cache_dir=str(tmp_path))
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
    assert [t["knobs"] for t in rec.tuned if t["kind"] == "knobs"] == [slowest]


def test_progress_bar_reports_eta_and_best():
    out = io.StringIO()
    p = Progress(10, stream=out)
    line = p.update(5, "layer_norm", 12.5, 20.0)
    assert "5/10 trials" in line and "ETA" in line and "best 12.5 us" in line and "default 20.0" in line
    assert out.getvalue().strip() == line


def test_bad_arguments_raise_value_errors_naming_what_is_valid(tmp_path):
    with pytest.raises(ValueError, match="valid: \\['tir', 'gemm', 'knobs'\\]"):
        autotune(Tiny(), _inputs(), kinds=("tir", "bogus"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="trials"):
        autotune(Tiny(), _inputs(), trials=-1, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="go together"):
        autotune(Tiny(), _inputs(), rpc_tracker="localhost:9190", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown target"):
        autotune(Tiny(), _inputs(), target="tpu", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="num-cores"):
        autotune(Tiny(), _inputs(), target="llvm", rpc_tracker="localhost:1", rpc_key="k", cache_dir=str(tmp_path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tuning_measures_on_devices_behind_an_rpc_tracker(tmp_path):
    pytest.importorskip("tornado")
    from tvm import rpc
    from tvm.rpc.tracker import Tracker

    port = _free_port()
    tracker = Tracker("127.0.0.1", port=port, port_end=port + 50, silent=True)
    servers = [rpc.Server("127.0.0.1", port=_free_port(), port_end=65000, key="effopt-test",
                          tracker_addr=("127.0.0.1", tracker.port), silent=True) for _ in range(2)]
    try:
        import time

        deadline = time.time() + 60
        while True:  # the servers register with the tracker in the background
            free = rpc.connect_tracker("127.0.0.1", tracker.port).summary()["queue_info"].get("effopt-test", {})
            if free.get("free") == 2 or time.time() > deadline:
                break
            time.sleep(0.5)
        assert free.get("free") == 2, free
        target = dict(host_target_dict())  # a remote CPU target names its cores
        report = autotune(Tiny().eval(), _inputs(), target=target, trials=4, trials_per_round=4,
                          cache_dir=str(tmp_path), kinds=("tir",), rpc_tracker=f"127.0.0.1:{tracker.port}",
                          rpc_key="effopt-test", progress=False)
        assert report.results and all(r.default_us and r.default_us > 0 for r in report.results)
        assert TuningDatabase.open(target, str(tmp_path)).records("trace")
    finally:
        for s in servers:
            s.terminate()
        tracker.terminate()


def test_cuda_targets_are_compile_checked_without_a_gpu(tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc here: TVM's CUDA code generator cannot produce device code")
    report = autotune(Tiny().eval(), _inputs(), target={"kind": "cuda", "arch": "sm_90"}, trials=2,
                      cache_dir=str(tmp_path), kinds=("tir",), progress=False)
    assert report.compile_only and report.results
    for r in report.results:
        assert "kernels built" in r.note and r.trials >= 1, r  # the default schedule and design-space samples
    assert not os.path.exists(TuningDatabase.open({"kind": "cuda", "arch": "sm_90"}, str(tmp_path)).path)


def test_cli_tune_and_report(tuned_dir, capsys, tmp_path):
    from effopt.cli import main, parse_duration

    d, _, _ = tuned_dir
    assert main(["tune", "--report", "--cache-dir", d]) == 0
    out = capsys.readouterr().out
    assert "default us" in out and "linear 16x64x64" in out
    assert main(["tune", "--report", "--cache-dir", str(tmp_path)]) == 0
    assert "no tuning records" in capsys.readouterr().out
    assert parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    with pytest.raises(ValueError, match="30m"):
        parse_duration("soon")
    with pytest.raises(SystemExit, match="--time-budget"):
        main(["tune", "examples/vit.py", "--time-budget", "soon"])
    with pytest.raises(SystemExit, match="unknown target"):
        main(["tune", "examples/vit.py", "--target", "tpu"])
    assert callable(effopt.autotune)


_TUNER = """
import sys, torch, torch.nn as nn
from effopt.autotune.tune import autotune
width = int(sys.argv[2])
model = nn.Sequential(nn.LayerNorm(width), nn.Softmax(-1)).eval()
r = autotune(model, (torch.randn(8, width),), target="host", trials=4, trials_per_round=4, cache_dir=sys.argv[1],
             kinds=("tir",), progress=False)
print("WROTE", r.records_written)
"""


def test_two_processes_tuning_into_one_database_lose_no_records(tmp_path):
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", _TUNER, str(tmp_path), str(w)], stdout=subprocess.PIPE, text=True)
             for w in (48, 80)]  # different shapes: different workloads, tuned at the same time
    outs = [p.communicate(timeout=900)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    wrote = [int(o.split("WROTE")[1]) for o in outs]
    assert all(w > 0 for w in wrote)
    assert len(TuningDatabase.open(host_target_dict(), str(tmp_path)).records("trace")) == sum(wrote)


def test_a_time_budget_stops_the_search_and_says_so(tmp_path):
    report = autotune(Tiny().eval(), _inputs(), target="host", trials=64, trials_per_round=4, time_budget=0.01,
                      cache_dir=str(tmp_path), kinds=("tir",), progress=False)
    assert report.stopped == "time budget"
    assert report.results and all(r.trials == 0 and "time budget: 0 of" in r.note and not r.use_tuned
                                  for r in report.results)
    assert TuningDatabase.open(host_target_dict(), str(tmp_path)).records("trace") == []

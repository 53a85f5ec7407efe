"""Never slower than eager: a rewritten layer that measures slower than the float32 layer it replaced runs
as that float32 layer, and a compiled graph that measures slower than eager runs eager. The decisions are
driven here by stubbed timings (timing itself is for benchmarks), so each branch is taken for certain."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import effopt
import importlib
import effopt.lowering.select as select
from effopt.ops import int8 as int8_ops
from effopt.lowering import EffoptSlowerWarning
from effopt.testing.compare import assert_same_as_eager
from effopt.testing.models import vit_tiny_test
from tests.conftest import compile_effopt
from tests.passes.test_quantize import LINEARS, quantized

BACKEND = importlib.import_module("effopt.backend")  # the module (effopt.backend is also a function)


def _model():
    torch.manual_seed(0)
    return vit_tiny_test().eval(), torch.randn(2, 3, 32, 32)


def _stub(monkeypatch, float_faster: bool):
    real = select.interleaved_medians

    def medians(fns, args, **kw):
        if set(fns) == {"chosen", "float"}:
            return {"chosen": 2e-3, "float": 1e-3} if float_faster else {"chosen": 1e-3, "float": 2e-3}
        return real(fns, args, **kw)

    monkeypatch.setattr(select, "interleaved_medians", medians)


@pytest.mark.parametrize("float_faster", [True, False])
def test_int8_layers_slower_than_float32_run_as_float32(monkeypatch, float_faster):
    model, x = _model()
    _stub(monkeypatch, float_faster)
    monkeypatch.setattr(BACKEND, "NOISE", float("inf"))  # the whole graph is kept: this test is per layer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = compile_effopt(model, quantize="int8-dynamic")(x)
    slower = [str(w.message) for w in caught if issubclass(w.category, EffoptSlowerWarning)]
    layers = [k for k in effopt.last_report().lowering.kernels if "int8_linear" in k.ops]
    assert len(layers) == 8 and all(k.float_us is not None for k in layers)
    with torch.no_grad():
        if float_faster:  # every int8 layer runs as the float32 layer it replaced: the head alone is int8
            assert {k.choice for k in layers} == {"float32"} and len(slower) == 1 and "8 of 8" in slower[0]
            ref = quantized(model, LINEARS[-1:])(x) if int8_ops.int_mm_usable() is None else model(x)
        else:
            assert {k.choice for k in layers} <= {"tvm", "eager"} and not slower
            ref = quantized(model, LINEARS if int8_ops.int_mm_usable() is None else LINEARS[:-1])(x)
    assert_same_as_eager(got, ref)


def test_the_float_form_keeps_the_int8_interface():
    """A float32 layer standing in for an int8 linear inside a folded pair takes the uint8 input the one
    before hands it and hands the next one uint8 in its scale."""
    g = torch.Generator().manual_seed(0)
    w, b, r = torch.randn(32, 64, generator=g), torch.randn(32, generator=g), torch.randn(5, 32, generator=g)
    f = int8_ops.FloatLinear(w)
    x = torch.randn(5, 64, generator=g)
    args = (None, None, None, b, 0.05, 3, 0, 255, 64, "gelu", r)
    torch.testing.assert_close(f(x, *args), F.gelu(F.linear(x, w, b)) + r)
    xq = torch.randint(0, 256, (5, 64), dtype=torch.uint8, generator=g)
    y = f(xq, *args, None, 0.1, 7, 0, 255)
    expect = F.gelu(F.linear((xq.float() - 3) * 0.05, w, b)) + r
    assert y.dtype == torch.uint8
    assert torch.equal(y, torch.clamp(torch.round(expect / 0.1) + 7, 0, 255).to(torch.uint8))


@pytest.mark.parametrize("noise, compiled", [(0.0, False), (float("inf"), True)])
def test_a_graph_slower_than_eager_runs_eager(monkeypatch, noise, compiled):
    """NOISE 0: the compiled graph would have to take no time at all to be kept; inf: it is always kept."""
    model, x = _model()
    monkeypatch.setattr(BACKEND, "NOISE", noise)
    calls = []  # effopt's compiled graph called (the ATen-level graph, lowered or not)
    real_call = BACKEND.CompiledGraph.__call__
    monkeypatch.setattr(BACKEND.CompiledGraph, "__call__", lambda self, args: calls.append(1) or real_call(self, args))
    f = compile_effopt(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got, ref = f(x), model(x)
    rep = effopt.last_report()
    slower = [w for w in caught if issubclass(w.category, EffoptSlowerWarning)]
    assert rep.versus_eager["use_compiled"] is compiled and len(slower) == (0 if compiled else 1)
    assert ("runs in EAGER" in rep.headline()) is not compiled
    assert_same_as_eager(got, ref)
    if not compiled:  # eager's own kernels: the very same values
        assert torch.equal(got, ref)
    with torch.no_grad():  # and the decision holds for later calls
        assert_same_as_eager(f(x * 2), model(x * 2))
    # where eager won, what runs is dynamo's torch-level graph (torch.compile(backend="eager")), never
    # effopt's ATen graph: the user's own modules and kernels
    assert bool(calls) is compiled and rep.runs_eager is not compiled


def test_the_whole_graph_decision_is_stored_and_a_warm_compile_reuses_it(monkeypatch, cache_dir):
    model, x = _model()
    with torch.no_grad():
        compile_effopt(model, cache=True, cache_dir=cache_dir)(x)
    first = effopt.last_report().versus_eager
    assert first["reused"] is False and first["eager"] == "torch graph"
    torch._dynamo.reset()
    monkeypatch.setattr(BACKEND, "versus_eager", lambda *a, **k: pytest.fail("the whole graph was timed again"))
    with torch.no_grad():
        got = compile_effopt(model, cache=True, cache_dir=cache_dir)(x)
        assert_same_as_eager(got, model(x))
    again = effopt.last_report().versus_eager
    assert again["reused"] is True and again["use_compiled"] == first["use_compiled"]
    assert again["compiled_ms"] == first["compiled_ms"]
    torch._dynamo.reset()  # another shape is another decision
    with pytest.raises(pytest.fail.Exception, match="timed again"), torch.no_grad():
        compile_effopt(model, cache=True, cache_dir=cache_dir, strict=True)(torch.randn(3, 3, 32, 32))


def test_forced_kernels_skip_the_check():
    model, x = _model()
    with torch.no_grad():
        compile_effopt(model, kernel_choice="tvm")(x)
    assert effopt.last_report().versus_eager is None


def test_float32_decisions_apply_where_no_region_has_a_kernel(monkeypatch):
    """Every region of the graph runs eager (the int8 kernel refused for this target, nothing else to lower):
    the float32 layers chosen in the choose step still take their place (the graph is recompiled)."""
    from effopt.lowering.kernels import int8 as int8_kernels

    monkeypatch.setattr(int8_kernels, "supported", lambda target: "refused by the test")
    _stub(monkeypatch, True)
    monkeypatch.setattr(BACKEND, "NOISE", float("inf"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32)).eval()
    x = torch.randn(4, 64)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = compile_effopt(model, quantize="int8-dynamic")(x)
        ref = model(x)
    rep = effopt.last_report()
    layers = [k for k in rep.lowering.kernels if "int8_linear" in k.ops]
    assert layers and {k.choice for k in layers} == {"float32"}, [(k.name, k.choice) for k in layers]
    assert not [k for k in rep.lowering.kernels if k.choice == "tvm"]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the float32 layers ran, not int8


def test_a_graph_of_symbolic_sizes_decides_per_size_bucket_and_stores_each(monkeypatch, cache_dir):
    """dynamic=True: one graph serves every row count. The compile's check decides the first call's bucket;
    the first call of each other bucket times both graphs once on its own arguments (here: eager wins
    below 4096 elements, the compiled graph from there on); later calls of a bucket, and a warm process,
    measure nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    timed = []

    def versus(compiled, eager, inputs, budget_s=1.0, rounds=15):
        big = bool(timed) and timed[-1] >= 4096  # the bucket being decided (recorded by the spy below)
        timed.append(None)
        return {"compiled_ms": 1.0, "eager_ms": 2.0 if big else 0.5, "speedup": 2.0 if big else 0.5,
                "use_compiled": big}

    real_decide = BACKEND.CompiledGraph._decide_bucket

    def spy(self, bucket, *a, **k):
        timed.append(bucket)
        return real_decide(self, bucket, *a, **k)

    monkeypatch.setattr(BACKEND, "versus_eager", versus)
    monkeypatch.setattr(importlib.import_module("effopt.lowering.buckets"), "MARGIN", 10.0)  # 0.5x: a close call
    monkeypatch.setattr(BACKEND.CompiledGraph, "_decide_bucket", spy)
    calls = []
    real_call = BACKEND.CompiledGraph.__call__
    monkeypatch.setattr(BACKEND.CompiledGraph, "__call__", lambda self, args: calls.append(1) or real_call(self, args))
    f = torch.compile(model, backend="effopt", dynamic=True, options={"cache_dir": cache_dir})
    sizes = [3, 5, 100, 6, 120, 3]  # rows x 64 elements: buckets 256, 512, 8192, 512, 8192, 256
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EffoptSlowerWarning)
        for n in sizes:
            x = torch.randn(n, 64)
            assert_same_as_eager(f(x), model(x))
    rep = effopt.last_report()
    buckets = rep.versus_eager["buckets"]
    assert sorted(buckets) == [256, 512, 8192]
    assert buckets[256]["use_compiled"] is False  # the compile's own check (stubbed: eager faster)
    assert buckets[512]["use_compiled"] is False and buckets[8192]["use_compiled"] is True
    measured = [b for b in timed if b is not None]
    assert measured == [256, 512, 8192]  # once per bucket; the first is the compile's, not timed again
    assert timed.count(None) == 3  # the compile's check and two buckets timed: none for later calls
    assert len(calls) == 2  # only the two calls of the 8192 bucket ran the compiled graph
    assert "per size bucket: rows <= 256 eager (0.50x), rows <= 512 eager (0.50x), rows <= 8192 compiled " \
        "(2.00x)" in rep.headline()
    # a warm process: the stored decisions, nothing timed
    torch._dynamo.reset()
    timed.clear()
    monkeypatch.setattr(BACKEND, "versus_eager", lambda *a, **k: pytest.fail("a bucket was timed again"))
    f = torch.compile(model, backend="effopt", dynamic=True, options={"cache_dir": cache_dir})
    with torch.no_grad():
        for n in sizes:
            x = torch.randn(n, 64)
            assert_same_as_eager(f(x), model(x))
    again = effopt.last_report().versus_eager["buckets"]
    assert {b: d["use_compiled"] for b, d in again.items()} == {256: False, 512: False, 8192: True}
    assert all(d.get("reused") for b, d in again.items())


def test_a_clear_compile_time_decision_holds_for_every_size_bucket(monkeypatch):
    """The compiled graph won (or lost) its compile-time check by more than buckets.MARGIN: a new bucket takes
    that decision without timing anything."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).eval()
    timed = []

    def versus(compiled, eager, inputs, budget_s=1.0, rounds=15):
        timed.append(1)
        return {"compiled_ms": 1.0, "eager_ms": 2.0, "speedup": 2.0, "use_compiled": True}

    monkeypatch.setattr(BACKEND, "versus_eager", versus)
    f = torch.compile(model, backend="effopt", dynamic=True, options={"cache": False})
    with torch.no_grad():
        for n in (3, 100, 1000):
            x = torch.randn(n, 64)
            assert_same_as_eager(f(x), model(x))
    buckets = effopt.last_report().versus_eager["buckets"]
    assert len(timed) == 1 and sorted(buckets) == [256, 8192, 65536]  # the compile's check only
    assert all(d["use_compiled"] for d in buckets.values()) and buckets[8192]["margin"] is True


def test_a_close_region_choice_is_made_per_size_bucket_and_stored(monkeypatch, cache_dir):
    """A graph of symbolic sizes whose region measured TVM 100 us against eager 110 us at compile time (a
    close call): the region keeps both forms, the first bucket takes the compile's choice, each new bucket
    times the forms once on its own arguments (here eager wins at 8192 elements and up), and a warm process
    reuses the stored choices without timing. Every output is eager's."""
    buckets = importlib.import_module("effopt.lowering.buckets")
    monkeypatch.setattr(BACKEND, "NOISE", float("inf"))  # the whole graph is kept: this test is per region
    real = select.interleaved_medians

    def compile_time(fns, args, **kw):
        if set(fns) == {"kernel", "eager"}:
            return {"kernel": 100e-6, "eager": 110e-6}
        return real(fns, args, **kw)

    timed = []

    def per_bucket(fns, args, **kw):
        big = max(a.numel() for a in args if isinstance(a, torch.Tensor)) >= 8192
        timed.append(sorted(fns))
        return {k: (2e-3 if (k == "tvm") == big else 1e-3) for k in fns}

    monkeypatch.setattr(select, "interleaved_medians", compile_time)
    monkeypatch.setattr(buckets, "interleaved_medians", per_bucket)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.GELU()).eval()
    sizes = [3, 5, 200, 6, 150]  # x 64 elements: buckets 256, 512, 16384, 512, 16384

    def run():
        f = torch.compile(model, backend="effopt", dynamic=True, options={"cache_dir": cache_dir})
        with torch.no_grad():
            for n in sizes:
                x = torch.randn(n, 64)
                assert_same_as_eager(f(x), model(x))
        rep = effopt.last_report()
        names = rep.lowering.per_bucket
        assert len(names) == 1 and "1 region(s) choose per size bucket" in str(rep.lowering)
        return next(m for n, m in rep.graph.named_modules() if n == names[0])

    region = run()
    assert region.chosen == "tvm"
    assert {b: d["form"] for b, d in region.decisions.items()} == {256: "tvm", 512: "tvm", 16384: "eager"}
    assert timed == [["eager", "tvm"], ["eager", "tvm"]]  # buckets 512 and 16384, once each
    torch._dynamo.reset()
    monkeypatch.setattr(buckets, "interleaved_medians", lambda *a, **k: pytest.fail("a bucket was timed again"))
    region = run()
    assert {b: d["form"] for b, d in region.decisions.items()} == {256: "tvm", 512: "tvm", 16384: "eager"}
    assert [d["reused"] for d in region.decisions.values()] == [False, True, True]
    # kernel_choice="tvm": the same close call keeps the TVM kernel at every size, nothing per bucket
    torch._dynamo.reset()
    f = torch.compile(model, backend="effopt", dynamic=True, options={"cache": False, "kernel_choice": "tvm"})
    with torch.no_grad():
        for n in sizes:
            x = torch.randn(n, 64)
            assert_same_as_eager(f(x), model(x))
    rep = effopt.last_report()
    assert rep.lowering.per_bucket == [] and [k.choice for k in rep.lowering.kernels] == ["tvm"]

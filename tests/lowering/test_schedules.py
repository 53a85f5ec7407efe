"""Default CPU schedules: row-wise normalization kernels (softmax, LayerNorm) get one parallel row loop
with every step computed under it, instead of TVM's unscheduled serial loops."""
import pytest
import tvm
from tvm import relax

from effopt.target import resolve_target
from effopt.lowering.build import LEGALIZE_OVERRIDES, fast_math_float32
from effopt.lowering.schedules import RowReduction


def _fused_primfuncs(build):
    bb = relax.BlockBuilder()
    params = [relax.Var(f"p{i}", relax.TensorType(s, "float32")) for i, s in enumerate(build.shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(*params))
        bb.emit_func_output(out)
    target = resolve_target("host")
    with target:
        mod = tvm.transform.Sequential([
            fast_math_float32, relax.transform.LegalizeOps(customize_legalize_map=LEGALIZE_OVERRIDES),
            relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(), relax.transform.FuseTIR()])(bb.get())
    return target, [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def softmax(x):
    return relax.op.nn.softmax(x, -1)


softmax.shapes = [(1, 6, 197, 197)]


def add_layer_norm(a, b, w):
    return relax.op.nn.layer_norm(relax.op.add(a, b), w, w, [-1], 1e-5)


add_layer_norm.shapes = [(1, 197, 384), (1, 197, 384), (384,)]


@pytest.mark.parametrize("build", [softmax, add_layer_norm])
def test_row_reduction_schedule_applies(build):
    target, funcs = _fused_primfuncs(build)
    norms = [f for f in funcs if "T.init()" in f.script()]  # the kernel with the row reductions
    assert len(norms) == 1
    sch = RowReduction().apply(norms[0], target, False)
    assert sch is not None
    text = sch.mod["main"].script()
    assert text.count("T.parallel(") == 1
    # every block sits under the one parallel row loop
    body = text[text.index("T.parallel("):]
    assert body.count("T.sblock(") == text.count("T.sblock(") - text.count('T.sblock("root")')


def softmax_relu(x):  # softmax's division, read by the ReLU alone, is inlined into it
    return relax.op.nn.relu(relax.op.nn.softmax(x, -1))


softmax_relu.shapes = [(2, 64, 64)]


def _refusing(monkeypatch, method):
    """s_tir.Schedule.<method> raising as TVM does where a step does not apply."""
    from tvm import s_tir

    from effopt import logs

    def refuse(self, *a, **k):
        raise RuntimeError(f"{method} refused (planted)")

    monkeypatch.setattr(s_tir.Schedule, method, refuse)
    monkeypatch.setattr(logs, "_warned", set())


@pytest.mark.parametrize("rule, method, build, says", [
    ("ParallelOuter", "parallel", add_layer_norm, "could not be parallelised"),
    ("RowReduction", "compute_inline", softmax_relu, "could not be fused"),
])
def test_a_schedule_step_that_does_not_apply_is_said_once(monkeypatch, rule, method, build, says):
    from effopt.lowering import schedules
    from effopt.lowering.records import EffoptSlowerWarning

    target, funcs = _fused_primfuncs(build)
    _refusing(monkeypatch, method)
    with pytest.warns(EffoptSlowerWarning, match=says) as caught:
        for _ in range(2):
            for f in funcs:
                getattr(schedules, rule)().apply(f, target, False)
    assert sum(says in str(w.message) for w in caught) == 1 and "planted" in str(caught[0].message)

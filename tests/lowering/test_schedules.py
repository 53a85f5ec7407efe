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

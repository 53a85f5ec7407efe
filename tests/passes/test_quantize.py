"""The quantize option (effopt/passes/quantize.py): int8 linear layers, compared with a plain-torch oracle of the
same integer arithmetic (effopt.ops.int8); the quantizer kernel bit for bit; the per-layer guard."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import effopt
from effopt.ops import int8 as int8_ops
from effopt.passes.guard import EffoptAccuracyWarning
from effopt.options import Options
from effopt.testing.compare import assert_same_as_eager
from effopt.testing.models import vit_tiny_test
from tests.conftest import compile_effopt

LINEARS = ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.attn.qkv",
           "blocks.1.attn.proj", "blocks.1.mlp.0", "blocks.1.mlp.2", "head"]


def quantizable():
    """The linears the pass quantizes: all, or all but the 10-class head (whose int8 form is torch's int8
    GEMM) where that GEMM is not exact and fast on this CPU."""
    return LINEARS if int8_ops.int_mm_usable() is None else LINEARS[:-1]


class _Int8(torch.nn.Module):
    def __init__(self, lin, scale, activations="int8"):
        super().__init__()
        self.lin, self.scale, self.activations = lin, scale, activations
        self.wq, self.ws = int8_ops.quantize_weight(lin.weight)

    def forward(self, x):
        return int8_ops.int8_linear_ref(x, self.wq, self.ws, self.lin.bias, self.scale, self.activations)


def host_activations() -> str:
    """The per-token activations quantize='int8-dynamic' gives on this host (activations='auto')."""
    from effopt.options.quantize import QuantConfig
    from effopt.target import int8_dot_product

    return QuantConfig.parse("int8-dynamic").for_dot_product(int8_dot_product("host")).activations


def quantized(model, names, scales=None, activations=None):
    """The model with the named linears as the integer oracle of their int8 form (activations: 'int8' or
    'uint7' for the per-token ones; None: what 'int8-dynamic' gives on this host)."""
    activations = activations or host_activations()
    m = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = m.get_submodule(parent) if parent else m
        setattr(owner, child, _Int8(owner.get_submodule(child), (scales or {}).get(name), activations))
    return m


def input_ranges(model, names, calibration):
    """max|x| per input channel of each named linear over the calibration inputs, by forward hooks."""
    amax = {}

    def hook(mod, inp, out, n):
        a = inp[0].detach().abs().flatten(0, -2).amax(0)
        amax[n] = torch.maximum(amax[n], a) if n in amax else a

    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n)) for n in names]
    with torch.no_grad():
        for x in calibration:
            model(x)
    for h in hooks:
        h.remove()
    return amax


def input_scales(model, names, calibration):
    return {n: float(a.max()) / 127 for n, a in input_ranges(model, names, calibration).items()}


def _model():
    torch.manual_seed(0)
    return vit_tiny_test().eval(), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("bad, match", [
    ({"quantize": "int4"}, r"quantize='int4' is invalid; valid: \['int8', 'int8-dynamic'\]"),
    ({"quantize": {"mode": "weights"}}, r"mode='weights'; valid: \['static', 'dynamic', 'mixed'\]"),
    ({"quantize": {"mode": "dynamic", "alpha": 0.5}}, r"no parameter\(s\) \['alpha'\]"),
    ({"quantize": {"mode": "dynamic", "smooth": 1.5}}, r"smooth=1.5; valid: None or a migration strength"),
    ({"quantize": {"mode": "dynamic", "smooth": 0.5}}, r"smooth \(SmoothQuant\) needs calibration data"),
    ({"quantize": "int8"}, r"needs calibration data"),
    ({"quantize": {"mode": "dynamic", "activations": "uint8"}},
     r"activations='uint8'; valid: \['auto', 'int8', 'uint7'\]"),
])
def test_invalid_quantize_options(bad, match):
    with pytest.raises(ValueError, match=match):
        Options.from_dict(bad)


def test_auto_activations_are_uint7_where_the_best_dot_product_is_avx2():
    from effopt.options.quantize import QuantConfig
    from effopt.target import int8_dot_product

    cfg = QuantConfig.parse("int8-dynamic")
    assert cfg.activations == "auto"
    assert int8_dot_product({"kind": "llvm", "mcpu": "znver3"}) == "avx2"
    assert int8_dot_product({"kind": "llvm", "mcpu": "icelake-server"}) == "avx512vnni"
    assert int8_dot_product({"kind": "llvm", "mcpu": "alderlake"}) == "avxvnni"
    assert int8_dot_product({"kind": "cuda"}) is None
    assert cfg.for_dot_product("avx2").activations == "uint7"
    assert [cfg.for_dot_product(d).activations for d in ("avx512vnni", "avxvnni", "neon-dot", None)] == ["int8"] * 4
    pinned = QuantConfig.parse({"mode": "dynamic", "activations": "int8"})
    assert pinned.for_dot_product("avx2") is pinned and "int8 activations" in str(pinned)


@pytest.mark.slow
@pytest.mark.parametrize("activations", ["int8", "uint7"])
def test_dynamic_int8_matches_the_integer_oracle_and_runs_int8_gemms(activations):
    model, x = _model()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        got = compile_effopt(model, quantize={"mode": "dynamic", "activations": activations}, kernel_choice="tvm")(x)
        ref = quantized(model, LINEARS, activations=activations)(x)
        exact = model(x)
    report = effopt.last_report()
    rec = next(r for r in report.passes if r.name == "quantize_int8")
    # one fused kernel per layer with a multiple of 16 outputs; the 10-class head: quantizer + torch's GEMM
    # where that is exact and fast here, else it stays float32 and the record says why
    fused = [k for k in report.lowering.kernels if "int8_linear" in k.ops]
    assert len(fused) == len(LINEARS) - 1 and all(k.choice == "tvm" for k in fused)
    quantizers = [k for k in report.lowering.kernels if "quantize_rows" in k.ops]
    if int8_ops.int_mm_usable() is None:
        assert rec.matches == len(LINEARS) and report.lowering.library_calls.get("_int_mm") == 1
        assert len(quantizers) == 1 and quantizers[0].choice == "tvm"
    else:
        assert rec.matches == len(LINEARS) - 1 and not report.lowering.library_calls.get("_int_mm")
        assert not quantizers and "1 layer(s) stay float32 (head)" in str(rec), str(rec)
        with torch.no_grad():
            ref = quantized(model, LINEARS[:-1], activations=activations)(x)
    # each MLP's GELU, and the residual add after attn.proj and mlp.2, are in their kernels
    assert "8 as one quantize-GEMM-dequantize kernel" in str(rec)
    assert ("(8 with uint7 per-token activations" in str(rec)) == (activations == "uint7")
    assert "with 2 activation(s) and 4 residual add(s) fused in; 0 dequantize-quantize pair(s) folded" \
        in str(rec)  # dynamic scales: nothing to fold
    assert_same_as_eager(got, ref)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.equal(got, exact) and F.cosine_similarity(got.flatten(), exact.flatten(), dim=0) > 0.999


@pytest.mark.slow
def test_static_int8_uses_scales_calibrated_on_the_calibration_inputs():
    model, x = _model()
    cal = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with torch.no_grad():
        got = compile_effopt(model, quantize={"mode": "static", "layers": "mlp"}, calibration=cal,
                             kernel_choice="tvm")(x)
        ref = quantized(model, ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"],
                        input_scales(model, LINEARS, cal))(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    # each mlp.0 (with its GELU) hands mlp.2 uint8 values quantized with mlp.2's scale: one requantize
    report = effopt.last_report()
    rec = next(r for r in report.passes if r.name == "quantize_int8")
    assert "2 dequantize-quantize pair(s) folded into a requantize" in str(rec)
    fused = [k for k in report.lowering.kernels if "int8_linear" in k.ops]
    assert len(fused) == 4 and all(k.choice == "tvm" for k in fused)


def test_guard_keeps_layers_with_activation_outliers_in_float():
    model, x = _model()
    with torch.no_grad():  # blocks.1.mlp.0's input gets one huge channel: per-tensor int8 loses the rest
        model.blocks[1].norm2.weight[5] = 2000.0
    cal = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        compiled = compile_effopt(model, quantize="int8", calibration=cal, accuracy_budget=0.002, lower=False)
        got = compiled(x)
    rec = next(r for r in effopt.last_report().passes if r.name == "quantize_int8")
    rolled = [n for n, _ in rec.guard.rolled_back]
    scales = input_scales(model, LINEARS, cal)
    with torch.no_grad():
        every = [quantized(model, LINEARS, scales)(c) for c in cal]
        loss_all = sum(1 - F.cosine_similarity(e.flatten(1), model(c).flatten(1)).mean().item()
                       for e, c in zip(every, cal)) / len(cal)
        ref = quantized(model, [n for n in quantizable() if n not in rolled], scales)(x)
    assert loss_all > 0.002 and rolled and rec.guard.loss <= 0.002, (loss_all, rolled)
    assert any(n.startswith("blocks.1.") for n in rolled)  # where the outlier is
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


class _SmoothInt8(torch.nn.Module):
    """SmoothQuant in plain torch: s_j = max|x_j|^a / max|w_j|^(1-a), x / s and w * s, then static int8."""

    def __init__(self, lin, amax, alpha):
        super().__init__()
        w = lin.weight.detach()
        s = amax.clamp_min(1e-5) ** alpha / w.abs().amax(dim=0).clamp_min(1e-5) ** (1 - alpha)
        self.inv, self.bias = 1.0 / s, lin.bias
        self.wq, self.ws = int8_ops.quantize_weight(w * s)
        self.scale = float((amax * self.inv).max()) / 127

    def forward(self, x):
        return int8_ops.int8_linear_ref(x * self.inv, self.wq, self.ws, self.bias, self.scale)


def test_smoothquant_keeps_the_layer_with_activation_outliers_in_int8():
    model, x = _model()
    with torch.no_grad():
        model.blocks[1].norm2.weight[5] = 2000.0  # as in the guard test above
    cal = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        got = compile_effopt(model, quantize={"mode": "static", "smooth": 0.8}, calibration=cal,
                             accuracy_budget=0.003, lower=False)(x)
    rec = next(r for r in effopt.last_report().passes if r.name == "quantize_int8")
    notes = " ".join(rec.notes)
    smoothed = notes.split("int8: ")[-1].split(", ") if "SmoothQuant" in notes else []
    # plain int8 costs blocks.1.mlp.2 (fed by the outlier through fc1 and GELU) 0.0057 alone, over the budget
    assert "blocks.1.mlp.2" in smoothed and not any(n == "blocks.1.mlp.2" for n, _ in rec.guard.rolled_back)
    assert max(rec.guard.retried) > 0.003 and rec.guard.loss <= 0.003
    # the oracle: per-channel ranges from hooks, smoothed layers as _SmoothInt8, the others plain static int8
    amax = input_ranges(model, LINEARS, cal)
    kept = [n for n in quantizable() if n not in {m for m, _ in rec.guard.rolled_back}]
    ref = quantized(model, [n for n in kept if n not in smoothed], {n: float(a.max()) / 127 for n, a in amax.items()})
    for name in smoothed:
        parent, _, child = name.rpartition(".")
        owner = ref.get_submodule(parent)
        setattr(owner, child, _SmoothInt8(model.get_submodule(name), amax[name], 0.8))
    with torch.no_grad():
        torch.testing.assert_close(got, ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scale", [None, 0.013])
def test_the_quantizer_kernel_is_bit_exact(scale):
    from effopt.lowering.build import build_function
    from effopt.lowering.kernels import shift

    x = torch.randn(3, 50, 96, generator=torch.Generator().manual_seed(0)) * 2
    x[0, 0, :4] = torch.tensor([0.0065, -0.0195, 1e4, -1e4])  # ties at the static scale, and clamping
    f = build_function(lambda bb, v: shift.emit_quantize(bb, v, scale), ((3, 50, 96), "float32"))
    xq, step = (torch.from_dlpack(t) for t in f(x))
    rq, rstep = int8_ops.quantize_rows_ref(x, scale)
    assert xq.dtype == torch.int8 and torch.equal(xq, rq) and torch.equal(step, rstep)


def test_self_check_lets_quantized_outputs_differ_by_one_step_in_a_few_elements():
    from effopt.lowering.select import region_tolerances as _tolerances
    from effopt.lowering.select import mismatch

    g = torch.fx.Graph()
    x = g.placeholder("x")
    g.output(g.call_function(torch.ops.effopt.quantize_rows.default, (x, None)))
    tol = _tolerances(g)
    ref = torch.randint(-127, 128, (1000,), dtype=torch.int8)
    one = ref.clone()
    one[3] += 1 if ref[3] < 127 else -1
    assert mismatch(ref, one, tol) is None  # a rounding boundary crossed by a last-bit float difference
    two = one.clone()
    two[3] += 1 if two[3] < 127 else -1
    assert mismatch(ref, two, tol) is not None  # more than one step: wrong
    many = ref.clone()
    many[:50] = torch.where(many[:50] < 127, many[:50] + 1, many[:50] - 1)
    assert mismatch(ref, many, tol) is not None  # 5% of the elements: wrong
    assert mismatch(ref, one, None) is not None  # other regions: integers exactly
    assert mismatch(torch.randn(10), torch.randn(10), tol) is not None  # floats keep their tolerance


def test_pt2e_quantized_models_run_as_int8_gemms():
    xiq = pytest.importorskip("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval()
    x = torch.randn(2, 8, 32)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())  # uint8 activations, zero points
    prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
    for _ in range(4):
        prepared(torch.randn(2, 8, 32))
    pt2e = convert_pt2e(prepared)
    with torch.no_grad():
        ref = pt2e(x)  # PT2E eager: quantize, dequantize, float GEMMs
        got = compile_effopt(pt2e, kernel_choice="tvm")(x)
    report = effopt.last_report()
    rec = next(r for r in report.passes if r.name == "pt2e_int8")
    assert rec.matches == 2 and not report.lowering.library_calls.get("_int_mm")
    fused = [k for k in report.lowering.kernels if "int8_linear" in k.ops]
    assert len(fused) == 2 and all(k.choice == "tvm" for k in fused)
    # the GELU in the first kernel, and the first kernel's output requantized for the second
    assert "1 activation(s) and 0 residual add(s) fused in; 1 dequantize-quantize pair(s) folded" in str(rec)
    assert not report.lowering.fallbacks, report.lowering.fallbacks  # no quantized_decomposed op left to eager
    assert_same_as_eager(got, ref)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # the same integers; float rounding only
    with torch.no_grad():
        assert not torch.allclose(got, model(x), atol=1e-4)  # and it is the quantized model, not the float one


def test_batchnorm_folds_into_the_linear_before_it_is_quantized():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.BatchNorm1d(64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 32)).eval()
    with torch.no_grad():  # running statistics away from the identity
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
        model[1].weight.normal_()
    x = torch.randn(16, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        got = compile_effopt(model, quantize="int8-dynamic", kernel_choice="tvm")(x)
    report = effopt.last_report()
    names = [r.name for r in report.passes]
    assert names.index("fold_batchnorm") < names.index("quantize_int8")
    assert next(r for r in report.passes if r.name == "fold_batchnorm").matches == 1
    rec = next(r for r in report.passes if r.name == "quantize_int8")
    assert rec.matches == 2 and "with 1 activation(s)" in str(rec)  # the ReLU, after the folded BN
    assert not any("batch_norm" in op for k in report.lowering.kernels for op in k.ops)
    # the oracle: BN folded by hand (fold_bn's arithmetic), then both linears as int8
    lin, bn = model[0], model[1]
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    w = (lin.weight.t() * scale[None, :]).t()
    b = lin.bias * scale + (bn.bias - bn.running_mean * scale)
    with torch.no_grad():
        acts = host_activations()
        h = torch.relu(int8_ops.int8_linear_ref(x, *int8_ops.quantize_weight(w), b, None, acts))
        ref = int8_ops.int8_linear_ref(h, *int8_ops.quantize_weight(model[3].weight), model[3].bias, None, acts)
    assert_same_as_eager(got, ref)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)

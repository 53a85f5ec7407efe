"""Whole models compiled with backend="effopt", each compared with eager (the oracle)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effopt
from effopt.lowering import EffoptFallbackWarning
from effopt.testing.compare import assert_same_as_eager
from effopt.testing.models import SmallCNN, vit_tiny_test
from tests.conftest import compile_effopt


def run_both(model, *inputs, **options):
    compiled = compile_effopt(model, **options)
    with torch.no_grad():
        ref = model(*inputs)
        got = compiled(*inputs)
    assert_same_as_eager(got, ref)
    return compiled, got


@pytest.mark.parametrize("spelling", ["index", "unbind"])
@pytest.mark.parametrize("choice", ["tvm", "measure"])
def test_vit_both_qkv_spellings(spelling, choice, no_fallback_warnings):
    model = vit_tiny_test(qkv_spelling=spelling).eval()
    run_both(model, torch.randn(2, 3, 32, 32), kernel_choice=choice)
    report = effopt.last_report()
    assert report.lowering.kernels, "no region was lowered"
    if choice == "tvm":
        assert all(k.choice == "tvm" for k in report.lowering.kernels), report.lowering
        # the two blocks are identical: their regions share compiled kernels
        assert report.lowering.unique_kernels < len(report.lowering.kernels)


def test_cnn_batchnorm_is_folded(no_fallback_warnings):
    model = SmallCNN().eval()
    with torch.no_grad():  # non-trivial running statistics, so folding has something to get wrong
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.uniform_(0.5, 1.5)
    run_both(model, torch.randn(2, 3, 16, 16), kernel_choice="tvm")
    rewrites = effopt.last_report().rewrites()
    assert rewrites["fold_batchnorm"] == 3
    ops = {str(n.target) for n in effopt.last_report().graph.graph.nodes}
    assert not any("batch_norm" in o for o in ops)


def test_multihead_attention_and_transformer_encoder(no_fallback_warnings):
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(2, 7, 32)
    compiled = compile_effopt(mha, kernel_choice="tvm")
    with torch.no_grad():
        ref, got = mha(x, x, x), compiled(x, x, x)
    assert_same_as_eager(got, ref)  # (output, averaged attention weights)

    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, batch_first=True, dropout=0.0)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    run_both(enc, torch.randn(2, 9, 32), kernel_choice="tvm")


class WithUnsupportedOp(nn.Module):
    def forward(self, x):
        y = torch.sin(x) * 2
        return torch.special.bessel_j0(y) + torch.cumsum(y, dim=-1)


def test_op_tvm_lacks_falls_back_with_one_warning_and_stays_right():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run_both(WithUnsupportedOp(), torch.randn(4, 16), kernel_choice="tvm")
    msgs = [str(x.message) for x in w if issubclass(x.category, EffoptFallbackWarning)]
    assert sum("bessel_j0" in m for m in msgs) == 1, msgs
    assert sum("cumsum" in m for m in msgs) == 1, msgs


class TupleDictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        h = self.lin(x)
        return {"hidden": F.gelu(h), "pair": (h.sum(-1), x.transpose(0, 1))}


def test_tuple_and_dict_outputs(no_fallback_warnings):
    run_both(TupleDictOut().eval(), torch.randn(3, 8), kernel_choice="tvm")


def test_non_contiguous_and_channels_last_inputs(no_fallback_warnings):
    model = vit_tiny_test().eval()
    x = torch.randn(2, 32, 32, 3).permute(0, 3, 1, 2)  # non-contiguous
    assert not x.is_contiguous()
    run_both(model, x, kernel_choice="tvm")
    run_both(SmallCNN().eval(), torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last), kernel_choice="tvm")
    lin = TupleDictOut().eval()
    x = torch.randn(8, 3).t()
    assert not x.is_contiguous()
    run_both(lin, x, kernel_choice="tvm")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compile_region_by_region(dtype):
    """A library kernel this CPU lacks (oneDNN's bf16 inner product without AVX-512) sends only its own
    choice back to the other library, never the whole graph to eager (tests/e2e/test_isa.py runs this
    as on an AVX2 CPU)."""
    model = vit_tiny_test().eval().to(dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_both(model, torch.randn(2, 3, 32, 32, dtype=dtype), kernel_choice="tvm")
    whole = [str(w.message) for w in caught if "running this graph in eager" in str(w.message)]
    assert not whole, whole
    assert effopt.last_report().lowering.kernels


def test_dynamic_batch_does_not_recompile(no_fallback_warnings):
    from torch._dynamo.utils import counters

    model = vit_tiny_test().eval()
    compiled = compile_effopt(model, kernel_choice="tvm")
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.mark_dynamic(x, 0)
    counters.clear()
    with torch.no_grad():
        for b in (2, 3, 5, 4, 7):  # not 1: dynamo always specializes sizes 0 and 1
            xb = torch.randn(b, 3, 32, 32)
            if b == 2:
                xb = x
            assert_same_as_eager(compiled(xb), model(xb))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_weights_changed_in_place_are_picked_up():
    model = vit_tiny_test().eval()
    compiled = compile_effopt(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        compiled(x)
        model.head.weight.mul_(2)  # an in-place update of a frozen parameter
        assert_same_as_eager(compiled(x), model(x))


def test_model_built_under_inference_mode(no_fallback_warnings):
    """Parameters created under torch.inference_mode are inference tensors, without version counters."""
    with torch.inference_mode():
        model = vit_tiny_test().eval()
        x = torch.randn(1, 3, 32, 32)
        compiled = compile_effopt(model)
        assert_same_as_eager(compiled(x), model(x))
        assert effopt.last_report() is not None and effopt.last_report().lowering.kernels
        new = torch.nn.Parameter(model.head.weight * 2)  # a replaced weight is still picked up
        model.head.weight = new
        assert_same_as_eager(compiled(x), model(x))


def test_training_graph_backward_works():
    model = vit_tiny_test()
    ref_model = vit_tiny_test()
    ref_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    compiled = compile_effopt(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EffoptFallbackWarning)  # the expected one-time training warning
        compiled(x).sum().backward()
    ref_model(x).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert_same_as_eager(p.grad, q.grad, name)


def test_tvm_failure_falls_back_with_warning_and_strict_raises(monkeypatch):
    import effopt.lowering.build as build

    def broken(mod, target):
        raise RuntimeError("simulated TVM codegen failure")

    monkeypatch.setattr(build, "build_module", broken)
    model = vit_tiny_test().eval()
    x = torch.randn(1, 3, 32, 32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        run_both(model, x, kernel_choice="tvm")
    assert any("simulated TVM codegen failure" in str(m.message) for m in w)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="simulated TVM codegen failure"):
        with torch.no_grad():
            compile_effopt(model, strict=True)(x)

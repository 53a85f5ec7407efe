"""Before/After: what each graph pass makes of a small graph, as the ops of the graph the passes hand to the
lowering (`lower=False`: no TVM build, so the whole file runs in seconds). Each case names the ops before
(the pass disabled) and after, and checks the rewritten graph against eager PyTorch. The end-to-end tests
beside these compile the same rewrites through TVM."""
import warnings
from collections import Counter

import pytest
import torch
from torch import nn

from effopt.graph import collect
from effopt.host import host, torch_int8_gemm
from effopt.inspect.stats import op_name
from effopt.testing.compare import assert_same_as_eager
from effopt.testing.models import vit_tiny_test


def rewritten(model, *args, **options):
    """(the op names of the graph the passes produced, its output on args)."""
    torch._dynamo.reset()
    with collect("graphs") as graphs, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # approximate options without calibration say so once
        out = torch.compile(model, backend="effopt", options={"lower": False, **options})(*args)
    torch._dynamo.reset()
    (gm,) = graphs
    return [op_name(n) for n in gm.graph.nodes if n.op == "call_function"], out


class Attention(nn.Module):
    """timm's attention, spelled out (q @ k^T * scale, softmax, @ v)."""

    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv, self.proj, self.heads = nn.Linear(d, 3 * d), nn.Linear(d, d), heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.bn(self.conv(x))


HEAD = ["view", "addmm", "view", "view", "permute", "select", "select", "select"]
TAIL = ["transpose", "clone", "_unsafe_view", "view", "addmm", "view"]
SPELLED = ["transpose", "expand", "view", "expand", "view", "bmm", "view", "mul", "_softmax", "expand", "view",
           "expand", "view", "bmm", "view"]


def _x():
    return torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(0))


def test_fuse_attention_before_after():
    torch.manual_seed(0)
    model, x = Attention().eval(), _x()
    before, _ = rewritten(model, x, disable_passes=["fuse_attention"])
    after, out = rewritten(model, x)
    assert before == HEAD + SPELLED + TAIL
    assert after == HEAD + ["scaled_dot_product_attention"] + TAIL
    assert_same_as_eager(out, model(x))


def test_fuse_attention_leaves_a_softmax_over_queries_alone():
    class OverQueries(Attention):
        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            return ((q @ k.transpose(-2, -1)).softmax(-2) @ v).sum()

    ops, _ = rewritten(OverQueries().eval(), _x())
    assert "scaled_dot_product_attention" not in ops and "_softmax" in ops


@pytest.mark.parametrize("kind", ["hamming", "linear", "lmul"])
def test_approximate_attention_before_after(kind):
    torch.manual_seed(0)
    model, x = Attention().eval(), _x()
    after, out = rewritten(model, x, attention=kind)
    assert after == HEAD + [f"effopt::{kind}_attention"] + TAIL
    assert out.shape == model(x).shape and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fold_batchnorm_before_after():
    torch.manual_seed(0)
    model, x = ConvBN().eval(), torch.randn(1, 3, 8, 8)
    before, _ = rewritten(model, x, disable_passes=["fold_batchnorm"])
    after, out = rewritten(model, x)
    assert before == ["convolution", "_native_batch_norm_legit_no_training", "getitem"]
    assert after == ["convolution"]
    assert_same_as_eager(out, model(x))


def test_shift_add_before_after():
    torch.manual_seed(0)
    model, x = Mlp().eval(), _x()
    before, _ = rewritten(model, x)
    after, out = rewritten(model, x, shift_add="mlp")
    assert before == ["view", "addmm", "view", "gelu", "view", "addmm", "view"]
    assert after == ["view", "effopt::shift_linear", "view", "gelu", "view", "effopt::shift_linear", "view"]
    assert torch.nn.functional.cosine_similarity(out.flatten(), model(x).flatten(), dim=0) > 0.9


def test_quantize_before_after_takes_the_gelu_into_the_first_int8_linear():
    torch.manual_seed(0)
    model, x = Mlp().eval(), _x()
    after, out = rewritten(model, x, quantize="int8-dynamic")
    assert after == ["view", "effopt::int8_linear", "view", "view", "effopt::int8_linear", "view"]
    assert torch.nn.functional.cosine_similarity(out.flatten(), model(x).flatten(), dim=0) > 0.99


def test_quantize_takes_the_unfused_form_where_outputs_are_not_a_multiple_of_16():
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(16, 24)).eval(), _x()
    after, out = rewritten(model, x, quantize="int8-dynamic")
    # the fused kernel packs 16 outputs per tile: here the quantizer, torch's int8 GEMM and a float epilogue,
    # where the host description says torch's int8 GEMM is exact and fast (a VNNI CPU); without an int8 dot
    # product (AVX2, or EFFOPT_HOST_ISA=avx2) that GEMM is slower than float32, and the layer stays float32
    if torch_int8_gemm() is None:
        assert host().fast_int8
        assert after == ["view", "effopt::quantize_rows", "getitem", "getitem", "_int_mm", "mul", "_to_copy", "mul",
                         "add", "view"]
    else:
        assert after == ["view", "addmm", "view"]
    assert torch.nn.functional.cosine_similarity(out.flatten(), model(x).flatten(), dim=0) > 0.99


def test_quantize_leaves_a_graph_without_linear_layers_alone():
    model = nn.Sequential(nn.GELU()).eval()
    before, _ = rewritten(model, _x())
    after, _ = rewritten(model, _x(), quantize="int8-dynamic")
    assert after == before == ["gelu"]


@pytest.mark.parametrize("option, ops", [
    ({"token_merge": 2}, {"effopt::token_init": 1, "effopt::token_mask": 1, "effopt::tome_merge": 2}),
    ({"token_prune": 0.7}, {"effopt::token_init": 1, "effopt::token_mask": 1, "effopt::cls_attention": 2,
                            "effopt::evit_prune": 2}),
])
def test_token_reduction_before_after(option, ops):
    torch.manual_seed(0)
    model, x = vit_tiny_test().eval(), torch.randn(1, 3, 32, 32)
    before, _ = rewritten(model, x)
    after, out = rewritten(model, x, **option)
    assert not any(o.startswith("effopt::") for o in before) and before.count("scaled_dot_product_attention") == 2
    assert Counter(o for o in after if o.startswith("effopt::")) == ops  # one reduction per block
    assert out.shape == model(x).shape


def test_token_merge_of_zero_changes_nothing():
    torch.manual_seed(0)
    model, x = vit_tiny_test().eval(), torch.randn(1, 3, 32, 32)
    before, _ = rewritten(model, x)
    after, out = rewritten(model, x, token_merge=0)
    assert after == before
    assert_same_as_eager(out, model(x))

"""Exact attention fusion: every spelling of softmax attention becomes one SDPA, counted exactly; a
pattern whose intermediates are used elsewhere is left alone; results equal eager."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import effopt
from effopt.testing.compare import assert_same_as_eager
from effopt.testing.models import vit_tiny_test
from tests.conftest import compile_effopt

B, H, N, D = 2, 4, 17, 16


def _heads(x):
    return x.view(B, N, H, D).transpose(1, 2)


class Spelled(nn.Module):
    """Multi-head attention over [B, N, H*D] projections, written several ways."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.qkv = nn.Linear(H * D, 3 * H * D)

    def forward(self, x, mask=None):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, -1))
        s = self.spelling
        if s == "div_scores":
            a = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        elif s == "mul_scores":
            a = (q @ k.transpose(-2, -1)) * D ** -0.5
        elif s == "scale_q":
            a = (q * D ** -0.5) @ k.permute(0, 1, 3, 2)
        elif s == "bmm_3d":  # heads folded into the batch, torch.bmm on 3-D tensors
            q3, k3, v = (t.reshape(B * H, N, D) for t in (q, k, v))
            a = torch.bmm(q3, k3.transpose(1, 2)) / math.sqrt(D)
        elif s == "masked":
            a = q @ k.transpose(-2, -1) / math.sqrt(D) + mask
        p = F.dropout(a.softmax(dim=-1), 0.1, self.training)
        out = p @ v if s != "bmm_3d" else torch.bmm(p, v)
        return out.reshape(B, H, N, D).transpose(1, 2).reshape(B, N, H * D)


def _fuse_record():
    return next(r for r in effopt.last_report().passes if r.name == "fuse_attention")


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["div_scores", "mul_scores", "scale_q", "bmm_3d", "masked"])
def test_spellings_are_fused_and_stay_exact(spelling, no_fallback_warnings):
    model = Spelled(spelling).eval()
    x = torch.randn(B, N, H * D)
    mask = torch.zeros(B, 1, 1, N)
    mask[0, ..., -5:] = torch.finfo(torch.float32).min  # padding, Hugging Face style
    f = compile_effopt(model)
    with torch.no_grad():
        assert_same_as_eager(f(x, mask), model(x, mask))
    rec = _fuse_record()
    assert rec.matches == 1
    graph = effopt.last_report().graph.graph
    assert not any(n.target is torch.ops.aten._softmax.default for n in graph.nodes)


@pytest.mark.slow
@pytest.mark.parametrize("spelling", ["index", "unbind"])
def test_vit_blocks_each_fused(spelling, no_fallback_warnings):
    model = vit_tiny_test(qkv_spelling=spelling).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_as_eager(compile_effopt(model)(x), model(x))
    assert _fuse_record().matches == len(model.blocks)


def test_sdpa_models_are_counted_not_rewritten():
    model = vit_tiny_test(use_sdpa=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_same_as_eager(compile_effopt(model)(x), model(x))
    rec = _fuse_record()
    assert rec.matches == 0 and f"already_fused={len(model.blocks)}" in rec.notes


class ReturnsProbabilities(Spelled):
    def forward(self, x, mask=None):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, -1))
        p = (q @ k.transpose(-2, -1) / math.sqrt(D)).softmax(-1)
        return p @ v, p  # the probabilities are an output: the pattern must stay


class ReusesScores(Spelled):
    def forward(self, x, mask=None):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, -1))
        a = q @ k.transpose(-2, -1)
        return a.softmax(-1) @ v, a  # the raw scores are an output too


class SoftmaxOverQueries(Spelled):
    def forward(self, x, mask=None):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, -1))
        return (q @ k.transpose(-2, -1)).softmax(-2) @ v  # not attention over keys


@pytest.mark.parametrize("cls", [ReturnsProbabilities, ReusesScores, SoftmaxOverQueries])
def test_patterns_that_would_change_results_are_left_alone(cls, no_fallback_warnings):
    model = cls("mul_scores").eval()
    x = torch.randn(B, N, H * D)
    with torch.no_grad():
        assert_same_as_eager(compile_effopt(model)(x), model(x))
    assert _fuse_record().matches == 0


def test_training_graph_keeps_what_backward_needs():
    model = Spelled("mul_scores").train()
    x = torch.randn(B, N, H * D, requires_grad=True)
    ref = Spelled("mul_scores").train()
    ref.load_state_dict(model.state_dict())
    model.eval(), ref.eval()  # no dropout randomness, gradients still on
    f = compile_effopt(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-time "backward runs in eager" warning
        y = f(x, None)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2, None).sum().backward()
    assert_same_as_eager(x.grad, x2.grad)
    assert _fuse_record().matches == 0  # softmax output is saved for backward: an extra user


def _hf(name, impl):
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    cfg_cls, model_cls = {"vit": (ViTConfig, ViTModel), "dinov2": (Dinov2Config, Dinov2Model)}[name]
    cfg = cfg_cls(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                  image_size=32, patch_size=8)
    cfg._attn_implementation = impl
    return model_cls(cfg).eval()


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_hugging_face_vit_and_dinov2_attention(name, impl, no_fallback_warnings):
    model = _hf(name, impl)
    x = torch.randn(2, 3, 32, 32)

    def f(px):
        return model(pixel_values=px).last_hidden_state

    with torch.no_grad():
        assert_same_as_eager(compile_effopt(f)(x), f(x))
    rec = _fuse_record()
    if impl == "eager":
        assert rec.matches == 2
    else:
        assert rec.matches == 0 and "already_fused=2" in rec.notes


def test_multihead_attention_counted():
    mha = nn.MultiheadAttention(64, 4, batch_first=True).eval()
    x = torch.randn(2, 9, 64)

    def f(t):
        return mha(t, t, t, need_weights=False)[0]

    with torch.no_grad():
        assert_same_as_eager(compile_effopt(f)(x), f(x))
    rec = _fuse_record()
    assert rec.matches + sum(int(n.split("=")[1]) for n in rec.notes if n.startswith("already_fused=")) == 1


class BoolMasked(nn.Module):
    """Boolean masks, as hand-written models spell them."""

    def __init__(self, spelling, causal=False):
        super().__init__()
        self.spelling = spelling
        self.qkv = nn.Linear(H * D, 3 * H * D)
        self.register_buffer("causal", torch.tril(torch.ones(N, N, dtype=torch.bool)))

    def forward(self, x, keep):
        q, k, v = (_heads(t) for t in self.qkv(x).chunk(3, -1))
        a = q @ k.transpose(-2, -1) / math.sqrt(D)
        if self.spelling == "where_min":
            a = torch.where(keep, a, torch.finfo(a.dtype).min)
        elif self.spelling == "masked_fill_min":
            a = a.masked_fill(~keep, torch.finfo(a.dtype).min)
        elif self.spelling == "causal_inf":  # a constant mask in which every row keeps a key
            a = a.masked_fill(~self.causal, float("-inf"))
        elif self.spelling == "runtime_inf":
            a = a.masked_fill(~keep, float("-inf"))
        elif self.spelling == "runtime_1e9":
            a = a.masked_fill(keep == 0, -1e9)
        return (a.softmax(-1) @ v).transpose(1, 2).reshape(B, N, H * D)


@pytest.mark.slow
@pytest.mark.parametrize("spelling, fused", [("where_min", 1), ("masked_fill_min", 1), ("causal_inf", 1),
                                             ("runtime_inf", 0), ("runtime_1e9", 0)])
def test_boolean_masks(spelling, fused, no_fallback_warnings):
    """Fused where the additive mask is exactly equivalent, including rows whose keys are all masked (where a
    finite fill gives the uniform average); kept, with the reason noted, where such a row would change."""
    model = BoolMasked(spelling).eval()
    x = torch.randn(B, N, H * D)
    keep = torch.rand(B, 1, 1, N) > 0.3
    keep[0] = False  # every key of sample 0 masked
    keep[1, ..., 0] = True
    f = compile_effopt(model)
    with torch.no_grad():
        assert_same_as_eager(f(x, keep), model(x, keep))
    rec = _fuse_record()
    assert rec.matches == fused
    if not fused:
        assert any("unfused" in n and "every key masked" in n for n in rec.notes), rec.notes


def _attention_kernels():
    return [k for k in effopt.last_report().lowering.kernels if "scaled_dot_product_attention" in k.ops]


@pytest.mark.parametrize("masked", [False, True])
def test_fused_attention_lowers_to_the_tiled_kernel_or_torch_by_measurement(masked, no_fallback_warnings):
    """The fused op is a region of its own: effopt's tiled online-softmax TVM kernel where it is measured
    faster than torch's SDPA for the shape, else torch's; either way equal to eager."""
    model = Spelled("masked" if masked else "mul_scores").eval()
    x = torch.randn(B, N, H * D)
    mask = torch.zeros(B, 1, 1, N)
    mask[0, ..., -5:] = torch.finfo(torch.float32).min
    args = (x, mask) if masked else (x,)
    for choice in ("tvm", "measure"):
        torch._dynamo.reset()
        f = compile_effopt(model, kernel_choice=choice)
        with torch.no_grad():
            assert_same_as_eager(f(*args), model(*args))
        (k,) = _attention_kernels()
        assert k.ops == ["scaled_dot_product_attention"] and k.tvm_us and k.eager_us
        assert k.choice == ("tvm" if choice == "tvm" or k.tvm_us < k.eager_us else "eager"), k


def test_a_graph_of_only_sdpa_lowers_to_the_kernel(no_fallback_warnings):
    """A function that is one SDPA call reaches the lowering as torch's CPU flash op, whose (output,
    log-sum-exp) tuple the kernel stands in for; TVM's FuseTIR once failed on that region ("fused")."""
    q, k, v = torch.randn(3, 8, 6, 257, 64).unbind(0)  # failed at DINOv2's shape, not at small ones
    f = compile_effopt(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), kernel_choice="tvm", strict=True)
    with torch.no_grad():
        assert_same_as_eager(f(q, k, v), F.scaled_dot_product_attention(q, k, v))
    (kern,) = [k for k in effopt.last_report().lowering.kernels if any("scaled_dot_product" in o for o in k.ops)]
    assert kern.choice == "tvm", kern


def test_causal_sdpa_stays_on_torch_without_warning(no_fallback_warnings):
    q, k, v = torch.randn(3, 1, 2, 9, 8).unbind(0)
    f = compile_effopt(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2)
    with torch.no_grad():
        assert_same_as_eager(f(q, k, v), F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2)
    assert not _attention_kernels()

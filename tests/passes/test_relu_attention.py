"""ReLU attention, the kind added by following docs/architecture.md's checklist: its reference, its pass entry
(Before/After), its kernel against the reference, and the guard."""
import math
import warnings

import pytest
import torch

from effopt.ops.relu_attention import relu_attention_ref
from effopt.options import Options
from tests.passes.test_ir import HEAD, TAIL, Attention, _x, rewritten

aten = torch.ops.aten


def test_reference_is_relu_of_the_scaled_scores_over_the_key_count():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g) for _ in range(3))
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * 0.5
    expect = torch.einsum("bhnm,bhmd->bhnd", s.clamp_min(0) / 5, v)
    torch.testing.assert_close(relu_attention_ref(q, k, v, None, 0.5), expect)


def test_reference_drops_masked_keys():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 3, 4, generator=g) for _ in range(3))
    keep = torch.tensor([True, True, False])
    v_changed = v.clone()
    v_changed[..., 2, :] = 100.0  # a masked key's value must not matter
    for mask in (keep, torch.zeros(3).masked_fill(~keep, -math.inf), torch.zeros(3).masked_fill(~keep, -1e30)):
        torch.testing.assert_close(relu_attention_ref(q, k, v, mask, 0.5), relu_attention_ref(q, k, v_changed, mask, 0.5))


def test_the_option_takes_no_parameters():
    assert str(Options.from_dict({"attention": "relu"}).attention) == "relu()"
    with pytest.raises(ValueError, match=r"attention 'relu' has no parameter\(s\) \['bits'\]"):
        Options.from_dict({"attention": {"kind": "relu", "bits": 64}})
    cfg = Options.from_dict({"attention": {"kind": "linear", "fallback": ["relu", "hamming"]}}).attention
    assert cfg.kinds == ("linear", "relu", "hamming")


def test_pass_before_after():
    torch.manual_seed(0)
    model, x = Attention().eval(), _x()
    after, out = rewritten(model, x, attention="relu")
    assert after == HEAD + ["effopt::relu_attention"] + TAIL
    qkv = model.qkv(x).reshape(1, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
    y = relu_attention_ref(qkv[0], qkv[1], qkv[2], None, 8 ** -0.5).transpose(1, 2).reshape(1, 10, 16)
    torch.testing.assert_close(out, model.proj(y))


@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_the_reference(masked, cache_dir):
    class Masked(Attention):
        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            mask = torch.zeros(1, n).masked_fill(torch.arange(n) >= n - 3, -1e30) if masked else None
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return self.proj(y.transpose(1, 2).reshape(b, n, d))

    torch.manual_seed(0)
    model, x = Masked().eval(), _x()
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.compile(model, backend="effopt", options={"attention": "relu", "lower": False})(x)
        torch._dynamo.reset()
        fast = torch.compile(model, backend="effopt", options={"attention": "relu", "kernel_choice": "tvm",
                                                               "cache_dir": cache_dir})
        out = fast(x)
    report = __import__("effopt").last_report()
    assert any("relu_attention" in op for k in report.lowering.kernels if k.choice == "tvm" for op in k.ops)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_guard_rolls_it_back_at_a_zero_budget():
    torch.manual_seed(0)
    model = Attention().eval()
    cal = [(torch.randn(1, 10, 16),) for _ in range(2)]
    after, out = rewritten(model, _x(), attention="relu", calibration=cal, accuracy_budget=0.0)
    assert "effopt::relu_attention" not in after and "scaled_dot_product_attention" in after
    torch.testing.assert_close(out, model(_x()))

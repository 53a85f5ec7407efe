"""Approximate attentions (hamming, linear, lmul), the accuracy guard, and effopt.reparameterize."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import effopt
from effopt.ops import attention as ops
from effopt.passes.guard import EffoptAccuracyWarning, cosine_loss
from effopt.options import Options
from effopt.testing.compare import assert_same_as_eager
from effopt.testing.models import vit_tiny_test
from tests.conftest import compile_effopt


# ---- options ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    ({"attention": "softmax"}, r"attention='softmax' is invalid; valid: \['exact', 'hamming', 'linear', 'lmul'(, '\w+')*\]"),
    ({"attention": {"kind": "hamming", "mantissa_bits": 3}}, r"no parameter\(s\) \['mantissa_bits'\]; valid: \['bits'"),
    ({"attention": {"kind": "hamming", "bits": 100}}, r"multiple of 64"),
    ({"attention": {"kind": "lmul", "mantissa_bits": 30}}, r"0..23"),
    ({"attention": {"kind": "linear", "feature_map": "softplus"}}, r"valid: \['elu', 'relu'\]"),
    ({"attention": "hamming", "accuracy_budget": 0.01}, r"accuracy_budget needs calibration"),
    ({"attention": "hamming", "accuracy_budget": -1, "calibration": [1]}, r"number >= 0"),
    ({"metric": "accuracy"}, r"metric='accuracy' is invalid; valid: \['cosine', 'top1'\]"),
    ({"calibration": torch.zeros(2)}, r"calibration must be a list"),
    ({"calibration": []}, r"empty"),
])
def test_invalid_approximate_options(bad, match):
    with pytest.raises(ValueError, match=match):
        Options.from_dict(bad)


# ---- the reference semantics ------------------------------------------------------------------------------
def test_lmul_is_the_papers_formula():
    # L-Mul(a, b) = (1 + ma + mb + 2^-l(m)) * 2^(ea + eb), mantissas truncated to m bits, l(3) = 3
    a = torch.tensor([1.25, -3.0, 0.0, 1.2])  # 1.2 truncates to 1.125 (mantissa .2 -> .125 at 3 bits)
    b = torch.tensor([1.5, 0.75, 5.0, 2.0])
    got = ops.lmul(a, b, 3)
    # -3 * 0.75: mantissas .5 + .5 carry into the exponent, as in the integer adder: 2 * (1 + 0 + .125)
    want = torch.tensor([(1 + 0.25 + 0.5 + 0.125), -2 * (1 + 0 + 0.125), 0.0, (1 + 0.125 + 0 + 0.125) * 2])
    assert torch.equal(got, want)
    assert ops.lmul_offset_bits(4) == 3 and ops.lmul_offset_bits(8) == 4


def test_hamming_similarity_counts_equal_bits():
    gen = torch.Generator().manual_seed(1)
    qp, kp = torch.randn(1, 2, 5, 64, generator=gen), torch.randn(1, 2, 7, 64, generator=gen)
    same = ops.hamming_similarity(qp, kp)

    def word(x):
        return sum(1 << i for i, bit in enumerate((x > 0).tolist()) if bit)

    for h in range(2):
        for i in range(5):
            for j in range(7):
                xor = word(qp[0, h, i]) ^ word(kp[0, h, j])
                assert same[0, h, i, j].item() == 64 - bin(xor).count("1")


def test_linear_attention_is_the_normalized_kernel_product():
    q, k, v = torch.randn(3, 2, 3, 9, 8).unbind(0)
    mask = torch.zeros(2, 1, 1, 9)
    mask[0, ..., -3:] = torch.finfo(torch.float32).min
    s = 8 ** -0.25
    w = (F.elu(q * s) + 1) @ (F.elu(k * s) + 1).transpose(-1, -2) * torch.exp(mask)
    want = (w / w.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(ops.linear_attention_ref(q, k, v, mask, 8 ** -0.5), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="differs between queries"):
        ops.linear_attention_ref(q, k, v, torch.randn(2, 1, 9, 9), 1.0)


# ---- the guard, through torch.compile --------------------------------------------------------------------------
def _vit_with_a_sharp_layer():
    """Three blocks; block 1's queries and keys are scaled up so that its attention is nearly one-hot,
    which an approximate attention cannot follow; blocks 0 and 2 attend broadly."""
    torch.manual_seed(0)
    model = vit_tiny_test(depth=3).eval()
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[:128] *= 6
    return model


def _calibration(n=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 32, 32, generator=gen),) for _ in range(n)]


def _approx_record():
    return next(r for r in effopt.last_report().passes if r.name.startswith("attention_"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hamming", "linear"])
def test_guard_rolls_back_the_layer_that_costs_too_much(kind, no_fallback_warnings):
    model, cal = _vit_with_a_sharp_layer(), _calibration()
    budget = 0.1
    # kernel_choice "tvm": the approximate kernels run whatever their speed (under "measure", a faster
    # exact layer or eager graph would stand in, and the guard's figure below would not be what runs)
    f = compile_effopt(model, attention=kind, calibration=cal, accuracy_budget=budget, metric="cosine",
                       kernel_choice="tvm")
    x = cal[0][0]
    with torch.no_grad():
        out, ref = f(x), model(x)
    guard = _approx_record().guard
    assert [name.split(" ")[0] for name, _ in guard.rolled_back] == ["attention[1]"], guard.summary()
    assert [name.split(" ")[0] for name in guard.kept] == ["attention[0]", "attention[2]"]
    assert all(loss > budget for _, loss in guard.rolled_back)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # the guard's own figure holds when measured independently, on every calibration input
    with torch.no_grad():
        losses = [cosine_loss(model(*c), f(*c)) for c in cal]
    assert abs(sum(losses) / len(losses) - guard.loss) < 1e-4 and guard.loss <= budget


@pytest.mark.slow
def test_zero_budget_keeps_the_exact_model():
    model, cal = _vit_with_a_sharp_layer(), _calibration(2)
    f = compile_effopt(model, attention="hamming", calibration=cal, accuracy_budget=0.0)
    with torch.no_grad():
        assert_same_as_eager(f(cal[1][0]), model(cal[1][0]))
    rec = _approx_record()
    assert rec.matches == 0 and len(rec.guard.rolled_back) == 3


@pytest.mark.slow
def test_top1_metric_and_callable_metric():
    model, cal = _vit_with_a_sharp_layer(), _calibration(2)
    with torch.no_grad():
        compile_effopt(model, attention="lmul", calibration=cal, accuracy_budget=0.0, metric="top1")(cal[0][0])
    assert _approx_record().guard.metric == "top1"
    calls = []

    def max_abs(ref, got):
        calls.append((ref.shape, got.shape))
        return (ref - got).abs().max().item()

    torch._dynamo.reset()
    with torch.no_grad():
        compile_effopt(model, attention="lmul", calibration=cal, accuracy_budget=1e-9, metric=max_abs)(cal[0][0])
    assert calls and calls[0] == (torch.Size([2, 10]), torch.Size([2, 10]))
    assert _approx_record().matches == 0  # L-Mul changes logits by more than 1e-9


def test_without_calibration_a_one_time_warning_says_unverified():
    model = vit_tiny_test().eval()
    x = torch.randn(2, 3, 32, 32)
    with warnings.catch_warnings(record=True) as w, torch.no_grad():
        warnings.simplefilter("always")
        compile_effopt(model, attention={"kind": "linear", "feature_map": "relu"})(x)
        torch._dynamo.reset()
        compile_effopt(model, attention={"kind": "linear", "feature_map": "relu"})(x)
    unverified = [x for x in w if issubclass(x.category, EffoptAccuracyWarning)]
    assert len(unverified) == 1 and "unverified" in str(unverified[0].message)
    assert _approx_record().matches == 2


class TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x, mask=None):
        q, k, v = self.proj(x).view(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum(1)


@pytest.mark.slow
def test_calibration_items_bind_to_the_signature():
    model = TwoInputs().eval()
    x, mask = torch.randn(2, 5, 16), torch.zeros(2, 1, 1, 5)
    cal = [(torch.randn(2, 5, 16), torch.zeros(2, 1, 1, 5)), {"x": torch.randn(2, 5, 16), "mask": mask}]
    f = compile_effopt(model, attention="lmul", calibration=cal, accuracy_budget=0.5)
    with torch.no_grad():
        f(x, mask=mask)
    assert _approx_record().guard.evaluations >= 1
    torch._dynamo.reset()
    f = compile_effopt(model, attention="lmul", calibration=[(torch.randn(3, 5, 16), mask)], accuracy_budget=0.5)
    with pytest.raises(Exception, match=r"calibration item 0: input L\['x'\] is \(3, 5, 16\).*compiled for \(2, 5, 16\)"):
        f(x, mask)


# ---- reparameterize ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_reparameterize_gives_a_module_that_fine_tunes_and_compiles():
    torch.manual_seed(0)
    teacher = vit_tiny_test().eval()
    x = torch.randn(8, 3, 32, 32)
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = effopt.reparameterize(teacher, (x,), attention="hamming")
    assert student.effopt_record.matches == 2
    projections = [p for n, p in student.named_parameters() if "hamming_proj" in n]
    assert len(projections) == 2 and all(p.requires_grad for p in projections)
    with torch.no_grad():
        target = teacher(x)
        before = F.mse_loss(student(x), target).item()
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    for _ in range(25):
        opt.zero_grad()
        loss = F.mse_loss(student(x), target)
        loss.backward()
        opt.step()
    assert projections[0].grad is not None and projections[0].grad.abs().sum() > 0
    with torch.no_grad():
        after = F.mse_loss(student(x), target).item()
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items()), "the original model changed"
    student.eval()
    f = compile_effopt(student)
    with torch.no_grad():
        assert_same_as_eager(f(x), student(x))
    kernels = effopt.last_report().lowering.kernels
    assert any("hamming_attention" in " ".join(k.ops) for k in kernels), kernels


@pytest.mark.slow
def test_reparameterize_guard_rolls_back_and_drops_the_projections():
    teacher, cal = _vit_with_a_sharp_layer(), _calibration(2)
    with pytest.warns(UserWarning, match="every attention layer was rolled back"):
        student = effopt.reparameterize(teacher, cal[0], attention="hamming", calibration=cal, accuracy_budget=0.0)
    assert student.effopt_record.matches == 0 and len(student.effopt_record.guard.rolled_back) == 3
    assert not [n for n, _ in student.named_parameters() if "hamming_proj" in n]
    with torch.no_grad():
        assert_same_as_eager(student(*cal[1]), teacher(*cal[1]))


def test_attention_parameters_are_the_projections_of_the_rewritten_layers():
    teacher, cal = _vit_with_a_sharp_layer(), _calibration()
    student = effopt.reparameterize(teacher, cal[0], attention="hamming", calibration=cal, accuracy_budget=0.1)
    assert [n.split(" ")[0] for n, _ in student.effopt_record.guard.rolled_back] == ["attention[1]"]
    names = {id(p): n for n, p in student.named_parameters()}
    got = [names[id(p)] for p in effopt.attention_parameters(student)]
    # blocks 0 and 2 kept Hamming attention: their fused qkv projections and their code projections
    assert sorted(got) == ["blocks.0.attn.qkv.bias", "blocks.0.attn.qkv.weight", "blocks.2.attn.qkv.bias",
                           "blocks.2.attn.qkv.weight", "effopt_hamming_proj_0", "effopt_hamming_proj_2"], got
    # fine-tuning only those leaves every other parameter as it was
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    opt = torch.optim.Adam(effopt.attention_parameters(student), lr=1e-3)
    F.mse_loss(student(*cal[0]), teacher(*cal[0]).detach()).backward()
    opt.step()
    changed = sorted(n for n, p in student.named_parameters() if not torch.equal(p, before[n]))
    assert changed == sorted(got), changed
    with pytest.raises(TypeError, match="reparameterize"):
        effopt.attention_parameters(teacher)


def test_reparameterize_needs_an_approximate_attention():
    with pytest.raises(ValueError, match="needs an approximate attention"):
        effopt.reparameterize(vit_tiny_test().eval(), (torch.randn(1, 3, 32, 32),), attention="exact")


@pytest.mark.slow
def test_lmul_kernel_passes_the_self_check_where_truncation_flips_differ():
    """L-Mul truncates mantissas, so kernel and reference can differ by a truncation step where their exp
    differ in the last bit; the self-check compares by relative L2 error (a wrong kernel fails it)."""
    from effopt.lowering.select import mismatch

    q, k, v = torch.randn(3, 1, 6, 257, 64, generator=torch.Generator().manual_seed(3)).unbind(0)
    f = compile_effopt(lambda q, k, v: torch.ops.effopt.lmul_attention(q, k, v, None, 0.125, 3), kernel_choice="tvm")
    with torch.no_grad():
        got, ref = f(q, k, v), ops.lmul_attention_ref(q, k, v, None, 0.125, 3)
    (kernel,) = [k for k in effopt.last_report().lowering.kernels if "lmul_attention" in k.ops]
    assert kernel.choice == "tvm", kernel.reason
    assert mismatch(ref, got, {"relative_l2": 1e-3}) is None
    assert mismatch(ref, got.roll(1, dims=2), {"relative_l2": 1e-3}) is not None

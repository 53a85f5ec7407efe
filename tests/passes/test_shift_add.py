"""The shift_add option (effopt/passes/shift_add.py): linear layers on power-of-two weights, compared with an
eager oracle that runs the same layers with the rounded weights; the per-layer guard; the savings record."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

import effopt
from effopt.passes.guard import EffoptAccuracyWarning
from effopt.options import Options
from effopt.testing.compare import assert_same_as_eager
from effopt.testing.models import vit_tiny_test
from tests.conftest import compile_effopt

MLP = ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2"]
ALL = ["patch_embed", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.attn.qkv",
       "blocks.1.attn.proj", "blocks.1.mlp.0", "blocks.1.mlp.2", "head"]


class _Shifted(torch.nn.Module):
    """The oracle of one rewritten layer: F.linear with the rounded weight (and quantized activations)."""

    def __init__(self, lin, terms, bits):
        super().__init__()
        self.lin, self.terms, self.bits = lin, terms, bits

    def forward(self, x):
        w = torch.ops.effopt.shift_weight(self.lin.weight, self.terms)
        if isinstance(self.lin, torch.nn.Conv2d):
            return F.conv2d(x, w, self.lin.bias, self.lin.stride, self.lin.padding, self.lin.dilation)
        x = torch.ops.effopt.act_quant(x, self.bits) if self.bits else x
        return F.linear(x, w, self.lin.bias)


def shifted(model, names, terms=1, bits=0):
    m = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = m.get_submodule(parent) if parent else m
        setattr(owner, child, _Shifted(owner.get_submodule(child) if child.isdigit() else getattr(owner, child),
                                       terms, bits))
    return m


def _model():
    torch.manual_seed(0)
    return vit_tiny_test().eval(), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("bad, match", [
    ({"shift_add": "attention"}, r"shift_add='attention' is invalid; valid: \['mlp', 'all'\]"),
    ({"shift_add": {"layers": "mlp", "terms": 4}}, r"terms=4; valid: \[1, 2, 3\]"),
    ({"shift_add": {"layers": "all", "activation_bits": 6}}, r"activation_bits=6; valid: \[0, 4, 8\]"),
    ({"shift_add": {"layers": "all", "bits": 8}}, r"no parameter\(s\) \['bits'\]"),
    ({"shift_add": "moe"}, r"effopt.reparameterize"),
])
def test_invalid_shift_options(bad, match):
    with pytest.raises(ValueError, match=match):
        Options.from_dict(bad)


@pytest.mark.slow
@pytest.mark.parametrize("layers, names, terms, bits", [("mlp", MLP, 1, 0), ("all", ALL, 2, 0), ("mlp", MLP, 1, 8)])
def test_shift_add_rewrites_the_chosen_layers_and_matches_the_eager_oracle(layers, names, terms, bits):
    model, x = _model()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        got = compile_effopt(model, shift_add={"layers": layers, "terms": terms, "activation_bits": bits},
                             kernel_choice="tvm")(x)
        rec = next(r for r in effopt.last_report().passes if r.name == "shift_add")
        assert rec.matches == len(names)
        assert [d["layer"] for d in rec.layers] == names
        ref = shifted(model, names, terms, bits)(x)
        exact = model(x)
    assert_same_as_eager(got, ref)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, exact, atol=1e-3)  # the rounding is really applied
    # the layers run on effopt's shift kernels
    shift = [k for k in effopt.last_report().lowering.kernels if {"shift_linear", "shift_conv2d"} & set(k.ops)]
    assert len(shift) == len(names) and all(k.choice == "tvm" for k in shift)


def test_savings_are_counted_per_layer():
    model, x = _model()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        compile_effopt(model, shift_add="mlp", lower=False)(x)
    rec = next(r for r in effopt.last_report().passes if r.name == "shift_add")
    fc1 = rec.layers[0]  # blocks.0.mlp.0: 64 -> 256 (mlp ratio 4) on 2 images x 17 tokens
    assert (fc1["tokens"], fc1["out"], fc1["in"]) == (34, 256, 64)
    assert fc1["multiplications_before"] == 34 * 256 * 64 and fc1["multiplications_after"] == 34 * 256
    assert fc1["weight_bytes_before"] == 4 * 256 * 64 and fc1["weight_bytes_after"] == 256 * 32 + 4 * 256
    assert fc1["energy_uj_before"] == pytest.approx(34 * 256 * 64 * 4.6e-6)
    assert fc1["energy_uj_after"] == pytest.approx(34 * 256 * 64 * 1.0e-6 + 34 * 256 * 3.7e-6)
    assert any("removed" in n and "smaller" in n for n in rec.notes)


def test_guard_keeps_layers_as_multiplications_where_shift_weights_cost_too_much():
    model, x = _model()
    with torch.no_grad():
        # blocks.1.mlp.2's weights become very spread out: 1 power of two per weight loses them (all but the
        # largest weight of each row fall below 2^-6 of it and round to 0)
        w = model.blocks[1].mlp[2].weight
        w.mul_(torch.where(torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.03, 300.0, 1.0))
    cal = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with torch.no_grad():
        compiled = compile_effopt(model, shift_add="mlp", calibration=cal, accuracy_budget=0.003, lower=False)
        got = compiled(x)
    rec = next(r for r in effopt.last_report().passes if r.name == "shift_add")
    rolled = [n for n, _ in rec.guard.rolled_back]
    assert "blocks.1.mlp.2" in rolled and [d["layer"] for d in rec.layers] == [n for n in MLP if n not in rolled]
    with torch.no_grad():
        ref = shifted(model, [d["layer"] for d in rec.layers])(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert rec.guard.loss <= 0.003


class _Convs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.d = torch.nn.Conv2d(8, 6, 1)
        self.head = torch.nn.Linear(6, 5)

    def forward(self, x):
        x = self.d(self.c(F.relu(self.b(F.relu(self.a(x))))))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.slow
def test_convolutions_become_shift_convolutions_except_grouped_ones():
    torch.manual_seed(0)
    model, x = _Convs().eval(), torch.randn(2, 3, 15, 17)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        got = compile_effopt(model, shift_add="all", kernel_choice="tvm")(x)
        ref = shifted(model, ["a", "b", "d", "head"])(x)
    rec = next(r for r in effopt.last_report().passes if r.name == "shift_add")
    assert [d["layer"] for d in rec.layers] == ["a", "b", "d", "head"]
    assert rec.layers[0]["tokens"] == 2 * 8 * 9 and rec.layers[0]["in"] == 27  # patches of the stride-2 conv
    assert sum("grouped convolution stays in float" in n for n in rec.notes) == 1
    assert_same_as_eager(got, ref)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    convs = [k for k in effopt.last_report().lowering.kernels if "shift_conv2d" in k.ops]
    assert len(convs) == 3 and all(k.choice == "tvm" for k in convs)


def test_no_matching_layer_warns():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    with torch.no_grad(), pytest.warns(UserWarning, match="no linear layer"):
        compile_effopt(model, shift_add="mlp", lower=False)(torch.randn(2, 8))


# ---- the fine-tune path: effopt.reparameterize(shift_add=...) -------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("bits", [0, 8])
def test_reparameterized_shift_layers_fine_tune_and_compile_to_the_shift_kernels(bits):
    teacher, x = _model()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    original = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = effopt.reparameterize(teacher, (x,), shift_add={"layers": "mlp", "terms": 1, "activation_bits": bits})
    rec = student.effopt_records["shift_add"]
    assert [d["layer"] for d in rec.layers] == MLP
    names = {id(p): n for n, p in student.named_parameters()}
    tuned = sorted(names[id(p)] for p in effopt.shift_parameters(student))
    assert tuned == sorted(f"{n}.{w}" for n in MLP for w in ("weight", "bias"))
    with torch.no_grad():
        target = teacher(x)
        # the student computes the rounded layers: the eager oracle with the same rounding
        torch.testing.assert_close(student(x), shifted(teacher, MLP, 1, bits)(x), rtol=1e-4, atol=1e-4)
        before = F.mse_loss(student(x), target).item()
    opt = torch.optim.Adam(effopt.shift_parameters(student), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        F.mse_loss(student(x), target).backward()
        opt.step()
    with torch.no_grad():
        after = F.mse_loss(student(x), target).item()
    assert after < 0.7 * before, (before, after)  # straight-through gradients reach the rounded weights
    assert all(torch.equal(v, original[k]) for k, v in teacher.state_dict().items()), "the original model changed"
    student.eval()
    with torch.no_grad():
        ref = student(x)
        got = compile_effopt(student, kernel_choice="tvm")(x)  # no shift_add option: the trained layers convert
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    rec = next(r for r in effopt.last_report().passes if r.name == "shift_add")
    assert rec.matches == 4 and rec.guard is None and all(d["activation_bits"] == bits for d in rec.layers)
    assert len([k for k in effopt.last_report().lowering.kernels if "shift_linear" in k.ops]) == 4
    # trained layers have no float32 stand-in (their latent weights are not the model that was trained)
    graph = effopt.last_report().after["graph"].graph
    shift = [n for n in graph.nodes if n.target is torch.ops.effopt.shift_linear.default]
    assert len(shift) == 4 and not any("float_form" in n.meta for n in shift)


def test_reparameterize_shift_guard_keeps_costly_layers_exact():
    teacher, _ = _model()
    cal = [(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)),) for i in range(2)]
    with torch.no_grad():
        w = teacher.blocks[0].mlp[0].weight
        w.mul_(torch.where(torch.rand(w.shape, generator=torch.Generator().manual_seed(0)) < 0.03, 300.0, 1.0))
    student = effopt.reparameterize(teacher, cal[0], shift_add="all", calibration=cal, accuracy_budget=0.003)
    rec = student.effopt_records["shift_add"]
    assert "blocks.0.mlp.0" in [n for n, _ in rec.guard.rolled_back]
    kept = [d["layer"] for d in rec.layers]
    with torch.no_grad():
        torch.testing.assert_close(student(*cal[1]), shifted(teacher, kept)(*cal[1]), rtol=1e-4, atol=1e-4)


# ---- ShiftAddViT's mixture of experts -------------------------------------------------------------------------
@pytest.mark.slow
def test_moe_routes_tokens_trains_with_the_latency_aware_loss_and_compiles():
    from effopt.ops.moe import ShiftMoE

    teacher, _ = _model()
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # the shift expert measured 3x faster here: the balancing loss should move tokens to it
    student = effopt.reparameterize(teacher, (x,), shift_add={"kind": "moe", "latency": (300.0, 100.0)})
    moes = [m for m in student.modules() if isinstance(m, ShiftMoE)]
    assert len(moes) == 2 and student.effopt_record.matches == 2
    assert not any("mlp" in n for n, _ in student.named_parameters() if not n.startswith("effopt_moe"))
    with torch.no_grad():
        target = teacher(x)
        student.train()
        dense = student(x)  # training mode: both experts on every token, combined by the routing
        student.eval()
        routed = student(x)  # eval: gather / expert / scatter (effopt::shift_moe)
    torch.testing.assert_close(routed, dense, rtol=1e-4, atol=1e-4)
    # the chosen expert's output is not scaled by its gate: routing everything to the multiplication expert
    # gives the original model, routing everything to the shift expert the model with shift MLPs
    for bias, ref in (((30.0, -30.0), target), ((-30.0, 30.0), shifted(teacher, MLP)(x).detach())):
        with torch.no_grad():
            for m in moes:
                m.router.bias.copy_(torch.tensor(bias))
            torch.testing.assert_close(student(x), ref, rtol=1e-4, atol=1e-4)
            for m in moes:
                m.router.bias.zero_()
    student.train()
    opt = torch.optim.Adam(student.parameters(), lr=2e-3)
    share0 = moes[0].last_load[1] / sum(moes[0].last_load)
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(student(x), target) + 0.05 * effopt.moe_loss(student)
        loss.backward()
        opt.step()
    share = moes[0].last_load[1] / sum(moes[0].last_load)
    assert moes[0].router.weight.grad is not None and moes[0].shift_fc1.weight.grad is not None
    assert share > max(share0, 0.6), (share0, share)  # faster expert: more tokens (3:1 is the optimum)
    student.eval()
    with torch.no_grad():
        ref = student(x)
        got = compile_effopt(student)(x)
    assert_same_as_eager(got, ref)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert effopt.last_report().lowering.library_calls.get("shift_moe") == 2


def test_moe_options_are_checked():
    teacher, x = _model()
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['experts'\]"):
        effopt.reparameterize(teacher, (x,), shift_add={"kind": "moe", "experts": 4})
    with pytest.raises(ValueError, match="latency"):
        effopt.reparameterize(teacher, (x,), shift_add={"kind": "moe", "latency": (1.0,)})

"""Each exact pass: positive case (exact match count), negative case, and equality with eager."""
import copy

import torch
import torch.fx as fx
from torch import nn

import effopt
from effopt.passes import ConstantFolding, DeadCodeElimination
from effopt.testing.compare import assert_same_as_eager
from tests.conftest import compile_effopt

aten = torch.ops.aten


def test_constant_fold_folds_weight_transpose_but_not_expand_of_constant():
    root = torch.nn.Module()
    g = fx.Graph()
    x = g.placeholder("x")
    root.register_buffer("w", torch.randn(4, 3), persistent=False)
    root.register_buffer("b", torch.randn(1, 4), persistent=False)
    w = g.get_attr("w")
    wt = g.call_function(aten.t.default, (w,))  # constant-only: folds
    y = g.call_function(aten.mm.default, (x, wt))
    big = g.call_function(aten.expand.default, (g.get_attr("b"), [64, 4]))  # would grow memory 64x: stays
    g.output(g.call_function(aten.add.Tensor, (y, big)))
    gm = fx.GraphModule(root, g)
    xin = torch.randn(64, 3)
    ref = gm(xin)
    record = ConstantFolding()(gm)
    assert record.matches == 1
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.t.default not in targets and aten.expand.default in targets
    assert_same_as_eager(gm(xin), ref)


def test_dead_code_removed_and_counted():
    g = fx.Graph()
    x = g.placeholder("x")
    g.call_function(aten.relu.default, (x,))  # unused
    g.output(g.call_function(aten.neg.default, (x,)))
    gm = fx.GraphModule(torch.nn.Module(), g)
    record = DeadCodeElimination()(gm)
    assert record.matches == 1 and record.nodes_after == 1


class ConvBN(nn.Module):
    def __init__(self, share_conv_output=False):
        super().__init__()
        self.conv, self.bn, self.share = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), share_conv_output
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = self.conv(x)
        z = self.bn(y)
        return (z, y.mean()) if self.share else z


class LinearBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn = nn.Linear(6, 5), nn.BatchNorm1d(5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.bn(self.lin(x))


def test_fold_batchnorm_positive_conv_and_linear():
    for model, x in [(ConvBN().eval(), torch.randn(2, 3, 8, 8)), (LinearBN().eval(), torch.randn(4, 6))]:
        torch._dynamo.reset()
        compiled = compile_effopt(model, lower=False)
        with torch.no_grad():
            assert_same_as_eager(compiled(x), model(x))
        assert effopt.last_report().rewrites()["fold_batchnorm"] == 1


def test_fold_batchnorm_negative_when_conv_output_used_elsewhere():
    model = ConvBN(share_conv_output=True).eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = compile_effopt(model, lower=False)
    with torch.no_grad():
        assert_same_as_eager(compiled(x), model(x))
    assert effopt.last_report().rewrites()["fold_batchnorm"] == 0


def test_fold_batchnorm_negative_in_training_mode():
    model = ConvBN().train()
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    compiled = compile_effopt(model, lower=False)
    with torch.no_grad():
        assert_same_as_eager(compiled(x), reference(x))
    # batch statistics were used and the running statistics updated, as in eager
    assert_same_as_eager(model.bn.running_mean, reference.bn.running_mean)
    assert_same_as_eager(model.bn.running_var, reference.bn.running_var)
    assert effopt.last_report().rewrites()["fold_batchnorm"] == 0


def test_disable_passes_is_respected():
    compiled = compile_effopt(ConvBN().eval(), lower=False, disable_passes=["fold_batchnorm"])
    with torch.no_grad():
        compiled(torch.randn(1, 3, 8, 8))
    assert "fold_batchnorm" not in effopt.last_report().rewrites()


def test_records_carry_user_source_lines():
    compiled = compile_effopt(ConvBN().eval(), lower=False)
    with torch.no_grad():
        compiled(torch.randn(1, 3, 8, 8))
    rec = next(r for r in effopt.last_report().passes if r.name == "fold_batchnorm")
    assert any(loc.endswith("test_exact_passes.py:" + str(ConvBN.forward.__code__.co_firstlineno + 2))
               for loc in rec.locations), rec.locations

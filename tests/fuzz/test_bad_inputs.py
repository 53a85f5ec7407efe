"""Bad inputs: NaN and Inf, zero-size tensors, size-1 dimensions, a large tensor, mixed dtypes,
non-contiguous and channels-last layouts, a target the inputs' device does not match. Each gives eager's
result or a clear error, never a wrong tensor."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from effopt.testing.models import SmallCNN, vit_tiny_test
from tests.conftest import FIGURES, compile_effopt

CASES: list[str] = []


def _same(got, ref):
    assert type(got) is type(ref)
    got, ref = (got, ref) if isinstance(got, (tuple, list)) else ((got,), (ref,))
    for g, r in zip(got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype, (g.shape, g.dtype, r.shape, r.dtype)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4, equal_nan=True)


def _check(name, model, *args, **options):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = compile_effopt(model, kernel_choice="tvm", **options)(*args)
        ref = model(*args)
    _same(got, ref)
    CASES.append(name)
    FIGURES["bad inputs"] = f"{len(CASES)} cases, eager's result or a clear error: {', '.join(CASES)}"


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return torch.softmax(self.b(F.gelu(self.a(x))), -1) + x.sum(-1, keepdim=True)


def test_nan_and_inf_inputs_propagate_as_in_eager():
    x = torch.randn(2, 3, 32, 32)
    x[0, 0, 0, 0] = float("nan")
    x[1, 1, 4, 4] = float("inf")
    _check("nan/inf", vit_tiny_test().eval(), x)
    y = torch.randn(4, 16)
    y[1, 3], y[2, 5] = float("-inf"), float("nan")
    _check("nan/inf mlp", Mlp().eval(), y)


def test_zero_size_and_size_one_inputs():
    _check("zero-size batch", Mlp().eval(), torch.randn(0, 16))
    _check("size-1 dims", Mlp().eval(), torch.randn(1, 1, 16))
    _check("one image", vit_tiny_test().eval(), torch.randn(1, 3, 32, 32))


def test_a_large_input():
    class Big(torch.nn.Module):
        def forward(self, x):
            return (torch.tanh(x) * 2 + 1).sum(-1)

    _check("large (2^24 elements)", Big(), torch.randn(256, 65536))


def test_mixed_dtypes():
    class Mixed(torch.nn.Module):
        def forward(self, a, b, i):
            return a * b + i, (a.to(torch.bfloat16) * 2).float()

    _check("float32 x float64 + int64", Mixed(), torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64),
           torch.arange(8))
    model = Mlp().eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = torch.randn(4, 16, dtype=torch.float64)
        with pytest.raises(Exception, match="dtype|Double|double|float"):  # as eager: a linear of mismatched dtypes
            compile_effopt(model)(x)
        with pytest.raises(Exception, match="dtype|Double|double|float"):
            model(x)
    CASES.append("mismatched weight dtype: eager's error")


def test_non_contiguous_and_channels_last_inputs():
    x = torch.randn(2, 32, 3, 32).transpose(1, 2)  # [2, 3, 32, 32], a transposed view
    assert not x.is_contiguous()
    _check("transposed view", vit_tiny_test().eval(), x)
    cnn = SmallCNN().eval()
    _check("channels-last", cnn, torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last))
    _check("strided slice", Mlp().eval(), torch.randn(8, 32)[::2, ::2])


def test_a_target_the_inputs_do_not_match_runs_eager_with_a_warning_or_raises_when_strict():
    from effopt.lowering import EffoptFallbackWarning

    model, x = Mlp().eval(), torch.randn(2, 16)
    why = "target kind 'cuda' from CPU tensors is not supported; use a CPU target"
    with torch.no_grad(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = compile_effopt(model, target="cuda")(x)
        _same(got, model(x))
    assert any(issubclass(m.category, EffoptFallbackWarning) and why in str(m.message) for m in w)
    torch._dynamo.reset()
    with torch.no_grad(), warnings.catch_warnings(), pytest.raises(Exception, match=why):
        warnings.simplefilter("ignore")
        compile_effopt(model, target="cuda", strict=True)(x)
    CASES.append("cuda target, CPU tensors: eager with a warning (strict: the error)")

"""The accuracy budget judged on what runs: after lowering, the compiled model's loss on the held-out inputs
is measured and reported beside the loss the guards decided on; where lowering pushed it over the budget
(a kernel that moves the result more than the guards allowed for), the rewritten graph runs in its torch
form, with a warning."""
import warnings

import pytest
import torch

import effopt
import effopt.lowering
from effopt.lowering.runtime import TVMKernel
from effopt.passes.guard import EffoptAccuracyWarning, cosine_loss
from effopt.testing.models import vit_tiny_test
from tests.conftest import compile_effopt

pytestmark = pytest.mark.slow
BUDGET = 0.02


def _setup():
    torch.manual_seed(0)
    model = vit_tiny_test().eval()
    # 4 calibration inputs: the guards decide on the first 3, the last is held out
    cal = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    return model, cal


def _compile(model, cal, **extra):
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        f = compile_effopt(model, token_merge=2, quantize="int8-dynamic", calibration=cal, accuracy_budget=BUDGET,
                           **extra)
        f(cal[0])
    over = [str(w.message) for w in caught if issubclass(w.category, EffoptAccuracyWarning)
            and "over the budget" in str(w.message) and "compiled model" in str(w.message)]
    return f, effopt.last_report(), over


def test_two_families_on_tvm_kernels_report_the_compiled_models_held_out_loss():
    model, cal = _setup()
    f, rep, over = _compile(model, cal, kernel_choice="tvm")
    b = rep.budget
    assert {r.name for r in rep.passes if r.guard is not None and r.matches} >= {"token_merge", "quantize_int8"}
    assert sum(k.choice == "tvm" for k in rep.lowering.kernels if "int8_linear" in k.ops) > 0
    assert b["inputs"] == "held-out" and b["budget"] == BUDGET and b["decided"] is not None
    with torch.no_grad():
        measured = cosine_loss(model(cal[3]), f(cal[3]))  # what a user gets on the held-out input
    assert b["compiled"] == pytest.approx(measured, rel=1e-3, abs=1e-6)
    assert b["compiled"] <= BUDGET and b["action"] is None and not over
    assert any("accuracy of the compiled model on the 1 held-out input(s)" in n for n in rep.notes)
    assert rep.to_dict()["budget"] == b


def test_a_planted_kernel_off_beyond_its_tolerance_is_caught_and_the_torch_form_runs(monkeypatch):
    """A TVM kernel whose result is 40% off on the real inputs (the lowering's own self-check, on random
    inputs, is bypassed: the kernel is planted after it): the compiled model's held-out loss exceeds the
    budget, and the rewritten graph runs in its torch form instead."""
    model, cal = _setup()
    real_lower = effopt.lowering.lower
    planted = []

    def lower_with_a_bad_kernel(gm, options):
        gm, record = real_lower(gm, options)
        int8 = {k.kernel for k in record.kernels if "int8_linear" in k.ops and k.choice == "tvm"}
        kernel = next(m for m in gm.modules() if isinstance(m, TVMKernel) and m.kernel_name in int8)
        good = kernel.forward
        kernel.forward = lambda *a: (lambda out: out * 1.4 if isinstance(out, torch.Tensor) else
                                     tuple(o * 1.4 if o.is_floating_point() else o for o in out))(good(*a))
        planted.append(kernel.kernel_name)
        return gm, record

    monkeypatch.setattr(effopt.lowering, "lower", lower_with_a_bad_kernel)
    f, rep, over = _compile(model, cal, kernel_choice="tvm")
    assert planted and rep.budget["compiled"] > BUDGET, rep.budget
    assert rep.budget["action"] and "torch form" in rep.budget["action"] and len(over) == 1, over
    with torch.no_grad():  # what runs is the rewritten graph before lowering: within the budget
        assert cosine_loss(model(cal[3]), f(cal[3])) == pytest.approx(rep.budget["rewritten"], rel=1e-3, abs=1e-6)
    assert rep.budget["rewritten"] <= BUDGET

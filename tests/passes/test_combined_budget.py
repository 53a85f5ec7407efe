"""Approximate passes combined under one accuracy budget: every guard measures against the original model
(the graph after the exact passes), so the end-to-end loss of all rewrites together stays within the
budget on the calibration inputs (before, each pass's guard took the graph the pass before it left as its
reference, and the losses added up: 0.0103 at a 0.01 budget and 0.029 at 0.02 on this model)."""
import warnings

import pytest
import torch

import effopt
from effopt.passes.guard import EffoptAccuracyWarning, cosine_loss
from effopt.testing.models import vit_tiny_test
from tests.conftest import compile_effopt

ALL = {"token_merge": 2, "attention": "hamming", "shift_add": "mlp", "quantize": "int8-dynamic"}


def _loss(f, model, cal):
    with torch.no_grad():
        return sum(cosine_loss(model(c), f(c)) for c in cal) / len(cal)


@pytest.mark.slow
@pytest.mark.parametrize("budget", [0.01, 0.02])
def test_all_four_families_stay_within_one_budget_end_to_end(budget):
    torch.manual_seed(0)
    model = vit_tiny_test().eval()
    cal = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        with torch.no_grad():
            f = compile_effopt(model, **ALL, calibration=cal, accuracy_budget=budget, lower=False)
            f(cal[0])
    records = {r.name: r for r in effopt.last_report().passes if r.guard is not None}
    assert len(records) == 4, sorted(records)  # every family ran its guard
    assert sum(r.matches for r in records.values()) > 0  # and some rewrite was kept
    loss = _loss(f, model, cal)
    assert loss <= budget * (1 + 1e-6), (loss, {n: r.guard.loss for n, r in records.items()})
    last = [r for r in effopt.last_report().passes if r.guard is not None][-1]
    assert last.guard.loss == pytest.approx(loss, rel=1e-3, abs=1e-6)  # the record reports the end-to-end loss


@pytest.mark.slow
def test_a_later_pass_gets_only_what_the_earlier_ones_left():
    """With a budget the first pass uses part of, the last pass keeps other layers than it does alone: its
    guard measures each layer on top of the first pass, against the original model, and its loss is the
    end-to-end loss of both."""
    torch.manual_seed(0)
    model = vit_tiny_test().eval()
    cal = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]

    def kept(**options):
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", EffoptAccuracyWarning)
            f = compile_effopt(model, **options, calibration=cal, lower=False)
            f(cal[0])
        return f, {r.name: r for r in effopt.last_report().passes if r.guard is not None}

    alone = kept(shift_add="all", accuracy_budget=0.01)[1]["shift_add"]
    f, both = kept(attention="hamming", shift_add="all", accuracy_budget=0.01)
    assert both["attention_hamming"].guard.loss > 0  # the first pass used part of the budget
    assert set(both["shift_add"].guard.kept) != set(alone.guard.kept)
    end_to_end = _loss(f, model, cal)
    assert end_to_end <= 0.01 * (1 + 1e-6)
    assert both["shift_add"].guard.loss == pytest.approx(end_to_end, rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_held_out_validation_backs_the_guards_off_until_it_holds():
    """Decided on 2 calibration inputs at 0.01, shift/add + int8 cost 0.022 on 2 held-out inputs from the
    same distribution: the passes run again at a lower budget until the held-out loss holds, and the
    report gives both losses."""
    torch.manual_seed(0)
    model = vit_tiny_test().eval()
    cal = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(4 + i)) for i in range(2)]
    val = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)) for i in range(2)]
    options = dict(shift_add="all", quantize="int8", calibration=cal, accuracy_budget=0.01, lower=False)
    with torch.no_grad():
        unchecked = compile_effopt(model, **options)
        unchecked(cal[0])
        assert _loss(unchecked, model, val) > 0.01  # the in-sample decision does not hold out of sample
        torch._dynamo.reset()
        f = compile_effopt(model, **options, validation=val)
        f(cal[0])
    rep = effopt.last_report()
    held = [n for n in rep.notes if n.startswith("accuracy on 2 held-out")]
    assert len(held) >= 2 and "decided at 0.01 " in held[0] and "decided at 0.01 " not in held[-1], held
    final = _loss(f, model, val)
    assert final <= 0.01 and f"loss {final:.4g}" in held[-1], (final, held)
    names = [r.name for r in rep.passes if r.guard is not None]
    assert names == ["shift_add", "quantize_int8"]  # the records of the attempts that failed are gone
    assert sum(r.matches for r in rep.passes if r.guard is not None) > 0  # something is still rewritten


def test_validation_needs_calibration():
    with pytest.raises(ValueError, match="validation .* calibration"):
        effopt.Options.from_dict({"shift_add": "all", "validation": [torch.randn(1, 3, 32, 32)]})


@pytest.mark.slow
def test_a_quarter_of_the_calibration_is_held_out_by_default():
    """8 calibration inputs and no validation option: the guards decide on the first 6 and the loss on the
    last 2 is reported (and bounded); validation=False decides on all 8."""
    torch.manual_seed(0)
    model = vit_tiny_test().eval()
    cal = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        f = compile_effopt(model, shift_add="all", calibration=cal, accuracy_budget=0.01, lower=False)
        f(cal[0])
        rep = effopt.last_report()
        assert any("held out the last 2 of the 8 calibration inputs" in n for n in rep.notes), rep.notes
        held = [n for n in rep.notes if n.startswith("accuracy on 2 held-out")]
        assert held and _loss(f, model, cal[6:]) <= 0.01
        assert f"loss {_loss(f, model, cal[6:]):.4g}" in held[-1]
        guard = next(r.guard for r in rep.passes if r.guard is not None)
        assert guard.loss == pytest.approx(_loss(f, model, cal[:6]), rel=1e-3, abs=1e-6)  # decided on the first 6
        torch._dynamo.reset()
        g = compile_effopt(model, shift_add="all", calibration=cal, accuracy_budget=0.01, lower=False,
                           validation=False)
        g(cal[0])
        rep = effopt.last_report()
        assert not any("held out" in n or "held-out" in n for n in rep.notes), rep.notes
        guard = next(r.guard for r in rep.passes if r.guard is not None)
        assert guard.loss == pytest.approx(_loss(g, model, cal), rel=1e-3, abs=1e-6)


@pytest.mark.slow
def test_disable_passes_names_every_pass():
    """Every approximate pass has a name in disable_passes, and disabling it leaves that family out of the
    pipeline (the exact passes' names stay valid too)."""
    from effopt.passes import GUARDED_ORDER, PASSES, pass_names

    assert set(pass_names()) == set(PASSES) | set(GUARDED_ORDER)
    torch.manual_seed(0)
    model = vit_tiny_test().eval()
    x = torch.randn(2, 3, 32, 32)
    families = {"tokens": "token_merge", "attention": "attention_hamming", "shift_add": "shift_add",
                "quantize": "quantize_int8"}
    for name, record in families.items():
        torch._dynamo.reset()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", EffoptAccuracyWarning)
            compile_effopt(model, **ALL, lower=False, disable_passes=[name])(x)
        ran = [r.name for r in effopt.last_report().passes]
        assert record not in ran and all(families[o] in ran for o in families if o != name), (name, ran)


def _per_layer(model, cal, budget, **options):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        f = compile_effopt(model, **options, calibration=cal, accuracy_budget=budget, lower=False, validation=False)
        f(cal[0])
    return f, next(r for r in effopt.last_report().passes if r.guard is not None)


@pytest.mark.slow
def test_per_layer_forms_retry_a_layer_over_budget_in_the_next_form():
    """Attention kinds in order, shift terms 1 -> 2 -> 3, int8 static -> dynamic: a layer that exceeds the
    budget in its first form is measured again in the next; the records say which layer took which form,
    and the end-to-end loss holds."""
    torch.manual_seed(0)
    model = vit_tiny_test().eval()
    cal = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    # shift terms: at a budget between what 1 and 3 terms cost, some layer needs more than 1
    _, one = _per_layer(model, cal, 0.004, shift_add="all")
    f, auto_terms = _per_layer(model, cal, 0.004, shift_add={"layers": "all", "terms": "auto"})
    terms = {d["layer"]: d["terms"] for d in auto_terms.layers}
    assert len(auto_terms.guard.kept) > len(one.guard.kept) and max(terms.values()) > 1, (terms, one.guard)
    assert auto_terms.guard.retried and _loss(f, model, cal) <= 0.004 * (1 + 1e-6)
    # attention: hamming first, linear where hamming costs too much
    f, att = _per_layer(model, cal, 0.003, attention={"kind": "hamming", "fallback": ["linear"]})
    per_layer = next(n for n in att.notes if n.startswith("per layer: "))
    assert att.guard.retried and _loss(f, model, cal) <= 0.003 * (1 + 1e-6), att.notes
    assert "linear" in per_layer or len(att.guard.kept) < 2, per_layer
    # int8 mixed: static where it holds, dynamic where not (static on all 9 layers costs 2.3e-4 here)
    f, q = _per_layer(model, cal, 0.0001, quantize={"mode": "mixed"})
    mixed = next(n for n in q.notes if n.startswith("mixed: "))
    assert q.guard.retried and "1 dynamic (over budget as static): " in mixed, q.notes
    assert _loss(f, model, cal) <= 0.0001 * (1 + 1e-6)


@pytest.mark.parametrize("bad, match", [
    ({"attention": {"kind": "hamming", "fallback": ["hamming"]}}, r"fallback=\['hamming'\]; valid: other"),
    ({"attention": {"kind": "linear", "fallback": "exact"}}, r"fallback='exact'"),
    ({"shift_add": {"layers": "mlp", "terms": "many"}}, r"terms='many'; valid: \[1, 2, 3\] or 'auto'"),
    ({"quantize": {"mode": "mixed"}}, r"needs calibration data"),
])
def test_invalid_per_layer_forms(bad, match):
    with pytest.raises(ValueError, match=match):
        effopt.Options.from_dict(bad)

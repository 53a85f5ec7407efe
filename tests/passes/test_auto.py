"""approximate='auto': the search over the approximate families (effopt/auto.py), its stored choice, and
its report. The search's decisions are unit-tested on a stubbed evaluation; one end-to-end compile shows
it choosing int8 on a model where int8 pays off, and a second compile applying the stored choice without
measuring anything."""
import warnings

import pytest
import torch

import effopt
from effopt import auto
from effopt.passes.guard import EffoptAccuracyWarning, cosine_loss
from effopt.testing.models import vit_tiny_test
from tests.conftest import compile_effopt


def _stub(table):
    """evaluate() from a table {label: (relative ms, held-out loss)}; a combination's figures are looked
    up by its label too."""
    seen = []

    def evaluate(settings):
        label = auto._label(settings)
        seen.append(label)
        ms, loss = table[label]
        return {"ms": ms, "loss": loss, "held_out": loss, "within": loss <= 0.01, "matches": 1, "rewrites": {}}
    return evaluate, seen


STUB_CANDIDATES = {"tokens": [{"token_merge": 4}, {"token_merge": 8}, {"token_prune": 0.7}],
                   "attention": [{"attention": "hamming"}, {"attention": "linear"}],
                   "shift_add": [{"shift_add": "mlp"}, {"shift_add": "all"}],
                   "quantize": [{"quantize": "int8-dynamic"}]}


def test_search_orders_by_gain_per_loss_and_keeps_only_what_speeds_the_whole_up(monkeypatch):
    monkeypatch.setattr(auto, "CANDIDATES", STUB_CANDIDATES)
    table = {"token_merge=4": (0.9, 0.002), "token_merge=8": (0.8, 0.02), "token_prune=0.7": (0.97, 0.001),
             "attention=hamming": (1.1, 0.001), "attention=linear": (0.97, 0.009),
             "shift_add=mlp": (0.7, 0.008), "shift_add=all": (0.6, 0.03), "quantize=int8-dynamic": (0.5, 0.001),
             # combinations, added to the best-ranked one (int8: gain 0.5 per 0.001)
             "quantize=int8-dynamic + token_merge=4": (0.45, 0.004),
             "quantize=int8-dynamic + token_merge=4 + shift_add=mlp": (0.46, 0.009),  # slower than without
             "quantize=int8-dynamic + token_merge=4 + attention=linear": (0.40, 0.012)}  # over budget
    evaluate, seen = _stub(table)
    result = auto.search(evaluate, auto.AutoConfig())
    assert result["chosen"] == {"quantize": "int8-dynamic", "token_merge": 4}
    assert result["speedup_over_exact"] == pytest.approx(1 / 0.45)
    # every setting alone, then by gain per loss (int8 500, token_merge=4 50, shift_add=mlp 37.5,
    # token_prune 30, linear 3.3), one per family, on top of the chosen: token_prune=0.7 is not tried once
    # the tokens family is taken; hamming (slower) and the over-budget ones never
    assert seen[:8] == ["token_merge=4", "attention=hamming", "shift_add=mlp", "quantize=int8-dynamic",
                        "token_merge=8", "attention=linear", "shift_add=all", "token_prune=0.7"]  # round robin
    assert seen[8:] == ["quantize=int8-dynamic + token_merge=4",
                        "quantize=int8-dynamic + token_merge=4 + shift_add=mlp",
                        "quantize=int8-dynamic + token_merge=4 + attention=linear"]
    assert len(result["candidates"]) == 11 and all("label" in c for c in result["candidates"])


def test_search_keeps_the_exact_model_where_nothing_pays_and_narrows_to_families(monkeypatch):
    monkeypatch.setattr(auto, "CANDIDATES", STUB_CANDIDATES)
    table = {"quantize=int8-dynamic": (1.2, 0.001), "shift_add=mlp": (0.9, 0.05), "shift_add=all": (0.8, 0.2)}
    evaluate, seen = _stub(table)
    result = auto.search(evaluate, auto.AutoConfig.parse({"kind": "auto", "families": ["shift_add", "quantize"]}))
    assert result["chosen"] == {} and result["speedup_over_exact"] == 1.0
    assert seen == ["shift_add=mlp", "quantize=int8-dynamic", "shift_add=all"]


@pytest.mark.parametrize("bad, match", [
    ({"approximate": "fast", "calibration": [torch.randn(1, 3, 32, 32)]}, r"approximate='fast' is invalid"),
    ({"approximate": "auto"}, r"calibration"),
    ({"approximate": "auto", "quantize": "int8-dynamic", "calibration": [torch.randn(1, 3, 32, 32)]},
     r"drop \['quantize'\]"),
    ({"approximate": {"kind": "auto", "families": ["int4"]}, "calibration": [torch.randn(1, 3, 32, 32)]},
     r"families=\['int4'\] is invalid"),
    ({"approximate": {"kind": "auto", "time_budget": "soon"}, "calibration": [torch.randn(1, 3, 32, 32)]},
     r"time_budget='soon' is invalid"),
])
def test_invalid_auto_options(bad, match):
    with pytest.raises(ValueError, match=match):
        effopt.Options.from_dict(bad)


def test_time_budget_spellings():
    assert auto.AutoConfig.parse({"kind": "auto", "time_budget": "10m"}).time_budget_s == 600
    assert auto.AutoConfig.parse({"time_budget": 90}).time_budget_s == 90
    assert auto.AutoConfig.parse("auto") == auto.AutoConfig()


@pytest.mark.slow
def test_auto_chooses_int8_where_it_pays_and_a_second_compile_reuses_the_choice(cache_dir, monkeypatch):
    torch.manual_seed(0)
    model = vit_tiny_test(img_size=64, dim=256, depth=2).eval()  # 512 tokens x 256 features: int8 pays
    cal = [torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    options = dict(approximate={"kind": "auto", "families": ["quantize"]}, calibration=cal, accuracy_budget=0.02,
                   cache=True, cache_dir=cache_dir)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        f = compile_effopt(model, **options)
        out = f(cal[0])
    rep = effopt.last_report()
    assert rep.auto is not None and not rep.auto["reused"]
    cand = rep.auto["candidates"][0]
    assert len(rep.auto["candidates"]) == len(auto.CANDIDATES["quantize"])
    assert cand["label"] == "quantize=int8-dynamic" and cand["matches"] > 0
    # int8 pays here on every CPU (1.9x on AVX-512 and on AVX2: effopt's own int8 kernel where torch's
    # int8 GEMM is slow) within the budget: the search must choose it, and its passes must run
    assert cand["within"] and cand["ms"] < auto.FASTER, cand
    assert rep.auto["chosen"] == {"quantize": "int8-dynamic"} == cand["settings"]
    assert sum(r.matches for r in rep.passes if r.name == "quantize_int8") == cand["matches"] > 0
    with torch.no_grad():
        assert cosine_loss(model(cal[3]), f(cal[3])) <= 0.02  # the held-out input
        assert out.shape == model(cal[0]).shape
    assert any("held out the last 1 of the 4" in n for n in rep.notes)
    html = rep.to_html()
    assert "Approximate search" in html and html.count("<circle") == len(rep.auto["candidates"]) + 1
    # a new compile of the same graph, target, budget and calibration: the stored choice, no search
    monkeypatch.setattr(auto, "search", lambda *a, **k: pytest.fail("searched again"))
    torch._dynamo.reset()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        compile_effopt(model, **options)(cal[0])
    again = effopt.last_report()
    assert again.auto["reused"] and again.auto["chosen"] == rep.auto["chosen"]
    assert any("applied the stored choice" in n for n in again.notes)
    assert again.rewrites() == rep.rewrites()


@pytest.mark.slow
def test_auto_with_a_zero_budget_keeps_the_exact_model(cache_dir):
    torch.manual_seed(0)
    model = vit_tiny_test().eval()
    cal = [torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        f = compile_effopt(model, approximate={"kind": "auto", "families": ["shift_add", "quantize"]},
                           calibration=cal, accuracy_budget=0.0, cache_dir=cache_dir)
        torch.testing.assert_close(f(cal[0]), model(cal[0]), rtol=1e-4, atol=1e-5)
    rep = effopt.last_report()
    assert rep.auto["chosen"] == {}
    assert len(rep.auto["candidates"]) == len(auto.CANDIDATES["shift_add"]) + len(auto.CANDIDATES["quantize"])
    assert not any(r.guard is not None for r in rep.passes)

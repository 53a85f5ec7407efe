"""The operator sweep: every op of the list below (the ops of ViT, BERT, ResNet and MobileNet graphs, and
more) compiled alone through the backend either lowers to TVM and matches eager, or falls back to eager
with a warning naming it: no crash, no silent mismatch. The ops expected to fall back are checked in
(EXPECTED_FALLBACKS); an op that starts lowering (or stops) fails the test until the list is updated."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from effopt.lowering import EffoptFallbackWarning
from effopt.testing.compare import assert_same_as_eager
from tests.conftest import FIGURES, compile_effopt

g = torch.Generator().manual_seed(0)


def r(*shape):
    return torch.randn(*shape, generator=g)


X4, X3, X2 = r(2, 8, 9, 9), r(2, 7, 16), r(6, 16)
IDX = torch.tensor([[0, 3, 2], [5, 1, 4]])
MASK = torch.rand(2, 7, 16, generator=g) > 0.5

# name -> (function of the inputs, inputs); names are the ATen ops they produce, as the fallback warning says
OPS = {
    # convolutional networks (ResNet, MobileNet)
    "conv2d": (lambda x: F.conv2d(x, torch.ones(4, 8, 3, 3) * 0.1, padding=1), (X4,)),
    "depthwise_conv2d": (lambda x: F.conv2d(x, torch.ones(8, 1, 3, 3) * 0.1, padding=1, groups=8), (X4,)),
    "batch_norm": (lambda x: F.batch_norm(x, torch.zeros(8), torch.ones(8), training=False), (X4,)),
    "relu6": (lambda x: F.relu6(x), (X4,)),
    "hardswish": (lambda x: F.hardswish(x), (X4,)),
    "hardsigmoid": (lambda x: F.hardsigmoid(x), (X4,)),
    "max_pool2d": (lambda x: F.max_pool2d(x, 3, 2, 1), (X4,)),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 2), (X4,)),
    "avg_pool2d_padded": (lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), (X4,)),
    "max_pool2d_ceil": (lambda x: F.max_pool2d(x, 2, 2, ceil_mode=True), (X4,)),
    "adaptive_avg_pool2d": (lambda x: F.adaptive_avg_pool2d(x, 1), (X4,)),
    "flatten": (lambda x: torch.flatten(x, 1) * 2, (X4,)),
    "pad": (lambda x: F.pad(x, (1, 1, 2, 0)) + 1, (X4,)),
    "pad_crop": (lambda x: F.pad(x, (-1, 1)) + 1, (X4,)),
    "interpolate_nearest": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), (X4,)),
    "interpolate_bilinear": (lambda x: F.interpolate(x, size=(5, 5), mode="bilinear", align_corners=False), (X4,)),
    # transformers (ViT, BERT)
    "linear": (lambda x: F.linear(x, torch.ones(5, 16) * 0.1, torch.ones(5)), (X3,)),
    "layer_norm": (lambda x: F.layer_norm(x, (16,)), (X3,)),
    "gelu": (lambda x: F.gelu(x), (X3,)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), (X3,)),
    "softmax": (lambda x: torch.softmax(x, -1), (X3,)),
    "log_softmax": (lambda x: torch.log_softmax(x, -1), (X3,)),
    "embedding": (lambda i: F.embedding(i, torch.arange(48.0).reshape(8, 6)), (IDX,)),
    "bmm": (lambda x: torch.bmm(x, x.transpose(1, 2)), (X3,)),
    "matmul_4d": (lambda x: x @ x.transpose(-1, -2), (X4,)),
    "baddbmm": (lambda x: torch.baddbmm(x[:, :, :7], x, x.transpose(1, 2)), (X3,)),
    "sdpa": (lambda x: F.scaled_dot_product_attention(x, x, x), (X4,)),
    "masked_fill": (lambda x, m: x.masked_fill(m, -1e4), (X3, MASK)),
    "where": (lambda x, m: torch.where(m, x, x * 2), (X3, MASK)),
    "tanh": (lambda x: torch.tanh(x), (X3,)),
    "erf": (lambda x: torch.erf(x), (X3,)),
    "rsqrt": (lambda x: torch.rsqrt(x.abs() + 1), (X3,)),
    "pow": (lambda x: torch.pow(x.abs() + 1, 1.5), (X3,)),
    "exp": (lambda x: torch.exp(x), (X3,)),
    "log": (lambda x: torch.log(x.abs() + 1), (X3,)),
    "sigmoid": (lambda x: torch.sigmoid(x), (X3,)),
    "silu": (lambda x: F.silu(x), (X3,)),
    "mean": (lambda x: x.mean(-1, keepdim=True), (X3,)),
    "sum": (lambda x: x.sum(1), (X3,)),
    "amax": (lambda x: x.amax(-1), (X3,)),
    "var": (lambda x: x.var(-1, unbiased=False), (X3,)),
    "var_unbiased": (lambda x: x.var((0, 2), keepdim=True), (X3,)),
    "cat": (lambda x: torch.cat([x, x * 2], 1), (X3,)),
    "stack": (lambda x: torch.stack([x, x + 1], 0) * 2, (X3,)),
    "expand": (lambda x: x[:, :1].expand(2, 7, 16) + x, (X3,)),
    "slice_select": (lambda x: x[:, 1:5:2, 3] * 2, (X3,)),
    "permute_reshape": (lambda x: x.permute(0, 2, 1).reshape(2, -1) + 1, (X3,)),
    "clamp": (lambda x: x.clamp(-0.5, 0.5), (X3,)),
    "abs_neg": (lambda x: -x.abs(), (X3,)),
    "div": (lambda x: x / (x.abs() + 1), (X3,)),
    "maximum": (lambda x: torch.maximum(x, x * 0.5 + 0.1), (X3,)),
    "cumsum": (lambda x: torch.cumsum(x, -1), (X3,)),
    "argmax": (lambda x: torch.argmax(x, -1), (X3,)),
    "topk": (lambda x: torch.topk(x, 3, -1).values, (X3,)),
    "sort": (lambda x: torch.sort(x, -1).values, (X3,)),
    "gather": (lambda x: torch.gather(x, 1, torch.zeros(2, 3, 16, dtype=torch.long)), (X3,)),
    "gather_last": (lambda x: torch.gather(x, -1, (torch.arange(5) * 3 % 16).expand(2, 7, 5)), (X3,)),
    "remainder": (lambda x: torch.remainder(x * 3, 1.5) + torch.remainder(torch.arange(16) - 7, 5), (X3,)),
    "argmax_keepdim": (lambda x: torch.argmax(x, 1, keepdim=True), (X3,)),
    "index_select": (lambda x: torch.index_select(x, 1, torch.tensor([0, 2, 4])), (X3,)),
    "flip": (lambda x: torch.flip(x, (-1,)) + 1, (X3,)),
    "flip_2d": (lambda x: torch.flip(x, (0, 2)) * 2, (X3,)),
    "roll": (lambda x: torch.roll(x, 2, -1) + 1, (X3,)),
    "tril": (lambda x: torch.tril(x[0]), (X3,)),
    "tril_offset": (lambda x: torch.tril(x, -2) + 1, (X3,)),
    "arange_add": (lambda x: x + torch.arange(16.0), (X3,)),
    "to_dtype": (lambda x: (x * 4).to(torch.int32).to(torch.float32), (X3,)),
    "matmul_2d": (lambda x: x @ x.t(), (X2,)),
}

# The ops expected to run in eager (no TVM lowering), each with the fallback warning's op name.
EXPECTED_FALLBACKS = {  # op names, or the reason a converter gave for declining a region
    # a BatchNorm with no conv/linear before it to fold into (fold_batchnorm folds the usual ones)
    "batch_norm": ["aten._native_batch_norm_legit_no_training.default"],
    "interpolate_nearest": ["aten._unsafe_index.Tensor"],
    "interpolate_bilinear": ["aten._unsafe_index.Tensor", "integer clamp"],
    "pad_crop": ["constant_pad_nd with negative (cropping) pads"],
    "embedding": ["symbolic or float arange"],  # the table built in the graph from a float arange
    "arange_add": ["symbolic or float arange"],
    "cumsum": ["aten.cumsum.default"],  # relax.op.cumsum does not build for the CPU VM (TVM 0.27)
    "topk": ["aten.topk.default"],
    "sort": ["aten.sort.default"],
    "roll": ["aten.roll.default"],
}


def _sweep(name):
    fn, args = OPS[name]

    class M(torch.nn.Module):
        def forward(self, *a):
            return fn(*a)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = compile_effopt(M(), kernel_choice="tvm")(*args)
            ref = fn(*args)
    msgs = [str(w.message) for w in caught if issubclass(w.category, EffoptFallbackWarning)]
    # expected kinds of fallback: an op with no converter, or a region a converter declined (with why)
    fallbacks = sorted({m.split(" has no TVM lowering")[0].removeprefix("effopt: ") for m in msgs
                        if "has no TVM lowering" in m}
                       | {m.split("stays in eager PyTorch: ")[1] for m in msgs if "stays in eager PyTorch: " in m})
    # bugs, even though they are caught: a kernel that differs from eager or does not build
    rejected = [m for m in msgs if any(k in m for k in ("result differs from eager", "could not compile kernel",
                                                        "compilation failed"))]
    return got, ref, fallbacks, rejected


RESULTS: dict = {}


@pytest.mark.parametrize("name", list(OPS))
def test_op_lowers_and_matches_eager_or_falls_back_with_a_warning(name):
    got, ref, fallbacks, rejected = _sweep(name)
    assert_same_as_eager(got, ref)  # never silently wrong, whichever path ran
    assert not rejected, rejected
    RESULTS[name] = fallbacks
    assert fallbacks == EXPECTED_FALLBACKS.get(name, []), (
        f"{name}: fell back for {fallbacks}, expected {EXPECTED_FALLBACKS.get(name, [])}: update EXPECTED_FALLBACKS")
    lowered = sum(1 for v in RESULTS.values() if not v)
    FIGURES["ops swept"] = f"{len(RESULTS)} ops: {lowered} lowered to TVM or library kernels, " \
                           f"{len(RESULTS) - lowered} expected fallbacks to eager; 0 crashes, 0 mismatches"

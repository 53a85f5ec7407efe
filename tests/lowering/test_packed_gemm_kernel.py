"""The packed float32 linear (effopt/lowering/kernels/gemm.py), the autotuner's rival to MKL on frozen-weight
GEMMs, against eager's linear: every tile setting of its space, at shapes that leave partial row tiles and
partial column vectors; its packing; its refusals."""
import pytest
import torch
import tvm

from effopt.autotune.targets import resolve_target
from effopt.autotune.tasks import normalized
from effopt.lowering.kernels import gemm

HOST = resolve_target("host")
pytestmark = pytest.mark.skipif(gemm.supported(HOST) is not None, reason="this CPU has no AVX-512")


def _run(m, n, k, tile, x, w, b):
    fn = tvm.compile(normalized(gemm.linear_func(m, n, k, **tile)), target=HOST)["main"]
    y = torch.full((m, n), float("nan"))  # every element must be written
    fn(x, gemm.pack_weight(w), gemm.pad_bias(b, n), y)
    return y


@pytest.mark.parametrize("m, n, k", [(197, 384, 384), (13, 40, 24), (1, 1000, 64), (30, 64, 1)])
def test_every_tile_setting_matches_eager(m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    ref = torch.nn.functional.linear(x, w, b)
    tiles = gemm.space(m, n)
    assert tiles and all(t["mb"] <= max(m, 1) or t["mb"] == 1 for t in tiles)
    for tile in tiles:
        y = _run(m, n, k, tile, x, w, b)
        assert y.shape == ref.shape and y.dtype == ref.dtype
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * k ** 0.5, msg=f"tiles {tile}")
    y = _run(m, n, k, tiles[0], x, w, None)  # no bias: the padded bias is zeros
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-4 * k ** 0.5)


def test_packing_lays_out_16_channels_per_vector_with_zero_padding():
    w = torch.arange(20 * 3, dtype=torch.float32).reshape(20, 3)
    p = gemm.pack_weight(w.t().contiguous().t())  # a transposed view, as the graph holds it
    assert p.shape == (2, 3, 16)
    assert torch.equal(p[1, 2, 3], w[19, 2]) and torch.equal(p[0, 1, :], w[:16, 1])
    assert torch.count_nonzero(p[1, :, 4:]) == 0
    assert torch.equal(gemm.pad_bias(torch.ones(20), 20), torch.cat([torch.ones(20), torch.zeros(12)]))


def test_bad_tiles_and_targets_are_refused():
    with pytest.raises(ValueError, match="does not split"):
        gemm.linear_func(8, 48, 8, mb=4, nb=2)  # 3 column vectors
    assert "x86" in gemm.supported(tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    assert "avx512f" in gemm.supported(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}))

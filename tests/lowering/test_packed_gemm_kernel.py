"""The packed float32 linear (effopt/lowering/kernels/gemm.py), the autotuner's rival to MKL on frozen-weight
GEMMs, against eager's linear: every tile setting of its space, for each vector unit this machine executes
(an AVX-512 CPU runs the AVX2 form too), at shapes that leave partial row tiles and partial column vectors;
NEON's form cross-compiled; its packing; its refusals."""
import re

import pytest
import torch
import tvm

from effopt.host import host
from effopt.target import resolve_target
from effopt.lowering.tuned import normalized
from effopt.lowering.kernels import gemm

HOST = resolve_target("host")
# an LLVM CPU for each unit, and the CPU flags (effopt.host's) a machine needs to execute its code
UNITS = {"avx512": ({"kind": "llvm", "mcpu": "skylake-avx512"}, ("avx512f", "avx512bw")),
         "avx2": ({"kind": "llvm", "mcpu": "haswell"}, ("avx2", "fma"))}


def _target(unit):
    if host().vector_unit == unit:
        return HOST
    spec, flags = UNITS[unit]
    why = host().missing(*flags)
    if why:
        pytest.skip(f"{why}: {unit} code cannot run here")
    return resolve_target(spec)


def _run(target, m, n, k, tile, x, w, b):
    unit = gemm.unit_of(target)
    fn = tvm.compile(normalized(gemm.linear_func(m, n, k, **tile, unit=unit)), target=target)["main"]
    y = torch.full((m, n), float("nan"))  # every element must be written
    fn(x, gemm.pack_weight(w), gemm.pad_bias(b, n), y)
    return y


@pytest.mark.slow
@pytest.mark.parametrize("unit", list(UNITS))
@pytest.mark.parametrize("m, n, k", [(197, 384, 384), (13, 40, 24), (1, 1000, 64), (30, 64, 1)])
def test_every_tile_setting_matches_eager(unit, m, n, k):
    target = _target(unit)
    g = torch.Generator().manual_seed(m + n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    ref = torch.nn.functional.linear(x, w, b)
    tiles = gemm.space(m, n, gemm.unit_of(target))
    assert tiles and all(t["mb"] <= max(m, 1) or t["mb"] == 1 for t in tiles)
    assert all(t["mb"] * t["nb"] <= gemm.unit_of(target).registers * 7 // 8 for t in tiles)
    for tile in tiles:
        y = _run(target, m, n, k, tile, x, w, b)
        assert y.shape == ref.shape and y.dtype == ref.dtype
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * k ** 0.5, msg=f"tiles {tile}")
    y = _run(target, m, n, k, tiles[0], x, w, None)  # no bias: the padded bias is zeros
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-4 * k ** 0.5)


@pytest.mark.parametrize("spec, unit, register", [
    ({"kind": "llvm", "mcpu": "haswell"}, "avx2", "ymm"),
    ({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "neon", "v0.4s|fmla")])
def test_lower_units_build_with_their_own_registers(spec, unit, register):
    target = resolve_target(spec)
    assert gemm.supported(target) is None and gemm.unit_of(target).name == unit
    tile = gemm.space(30, 64, gemm.unit_of(target))[0]
    mod = tvm.compile(normalized(gemm.linear_func(30, 64, 32, **tile, unit=gemm.unit_of(target))), target=target)
    asm = mod.mod.inspect_source("asm") if hasattr(mod, "mod") else mod.inspect_source("asm")
    assert re.search(register, asm) and "zmm" not in asm


def test_packing_lays_out_16_channels_per_vector_with_zero_padding():
    w = torch.arange(20 * 3, dtype=torch.float32).reshape(20, 3)
    p = gemm.pack_weight(w.t().contiguous().t())  # a transposed view, as the graph holds it
    assert p.shape == (2, 3, 16)
    assert torch.equal(p[1, 2, 3], w[19, 2]) and torch.equal(p[0, 1, :], w[:16, 1])
    assert torch.count_nonzero(p[1, :, 4:]) == 0
    assert torch.equal(gemm.pad_bias(torch.ones(20), 20), torch.cat([torch.ones(20), torch.zeros(12)]))


def test_bad_tiles_and_targets_are_refused():
    with pytest.raises(ValueError, match="does not split"):
        gemm.linear_func(8, 48, 8, mb=4, nb=2)  # 3 column vectors of 16
    assert "CPU" in gemm.supported(tvm.target.Target({"kind": "cuda", "arch": "sm_90"}))
    assert "AVX2 + FMA" in gemm.supported(tvm.target.Target({"kind": "llvm", "mcpu": "sandybridge"}))

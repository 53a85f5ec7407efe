"""Comparing a compiled result with eager: structure, then shape and dtype, then values per dtype."""
from __future__ import annotations

import torch

# (rtol, atol) per dtype for exact passes: float rounding differences only (library GEMMs, fast-math exp/erf).
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.float64: (1e-7, 1e-7), torch.bfloat16: (3e-2, 3e-2),
              torch.float16: (3e-3, 3e-3)}


def assert_same_as_eager(got, ref, path: str = "out") -> None:
    if isinstance(ref, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{path}: got {type(got).__name__}, eager gave a Tensor"
        assert got.shape == ref.shape, f"{path}: shape {tuple(got.shape)} != eager {tuple(ref.shape)}"
        assert got.dtype == ref.dtype, f"{path}: dtype {got.dtype} != eager {ref.dtype}"
        assert got.device == ref.device, f"{path}: device {got.device} != eager {ref.device}"
        if ref.dtype.is_floating_point:
            rtol, atol = TOLERANCES[ref.dtype]
            torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{path}: {m}")
        else:
            assert torch.equal(got, ref), f"{path}: values differ from eager"
    elif isinstance(ref, dict) or hasattr(ref, "keys"):
        assert set(got.keys()) == set(ref.keys()), f"{path}: keys {sorted(got.keys())} != eager {sorted(ref.keys())}"
        for k in ref.keys():
            assert_same_as_eager(got[k], ref[k], f"{path}[{k!r}]")
    elif isinstance(ref, (tuple, list)):
        assert type(got) is type(ref) and len(got) == len(ref), f"{path}: {type(got).__name__} of {len(got)} != eager"
        for i, (g, r) in enumerate(zip(got, ref)):
            assert_same_as_eager(g, r, f"{path}[{i}]")
    else:
        assert got == ref, f"{path}: {got!r} != eager {ref!r}"

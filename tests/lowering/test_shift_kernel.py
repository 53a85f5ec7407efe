"""The single-token shift linear kernel (effopt/lowering/kernels/shift.py) against the plain-torch reference
of the same shift arithmetic (effopt.shift_ops.shift_linear_ref)."""
import pytest
import torch
from effopt import shift_ops as so
from effopt.lowering.kernels import shift


def _kernel(n, k, terms):
    return shift.build_gemv(n, k, terms)


@pytest.mark.parametrize("n,k,terms", [(10, 37, 1), (24, 64, 2), (7, 100, 3), (33, 32, 1)])
def test_shift_gemv_matches_the_reference(n, k, terms):
    g = torch.Generator().manual_seed(n * k + terms)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(k, generator=g)
    x[3] = 0.0  # zero activations contribute nothing
    x[5] = -1e-38  # so does an x too small to shift (a subnormal in the reference)
    codes, scale = so.quantize(w, terms)
    packed = so.pack(codes)
    y = torch.from_dlpack(_kernel(n, k, terms)(x, packed, scale))
    ref = so.shift_linear_ref(x[None], packed, scale, None, k)[0]
    assert y.shape == ref.shape == (n,) and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # the kernel really uses the codes: a flipped sign bit changes the result
    flipped = packed.clone()
    j = int(torch.nonzero((packed[0, 0] & 7) != so.ZERO_CODE)[0])  # a nonzero weight's low nibble
    flipped[0, 0, j] ^= 8
    assert not torch.allclose(torch.from_dlpack(_kernel(n, k, terms)(x, flipped, scale)), ref)

"""The shift linear kernels (effopt/lowering/kernels/shift.py) against the plain-torch references of the same
shift arithmetic (effopt.ops.shift): the float path within float summation order, the integer MatShift path
bit for bit."""
import pytest
import torch
from effopt.ops import shift as so
from effopt.lowering.kernels import shift


def _case(m, n, k, terms, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    x = torch.randn(m, k, generator=g)
    x[0, 3] = 0.0  # zero activations contribute nothing
    x[-1, min(5, k - 1)] = -1e-38  # so does an x too small to shift (a subnormal in the reference)
    codes, scale = so.quantize(w, terms)
    return x, so.pack(codes), scale, torch.randn(n, generator=g)


def _flip_a_sign(packed):
    flipped = packed.clone()
    j = int(torch.nonzero((packed[0, 0] & 7) != so.ZERO_CODE)[0])  # a nonzero weight's low nibble
    flipped[0, 0, j] ^= 8
    return flipped


@pytest.mark.parametrize("m,n,k,terms", [(1, 10, 37, 1), (1, 24, 64, 2), (1, 7, 100, 3), (1, 33, 32, 1),
                                         (5, 9, 70, 1), (4, 16, 64, 2), (11, 3, 33, 1)])
def test_shift_float_kernel_matches_the_reference(m, n, k, terms):
    x, packed, scale, bias = _case(m, n, k, terms, m * n * k + terms)
    f = shift.build(m, n, k, terms, bias=True)
    y = torch.from_dlpack(f(x, packed, scale, bias))
    ref = so.shift_linear_ref(x, packed, scale, bias, k)
    assert y.shape == ref.shape == (m, n) and y.dtype == ref.dtype
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    # the kernel really uses the codes: a flipped sign bit changes the result
    assert not torch.allclose(torch.from_dlpack(f(x, _flip_a_sign(packed), scale, bias)), ref)


@pytest.mark.parametrize("m,n,k,terms", [(1, 12, 70, 1), (5, 9, 101, 2), (4, 16, 64, 3)])
def test_shift_float_kernel_is_exact_where_summation_order_cannot_matter(m, n, k, terms):
    # small integer activations and power-of-two weights: every partial sum is a multiple of 2^-6 far below
    # 2^24 units, so any summation order gives the same float32 and the kernel must equal the reference bit
    # for bit: each term x * 2^-e (exponent subtract, sign xor) is exact
    g = torch.Generator().manual_seed(m + n + k)
    x = torch.randint(-8, 9, (m, k), generator=g).float()
    codes, _ = so.quantize(torch.randn(n, k, generator=g), terms)
    packed, scale = so.pack(codes), torch.ones(n)
    y = torch.from_dlpack(shift.build(m, n, k, terms)(x, packed, scale))
    assert torch.equal(y, so.shift_linear_ref(x, packed, scale, None, k))


@pytest.mark.slow
@pytest.mark.parametrize("m,n,k,terms,bits", [(1, 10, 37, 1, 8), (3, 24, 64, 2, 8), (6, 7, 100, 3, 8),
                                              (5, 17, 96, 1, 4), (512, 8, 1536, 1, 8)])
def test_matshift_integer_kernel_is_bit_exact(m, n, k, terms, bits):
    # (512 x 1536: enough activations that a quantization step computed differently would show; one did, when
    # the reference's qmax / amax was torch's scalar / tensor, a reciprocal times the scalar, not a division)
    x, packed, scale, bias = _case(m, n, k, terms, 7 * m + n + k)
    x[1 % m] *= 1e4  # tokens of very different ranges: each has its own step
    f = shift.build(m, n, k, terms, bits=bits, bias=True)
    y = torch.from_dlpack(f(x, packed, scale, bias))
    ref = so.matshift_linear_ref(x, packed, scale, bias, k, bits)
    assert y.shape == ref.shape == (m, n) and y.dtype == ref.dtype
    assert torch.equal(y, ref), (y - ref).abs().max()
    # and it is close to the float linear with the same power-of-two weights (8 bits: within quantization)
    if bits == 8:
        flt = so.shift_linear_ref(x, packed, scale, bias, k)
        assert ((y - flt).norm() / flt.norm()) < 0.02
    assert not torch.equal(torch.from_dlpack(f(x, _flip_a_sign(packed), scale, bias)), ref)


def test_activation_quantization_rounds_half_to_even_like_the_kernel():
    # values landing exactly on .5 after scaling: 127 / 127 * [0.5, 1.5, 2.5] -> 0, 2, 2
    x = torch.tensor([[0.5, 1.5, 2.5, 127.0, -2.5, 0.0] + [0.0] * 26])
    xq, step = so.act_quantize(x, 8)
    assert xq[0, :6].tolist() == [0.0, 2.0, 2.0, 127.0, -2.0, 0.0] and step.item() == 1.0
    codes, scale = so.quantize(torch.ones(2, 32), 1)
    f = shift.build(1, 2, 32, 1, bits=8)
    assert torch.equal(torch.from_dlpack(f(x, so.pack(codes), scale)),
                       so.matshift_linear_ref(x, so.pack(codes), scale, None, 32, 8))


def test_one_symbolic_build_serves_every_row_count():
    """Rows symbolic (a served stream): the per-token quantizer and both paths of the shift linear, built once,
    bit for bit the references at row counts that fill no token block, one, and several."""
    from tvm import tirx

    m = tirx.Var("m", "int64")
    n, k, terms = 24, 70, 2
    for bits in (8, 0):
        f = shift.build(m, n, k, terms, bits=bits, bias=True)
        for rows in (1, 3, 9):
            x, packed, scale, bias = _case(rows, n, k, terms, rows)
            x[0] *= 1e3
            y = torch.from_dlpack(f(x, packed, scale, bias))
            ref = so.matshift_linear_ref(x, packed, scale, bias, k, bits) if bits else \
                so.shift_linear_ref(x, packed, scale, bias, k)
            assert y.shape == ref.shape == (rows, n) and y.dtype == ref.dtype
            if bits:
                assert torch.equal(y, ref), (rows, (y - ref).abs().max())
            else:  # the float path sums in its own order
                torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)

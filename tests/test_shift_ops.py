"""Power-of-two weights (effopt/ops/shift.py): rounding, residual terms, packing, the reference linear."""
import pytest
import torch

from effopt.ops import shift as so


def test_codes_of_known_weights():
    w = torch.tensor([[1.0, -0.5, 0.3, 0.004, 0.0, -0.02],
                      [0.0, 0.0, 0.0, 0.0, 0.0, -2.0]])
    codes, scale = so.quantize(w)
    assert torch.equal(scale, torch.tensor([1.0, 2.0]))
    # 1 -> +2^0; -0.5 -> -2^-1 (sign bit 8 | 1); 0.3 -> 2^-2 (log2 0.3 = -1.74); 0.004 < 2^-7 -> zero (7);
    # -0.02 -> -2^-6 (log2 0.02 = -5.64)
    assert codes[0, 0].tolist() == [0, 9, 2, 7, 7, 8 | 6]
    assert codes[0, 1].tolist() == [7, 7, 7, 7, 7, 8]
    assert torch.equal(so.dequantize(codes, scale),
                       torch.tensor([[1.0, -0.5, 0.25, 0.0, 0.0, -2.0 ** -6], [0, 0, 0, 0, 0, -2.0]]))


def test_rounding_is_within_half_a_power_and_terms_add_precision():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g)
    errs = {}
    for terms in so.TERMS:
        codes, scale = so.quantize(w, terms)
        assert codes.shape == (terms, 64, 96) and codes.dtype == torch.uint8 and int(codes.max()) <= 15
        q = so.dequantize(codes, scale)
        errs[terms] = ((q - w).norm() / w.norm()).item()
        if terms == 1:  # log-domain rounding: within a factor sqrt(2) where the weight is in range
            rel = (w / scale[:, None]).abs()
            ok = rel >= 2.0 ** -so.MAX_SHIFT
            ratio = (q[ok] / w[ok])
            assert torch.all(ratio > 0) and torch.all(ratio <= 2 ** 0.5 + 1e-6) and torch.all(ratio >= 2 ** -0.5 - 1e-6)
    assert errs[2] < errs[1] / 3 and errs[3] < errs[2], errs


def test_pack_round_trip_and_size():
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (2, 5, 7), generator=g, dtype=torch.uint8)
    packed = so.pack(codes)
    assert packed.shape == (2, 5, 4) and packed.dtype == torch.uint8
    assert torch.equal(so.unpack(packed, 7), codes)
    assert so.unpack(packed, 8)[..., 7].eq(so.ZERO_CODE).all()  # odd K padded with zero codes
    assert 4 * 4096 * 4096 / so.weight_bytes(4096, 4096, 1) > 7.98  # 8x fewer bytes than fp32 (plus the scales)


def test_reference_linear_is_the_dequantized_matmul():
    g = torch.Generator().manual_seed(2)
    w, b, x = torch.randn(10, 13, generator=g), torch.randn(10, generator=g), torch.randn(3, 4, 13, generator=g)
    codes, scale = so.quantize(w, terms=2)
    y = so.shift_linear_ref(x, so.pack(codes), scale, b, 13)
    assert y.shape == (3, 4, 10) and y.dtype == torch.float32
    torch.testing.assert_close(y, x @ so.dequantize(codes, scale).t() + b)
    # and it approximates the original linear
    assert torch.nn.functional.cosine_similarity(y.flatten(), (x @ w.t() + b).flatten(), dim=0) > 0.99


def test_bad_arguments():
    with pytest.raises(ValueError, match="terms"):
        so.quantize(torch.randn(3, 3), terms=4)
    with pytest.raises(ValueError, match="2-D"):
        so.quantize(torch.randn(3, 3, 3))


def test_dequantize_from_packed_bytes_equals_dequantize_of_the_codes():
    g = torch.Generator().manual_seed(3)
    for terms, k in ((1, 13), (2, 64), (3, 7)):
        codes, scale = so.quantize(torch.randn(9, k, generator=g), terms)
        assert torch.equal(so.dequantize_packed(so.pack(codes), scale, k), so.dequantize(codes, scale))


def test_integer_path_reference():
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(6, 40, generator=g), torch.randn(2, 3, 40, generator=g)
    codes, scale = so.quantize(w)
    # the integer weights are the float weights in units of 2^-6 of the channel scale
    assert torch.equal(so.integer_weight(codes).double() * 2.0 ** -6 * scale[:, None].double(),
                       so.dequantize(codes, scale).double())
    xq, step = so.act_quantize(x, 8)
    assert xq.abs().max() == 127 and torch.equal(xq, xq.round()) and step.shape == (2, 3, 1)
    y = so.matshift_linear_ref(x, so.pack(codes), scale, None, 40, 8)
    flt = so.shift_linear_ref(x, so.pack(codes), scale, None, 40)
    assert y.shape == flt.shape == (2, 3, 6)
    assert ((y - flt).norm() / flt.norm()) < 0.02  # 8-bit activations: close to the float path
    y4 = so.matshift_linear_ref(x, so.pack(codes), scale, None, 40, 4)
    assert ((y4 - flt).norm() / flt.norm()) > ((y - flt).norm() / flt.norm())  # fewer bits, more error


def test_custom_ops_run_their_references_and_pass_gradients_straight_through():
    g = torch.Generator().manual_seed(5)
    w, b, x = torch.randn(6, 40, generator=g), torch.randn(6, generator=g), torch.randn(3, 40, generator=g)
    codes, scale = so.quantize(w, 2)
    packed = so.pack(codes)
    for bits in (0, 8):
        assert torch.equal(torch.ops.effopt.shift_linear(x, packed, scale, b, 40, bits),
                           so.linear_ref(x, packed, scale, b, 40, bits))
    with pytest.raises(ValueError, match="activation_bits"):
        torch.ops.effopt.shift_linear(x, packed, scale, b, 40, 3)
    wp = w.clone().requires_grad_()
    xp = x.clone().requires_grad_()
    y = torch.nn.functional.linear(torch.ops.effopt.act_quant(xp, 8), torch.ops.effopt.shift_weight(wp, 2), b)
    assert torch.equal(torch.ops.effopt.shift_weight(w, 2), so.dequantize(codes, scale))
    assert torch.allclose(y, so.matshift_linear_ref(x, packed, scale, b, 40, 8), atol=1e-4)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    # straight through: the gradients of a plain linear evaluated at the rounded values
    torch.testing.assert_close(wp.grad, gy.t() @ torch.ops.effopt.act_quant(x, 8))
    torch.testing.assert_close(xp.grad, gy @ so.dequantize(codes, scale))

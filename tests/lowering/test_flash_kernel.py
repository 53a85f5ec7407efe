"""The FlashAttention-style TVM kernel (effopt.lowering.kernels.flash) against torch's SDPA."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from effopt.target import resolve_target  # noqa: E402
from effopt.lowering.build import build_module  # noqa: E402
from effopt.lowering.kernels import flash  # noqa: E402

NEG = torch.finfo(torch.float32).min


def _tensor_ty(shape, dtype="float32"):
    return relax.TensorType(list(shape), dtype)


def _build(q_shape, k_shape, v_shape, mask_shape=None, scale=0.125, mask_dtype="float32", **tiles):
    bb = relax.BlockBuilder()
    params = [relax.Var(n, _tensor_ty(s)) for n, s in zip("qkv", (q_shape, k_shape, v_shape))]
    if mask_shape is not None:
        params.append(relax.Var("mask", _tensor_ty(mask_shape, mask_dtype)))
    with bb.function("main", params):
        with bb.dataflow():
            out = flash.emit(bb, *params[:3], params[3] if mask_shape is not None else None, scale, **tiles)
            gv = bb.emit_output(out)
        bb.emit_func_output(gv)
    vm = relax.VirtualMachine(build_module(bb.get(), resolve_target("host")), tvm.cpu())
    return bb.get(), lambda *ts: torch.from_dlpack(vm["main"](*ts))


def _qkv(b, h, n, m, d, dv, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, d, generator=g), torch.randn(b, h, m, d, generator=g),
            torch.randn(b, h, m, dv, generator=g))


def _check(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("b,h,n,m,d,dv", [(2, 3, 197, 197, 64, 64),  # ViT-like, not a multiple of the tiles
                                          (2, 2, 197, 150, 64, 48),   # N != M, Dv != D
                                          (1, 2, 5, 300, 32, 32)])    # fewer rows than one query block
def test_no_mask(b, h, n, m, d, dv):
    q, k, v = _qkv(b, h, n, m, d, dv)
    scale = 1 / math.sqrt(d)
    _, run = _build(q.shape, k.shape, v.shape, scale=scale)
    _check(run(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=scale))


def test_hf_key_padding_mask():
    b, h, n, m, d = 2, 3, 197, 197, 64
    q, k, v = _qkv(b, h, n, m, d, d, seed=1)
    mask = torch.zeros(b, 1, 1, m)
    mask[0, ..., 120:] = NEG  # first sequence padded after 120 keys
    mask[1, ..., 190:] = NEG  # the padding of the second starts inside the last key block
    _, run = _build(q.shape, k.shape, v.shape, mask.shape)
    _check(run(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125))


def test_full_additive_mask():
    b, h, n, m, d = 2, 2, 197, 150, 64
    q, k, v = _qkv(b, h, n, m, d, d, seed=2)
    mask = torch.randn(1, 1, n, m) * 3
    mask[..., ::7, 100:] = NEG  # some rows lose a suffix of keys, causal-like
    _, run = _build(q.shape, k.shape, v.shape, mask.shape)
    _check(run(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125))


def test_per_head_mask_rank2_mask_and_bool_mask():
    b, h, n, m, d = 2, 2, 33, 70, 16
    q, k, v = _qkv(b, h, n, m, d, d, seed=3)
    per_head = torch.randn(b, h, n, m)
    _, run = _build(q.shape, k.shape, v.shape, per_head.shape)
    _check(run(q, k, v, per_head), F.scaled_dot_product_attention(q, k, v, attn_mask=per_head, scale=0.125))
    rank2 = torch.randn(n, m)  # broadcast from the right, as torch does
    _, run = _build(q.shape, k.shape, v.shape, rank2.shape)
    _check(run(q, k, v, rank2), F.scaled_dot_product_attention(q, k, v, attn_mask=rank2, scale=0.125))
    keep = torch.ones(b, 1, 1, m, dtype=torch.bool)
    keep[1, ..., 50:] = False
    _, run = _build(q.shape, k.shape, v.shape, keep.shape, mask_dtype="bool")
    _check(run(q, k, v, keep), F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.125))


def test_other_tiles():
    q, k, v = _qkv(2, 2, 100, 77, 64, 64, seed=4)
    _, run = _build(q.shape, k.shape, v.shape, scale=0.3, block_q=16, block_k=32, rows_qk=4, rows_pv=2)
    _check(run(q, k, v), F.scaled_dot_product_attention(q, k, v, scale=0.3))
    with pytest.raises(ValueError):
        flash.make_kernel(64, 64, 0.125, block_k=30, rows_qk=8)


def test_symbolic_batch():
    batch = tirx.Var("batch", "int64")
    mod, run = _build((batch, 2, 40, 32), (batch, 2, 50, 32), (batch, 2, 50, 32), (batch, 1, 1, 50))
    for b in (1, 3):
        q, k, v = _qkv(b, 2, 40, 50, 32, 32, seed=b)
        mask = torch.zeros(b, 1, 1, 50)
        mask[-1, ..., 30:] = NEG
        _check(run(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125))


def test_scheduled_kernel_is_left_alone():
    from effopt.lowering.schedules import default_schedule_pass

    target = resolve_target("host")
    func = flash.make_kernel(64, 64, 0.125, (False, True, True, False))
    assert func.attrs["tirx.is_scheduled"]
    mod = tvm.IRModule({"flash": func})
    tvm.ir.assert_structural_equal(default_schedule_pass(target)(mod)["flash"], func)


def test_rows_with_every_key_masked_match_torch():
    """-inf (and boolean) masks: 0 for a row whose keys are all masked, as torch's SDPA gives; finfo.min
    masks: the mean of V, also as torch gives."""
    q, k, v = _qkv(1, 2, 9, 9, 16, 16)
    for shape in ((1, 1, 9, 9), (2, 1, 1, 9)):  # a per-row mask; a key mask whose sample 0 is all masked
        for fill in (float("-inf"), torch.finfo(torch.float32).min):
            mask = torch.zeros(shape)
            mask[0, ..., 2 if shape[2] > 1 else 0, :] = fill
            mask[..., -1, :4] = fill
            qq, kk, vv = (t.expand(shape[0], -1, -1, -1).contiguous() for t in (q, k, v))
            _, run = _build(qq.shape, kk.shape, vv.shape, mask.shape, scale=0.25)
            ref = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=0.25)
            _check(run(qq, kk, vv, mask), ref)

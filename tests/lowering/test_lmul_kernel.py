"""The L-Mul attention TVM kernel (effopt/lowering/kernels/lmul.py) against effopt.ops.attention: the elementwise
L-Mul bit-exactly, the attention within float tolerance (only the float32 summation order and the exp
differ from the reference)."""
import pytest
import torch
import tvm
from tvm import relax, tirx

from effopt.ops import attention as ops
from effopt.target import resolve_target
from effopt.lowering.build import build_module
from effopt.lowering.kernels import lmul

B, H, N, M, D, DV = 2, 3, 13, 37, 24, 20  # N != M; M, Dv not multiples of 16, N not a multiple of 4
NEG = torch.finfo(torch.float32).min


MANTISSA_BITS_EW = [0, 3, 4, 8, 23]


def _function(bb, name, params, body):
    with bb.function(name, params):
        with bb.dataflow():
            out = bb.emit_output(body(bb))
        bb.emit_func_output(out)


@pytest.fixture(scope="module")
def vm():
    """Every kernel the tests call, compiled in one module (one LLVM run)."""
    bb = relax.BlockBuilder()
    for m in (3, 8):
        for mask_kind in (None, "padding"):
            b = tirx.Var("b", "int64")  # symbolic batch
            q = relax.Var("q", relax.TensorType([b, H, N, D], "float32"))
            k = relax.Var("k", relax.TensorType([b, H, M, D], "float32"))
            v = relax.Var("v", relax.TensorType([b, H, M, DV], "float32"))
            mask = relax.Var("mask", relax.TensorType([b, 1, 1, M], "float32")) if mask_kind else None
            _function(bb, f"attn_m{m}_{mask_kind}", [q, k, v] + ([mask] if mask is not None else []),
                      lambda bb, q=q, k=k, v=v, mask=mask, m=m: lmul.emit(bb, q, k, v, mask, D ** -0.5, m))
    # a static batch and a rank-2 [N, M] mask, broadcast over batch and heads
    q = relax.Var("q", relax.TensorType([B, H, N, D], "float32"))
    k = relax.Var("k", relax.TensorType([B, H, M, D], "float32"))
    v = relax.Var("v", relax.TensorType([B, H, M, DV], "float32"))
    mask = relax.Var("mask", relax.TensorType([N, M], "float32"))
    _function(bb, "attn_static_2d", [q, k, v, mask], lambda bb: lmul.emit(bb, q, k, v, mask, 0.3, 5))
    for m in MANTISSA_BITS_EW:
        n = tirx.Var("n", "int64")
        a = relax.Var("a", relax.TensorType([n, 4], "float32"))
        b = relax.Var("b", relax.TensorType([n, 4], "float32"))
        _function(bb, f"ew_m{m}", [a, b], lambda bb, a=a, b=b, m=m: lmul.emit_elementwise(bb, a, b, m))
    return relax.VirtualMachine(build_module(bb.get(), resolve_target("host")), tvm.cpu())


def _run(vm, name, *args):
    return torch.from_dlpack(vm[name](*args))


def _inputs(batch=B, n=N):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(batch, H, n, D, generator=g)
    k = torch.randn(batch, H, M, D, generator=g)
    v = torch.randn(batch, H, M, DV, generator=g)
    v[0, 0, 3, :5] = 0.0  # zero (zero exponent field) operands
    q[-1, 1, 2, :7] = 0.0
    return q, k, v


@pytest.mark.slow
@pytest.mark.parametrize("mantissa_bits", [3, 8])
@pytest.mark.parametrize("mask_kind", [None, "padding"])
def test_lmul_attention_matches_reference(vm, mantissa_bits, mask_kind):
    q, k, v = _inputs()
    args = [q, k, v]
    mask = None
    if mask_kind == "padding":
        mask = torch.zeros(B, 1, 1, M)
        mask[1, ..., M - 9:] = NEG  # the second sequence is padded
        args.append(mask)
    out = _run(vm, f"attn_m{mantissa_bits}_{mask_kind}", *args)
    ref = ops.lmul_attention_ref(q, k, v, mask, D ** -0.5, mantissa_bits)
    assert out.shape == ref.shape == (B, H, N, DV)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # L-Mul is not float attention: the result differs from SDPA by much more than float rounding
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D ** -0.5)
    assert (out - sdpa).abs().max() > 1e-3


@pytest.mark.slow
def test_lmul_attention_symbolic_batch(vm):
    for batch in (1, 3):
        q, k, v = _inputs(batch)
        out = _run(vm, "attn_m3_None", q, k, v)
        torch.testing.assert_close(out, ops.lmul_attention_ref(q, k, v, None, D ** -0.5, 3), rtol=1e-5, atol=1e-5)


def test_lmul_attention_static_batch_2d_mask(vm):
    q, k, v = _inputs()
    mask = torch.randn(N, M) * 3
    mask[:, :4] = NEG
    out = _run(vm, "attn_static_2d", q, k, v, mask)
    torch.testing.assert_close(out, ops.lmul_attention_ref(q, k, v, mask, 0.3, 5), rtol=1e-5, atol=1e-5)


def test_kernels_are_prescheduled_and_opaque():
    """The default schedule pass and FuseOps leave the hand-scheduled PrimFuncs alone."""
    from effopt.lowering.schedules import default_schedule_pass

    b = tirx.Var("b", "int64")
    q, k, v = (relax.Var(x, relax.TensorType([b, H, N, D], "float32")) for x in "qkv")
    bb = relax.BlockBuilder()
    with bb.function("main", [q, k, v]):
        with bb.dataflow():
            out = bb.emit_output(lmul.emit(bb, q, k, v, None, 0.125, 3))
        bb.emit_func_output(out)
    mod = bb.get()
    target = resolve_target("host")
    with target:
        after = tvm.transform.Sequential([relax.transform.AnnotateTIROpPattern(), relax.transform.FuseOps(),
                                          relax.transform.FuseTIR(), default_schedule_pass(target)])(mod)
    prims = {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    assert len(prims) == 3
    for name, f in prims.items():
        assert f.attrs["tirx.is_scheduled"]
        tvm.ir.assert_structural_equal(after[name], f)
    text = prims["lmul_attention_m3"].script()
    assert text.count("T.parallel(") == 1 and "T.vectorized(" in text


@pytest.mark.parametrize("mantissa_bits", MANTISSA_BITS_EW)
def test_elementwise_lmul_bit_exact(vm, mantissa_bits):
    g = torch.Generator().manual_seed(mantissa_bits)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-40, 1.1754944e-38, 1.0, -1.0, 1.5, 3.4028235e38, -3.4028235e38,
                            float("inf"), float("-inf"), float("nan"), 1e30, -1e-30, 2.0 ** -100])
    sx, sy = torch.meshgrid(special, special, indexing="ij")
    x = torch.cat([
        torch.randint(-2 ** 31, 2 ** 31 - 1, (4000,), dtype=torch.int32, generator=g).view(torch.float32),
        torch.randn(4000, generator=g) * torch.exp2(torch.randint(-140, 140, (4000,), generator=g).float()),
        sx.flatten()])
    y = torch.cat([
        torch.randn(4000, generator=g) * 1e20,
        torch.randint(-2 ** 31, 2 ** 31 - 1, (4000,), dtype=torch.int32, generator=g).view(torch.float32),
        sy.flatten()])
    x, y = x.reshape(-1, 4), y.reshape(-1, 4)
    out = _run(vm, f"ew_m{mantissa_bits}", x, y)
    ref = ops.lmul(x, y, mantissa_bits)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


def test_emit_rejects_bad_arguments():
    q = relax.Var("q", relax.TensorType([1, H, N, D], "float32"))
    k = relax.Var("k", relax.TensorType([1, H, M, D + 1], "float32"))
    v = relax.Var("v", relax.TensorType([1, H, M, DV], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, k, v]):
        with pytest.raises(ValueError):
            lmul.emit(bb, q, k, v, None, 0.1, 3)
        with pytest.raises(ValueError):
            lmul.emit(bb, q, q, v, None, 0.1, 24)
        bb.emit_func_output(q)


# ---- the op's eager forward (effopt/lowering/eager.py): the same kernel, called from PyTorch ----------------
def _op(q, k, v, mask, mantissa_bits=3):
    return torch.ops.effopt.lmul_attention(q, k, v, mask, D ** -0.5, mantissa_bits)


@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_eager_op_runs_the_kernel_and_matches_the_reference(mask_kind):
    from effopt.lowering import eager

    q, k, v = _inputs()
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # a non-contiguous input, as Hugging Face passes them
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(B, 1, 1, M, dtype=torch.bool)
        mask[1, ..., M - 9:] = False
    elif mask_kind == "float":
        mask = torch.randn(N, M) * 3
    eager.clear()
    out = _op(q, k, v, mask)
    assert len(eager._compiled) == 1  # compiled once for this signature, reused
    assert torch.equal(_op(q, k, v, mask), out) and len(eager._compiled) == 1
    with ops.reference_kernels():
        ref = _op(q, k, v, mask)
    assert len(eager._compiled) == 1
    assert out.shape == ref.shape == (B, H, N, DV) and out.dtype == ref.dtype
    assert out.stride() == ref.stride()  # SDPA's layout
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ref, ops.lmul_attention_ref(q, k, v, mask, D ** -0.5, 3).transpose(1, 2)
                               .contiguous().transpose(1, 2))


def test_eager_op_falls_back_to_the_reference(monkeypatch):
    from effopt.lowering import eager

    q, k, v = _inputs()
    ref = ops.lmul_attention_ref(q.double(), k.double(), v.double(), None, D ** -0.5, 3)
    eager.clear()
    got = _op(q.double(), k.double(), v.double(), None)  # not float32: the reference
    assert got.dtype == torch.float64 and len(eager._compiled) == 0
    torch.testing.assert_close(got, ref)

    def broken(*args):
        raise RuntimeError("no kernel today")

    monkeypatch.setattr(ops, "_kernel_failed", [])
    monkeypatch.setitem(ops.EAGER_KERNELS, "lmul_attention", broken)
    with pytest.warns(RuntimeWarning, match="no kernel today"):
        got = _op(q, k, v, None)
    torch.testing.assert_close(got, ops.lmul_attention_ref(q, k, v, None, D ** -0.5, 3))
    assert ops._kernel_failed  # not retried on every call

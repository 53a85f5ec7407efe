"""The Hamming attention TVM kernels (effopt.lowering.kernels.hamming) against effopt.ops.attention.hamming_attention_ref."""
from __future__ import annotations

import pytest
import torch

tvm = pytest.importorskip("tvm")
from tvm import relax, tirx  # noqa: E402

from effopt.target import resolve_target  # noqa: E402
from effopt.lowering.build import build_module  # noqa: E402
from effopt.lowering.kernels import hamming  # noqa: E402
from effopt.ops.attention import hamming_attention_ref  # noqa: E402

NEG = torch.finfo(torch.float32).min
BETA = 0.37

# name: (B, H, N, M, bits, Dv, mask shape or None, mask dtype)
CASES = {
    "nomask": (2, 3, 17, 23, 64, 64, None, "float32"),
    "keypad_bits128": (2, 3, 33, 33, 128, 48, (2, 1, 1, 33), "float32"),
    "keypad_n_ne_m": (2, 2, 12, 29, 64, 64, (2, 1, 1, 29), "float32"),
    "full_mask_bits32": (2, 2, 9, 40, 32, 20, (1, 1, 9, 40), "float32"),
    "bool_mask_bits100": (2, 1, 7, 11, 100, 16, (2, 1, 7, 11), "bool"),
}


def _add_case(bb, name, B, H, N, M, bits, Dv, mask_shape, mask_dtype, beta=BETA):
    params = [relax.Var("qp", relax.TensorType([B, H, N, bits], "float32")),
              relax.Var("kp", relax.TensorType([B, H, M, bits], "float32")),
              relax.Var("v", relax.TensorType([B, H, M, Dv], "float32"))]
    if mask_shape is not None:
        mshape = [B if d == "B" else d for d in mask_shape]
        params.append(relax.Var("mask", relax.TensorType(mshape, mask_dtype)))
    with bb.function(name, params):
        with bb.dataflow():
            out = bb.emit_output(hamming.emit(bb, *params[:3], params[3] if mask_shape is not None else None, beta))
        bb.emit_func_output(out)


@pytest.fixture(scope="module")
def vm():
    """All cases (and a symbolic-batch one, and a crafted one) compiled in one module: one LLVM run."""
    bb = relax.BlockBuilder()
    for name, case in CASES.items():
        _add_case(bb, name, *case)
    _add_case(bb, "symbolic_batch", tirx.Var("batch", "int64"), 2, 10, 14, 64, 32, ("B", 1, 1, 14), "float32")
    _add_case(bb, "crafted", 1, 1, 2, 4, 64, 16, None, "float32", beta=1.0)
    mod = bb.get()
    ex = build_module(mod, resolve_target("host"))
    return mod, ex, relax.VirtualMachine(ex, tvm.cpu())


def _inputs(B, H, N, M, bits, Dv, mask_shape, mask_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qp, kp = torch.randn(B, H, N, bits, generator=g), torch.randn(B, H, M, bits, generator=g)
    v = torch.randn(B, H, M, Dv, generator=g) * 3
    v[..., 0, :2] = 0.0  # zeros stay zero under the exponent addition
    mask = None
    if mask_shape is not None:
        mshape = [B if d == "B" else d for d in mask_shape]
        if mask_dtype == "bool":
            mask = torch.rand(mshape, generator=g) > 0.3
            mask[..., 0] = True  # no fully masked row
        elif mshape[-2] == 1:  # Hugging Face key padding mask: the last keys of batch 0 are padding
            mask = torch.zeros(mshape)
            mask[0, ..., -5:] = NEG
        else:  # an arbitrary additive float mask, with some keys excluded
            mask = torch.randn(mshape, generator=g) * 4
            mask[..., 1::3] = NEG
    return qp, kp, v, mask


def _check(out, ref):
    assert out.shape == ref.shape and out.dtype == ref.dtype == torch.float32
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0))


def _run(fn, *args):
    return torch.from_dlpack(fn(*[a for a in args if a is not None]))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(vm, name):
    _, _, machine = vm
    qp, kp, v, mask = _inputs(*CASES[name])
    _check(_run(machine[name], qp, kp, v, mask), hamming_attention_ref(qp, kp, v, mask, BETA))


@pytest.mark.slow
def test_symbolic_batch(vm):
    _, _, machine = vm
    for B in (1, 3):
        qp, kp, v, mask = _inputs(B, 2, 10, 14, 64, 32, (B, 1, 1, 14), "float32", seed=B)
        _check(_run(machine["symbolic_batch"], qp, kp, v, mask), hamming_attention_ref(qp, kp, v, mask, BETA))


def test_weights_come_from_popcount_of_codes(vm):
    """Crafted codes: only the signs count (magnitudes are wildly different), and with beta = 1 the weight
    of key j is 2^(equal bits - max equal bits), so the output is known in closed form."""
    mod, ex, machine = vm
    q = torch.full((1, 1, 2, 64), 1e-3)
    q[0, 0, 1, :32] = -1e3  # query 1: half the bits differ from query 0
    k = torch.full((1, 1, 4, 64), 5.0)
    differ = [0, 1, 3, 40]  # key j differs from query 0 in differ[j] bits
    for j, n in enumerate(differ):
        k[0, 0, j, 64 - n:] = -7e-5
    v = torch.arange(1, 4 * 16 + 1, dtype=torch.float32).reshape(1, 1, 4, 16)
    out = _run(machine["crafted"], q, k, v)
    for i in range(2):
        same = ((q[0, 0, i] > 0) == (k[0, 0] > 0)).sum(-1).double()  # equal bits per key
        e = torch.floor(same - same.max() + 0.5)
        w = torch.where(e < -126, 0.0, 2.0 ** e)
        expected = (w[:, None] * v[0, 0].double()).sum(0) / w.sum()
        torch.testing.assert_close(out[0, 0, i].double(), expected, rtol=1e-6, atol=0)
    assert torch.equal(out, hamming_attention_ref(q, k, v, None, 1.0))
    # the similarity really is computed with the popcount instruction on packed words
    attn = next(f for gv, f in mod.functions_items() if gv.name_hint.startswith("hamming_attention"))
    assert "T.popcount(" in attn.script()
    asm = "\n".join(m.inspect_source("asm") for m in ex.mod.imports)
    assert "popcnt" in asm


def test_kernels_are_prescheduled():
    """The PrimFuncs carry tirx.is_scheduled, so effopt's default schedule pass leaves them as written."""
    from effopt.lowering.schedules import default_schedule_pass

    target = resolve_target("host")
    funcs = {"pack": hamming.pack_func(tirx.Var("b", "int64"), 2, 10, 64),
             "attn": hamming.attention_func(2, 2, 10, 12, 128, 64, BETA, (1, 1, 1, 12))}
    for f in funcs.values():
        assert bool(f.attrs["tirx.is_scheduled"]) and "T.parallel(" in f.script()
    assert "T.vectorized(" in funcs["attn"].script()
    mod = tvm.IRModule(funcs)
    tvm.ir.assert_structural_equal(default_schedule_pass(target)(mod), mod)


def test_rejects_bad_shapes():
    bb = relax.BlockBuilder()
    qp = relax.Var("qp", relax.TensorType([1, 2, 4, 64], "float32"))
    kp = relax.Var("kp", relax.TensorType([1, 2, 5, 64], "float32"))
    v = relax.Var("v", relax.TensorType([1, 2, 6, 8], "float32"))
    with bb.function("main", [qp, kp, v]):
        with pytest.raises(ValueError, match="incompatible shapes"):
            hamming.emit(bb, qp, kp, v, None, 1.0)
        bb.emit_func_output(qp)

"""The fused int8 linear kernel (effopt/lowering/kernels/int8.py) against plain-torch references of the same
integer arithmetic (effopt.ops.int8): exactly, for every quantization and epilogue, and at shapes that leave
partial register tiles, in each ISA's form this machine can execute (an AVX-512 CPU runs the AVX2 and
AVX-VNNI kernels too); aarch64's are cross-compiled and their assembly checked, and the i8mm kernel's layout,
zips and epilogue run here with smmla written out in vector arithmetic; and the op's eager form
(torch._int_mm) against the same reference."""
import dataclasses
import re

import pytest
import torch

from effopt.ops import int8 as int8_ops
from effopt.target import resolve_target
from effopt.lowering.kernels import int8

X86 = ["avx512vnni", "avxvnni", "avx2"]
EMULATED = "neon-i8mm-emulated"  # i8mm's kernel with smmla in plain vector arithmetic: runs on any CPU


def _target(isa):
    if isa == EMULATED:
        return EMULATED
    why = int8.host_runs(isa)
    if why:
        pytest.skip(f"{why}: the {isa} kernel cannot run here")
    host = resolve_target("host")
    if int8.isa_of(host) is not None and int8.isa_of(host).name == isa:
        return "host"
    return int8.ISA_TARGETS[isa][0]


def _case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    wq, ws = int8_ops.quantize_weight(torch.randn(n, k, generator=g))
    return x, wq, ws, torch.randn(n, generator=g), torch.randn(m, n, generator=g)


def _body(m, n, k, scale, quant, activation, bias, residual, smooth, x_dtype, out_quant, isa):
    def body(bb, x, p, s, st, *rest):
        rest = list(rest)
        sm = rest.pop() if smooth else None
        b = rest[0] if bias else None
        r = rest[-1] if residual else None
        return int8.emit(bb, x, p, s, st, b, r, k, scale, *quant, activation, sm, out_quant, isa=isa)

    types = [((m, k), x_dtype), ((n // 16, (k + 3) // 4, 16, 4), "int8"), ((n,), "int32"), ((n,), "float32")]
    types += [((n,), "float32")] * bias + [((m, n), "float32")] * residual + [((k,), "float32")] * smooth
    return body, types


def _build_target(target):
    """(the target to build for, the Isa its kernel is generated for): the emulated i8mm kernel builds for this
    machine."""
    if target == EMULATED:
        return "host", dataclasses.replace(int8.ISAS["neon-i8mm"], emulated=True)
    isa = int8.isa_of(resolve_target(target))
    if isa is None:
        pytest.skip("this CPU has no integer dot product the int8 kernel is generated for")
    return target, isa


def _build(m, n, k, scale, quant, activation, bias, residual, smooth=False, x_dtype="float32", out_quant=None,
           target="host"):
    from effopt.lowering.build import build_function

    target, isa = _build_target(target)
    body, types = _body(m, n, k, scale, quant, activation, bias, residual, smooth, x_dtype, out_quant, isa)
    return build_function(body, *types, target=target)


QUANTS = {"dynamic": (None, int8_ops.SYMMETRIC), "static": (0.02, int8_ops.SYMMETRIC),
          "pt2e-uint8": (0.021, (3, 0, 255)),  # PT2E's affine uint8: zero point 3, [0, 255]
          "token-affine": (None, int8_ops.TOKEN_AFFINE)}  # 7 bits, each token's own range and zero point


EPILOGUES = [("none", True, False, False), ("relu", True, True, False), ("none", False, True, False),
             ("none", True, False, True)]
CASES = [(shape, quant, epi) for shape in [(1, 16, 64), (7, 48, 50), (37, 96, 384), (256, 384, 1536)]
         for quant in QUANTS for epi in EPILOGUES]


_HOST = int8.isa_of(resolve_target("host"))
# every case on this CPU's own kernel; every third (all shapes, quantizations and epilogues still met) on
# the other ISAs, to keep make test short
RUNS = [(isa, case) for isa in X86 + [EMULATED] for case in range(len(CASES))
        if (_HOST is not None and _HOST.name == isa) or case % 3 == 0]


@pytest.mark.slow
@pytest.mark.parametrize("isa, case", RUNS)
def test_fused_kernel_is_exact(isa, case):
    (m, n, k), quant, (activation, bias, residual, smooth) = CASES[case]
    target = _target(isa)
    x, wq, ws, b, r = _case(m, n, k)
    wq[0, : k // 2] = -128  # PT2E's weights may reach -128 (quantize_weight's stop at -127)
    scale, (offset, lo, hi) = QUANTS[quant]
    x[0, :3] = torch.tensor([1e4, -1e4, 0.03])  # clamping, and a tie at the static scale
    sm = torch.rand(k, generator=torch.Generator().manual_seed(3)) * 2 + 0.1  # SmoothQuant's 1 / s
    packed, wsum = int8_ops.pack_weight(wq, offset)
    assert torch.equal(int8_ops.unpack_weight(packed, k), wq)
    args = [x, packed, wsum, ws] + [b] * bias + [r] * residual + [sm] * smooth
    got = torch.from_dlpack(_build(m, n, k, scale, (offset, lo, hi), activation, bias, residual, smooth,
                                   target=target)(*args))
    ref = int8_ops.int8_linear_fused_ref(x, packed, wsum, ws, b if bias else None, scale, offset, lo, hi, k,
                                         activation, r if residual else None, sm if smooth else None)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.equal(got, ref), (got - ref).abs().max()


@pytest.mark.slow
@pytest.mark.parametrize("isa", X86 + [EMULATED])
@pytest.mark.parametrize("m, n, k", [(7, 48, 50), (256, 384, 1536)])
@pytest.mark.parametrize("prequantized", [False, True])
@pytest.mark.parametrize("quant", [(3, 0, 255), (128, 1, 255)])  # PT2E-style affine; effopt's symmetric
def test_requantized_output_and_input_are_exact(isa, m, n, k, prequantized, quant):
    """A folded dequantize -> quantize pair: the kernel's output requantized to uint8 for the next int8
    linear, and a kernel that takes such a uint8 input (with its static scale) instead of quantizing: any
    byte, 0 included (outside [1, 255], as the lowering's self-check feeds it)."""
    x, wq, ws, b, r = _case(m, n, k, seed=4)
    out = (0.05, *quant)  # the next layer's scale, zero point, range
    if prequantized:
        x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
        x[0, :8] = 0
    packed, wsum = int8_ops.pack_weight(wq, quant[0])
    got = torch.from_dlpack(_build(m, n, k, 0.02, quant, "relu", True, True, x_dtype=str(x.dtype)[6:],
                                   out_quant=out, target=_target(isa))(x, packed, wsum, ws, b, r))
    ref = int8_ops.int8_linear_fused_ref(x, packed, wsum, ws, b, 0.02, *quant, k, "relu", r, None, *out)
    assert got.dtype == ref.dtype == torch.uint8 and torch.equal(got, ref)
    assert 0 < int(ref.min()) or int(ref.max()) < 255 or ref.unique().numel() > 2  # not a saturated output
    eager = int8_ops.int8_linear(x, packed, wsum, ws, b, 0.02, *quant, k, "relu", r, None, *out)
    off = (eager.int() - ref.int()).abs()
    assert int(off.max()) <= 1 and off.float().mean() < 0.01  # the eager form rounds the multiply-add twice


def test_fused_kernel_gelu_and_the_ops_eager_form_agree_with_the_reference():
    m, n, k = 37, 96, 384
    x, wq, ws, b, r = _case(m, n, k, seed=1)
    packed, wsum = int8_ops.pack_weight(wq)
    for act in ("gelu", "gelu_tanh"):
        got = torch.from_dlpack(_build(m, n, k, None, int8_ops.SYMMETRIC, act, True, True)(x, packed, wsum, ws, b, r))
        ref = int8_ops.int8_linear_fused_ref(x, packed, wsum, ws, b, None, *int8_ops.SYMMETRIC, k, act, r)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)  # erf/tanh: TVM's against torch's
    # the op's eager form (torch's int8 GEMM): the same integers, the multiply-add rounded twice
    eager = int8_ops.int8_linear(x, packed, wsum, ws, b, None, *int8_ops.SYMMETRIC, k, "relu", r, None, None,
                                 *int8_ops.SYMMETRIC)
    ref = int8_ops.int8_linear_fused_ref(x, packed, wsum, ws, b, None, *int8_ops.SYMMETRIC, k, "relu", r)
    torch.testing.assert_close(eager, ref, rtol=1e-6, atol=1e-5)
    # and the whole: what the quantize pass's oracle computes, layer for layer
    plain = torch.relu(int8_ops.int8_linear_ref(x, wq, ws, b, None)) + r
    torch.testing.assert_close(eager, plain, rtol=1e-6, atol=1e-5)


def test_a_flipped_weight_bit_changes_the_result():
    m, n, k = 8, 32, 64
    x, wq, ws, b, _ = _case(m, n, k, seed=2)
    packed, wsum = int8_ops.pack_weight(wq)
    f = _build(m, n, k, None, int8_ops.SYMMETRIC, "none", True, False)
    base = torch.from_dlpack(f(x, packed, wsum, ws, b)).clone()
    bad = packed.clone()
    bad[1, 3, 5, 2] ^= 4
    got = torch.from_dlpack(f(x, bad, wsum, ws, b))
    assert (got != base).sum() == m and (got[:, 16 + 5] != base[:, 16 + 5]).all()


# the instructions each ISA's GEMM must be made of (and, for the 256-bit forms, no 512-bit register)
ASM = {"avx512vnni": (["vpdpbusd"], None), "avxvnni": (["vpdpbusd"], "zmm"),
       "avx2": (["vpmaddubsw", "vpmaddwd", "vpsignb"], "zmm"), "neon-dot": (["sdot"], None),
       "neon-i8mm": (["smmla", "zip1", "zip2"], None)}


@pytest.mark.slow
@pytest.mark.parametrize("isa", list(ASM))
@pytest.mark.parametrize("lo", [1, 0])
def test_each_isa_builds_with_its_dot_product_instruction(isa, lo):
    """Built for each ISA's target whatever this machine is (aarch64 cross-compiled by TVM's LLVM): the
    kernel's assembly holds the ISA's dot product, and the lower x86 forms stay off AVX-512 registers."""
    from tvm import relax

    from effopt.lowering.build import build_module

    target = resolve_target(int8.ISA_TARGETS[isa][0])
    found = int8.isa_of(target)
    assert found is not None and found.name == isa
    body, types = _body(8, 32, 64, None, (128 if lo else 3, lo, 255), "relu", True, False, False, "float32", None,
                        found)
    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(list(shape), dt)) for i, (shape, dt) in enumerate(types)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    asm = build_module(bb.get(), target).mod.imports[0].inspect_source("asm")
    wanted, banned = ASM[isa]
    if lo == 0:  # the full uint8 range on AVX2 splits x instead of taking w's sign
        wanted = [w for w in wanted if w != "vpsignb"]
    for ins in wanted:
        assert re.search(rf"\b{ins}\b", asm), f"{isa}: no {ins} in the kernel"
    if banned:
        assert banned not in asm, f"{isa}: {banned} registers in a kernel for a CPU without them"


def test_targets_without_a_dot_product_say_why():
    assert int8.isa_of(resolve_target({"kind": "llvm", "mcpu": "sandybridge"})) is None  # AVX, no AVX2
    assert "needs AVX2" in int8.supported(resolve_target({"kind": "llvm", "mcpu": "sandybridge"}))
    arm = resolve_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    assert int8.isa_of(arm) is None and int8.supported(arm)


@pytest.mark.parametrize("isa", X86 + [EMULATED])
def test_one_symbolic_kernel_serves_every_row_count(isa):
    """Rows symbolic (a served stream: batch x tokens changes per request): one built kernel, exact at row
    counts that fill no register tile, one, and several, with the residual and GELU epilogue and the
    requantized output."""
    from tvm import tirx

    from effopt.lowering.build import build_function

    target, kisa = _build_target(_target(isa))
    n, k = 48, 50
    B, S = tirx.Var("b", "int64"), tirx.Var("s", "int64")
    out = (0.05, *int8_ops.SYMMETRIC)
    for out_quant in (None, out):
        def body(bb, x, p, s, st, b, r):
            return int8.emit(bb, x, p, s, st, b, r, k, None, *int8_ops.SYMMETRIC, "gelu", None, out_quant, isa=kisa)

        f = build_function(body, ((B, S, k), "float32"), ((n // 16, (k + 3) // 4, 16, 4), "int8"), ((n,), "int32"),
                           ((n,), "float32"), ((n,), "float32"), ((B, S, n), "float32"), target=target)
        x0, wq, ws, bias, _ = _case(1, n, k, seed=6)
        packed, wsum = int8_ops.pack_weight(wq)
        for b, s in [(1, 1), (1, 3), (3, 5), (2, 37)]:
            x, _, _, _, r = _case(b * s, n, k, seed=b * 100 + s)
            got = torch.from_dlpack(f(x.reshape(b, s, k), packed, wsum, ws, bias, r.reshape(b, s, n)))
            ref = int8_ops.int8_linear_fused_ref(x, packed, wsum, ws, bias, None, *int8_ops.SYMMETRIC, k, "gelu", r,
                                                 None, *(out_quant or ())).reshape(b, s, n)
            assert got.shape == ref.shape and got.dtype == ref.dtype, (b, s)
            if out_quant is None:  # erf: TVM's rational approximation against torch's
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            else:  # uint8 codes: at most one code apart where erf's rounding differs
                assert int((got.int() - ref.int()).abs().max()) <= 1, (b, s)

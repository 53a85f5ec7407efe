"""The fused int8 linear kernel (effopt/lowering/kernels/int8.py: quantize, VNNI GEMM, dequantize, bias,
activation / residual add in one TIR kernel), with 8-bit symmetric and with uint7 per-token activations,
against the library path for the same op (effopt::int8_linear's torch form: the quantizer in torch,
torch._int_mm on oneDNN, dequantize and epilogue in torch) and against the fp32 linear (MKL) and torch's
one-line int8 (`quantize_dynamic`'s dynamically quantized linear: fbgemm, 7-bit activations, epilogue in
torch), at the layer shapes of MiniLM (8 x 128 tokens) and DINOv2-S/14 (8 x 257 tokens).
Interleaved medians in one process; the effopt backend makes the same choice per shape when it compiles.

    python benchmarks/int8_kernel.py [--rounds 9]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from baselines import torch_int8  # noqa: E402
from effopt.ops import int8 as int8_ops  # noqa: E402
from effopt.lowering.build import build_function  # noqa: E402
from effopt.lowering.kernels import int8  # noqa: E402
from effopt.timing import interleaved_medians, merge_results  # noqa: E402

# (model, layer, tokens, in, out, epilogue)
SHAPES = [("MiniLM", "q / k / v", 1024, 384, 384, "none"),
          ("MiniLM", "attention out + residual", 1024, 384, 384, "residual"),
          ("MiniLM", "fc1 + GELU", 1024, 384, 1536, "gelu"),
          ("MiniLM", "fc2 + residual", 1024, 1536, 384, "residual"),
          ("DINOv2", "qkv", 2056, 384, 1152, "none"),
          ("DINOv2", "fc1 + GELU", 2056, 384, 1536, "gelu"),
          ("DINOv2", "fc2", 2056, 1536, 384, "none")]


def run(rounds: int):
    from effopt.target import resolve_target

    isa = int8.isa_of(resolve_target("host"))
    if isa is None:
        raise SystemExit(f"{int8.supported(resolve_target('host'))}: no int8 kernel to measure on this CPU")
    rows = []
    for model, layer, m, k, n, epi in SHAPES:
        g = torch.Generator().manual_seed(0)
        x, w, b, r = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * 0.05, torch.randn(n), \
            torch.randn(m, n)
        wq, ws = int8_ops.quantize_weight(w)
        packed, wsum = int8_ops.pack_weight(wq)
        act = "gelu" if epi == "gelu" else "none"
        res = r if epi == "residual" else None

        def build(quant):
            def body(bb, xv, p, s, st, bv, *rest):
                return int8.emit(bb, xv, p, s, st, bv, rest[0] if rest else None, k, None, *quant, act, isa=isa)

            types = [((m, k), "float32"), (tuple(packed.shape), "int8"), ((n,), "int32"), ((n,), "float32"),
                     ((n,), "float32")] + ([((m, n), "float32")] if res is not None else [])
            return build_function(body, *types)

        kernel = build(int8_ops.SYMMETRIC)  # 8-bit symmetric activations
        kernel7 = build(int8_ops.TOKEN_AFFINE)  # 7 bits, each token's range and zero point (AVX2's default)
        kargs = [x, packed, wsum, ws, b] + ([res] if res is not None else [])
        wsum7 = int8_ops.pack_weight(wq, int8_ops.TOKEN_AFFINE[0])[1]
        kargs7 = [x, packed, wsum7, ws, b] + ([res] if res is not None else [])
        wq_t = wq.t().contiguous()

        def library():  # the op's torch form, with the weight already in _int_mm's layout
            q, step, _ = int8_ops.quantize_u8(x, None, *int8_ops.SYMMETRIC)
            acc = torch._int_mm((q - 128).to(torch.int8), wq_t)
            y = acc.to(torch.float32) * (step * ws) + b
            y = F.gelu(y) if act == "gelu" else y
            return y + res if res is not None else y

        def fp32():
            y = F.linear(x, w, b)
            y = F.gelu(y) if act == "gelu" else y
            return y + res if res is not None else y

        lin = torch.nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        qlin = torch_int8(torch.nn.Sequential(lin))  # quantize_dynamic swaps children, never the root

        def qdynamic():
            y = qlin(x)
            y = F.gelu(y) if act == "gelu" else y
            return y + res if res is not None else y

        ref = int8_ops.int8_linear_fused_ref(x, packed, wsum, ws, b, None, *int8_ops.SYMMETRIC, k, act, res)
        got = torch.from_dlpack(kernel(*kargs))
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        ref7 = int8_ops.int8_linear_fused_ref(x, packed, wsum7, ws, b, None, *int8_ops.TOKEN_AFFINE, k, act, res)
        torch.testing.assert_close(torch.from_dlpack(kernel7(*kargs7)), ref7, rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            t = interleaved_medians({"fused": lambda: kernel(*kargs), "fused uint7": lambda: kernel7(*kargs7),
                                     "library": library, "fp32": fp32, "quantize_dynamic": qdynamic}, [],
                                    rounds=rounds, reps=5, budget_s=1e9)
        row = {"model": model, "layer": layer, "shape": f"{m} x {k} -> {n}", "fused_us": t["fused"] * 1e6,
               "fused_uint7_us": t["fused uint7"] * 1e6,
               "fused_uint7_vs_quantize_dynamic": t["quantize_dynamic"] / t["fused uint7"],
               "library_us": t["library"] * 1e6, "fp32_us": t["fp32"] * 1e6,
               "quantize_dynamic_us": t["quantize_dynamic"] * 1e6,
               "fused_vs_library": t["library"] / t["fused"], "fused_vs_fp32": t["fp32"] / t["fused"],
               "fused_vs_quantize_dynamic": t["quantize_dynamic"] / t["fused"],
               "gops_fused": 2 * m * n * k / t["fused"] / 1e9}
        rows.append(row)
        print(f"  {model:7s} {layer:22s} {row['shape']:20s} fused {row['fused_us']:7.0f} us  library "
              f"{row['library_us']:7.0f} us  fp32 {row['fp32_us']:7.0f} us  fused/library "
              f"{row['fused_vs_library']:.2f}x  fused/fp32 {row['fused_vs_fp32']:.2f}x  fused/quantize_dynamic "
              f"{row['fused_vs_quantize_dynamic']:.2f}x  uint7/quantize_dynamic "
              f"{row['fused_uint7_vs_quantize_dynamic']:.2f}x  ({row['gops_fused']:.0f} GOPS)",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    from effopt.testing import machine

    print(f"{machine.describe()['line']}, {torch.get_num_threads()} threads")
    merge_results("bench-results/int8_kernel.json", run(args.rounds), lambda r: (r["model"], r["layer"]))


if __name__ == "__main__":
    main()

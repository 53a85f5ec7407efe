"""Shift linear kernels (lowering/kernels/shift.py: packed 4-bit power-of-two codes, no multiplications in
the inner loop; float path and MatShift's int8 path) against torch's fp32 linear (MKL), interleaved medians
in one process, for 1 token and 197 tokens (a ViT-S/16 image).

A single token's linear reads every weight once and does two flops per weight read: it is bound by the bytes
it moves, and the packed weights are 8x fewer. At 197 tokens the linear is compute bound, and MKL's fused
multiply-adds do one multiply-accumulate per lane per instruction where a shift term takes several integer
instructions. Writes bench-results/shift.json. Part of `make bench`.

    python benchmarks/shift.py [tokens ...]      (default: 1 197)
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from effopt.ops import shift as so  # noqa: E402
from effopt.lowering.kernels import shift  # noqa: E402
from effopt.timing import interleaved_medians, merge_results  # noqa: E402

SHAPES = [(384, 1536, "ViT-S MLP fc2"), (1536, 384, "ViT-S MLP fc1"), (4096, 4096, "4096 x 4096 (64 MB fp32)")]
PATHS = [(1, 0), (2, 0), (1, 8)]  # (terms, activation bits): float path, float path with 2 terms, MatShift int8


def main():
    tokens = [int(t) for t in sys.argv[1:]] or [1, 197]
    from effopt.testing import machine

    print(f"{machine.describe()['line']}, {torch.get_num_threads()} threads")
    rows = []
    for n, k, name in SHAPES:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n, k, generator=g)
        for m in tokens:
            x = torch.randn(m, k, generator=g)
            for terms, bits in PATHS:
                codes, scale = so.quantize(w, terms)
                packed = so.pack(codes)
                f = shift.build(m, n, k, terms, bits)
                err = (torch.from_dlpack(f(x, packed, scale)) - so.linear_ref(x, packed, scale, None, k, bits)).abs().max()
                t = interleaved_medians({"fp32": lambda: torch.nn.functional.linear(x, w),
                                         "shift": lambda: f(x, packed, scale)}, [], rounds=21 if m > 1 else 31, reps=5)
                row = {"layer": name, "n": n, "k": k, "tokens": m, "terms": terms, "activation_bits": bits,
                       "fp32_us": t["fp32"] * 1e6, "shift_us": t["shift"] * 1e6, "speedup": t["fp32"] / t["shift"],
                       "weight_mb": {"fp32": 4 * n * k / 2 ** 20, "shift": so.weight_bytes(n, k, terms) / 2 ** 20},
                       "max_abs_err_vs_reference": float(err)}
                rows.append(row)
                path = f"int{bits}" if bits else "float"
                print(f"  {name:26s} tokens={m:4d} terms={terms} {path:5s}  fp32 {row['fp32_us']:9.1f} us  shift "
                      f"{row['shift_us']:9.1f} us  ({row['speedup']:.2f}x)  weights {row['weight_mb']['fp32']:.1f} -> "
                      f"{row['weight_mb']['shift']:.2f} MB", flush=True)
    merge_results("bench-results/shift.json", rows, lambda r: (r["layer"], r.get("tokens", 1), r["terms"],
                                                                r.get("activation_bits", 0)))


if __name__ == "__main__":
    main()

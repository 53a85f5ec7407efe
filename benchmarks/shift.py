"""Shift linear for one token: effopt's packed power-of-two GEMV kernel (lowering/kernels/shift.py, 4-bit
codes, no multiplications in the inner loop) against torch's fp32 linear, interleaved medians in one process.

A single token's linear reads every weight once and does two flops per weight read: it is bound by the bytes
it moves, and the packed weights are 8x fewer. Writes bench-results/shift.json. Part of `make bench`.

    python benchmarks/shift.py
"""
from __future__ import annotations

import os
import platform
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from effopt import shift_ops as so  # noqa: E402
from effopt.lowering.kernels import shift  # noqa: E402
from effopt.timing import interleaved_medians, merge_results  # noqa: E402

SHAPES = [(384, 1536, "ViT-S MLP fc2"), (1536, 384, "ViT-S MLP fc1"), (4096, 4096, "4096 x 4096 (64 MB fp32)")]


def main():
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = []
    for n, k, name in SHAPES:
        g = torch.Generator().manual_seed(0)
        w, x = torch.randn(n, k, generator=g), torch.randn(1, k, generator=g)
        for terms in (1, 2):
            codes, scale = so.quantize(w, terms)
            packed = so.pack(codes)
            f = shift.build_gemv(n, k, terms)
            x1 = x[0].contiguous()
            err = (torch.from_dlpack(f(x1, packed, scale)) - so.shift_linear_ref(x, packed, scale, None, k)[0]).abs().max()
            t = interleaved_medians({"fp32": lambda: torch.nn.functional.linear(x, w), "shift": lambda: f(x1, packed, scale)},
                                    [], rounds=31, reps=5)
            row = {"layer": name, "n": n, "k": k, "terms": terms, "fp32_us": t["fp32"] * 1e6,
                   "shift_us": t["shift"] * 1e6, "speedup": t["fp32"] / t["shift"],
                   "weight_mb": {"fp32": 4 * n * k / 2 ** 20, "shift": so.weight_bytes(n, k, terms) / 2 ** 20},
                   "max_abs_err_vs_reference": float(err)}
            rows.append(row)
            print(f"  {name:28s} terms={terms}  fp32 {row['fp32_us']:8.1f} us  shift {row['shift_us']:8.1f} us  "
                  f"({row['speedup']:.2f}x)  weights {row['weight_mb']['fp32']:.1f} -> {row['weight_mb']['shift']:.2f} MB")
    merge_results("bench-results/shift.json", rows, lambda r: (r["layer"], r["terms"]))


if __name__ == "__main__":
    main()

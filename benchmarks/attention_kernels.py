"""effopt's attention kernels one by one, through the real compile path (torch.compile, kernel_choice="tvm"):
the tiled exact kernel (flash), Hamming and L-Mul, against torch's fused SDPA (exact float attention) and
the approximate ops' PyTorch references, at ViT-S head shapes (1 x 6 heads x N x 64, float32).
Interleaved medians in one process, on torch's threads.

    python benchmarks/attention_kernels.py [--seqs 197,1024]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import effopt  # noqa: E402,F401 - registers the backend and torch.ops.effopt
from effopt.timing import interleaved_medians  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default="197,1024")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; 1 x 6 heads x N x 64, float32; median ms")
    proj = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    ops = {
        "sdpa (torch)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "flash (effopt)": torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend="effopt",
                                        options={"kernel_choice": "tvm", "cache": False}),
        "hamming (effopt)": torch.compile(lambda q, k, v: torch.ops.effopt.hamming_attention(q, k, v, None, proj, 0.25),
                                          backend="effopt", options={"kernel_choice": "tvm", "cache": False}),
        "hamming (reference)": lambda q, k, v: torch.ops.effopt.hamming_attention(q, k, v, None, proj, 0.25),
        "lmul (effopt)": torch.compile(lambda q, k, v: torch.ops.effopt.lmul_attention(q, k, v, None, 0.125, 3),
                                       backend="effopt", options={"kernel_choice": "tvm", "cache": False}),
    }
    print(f"{'N':>6} " + " ".join(f"{k:>20}" for k in ops))
    for n in (int(s) for s in args.seqs.split(",")):
        torch._dynamo.reset()
        q, k, v = (torch.randn(1, 6, n, 64) for _ in range(3))
        with torch.no_grad():
            for f in ops.values():
                f(q, k, v)
            m = interleaved_medians(ops, (q, k, v), rounds=args.rounds, reps=1)
        print(f"{n:>6} " + " ".join(f"{m[k] * 1e3:>20.3f}" for k in ops), flush=True)


if __name__ == "__main__":
    main()

"""Attention benchmark: manual softmax attention in eager PyTorch against the same code compiled by
effopt (whose fuse_attention pass turns it into one SDPA), at sequence 197, 1024 and 4096.

Latency: interleaved medians in one process. Peak memory: each variant in a fresh subprocess, called once
(compiling, for effopt), then the peak resident set (VmHWM) is reset and its growth during a second call is
reported, so neither compilation nor one variant's allocations hide another's. Writes bench-results/attention.json. Run with `make bench`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import torch

from effopt.testing.machine import describe as describe_machine

warnings.filterwarnings("ignore")
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-results")
HEADS, DIM = 6, 64  # ViT-S


def manual_attention(q, k, v):
    a = (q * DIM ** -0.5) @ k.transpose(-2, -1)
    return a.softmax(dim=-1) @ v


def inputs(n: int):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, HEADS, n, DIM, generator=g) for _ in range(3))


def compiled():
    return torch.compile(manual_attention, backend="effopt", options={"cache": False, "strict": True})


def rss_mb(field: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    """Restart the peak resident set (VmHWM) from the current one (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_mb(variant: str, n: int) -> float:
    """Growth of the peak resident set during one call, after a first call (compile, allocator warm-up)."""
    code = f"""
import torch, warnings
warnings.filterwarnings("ignore")
import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import attention as b
args = b.inputs({n})
f = b.compiled() if {variant!r} == "effopt" else b.manual_attention
with torch.inference_mode():
    f(*args)  # compiles for this shape (as in the latency measurement); not measured
    b.reset_peak()
    before = b.rss_mb()
    f(*args)
    print(b.rss_mb("VmHWM") - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main():
    from effopt.timing import interleaved_medians

    os.makedirs(OUT, exist_ok=True)
    rows = []
    with torch.inference_mode():
        for n in (197, 1024, 4096):
            args = inputs(n)
            torch._dynamo.reset()
            fused = compiled()
            ref = manual_attention(*args)
            err = (fused(*args) - ref).abs().max().item()
            import effopt

            matches = next(r.matches for r in effopt.last_report().passes if r.name == "fuse_attention")
            t = interleaved_medians({"eager": manual_attention, "effopt": fused}, args,
                                    rounds=15 if n < 4096 else 5)
            row = {"seq": n, "ms": {k: v * 1e3 for k, v in t.items()}, "speedup": t["eager"] / t["effopt"],
                   "peak_mb": {k: peak_mb(k, n) for k in ("eager", "effopt")}, "max_abs_err": err,
                   "fused_matches": matches}
            rows.append(row)
            print(json.dumps(row))
    result = {"machine": describe_machine()["line"], "shape": f"1 x {HEADS} heads x seq x {DIM}", "rows": rows}
    with open(os.path.join(OUT, "attention.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nmachine: {result['machine']}; q, k, v: {result['shape']}")
    print("| seq | eager manual | effopt fused | speed-up | peak MB eager | peak MB effopt |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq']} | {r['ms']['eager']:.2f} ms | {r['ms']['effopt']:.2f} ms | {r['speedup']:.2f}x | "
              f"{r['peak_mb']['eager']:.0f} | {r['peak_mb']['effopt']:.0f} |")


if __name__ == "__main__":
    main()

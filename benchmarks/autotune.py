"""Autotuning on ViT-S/16 (examples/vit.py, batch 1, 224x224): per-kernel default vs tuned vs library, and
end to end after tuning against untuned effopt, eager and Inductor, in one process.

    python benchmarks/autotune.py [--trials 320] [--time-budget 1800] [--cache-dir DIR] [--rounds 15]

Tuning goes into a tuning database under --cache-dir (default: a fresh directory under bench-results, so
that the untuned figures are untuned); a second run with the same directory resumes it. The per-kernel
figures are the tuner's own side-by-side measurements (MetaSchedule's runner; the library GEMM by torch);
the end-to-end figures are interleaved medians of whole forward passes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import effopt  # noqa: E402,F401
from effopt.autotune import autotune  # noqa: E402
from effopt.timing import interleaved_medians  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=320)
    ap.add_argument("--time-budget", type=float, default=1800)
    ap.add_argument("--cache-dir", default="bench-results/autotune-cache")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--kinds", default="tir,gemm,knobs", help="task kinds to tune (tir, gemm, knobs)")
    ap.add_argument("--remeasure", action="store_true", help="compare default/tuned/library again (resumed run)")
    args = ap.parse_args()
    from vit import effopt_model

    torch.set_grad_enabled(False)
    model, (x,) = effopt_model()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    t0 = time.time()
    report = autotune(model, (x,), target="host", trials=args.trials, time_budget=args.time_budget,
                      cache_dir=args.cache_dir, kinds=tuple(args.kinds.split(",")), remeasure=args.remeasure)
    print(report)
    tune_s = time.time() - t0

    def compiled(**opts):
        torch._dynamo.reset()
        f = torch.compile(model, backend="effopt", options={"cache_dir": args.cache_dir, **opts})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f(x)
        return f

    untuned = compiled(tuning=False)
    from effopt.report import last_report

    tuned = compiled()
    rec = last_report().lowering
    torch._dynamo.reset()
    inductor = torch.compile(model)
    inductor(x)
    ref = model(x)
    for name, f in (("untuned", untuned), ("tuned", tuned)):
        err = (f(x) - ref).abs().max().item()
        assert err < 1e-3, f"{name} effopt differs from eager by {err}"
    fns = {"eager": model, "inductor": inductor, "effopt untuned": untuned, "effopt tuned": tuned}
    med = interleaved_medians(fns, [x], rounds=args.rounds, warmup=3)
    print(f"\nViT-S/16, batch 1, {len(rec.tuned)} kernels with tuned schedules or tiles in the compiled model")
    for k, v in med.items():
        print(f"  {k:15s} {v * 1e3:8.2f} ms  {med['eager'] / v:5.2f}x eager")
    out = {"machine": f"{platform.machine()} {os.cpu_count()} cpus", "tune_seconds": tune_s,
           "tuning": report.to_json(), "end_to_end_ms": {k: v * 1e3 for k, v in med.items()},
           "tuned_in_compile": rec.tuned}
    os.makedirs("bench-results", exist_ok=True)
    with open("bench-results/autotune.json", "w") as f:
        json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()

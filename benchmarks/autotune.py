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
    from effopt.testing import machine

    print(machine.describe()["line"])
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
    from effopt.inspect.report import last_report

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
    gemms = gemm_table(report, args.rounds)
    out = {"machine": machine.describe()["line"], "tune_seconds": tune_s,
           "tuning": report.to_json(), "end_to_end_ms": {k: v * 1e3 for k, v in med.items()},
           "tuned_in_compile": rec.tuned, "gemms_in_process": gemms}
    os.makedirs("bench-results", exist_ok=True)
    with open("bench-results/autotune.json", "w") as f:
        json.dump(out, f, indent=1, default=str)


def gemm_table(report, rounds: int) -> list[dict]:
    """Each GEMM shape's tuned kernel (the database's choice: the packed kernel's best tiles or the
    MetaSchedule schedule, whether or not it beat the library) against MKL's addmm and oneDNN's linear,
    called as a compiled model calls them (TunedLinear through DLPack, on torch's threads), interleaved in
    this process."""
    from effopt.lowering.tuned import TunedLinear, build_tuned_gemm
    from effopt.lowering.tuning_db import TuningDatabase
    from effopt.target import resolve_target
    from effopt.autotune.tune import library_linears
    from effopt.lowering.kernels import gemm

    target = resolve_target(report.target)
    rows = []
    print("\nGEMMs of ViT-S/16 in this process (median us, interleaved; speed = library time / tuned time)")
    root = os.path.dirname(os.path.dirname(report.database))
    for key, c in TuningDatabase.open(report.target, root).choices().items():
        if c.get("kind") != "gemm" or not (c.get("packed") or c.get("best")) or c["gemm"][0] < 8:
            continue
        m, n, k, bias = c["gemm"]
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
        bb = b if bias else None
        tuned = TunedLinear.for_choice(c, build_tuned_gemm(c, m, n, k, bias, target, root), w, bb, m, n, k)
        fns = {"tuned": tuned, **library_linears(w, bb)}
        err = (tuned(x) - torch.nn.functional.linear(x, w, bb)).abs().max().item()
        med = {kk: v * 1e6 for kk, v in interleaved_medians(fns, [x], rounds=rounds, warmup=3, reps=5).items()}
        lib = min(v for kk, v in med.items() if kk != "tuned")
        row = {"gemm": f"{m}x{n}x{k}", "kernel": gemm.describe(c["packed"]) if c.get("packed") else "MetaSchedule",
               **{f"{kk}_us": v for kk, v in med.items()}, "speed_vs_library": lib / med["tuned"],
               "gflops_tuned": 2 * m * n * k / med["tuned"] / 1e3, "max_abs_err": err}
        rows.append(row)
        print(f"  {row['gemm']:14s} {row['kernel']:24s} tuned {med['tuned']:8.1f}  mkl {med['mkl']:8.1f}"
              + (f"  onednn {med['onednn']:8.1f}" if "onednn" in med else "")
              + f"  speed {row['speed_vs_library']:.2f}x library  {row['gflops_tuned']:.0f} GFLOPS  err {err:.1e}")
    return rows


if __name__ == "__main__":
    main()

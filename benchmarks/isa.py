"""Every CPU: eager, Inductor, effopt exact and effopt `quantize="int8-dynamic"` on ViT-S/16 b1, MiniLM-L6 s128
b8 and DINOv2-S/14 b8, on this CPU's own ISA and on AVX2 (emulated where this CPU has more, by
EFFOPT_HOST_ISA=avx2 and the variables that limit torch, effopt.host.torch_environment), each ISA in its own process, interleaved medians within it; plus a served MiniLM through
8 (batch, length) shapes: compiles, worst error against eager, and the time of one pass through all 8.

Targets (issue 18): on AVX2, exact >= 1.0x eager and >= Inductor's ratio; int8-dynamic >= 1.3x eager on
MiniLM b8 and DINOv2 b8 with MiniLM cosine >= 0.99; served shapes: <= 4 compiles, every output within 1e-4
relative of eager. Writes bench-results/isa.json.

    python benchmarks/isa.py [--isas native,avx2] [--models vit,minilm,dinov2] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch

from effopt.host import torch_environment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from baselines import inductor_frozen, torch_int8  # noqa: E402
OUT = os.path.join(ROOT, "bench-results")
AVX2_ENV = {"EFFOPT_HOST_ISA": "avx2", **torch_environment("avx2")}  # effopt and torch as on an AVX2 CPU
SERVED = [(1, 19), (2, 32), (4, 48), (8, 128), (3, 64), (8, 19), (5, 100), (2, 32)]


class ViTTask:
    """ViT-S/16 (random weights: speed only; the int8 metric is the output cosine against eager)."""
    name, metric_name = "ViT-S/16 b1", "output cosine"

    def __init__(self):
        from effopt.testing.models import vit_small

        torch.manual_seed(0)
        self.model = vit_small().eval()
        self.test = [torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(i)) for i in range(4)]
        with torch.no_grad():
            self.reference = [self.model(x) for x in self.test]

    @staticmethod
    def call(model, batch):
        return model(batch)

    def metric(self, model) -> float:
        with torch.no_grad():
            sims = [torch.nn.functional.cosine_similarity(model(x).flatten(), r.flatten(), dim=0)
                    for x, r in zip(self.test, self.reference)]
        return float(torch.stack(sims).min())


def tasks(keys):
    from approximate import TASKS

    made = {"vit": ViTTask}
    for k in keys:
        yield made[k]() if k in made else TASKS[k]()


def run_model(task, rounds: int) -> list[dict]:
    import effopt
    from effopt.timing import interleaved_medians

    torch._dynamo.config.recompile_limit = 64
    batch = task.test[0]
    fns, compile_s, notes = {"eager": task.model}, {}, {}
    torch._dynamo.reset()
    fns["inductor"] = torch.compile(task.model, backend="inductor")
    # Inductor's documented CPU inference setting, and torch's one-line int8 (fbgemm / oneDNN, no compiler)
    fns["inductor (freezing)"] = inductor_frozen(task.model)
    fns["quantize_dynamic"] = torch_int8(task.model)
    fns["effopt exact"] = torch.compile(task.model, backend="effopt")
    # effopt's own kernels wherever they build (no measured fallback to torch's), as the column
    fns["effopt kernel_choice=tvm"] = torch.compile(task.model, backend="effopt", options={"kernel_choice": "tvm"})
    fns["effopt int8-dynamic"] = torch.compile(task.model, backend="effopt", options={"quantize": "int8-dynamic"})
    for name, fn in fns.items():
        t0 = time.perf_counter()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            task.call(fn, batch)
        compile_s[name] = time.perf_counter() - t0
        if name.startswith("effopt"):
            rep = effopt.last_report()
            k = rep.lowering.kernels if rep.lowering else []
            int8 = [x.choice for x in k if "int8_linear" in x.ops]
            notes[name] = (f"{int8.count('tvm')} int8 kernels, {int8.count('float32')} float32 layers; "
                           if int8 else "") + (f"graph check {rep.versus_eager['speedup']:.2f}x"
                                               f"{'' if rep.versus_eager['use_compiled'] else ' -> eager'}"
                                               if rep.versus_eager else "")
    with torch.no_grad():
        t = interleaved_medians({k: (lambda f=f: task.call(f, batch)) for k, f in fns.items()}, [], rounds=rounds,
                                budget_s=1e9)
        metrics = {k: task.metric(f) for k, f in fns.items() if k in ("eager", "effopt int8-dynamic", "quantize_dynamic")}
    rows = []
    for name in fns:
        rows.append({"model": task.name, "variant": name, "ms": t[name] * 1e3, "speedup": t["eager"] / t[name],
                     "metric": metrics.get(name), "metric_name": task.metric_name, "compile_s": compile_s[name],
                     "note": notes.get(name, "")})
        print(f"  {task.name:16s} {name:20s} {t[name] * 1e3:8.1f} ms  {t['eager'] / t[name]:5.2f}x eager"
              + (f"  {task.metric_name} {metrics[name]:.4f}" if name in metrics else "")
              + (f"  ({notes[name]})" if notes.get(name) else ""), flush=True)
    return rows


def served(rounds: int) -> dict:
    """MiniLM compiled once and called with 8 (batch, length) shapes: compiles, worst relative error, and
    one pass through the 8 shapes (after a first pass) for eager, Inductor and effopt."""
    from effopt.testing import minilm
    from effopt.timing import interleaved_medians

    model, tok = minilm.load()
    sents = minilm.sentences()
    calls = [minilm.encode(tok, sents[:b], length=n) for b, n in SERVED]
    out = {}
    fns = {"eager": model}
    for name, backend in (("inductor", "inductor"), ("effopt", "effopt")):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        fn = torch.compile(model, backend=backend)
        worst = 0.0
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for ids, mask in calls:
                ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
                got = fn(input_ids=ids, attention_mask=mask).last_hidden_state
                worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
        out[name] = {"compiles": torch._dynamo.utils.counters["stats"]["unique_graphs"], "worst_rel_error": worst}
        fns[name] = fn

    def one_pass(f):
        for ids, mask in calls:
            f(input_ids=ids, attention_mask=mask)

    with torch.no_grad():
        t = interleaved_medians({k: (lambda f=f: one_pass(f)) for k, f in fns.items()}, [], rounds=rounds,
                                budget_s=1e9)
    for k in fns:
        out.setdefault(k, {})["pass_ms"] = t[k] * 1e3
        out[k]["speedup"] = t["eager"] / t[k]
    print(f"  served MiniLM, 8 shapes: " + "; ".join(
        f"{k} {v['pass_ms']:.0f} ms ({v['speedup']:.2f}x)" + (f", {v['compiles']} compiles, worst error "
                                                              f"{v['worst_rel_error']:.1e}" if "compiles" in v else "")
        for k, v in out.items()), flush=True)
    return out


def worker(models: list[str], rounds: int, with_served: bool) -> dict:
    from effopt.testing import machine

    m = machine.describe()
    print(m["line"], flush=True)
    rows = []
    for task in tasks(models):
        rows += run_model(task, rounds)
    return {"machine": m, "rows": rows, "served": served(rounds) if with_served else None}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--isas", default="native,avx2")
    ap.add_argument("--models", default="vit,minilm,dinov2")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--served", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    models = a.models.split(",")
    if a.worker:
        print("RESULT " + json.dumps(worker(models, a.rounds, a.served)), flush=True)
        return
    from effopt.lowering.kernels import int8
    from effopt.testing import machine

    results = {}
    for isa in a.isas.split(","):
        if isa == "avx2" and int8.host_runs("avx2"):
            print(f"== AVX2: skipped ({int8.host_runs('avx2')})")
            continue
        if isa == "avx2" and machine.cpu_isa() == "AVX2":
            print("== AVX2: this CPU is AVX2 already (the native run)")
            continue
        env = dict(os.environ, **(AVX2_ENV if isa == "avx2" else {}))
        print(f"== {isa}", flush=True)
        proc = subprocess.Popen([sys.executable, __file__, "--worker", "--models", a.models, "--rounds",
                                 str(a.rounds)] + (["--served"] if isa == "native" else []), env=env,
                                stdout=subprocess.PIPE, text=True)
        result = None
        for line in proc.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
            else:
                print(line, end="", flush=True)
        if proc.wait() != 0 or result is None:
            print(f"== {isa}: the worker failed ({proc.returncode})")
            continue
        results[isa] = result
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "isa.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| ISA | model | eager ms | Inductor | effopt exact | effopt int8-dynamic | int8 metric |")
    print("|---|---|---|---|---|---|---|")
    for isa, r in results.items():
        by = {}
        for row in r["rows"]:
            by.setdefault(row["model"], {})[row["variant"]] = row
        for model, v in by.items():
            q = v["effopt int8-dynamic"]
            print(f"| {r['machine']['isa']} | {model} | {v['eager']['ms']:.1f} | {v['inductor']['speedup']:.2f}x | "
                  f"{v['effopt exact']['speedup']:.2f}x | {q['speedup']:.2f}x | {q['metric_name']} "
                  f"{q['metric']:.4f} (fp32 {v['eager']['metric']:.4f}) |")


if __name__ == "__main__":
    main()

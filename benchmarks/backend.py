"""Backend benchmark: eager, Inductor, TVM's relax_dynamo and effopt on ViT-S/16 and MiniLM, one process,
interleaved medians; plus effopt's cold compile time and a second process's compile through the cache; plus
the whole-graph fallback (a compiled graph that lost to eager runs dynamo's torch-level graph) against the
user's own module on ViT-S b1 and MiniLM s128 b8 (target: >= 0.98x, i.e. within noise).

Writes bench-results/backend.json and bench-results/backend.png. Run with `make bench`;
`python benchmarks/backend.py --fallback-only [--rounds 21]` times the fallback alone.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings

import torch

from effopt.testing.machine import describe as describe_machine

warnings.filterwarnings("ignore")
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-results")


def models():
    from effopt.testing import minilm
    from effopt.testing.models import vit_small

    torch.manual_seed(0)
    vit = vit_small().eval()
    bert, tok = minilm.load()
    ids, mask = minilm.encode(tok, minilm.SENTENCES[:1], length=128)
    return [("ViT-S/16 b1", vit, (torch.randn(1, 3, 224, 224),)),
            ("ViT-S/16 b8", vit, (torch.randn(8, 3, 224, 224),)),
            ("MiniLM s128 b1", lambda i, m: bert(input_ids=i, attention_mask=m).last_hidden_state, (ids, mask))]


def compiled(name, model, args, backend):
    # no dynamo reset between backends: that would evict the others' compiled code, and they would
    # recompile inside the timed loop's warm-up instead of sitting side by side as they do for a user
    t0 = time.perf_counter()
    try:
        if backend == "relax_dynamo":
            from tvm.relax.frontend.torch import relax_dynamo

            f = torch.compile(model, backend=relax_dynamo())
        elif backend == "effopt":
            # strict: a compile failure is reported as "fails", never timed as effopt's eager fallback
            f = torch.compile(model, backend="effopt", options={"cache_dir": CACHE, "strict": True})
        else:
            f = torch.compile(model)
        f(*args)
        return f, time.perf_counter() - t0, None
    except Exception as e:  # noqa: BLE001 - a competitor failing is a result, not a crash
        return None, None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def second_process_compile_s() -> dict:
    """A fresh process compiling ViT-S through the warm cache: seconds spent importing torch and effopt
    (which brings torch._dynamo and TVM), and seconds from torch.compile to the first output."""
    code = ("import time; t0=time.perf_counter(); import torch, effopt; t1=time.perf_counter()\n"
            "from effopt.testing.models import vit_small\n"
            "torch.manual_seed(0); m=vit_small().eval(); x=torch.randn(1,3,224,224)\n"
            "with torch.inference_mode():\n"
            "    t2=time.perf_counter(); torch.compile(m, backend='effopt', options={'cache_dir': %r})(x)\n"
            "print(t1-t0, time.perf_counter()-t2, effopt.last_report().lowering.cache_hit)" % CACHE)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    imports, compile_s, hit = out.stdout.split()[-3:]
    assert hit == "True", "second process did not hit the cache"
    return {"imports_s": float(imports), "compile_s": float(compile_s)}


def fallback(rounds: int = 21) -> list[dict]:
    """The whole-graph fallback against eager: effopt compiled with its noise margin at 0 (the compiled graph
    would have to take no time to be kept), so that it loses and eager runs; timed interleaved with the
    user's own module and with torch.compile(backend="eager"), which runs the same dynamo graph."""
    import importlib

    import effopt
    from effopt.testing import minilm
    from effopt.testing.models import vit_small
    from effopt.timing import interleaved_medians

    backend = importlib.import_module("effopt.backend")
    torch.manual_seed(0)
    bert, tok = minilm.load()
    ids, mask = minilm.encode(tok, minilm.SENTENCES[:8], length=128)
    cases = [("ViT-S/16 b1", vit_small().eval(), (torch.randn(1, 3, 224, 224),)),
             ("MiniLM s128 b8", lambda i, m: bert(input_ids=i, attention_mask=m).last_hidden_state, (ids, mask))]
    rows = []
    with torch.inference_mode():
        for name, model, args in cases:
            torch._dynamo.reset()
            saved, backend.NOISE = backend.NOISE, 0.0
            try:
                f = torch.compile(model, backend="effopt", options={"cache": False})
                f(*args)
            finally:
                backend.NOISE = saved
            rep = effopt.last_report()
            assert rep.runs_eager, "the forced loss did not send the graph to eager"
            dyn = torch.compile(model, backend="eager")
            dyn(*args)
            t = interleaved_medians({"eager": model, "effopt fallback": f, "backend=eager": dyn}, args,
                                    rounds=rounds)
            row = {"model": name, "ms": {k: v * 1e3 for k, v in t.items()},
                   "vs_eager": {k: t["eager"] / v for k, v in t.items()},
                   "compiled_ms_at_compile": rep.versus_eager["compiled_ms"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{describe_machine()['line']}")
    print("| model | eager | effopt whole-graph fallback | torch.compile(backend=\"eager\") |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ms']['eager']:.1f} ms | {r['vs_eager']['effopt fallback']:.3f}x | "
              f"{r['vs_eager']['backend=eager']:.3f}x |")
    return rows


def main():
    import argparse

    from effopt.timing import interleaved_medians

    ap = argparse.ArgumentParser()
    ap.add_argument("--fallback-only", action="store_true", help="time the whole-graph fallback alone")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved rounds for the fallback rows")
    a = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if a.fallback_only:
        rows = fallback(a.rounds)
        with open(os.path.join(OUT, "backend_fallback.json"), "w") as f:
            json.dump({"machine": describe_machine()["line"], "rows": rows}, f, indent=1)
        return
    rows = []
    with torch.inference_mode():
        for name, model, args in models():
            torch._dynamo.reset()
            fns, notes, compile_s = {"eager": model}, {}, {}
            for be in ("inductor", "relax_dynamo", "effopt"):
                f, secs, err = compiled(name, model, args, be)
                if f is None:
                    notes[be] = "fails: " + err
                    continue
                # relax_dynamo untuned is ~85x slower than eager: time it, but with few rounds
                fns[be], compile_s[be] = f, secs
            slow = {k: v for k, v in fns.items() if k == "relax_dynamo"}
            fast = {k: v for k, v in fns.items() if k != "relax_dynamo"}
            t = interleaved_medians(fast, args, rounds=40 if "b8" not in name else 11)
            if slow:
                t.update(interleaved_medians(slow, args, rounds=2, warmup=0))
            row = {"model": name, "ms": {k: v * 1e3 for k, v in t.items()},
                   "speedup_vs_eager": {k: t["eager"] / v for k, v in t.items()}, "compile_s": compile_s,
                   "notes": notes}
            rows.append(row)
            print(json.dumps(row))
    torch._dynamo.reset()
    second = second_process_compile_s()
    cold = rows[0]["compile_s"].get("effopt")
    torch._dynamo.reset()
    result = {"machine": describe_machine()["line"], "rows": rows,
              "effopt_vit_cold_compile_s": cold, "effopt_vit_second_process": second,
              "fallback": fallback(a.rounds)}
    with open(os.path.join(OUT, "backend.json"), "w") as f:
        json.dump(result, f, indent=1)
    print_table(result)
    plot(result)


def print_table(result):
    cols = ["eager", "inductor", "relax_dynamo", "effopt"]
    print(f"\nmachine: {result['machine']}")
    print("| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for r in result["rows"]:
        cells = []
        for c in cols:
            if c in r["ms"]:
                cells.append(f"{r['ms'][c]:.1f} ms ({r['speedup_vs_eager'][c]:.2f}x)")
            else:
                cells.append("fails")
        print(f"| {r['model']} | " + " | ".join(cells) + " |")
    second = result["effopt_vit_second_process"]
    print(f"\neffopt ViT-S cold compile: {result['effopt_vit_cold_compile_s']:.1f} s; second process through "
          f"the cache: {second['compile_s']:.1f} s from torch.compile to output, after "
          f"{second['imports_s']:.1f} s importing torch and effopt (torch._dynamo, TVM)")


def plot(result):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["eager", "inductor", "relax_dynamo", "effopt"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.2
    for i, c in enumerate(cols):
        vals = [r["speedup_vs_eager"].get(c, 0) for r in result["rows"]]
        ax.bar([j + i * width for j in range(len(vals))], vals, width, label=c)
    ax.set_xticks([j + 1.5 * width for j in range(len(result["rows"]))], [r["model"] for r in result["rows"]])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("speed-up over eager (higher is better; 0 = fails)")
    ax.set_title(result["machine"], fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "backend.png"), dpi=120)


CACHE = tempfile.mkdtemp(prefix="effopt-bench-cache-")

if __name__ == "__main__":
    main()

"""A served stream: MiniLM-L6 (real weights, transformers' default `sdpa` attention) called with a stream of
requests of changing batch size (1-32) and length (16-128), as a text encoder in production sees them.

Variants, side by side in one process: eager; Inductor with `freezing=True` (its documented CPU inference
setting); torch's one-line int8, `quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)`; effopt exact;
effopt `quantize="int8-dynamic"`. For each it prints the graphs compiled, the warm-up (the first pass over
the stream, compiles included), the stream's time against eager (medians of whole passes, interleaved
round by round after the warm-up), and the worst sentence-embedding cosine against eager over every
request (mean pooling over the attention mask, as sentence-transformers embeds). For effopt it also says
which kernels the last (symbolic) graph runs: int8 kernels, float32 layers, eager regions.

Issue 27's targets (real AVX2 CPU): int8-dynamic >= 1.6x eager and >= 1.1x quantize_dynamic, every cosine
>= 0.99, <= 4 compiles, warm-up <= 1.5x Inductor's; exact >= 1.05x eager and >= Inductor (freezing).

Writes bench-results/served.json. `make bench` runs it; `python benchmarks/served.py --rounds 5`.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time
import warnings

import torch

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench-results")
# (batch, length): 10 requests, batch 1-32, lengths 16-128; the stream repeats every round
STREAM = [(1, 16), (4, 32), (32, 128), (8, 64), (2, 100), (16, 48), (1, 128), (32, 24), (6, 80), (12, 112)]


def embed(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: the mean of the token vectors under the attention mask, normalized."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def variants(model) -> dict:
    import effopt  # noqa: F401 - registers the backend
    from baselines import inductor_frozen, torch_int8

    return {
        "eager": model,
        "inductor (freezing)": inductor_frozen(model),
        "quantize_dynamic": torch_int8(model),
        "effopt exact": torch.compile(copy.deepcopy(model), backend="effopt"),
        "effopt int8-dynamic": torch.compile(copy.deepcopy(model), backend="effopt",
                                             options={"quantize": "int8-dynamic"}),
    }


def kernels_of_last_graph() -> str:
    import effopt

    rep = effopt.last_report()
    if rep is None or rep.lowering is None:
        return ""
    ks = rep.lowering.kernels
    choice = [k.choice for k in ks]
    int8 = [k.choice for k in ks if any("int8_linear" in o for o in k.ops)]
    return (f"last graph: {choice.count('tvm')} TVM kernels, {choice.count('eager')} eager regions, "
            f"{choice.count('float32')} float32 layers" + (f"; int8 linears: {int8.count('tvm')} TVM, "
                                                           f"{int8.count('float32')} float32, "
                                                           f"{int8.count('eager')} eager" if int8 else "")
            + ("; whole graph runs eager" if rep.runs_eager else ""))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="timed passes over the stream per variant")
    ap.add_argument("--variants", default="all", help="comma-separated names of the variants to run (eager and "
                    "quantize_dynamic always run: the ratios are against them), or 'all'")
    a = ap.parse_args(argv)

    from effopt.testing import machine, minilm

    warnings.filterwarnings("ignore")
    torch._dynamo.config.recompile_limit = 64
    torch._dynamo.config.accumulated_recompile_limit = 1024
    model, tok = minilm.load()
    sents = minilm.sentences()
    calls = [minilm.encode(tok, (sents * 4)[:b], length=n) for b, n in STREAM]
    with torch.no_grad():
        refs = [embed(model(input_ids=i, attention_mask=m).last_hidden_state, m) for i, m in calls]
    fns = variants(model)
    if a.variants != "all":
        wanted = {"eager", "quantize_dynamic", *(v.strip() for v in a.variants.split(","))}
        unknown = wanted - set(fns)
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; valid: {list(fns)}")
        fns = {k: f for k, f in fns.items() if k in wanted}
    rows = {}
    print(f"served MiniLM-L6 (sdpa), {len(STREAM)} requests, batch 1-32, lengths 16-128; "
          f"{machine.describe()['cpu']}", flush=True)
    for name, fn in fns.items():
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        worst = 1.0
        with torch.no_grad():
            for (ids, mask), ref in zip(calls, refs):
                got = embed(fn(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
                worst = min(worst, float(torch.nn.functional.cosine_similarity(got, ref, dim=-1).min()))
        rows[name] = {"warmup_s": time.perf_counter() - t0, "worst_cosine": worst,
                      "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"] - before,
                      "note": kernels_of_last_graph() if name.startswith("effopt") else ""}
        print(f"  warm-up {name:22s} {rows[name]['warmup_s']:6.1f} s, {rows[name]['graphs']} graphs, "
              f"worst cosine {worst:.4f}  {rows[name]['note']}", flush=True)

    def one_pass(f):
        for ids, mask in calls:
            f(input_ids=ids, attention_mask=mask)

    from effopt.timing import interleaved_medians

    with torch.no_grad():
        t = interleaved_medians({k: (lambda f=f: one_pass(f)) for k, f in fns.items()}, [], rounds=a.rounds,
                                warmup=1, budget_s=1e9)
    for name in fns:
        rows[name].update(stream_ms=t[name] * 1e3, speedup=t["eager"] / t[name])
    q = t["quantize_dynamic"]
    print("\n| variant | graphs | warm-up | stream | vs eager | vs quantize_dynamic | worst embedding cosine |\n"
          "|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['graphs'] if name not in ('eager', 'quantize_dynamic') else '-'} | "
              f"{r['warmup_s']:.1f} s | {r['stream_ms']:.0f} ms | {r['speedup']:.2f}x | {q / t[name]:.2f}x | "
              f"{r['worst_cosine']:.4f} |", flush=True)
    out = {"machine": machine.describe(), "stream": STREAM, "rounds": a.rounds, "rows": rows}
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "served.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()

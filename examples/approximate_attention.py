"""Approximate attention end to end on real weights (MiniLM-L6, all-MiniLM-L6-v2 sentence embeddings).

1. Training-free, guarded: torch.compile with attention="hamming", calibration data and an accuracy budget;
   the report says which layers kept the approximation and what it cost.
2. Fine-tuned: effopt.reparameterize gives a trainable module with Hamming attention; a few steps of
   distillation in plain PyTorch; then torch.compile lowers its attention to effopt's TVM kernels.

    python examples/approximate_attention.py [--attention hamming|linear|lmul] [--steps 30]
"""
import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import effopt  # noqa: E402
from effopt.testing import minilm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--attention", default="hamming", choices=["hamming", "linear", "lmul"])
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tokenizer = minilm.load("eager")
    ids, mask = minilm.encode(tokenizer, minilm.sentences(), length=128)
    train = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8]} for i in range(0, 32, 8)]
    test = [{"input_ids": ids[i:i + 8], "attention_mask": mask[i:i + 8]} for i in range(32, 64, 8)]

    def embeddings(fn, batches):
        with torch.no_grad():
            return torch.cat([minilm.sentence_embeddings(fn(**b).last_hidden_state, b["attention_mask"])
                              for b in batches])

    reference = embeddings(model, test)

    def cosine(fn):
        return F.cosine_similarity(embeddings(fn, test), reference, dim=-1).mean().item()

    # 1. training-free, with the accuracy guard
    fast = torch.compile(model, backend="effopt", options={
        "attention": args.attention, "calibration": train[:2], "accuracy_budget": 0.01, "metric": "cosine"})
    with torch.no_grad():
        fast(**test[0])
    print(effopt.last_report())
    print(f"\n[guarded, training-free] sentence-embedding cosine to the original: {cosine(fast):.4f}\n")

    # 2. reparameterize, fine-tune in plain PyTorch, compile
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the 'accuracy unverified' warning: the fine-tune below is the point
        student = effopt.reparameterize(model, train[0], attention=args.attention)
    print(f"reparameterized: {student.effopt_record}")
    print(f"[before fine-tuning] cosine {cosine(student):.4f}")
    with torch.no_grad():
        targets = [model(**b).last_hidden_state for b in train]
    # train the projections that feed the approximate attentions (q, k, v; Hamming's code projections)
    opt = torch.optim.AdamW(effopt.attention_parameters(student), lr=1e-5, weight_decay=0.0)
    t0 = time.perf_counter()
    for step in range(args.steps):
        b = step % len(train)
        opt.zero_grad()
        loss = F.mse_loss(student(**train[b]).last_hidden_state, targets[b])
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"  step {step:3d}  distillation loss {loss.item():.5f}")
    print(f"[after {args.steps} steps, {time.perf_counter() - t0:.0f} s] cosine {cosine(student):.4f}")
    student.eval()
    compiled = torch.compile(student, backend="effopt")
    with torch.no_grad():
        compiled(**test[0])
    kernels = [k for k in effopt.last_report().lowering.kernels if any("attention" in o for o in k.ops)]
    print(f"[compiled] cosine {cosine(compiled):.4f}; attention kernels: "
          + ", ".join(f"{k.ops[0]} on {k.choice} ({k.tvm_us:.0f} us TVM vs {k.eager_us:.0f} us torch)"
                      for k in kernels[:1]) + f" (x{len(kernels)})")


if __name__ == "__main__":
    main()

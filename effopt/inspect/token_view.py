"""Which tokens a token-reduced model merged: ToMe's source tracing, drawn over the input image.

    source = effopt.token_sources(model, (pixel_values,), token_merge=16)   # [B, T0]: final token per input token
    effopt.draw_token_merges(image, source[0], patch=14, path="merges.png")

`token_sources` compiles the model with the given options (without lowering) and runs the rewritten graph
once, reading the token-state `source` map the reduction ops keep; `draw_token_merges` paints each group of
merged patches in its mean colour with its outline, as ToMe's visualization does.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.fx as fx

_REDUCTIONS = ("tome_merge", "evit_prune")


def token_sources(model, example_inputs, **options) -> torch.Tensor:
    """For each input token, the index of the token that holds it after the last reduction: [B, T0] int64
    (T0 counts every token, CLS included). Raises ValueError if the options reduce nothing in this model."""
    from .report import last_report

    if not any(k in options for k in ("token_merge", "token_prune")):
        raise ValueError("token_sources needs token_merge=... or token_prune=...")
    args, kwargs = (example_inputs, {}) if not isinstance(example_inputs, dict) else ((), example_inputs)
    if isinstance(args, torch.Tensor):
        args = (args,)
    torch._dynamo.reset()
    from ..passes.guard import EffoptAccuracyWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EffoptAccuracyWarning)
        f = torch.compile(model, backend="effopt", options=dict(options, lower=False, cache=False, strict=True))
        with torch.no_grad():
            f(*args, **kwargs)
    gm = last_report().graph
    torch._dynamo.reset()
    sources = []

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and getattr(n.target, "_opname", "") in _REDUCTIONS:
                sources.append(out[3])
            return out

    leaves = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        Rec(gm).run(*leaves)
    if not sources:
        raise ValueError(f"options {options} reduced no tokens in this model (see effopt.last_report())")
    return sources[-1]


def draw_token_merges(image, source: torch.Tensor, patch: int, path: str | None = None, protected: int = 1,
                      title: str | None = None):
    """Draw the merged groups of one sample over its image and save a PNG at `path`.

    image: [3, H, W] tensor or [H, W, 3] array (any range; shown min-max scaled); source: [T0] for that
    sample, as `token_sources` gives it; patch: the patch size in pixels; the first `protected` tokens
    (CLS) are not patches. Returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = image.detach().cpu().float().permute(1, 2, 0).numpy() if isinstance(image, torch.Tensor) else \
        np.asarray(image, dtype=np.float32)
    img = (img - img.min()) / max(1e-12, float(img.max() - img.min()))
    h, w = img.shape[0] // patch, img.shape[1] // patch
    groups = source[protected:].cpu().numpy().reshape(h, w)
    painted = np.zeros_like(img[: h * patch, : w * patch])
    for g in np.unique(groups):
        cells = np.argwhere(groups == g)
        mask = np.kron(groups == g, np.ones((patch, patch), dtype=bool))
        colour = img[: h * patch, : w * patch][mask].mean(axis=0)
        painted[mask] = colour if len(cells) > 1 else img[: h * patch, : w * patch][mask]
    # outlines between patches of different groups
    edges = np.zeros((h * patch, w * patch), dtype=bool)
    big = np.kron(groups, np.ones((patch, patch), dtype=groups.dtype))
    edges[:, 1:] |= big[:, 1:] != big[:, :-1]
    edges[1:, :] |= big[1:, :] != big[:-1, :]
    painted[edges] = 1.0
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(img)
    axes[0].set_title("input")
    axes[1].imshow(painted)
    axes[1].set_title(title or f"{len(np.unique(groups))} tokens hold {h * w} patches")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=100)
    return fig


__all__ = ["token_sources", "draw_token_merges"]

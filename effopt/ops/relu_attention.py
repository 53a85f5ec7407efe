"""ReLU attention (Wortsman et al. 2023, "Replacing softmax with ReLU in Vision Transformers",
arXiv:2309.08586): the softmax of q k^T * scale becomes relu(q k^T * scale + mask) / M, M the number of keys.
No exponentials and no row normalization (a row's weights need not sum to 1): the paper trains ViTs with it
from scratch to softmax's accuracy; on a softmax-trained model it is a coarse approximation that the
accuracy guard keeps only where the budget allows (or after fine-tuning with `effopt.reparameterize`).

Shapes as `scaled_dot_product_attention`; a mask is additive (a very negative entry drops a key: relu makes
its weight 0) or boolean (True: attend).
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention import additive_mask, out_like, save_inputs, sdpa_layout, surrogate_grads
from .spec import attention_macs, declare

Tensor = torch.Tensor


def relu_attention_ref(q, k, v, mask, scale: float) -> Tensor:
    s = (q.to(torch.float32) @ k.to(torch.float32).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + additive_mask(mask).to(torch.float32)
    w = torch.relu(s) / k.shape[-2]
    return (w @ v.to(torch.float32)).to(v.dtype)


@torch.library.custom_op("effopt::relu_attention", mutates_args=())
def relu_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    return sdpa_layout(relu_attention_ref(q, k, v, mask, scale))


@relu_attention.register_fake
def _(q, k, v, mask, scale):
    return out_like(q, v)


# differentiable as it is: fine-tuning takes the reference's gradients
torch.library.register_autograd("effopt::relu_attention", lambda ctx, g: surrogate_grads(relu_attention_ref, ctx, g),
                                setup_context=save_inputs)


def _cost(b, out):  # q.k^T and w.v in float
    m = attention_macs(b["q"], b["k"], b["v"])
    return m, m


# lowered alone: its kernel (lowering/kernels/relu_attention.py) is measured against this op in torch
declare(relu_attention, alone=True, cost=_cost)

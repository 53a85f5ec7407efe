"""The op of ShiftAddViT's mixture of experts for MLPs (the pass: effopt/passes/moe.py): `effopt.reparameterize(model, inputs, shift_add="moe")`.

Each MLP (linear -> GELU/ReLU/SiLU -> linear) becomes a `ShiftMoE`: a router (a linear layer, dim -> 2)
sends each token to one of two experts, the original MLP (multiplications) or a copy of it on power-of-two
weights (shifts; `terms` powers of two per weight, straight-through gradients), top-1 as ShiftAddViT's MoE.
The token gets the chosen expert's output unscaled: the gate probability enters as g / stop_gradient(g),
1 in the forward pass, so the router learns from the task loss while a pretrained MLP's outputs are not
halved at initialization (scaling by g itself, as Switch-style MoEs trained from scratch do, multiplied
every MLP output by about 0.5 and took DINOv2's probe accuracy to 0.28 after fine-tuning).

Training (the module in train mode) runs both experts on every token and combines them by the routing, so
every parameter gets gradients; each layer keeps its latency-aware load-balancing loss of the last forward
(`moe_loss(module)` sums them). ShiftAddViT's loss balances the experts' importance (summed gate
probabilities) and load (token counts) weighted by each expert's latency: the squared coefficient of
variation of importance_e * latency_e / mean latency, so the optimum sends tokens in inverse proportion
to latency: the faster expert gets more tokens. The latencies are measured on this machine at the example's
token count (or given: {'kind': 'moe', 'latency': (mult_us, shift_us)}).

Inference (eval mode) is one op, `effopt::shift_moe`: route, gather each expert's tokens, run the expert
densely on them (the multiplication expert on torch's GEMMs; the shift expert on its packed 4-bit weights,
dequantized per call onto torch's GEMM, since its token count changes per input and effopt's shift kernels
are compiled per shape), scatter back. `eval()` packs the shift expert's trained weights.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn.functional as F

from . import shift as so
from .spec import declare

Tensor = torch.Tensor
ACTS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


def _act(name: str, x: Tensor) -> Tensor:
    return ACTS[name](x)


def _shift_mlp(x, p1, s1, b1, p2, s2, b2, k1: int, k2: int, act: str) -> Tensor:
    h = _act(act, so.shift_linear_ref(x, p1, s1, b1, k1))
    return so.shift_linear_ref(h, p2, s2, b2, k2)


@torch.library.custom_op("effopt::shift_moe", mutates_args=())
def shift_moe(x: Tensor, router_w: Tensor, router_b: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
              b2: Optional[Tensor], p1: Tensor, s1: Tensor, sb1: Optional[Tensor], p2: Tensor, s2: Tensor,
              sb2: Optional[Tensor], act: str) -> Tensor:
    """Top-1 routed MLP of two experts on x [M, D]: gather, run each expert densely, scatter (the gate's
    straight-through factor is 1 in the forward pass)."""
    gates = torch.softmax(F.linear(x, router_w, router_b), dim=-1)
    top = gates.argmax(dim=-1)
    out = x.new_empty((x.shape[0], w2.shape[0]))
    for e in (0, 1):
        idx = torch.nonzero(top == e).squeeze(1)
        if idx.numel() == 0:
            continue
        xe = x.index_select(0, idx)
        if e == 0:
            ye = F.linear(_act(act, F.linear(xe, w1, b1)), w2, b2)
        else:
            ye = _shift_mlp(xe, p1, s1, sb1, p2, s2, sb2, w1.shape[1], w2.shape[1], act)
        out.index_copy_(0, idx, ye)
    return out


@shift_moe.register_fake
def _(x, router_w, router_b, w1, b1, w2, b2, p1, s1, sb1, p2, s2, sb2, act):
    return x.new_empty((x.shape[0], w2.shape[0]))


def _cv2(v: Tensor) -> Tensor:
    """Squared coefficient of variation."""
    return v.var(unbiased=False) / (v.mean() ** 2 + 1e-10)


def balance_loss(gates: Tensor, top: Tensor, latency: Tensor) -> Tensor:
    """ShiftAddViT's latency-aware load balancing: cv^2 of each expert's importance (summed gates) and of its
    soft load, each weighted by latency / mean latency (zero when tokens go in inverse proportion to it)."""
    w = latency / latency.mean()
    importance = gates.sum(dim=0)
    one_hot = F.one_hot(top, gates.shape[-1]).to(gates.dtype)
    load = (one_hot + gates - gates.detach()).sum(dim=0)  # token counts, with the gates' gradient
    return _cv2(importance * w) + _cv2(load * w)


class ShiftMoE(torch.nn.Module):
    """One MLP as a mixture of a multiplication expert and a shift expert (see the module docstring)."""

    def __init__(self, fc1: torch.nn.Linear, fc2: torch.nn.Linear, act: str, terms: int, latency, seed: int = 0):
        super().__init__()
        self.act, self.terms = act, terms
        self.fc1, self.fc2 = fc1, fc2
        self.shift_fc1, self.shift_fc2 = copy.deepcopy(fc1), copy.deepcopy(fc2)
        self.router = torch.nn.Linear(fc1.in_features, 2)
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            self.router.weight.copy_(torch.randn(self.router.weight.shape, generator=g) * 1e-2)
            self.router.bias.zero_()
        self.register_buffer("latency", torch.as_tensor(latency, dtype=torch.float32))
        self.aux_loss: Tensor | None = None
        self.last_load: list[int] = [0, 0]
        self._pack()

    def _pack(self) -> None:
        for name, lin in (("1", self.shift_fc1), ("2", self.shift_fc2)):
            codes, scale = so.quantize(lin.weight.detach(), self.terms)
            self.register_buffer(f"packed{name}", so.pack(codes), persistent=False)
            self.register_buffer(f"scale{name}", scale, persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        if not mode:
            self._pack()  # the shift expert's trained weights, packed for inference
        return self

    def expert(self, x: Tensor, e: int) -> Tensor:
        if e == 0:
            return self.fc2(_act(self.act, self.fc1(x)))
        sw = torch.ops.effopt.shift_weight
        h = _act(self.act, F.linear(x, sw(self.shift_fc1.weight, self.terms), self.shift_fc1.bias))
        return F.linear(h, sw(self.shift_fc2.weight, self.terms), self.shift_fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return torch.ops.effopt.shift_moe(
                x, self.router.weight, self.router.bias, self.fc1.weight, self.fc1.bias, self.fc2.weight,
                self.fc2.bias, self.packed1, self.scale1, self.shift_fc1.bias, self.packed2, self.scale2,
                self.shift_fc2.bias, self.act)
        gates = torch.softmax(self.router(x), dim=-1)
        top = gates.argmax(dim=-1)
        gate = gates / gates.detach()  # 1, with the gates' gradient
        y = sum((top == e).unsqueeze(-1) * gate[:, e:e + 1] * self.expert(x, e) for e in (0, 1))
        self.aux_loss = balance_loss(gates, top, self.latency)
        self.last_load = [int((top == e).sum()) for e in (0, 1)]
        return y


def moe_loss(module: torch.nn.Module) -> Tensor:
    """The sum of the latency-aware load-balancing losses of the last training forward of `module`'s
    ShiftMoE layers (add it, times a small factor such as 0.01, to the task loss)."""
    losses = [m.aux_loss for m in module.modules() if isinstance(m, ShiftMoE) and m.aux_loss is not None]
    if not losses:
        raise ValueError("moe_loss: no ShiftMoE layer has run a training forward (call module.train() first)")
    return sum(losses)


def expert_latency(fc1: torch.nn.Linear, fc2: torch.nn.Linear, act: str, terms: int, tokens: int) -> tuple:
    """(multiplication expert, shift expert) microseconds for `tokens` tokens, as `shift_moe` runs them."""
    from ..timing import interleaved_medians

    x = torch.randn(tokens, fc1.in_features, generator=torch.Generator().manual_seed(0))
    c1, s1 = so.quantize(fc1.weight.detach(), terms)
    c2, s2 = so.quantize(fc2.weight.detach(), terms)
    p1, p2 = so.pack(c1), so.pack(c2)
    with torch.no_grad():
        t = interleaved_medians({
            "mult": lambda: fc2(_act(act, fc1(x))),
            "shift": lambda: _shift_mlp(x, p1, s1, fc1.bias, p2, s2, fc2.bias, fc1.in_features, fc2.in_features,
                                        act)}, [], rounds=7, reps=3)
    return t["mult"] * 1e6, t["shift"] * 1e6


# ---- declarations (effopt/ops/spec.py) ------------------------------------------------------------------------
# data-dependent token counts per expert (gather, dense experts on torch's GEMMs, scatter): torch runs it
declare(shift_moe, library=True)

__all__ = ["ShiftMoE", "moe_loss", "balance_loss", "expert_latency"]

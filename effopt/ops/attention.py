"""effopt's own operators: the approximate attentions, as torch custom ops.

Each op has a plain-PyTorch reference implementation (what eager runs, except for L-Mul, whose eager
forward calls its TVM kernel: see `reference_kernels`; and the oracle the TVM kernels are tested against)
and, where it is approximate in a non-differentiable way, straight-through gradients so that a
reparameterized model can be fine-tuned in plain PyTorch. The lowering stage replaces the ops by
TVM kernels (effopt/lowering/kernels/).

Shapes follow `scaled_dot_product_attention`: q [B, H, N, D], k and v [B, H, M, D] (v may have its own
last dim), an optional additive float mask broadcastable to [B, H, N, M] (Hugging Face extended masks:
0 where attended, a very negative number where not).

hamming_attention(qp, kp, v, mask, beta)   ShiftAddViT-style additive attention
    qp, kp: [B, H, N|M, bits], queries and keys already projected to `bits` dimensions (the projection is
    an ordinary matmul with a learnable [D, bits] matrix). Their signs are the binary codes; the similarity
    of a query and a key is the number of equal bits, bits - popcount(code_q XOR code_k). Attention weights
    are powers of two: w = 2^round(beta * similarity + log2(e) * mask - rowmax), so the product with V is
    an integer addition on V's exponent bits, and the normalizer a sum of powers of two.
lmul_attention(q, k, v, mask, scale, mantissa_bits)   L-Mul attention ("Addition is All You Need")
    softmax(lmul_matmul(q * scale, k^T) + mask) then lmul_matmul with V, where each elementwise
    product a*b is replaced by an integer addition of the float bit patterns with mantissas truncated to
    `mantissa_bits` bits: L-Mul(a, b) = (1 + ma + mb + 2^-l(m)) * 2^(ea + eb), accumulated in float32.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings

import torch

from .spec import attention_macs, declare

LOG2E = 1.4426950408889634
_MIN_EXP = -126  # weights 2^e with e below this are flushed to zero (float32 normal range)


def additive_mask(mask):
    """A boolean mask (True: attend, as SDPA takes it) as the equivalent additive float mask."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, -math.inf)


def key_mask(mask: torch.Tensor) -> torch.Tensor:
    """The [..., 1, M] mask of a mask that is the same for every query (checked: Hugging Face expands its
    padding masks to [B, 1, N, M]); a query-dependent mask is an error for linear attention."""
    if mask.shape[-2] == 1:
        return mask
    first = mask[..., :1, :]
    if not torch.equal(mask, first.expand(mask.shape)):
        raise RuntimeError("effopt linear attention: the attention mask differs between queries (e.g. a causal "
                           "mask); linear attention can only weigh keys. Use another attention option here.")
    return first


def _broadcast_mask(mask, shape):
    return None if mask is None else additive_mask(mask).to(torch.float32).expand(shape)


# ---- Hamming attention ----------------------------------------------------------------------------------
def hamming_similarity(qp: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """Equal bits of the codes, bits - popcount(code_q XOR code_k), computed exactly in float: with codes
    c in {0, 1}, equal bits = c_q . c_k + (1 - c_q) . (1 - c_k) (integers below 2^24)."""
    cq, ck = (qp > 0).to(torch.float32), (kp > 0).to(torch.float32)
    return cq @ ck.transpose(-1, -2) + (1 - cq) @ (1 - ck).transpose(-1, -2)


def hamming_exponents(same: torch.Tensor, mask: torch.Tensor | None, beta: float) -> torch.Tensor:
    """The integer exponent e[b, h, i, j] <= 0 of each attention weight 2^e (below -126: weight 0)."""
    s = same * beta
    if mask is not None:
        s = s + _broadcast_mask(mask, s.shape) * LOG2E
    s = s - s.amax(dim=-1, keepdim=True)
    return torch.floor(s + 0.5).clamp_min(_MIN_EXP - 1)


def hamming_weighted_sum(same, v, mask, beta: float) -> torch.Tensor:
    e = hamming_exponents(same, mask, beta)
    w = torch.where(e < _MIN_EXP, torch.zeros_like(e), torch.exp2(e))
    return ((w @ v.to(torch.float32)) / w.sum(dim=-1, keepdim=True)).to(v.dtype)


def hamming_attention_ref(qp, kp, v, mask, beta: float) -> torch.Tensor:
    return hamming_weighted_sum(hamming_similarity(qp, kp), v, mask, beta)


def hamming_attention_surrogate(qp, kp, v, mask, beta):
    """The same forward values, differentiable: sign and rounding pass gradients straight through
    (sign's clipped to |x| <= 1, as in binarized networks); `beta` may be a learnable tensor."""
    bits = qp.shape[-1]
    sq = _ste_sign(qp)
    sk = _ste_sign(kp)
    same = (bits + sq @ sk.transpose(-1, -2)) * 0.5
    s = same * beta
    if mask is not None:
        s = s + _broadcast_mask(mask, s.shape) * LOG2E
    s = (s - s.amax(dim=-1, keepdim=True).detach()).clamp_min(_MIN_EXP - 1)
    e = s + (torch.floor(s + 0.5) - s).detach()
    w = torch.exp2(e) * (e >= _MIN_EXP)
    return ((w @ v.to(w.dtype)) / w.sum(dim=-1, keepdim=True)).to(v.dtype)


def _ste_sign(x):
    hard = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
    soft = x.clamp(-1, 1)
    return soft + (hard - soft).detach()


# ---- L-Mul ------------------------------------------------------------------------------------------------
def lmul_offset_bits(mantissa_bits: int) -> int:
    """l(m) from the L-Mul paper: the offset term is 2^-l(m)."""
    return mantissa_bits if mantissa_bits <= 3 else (3 if mantissa_bits == 4 else 4)


def lmul(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Elementwise L-Mul of float32 tensors (broadcasting), on their int32 bit patterns."""
    if not 0 <= mantissa_bits <= 23:
        raise ValueError(f"mantissa_bits must be in 0..23, got {mantissa_bits}")
    ia = a.to(torch.float32).contiguous().view(torch.int32)
    ib = b.to(torch.float32).contiguous().view(torch.int32)
    keep = torch.tensor(~((1 << (23 - mantissa_bits)) - 1) & 0x7FFFFFFF, dtype=torch.int32)
    ma, mb = ia & keep, ib & keep
    sign = (ia ^ ib) & torch.tensor(-0x80000000, dtype=torch.int32)
    r = ma + mb + (-0x3F800000 + (1 << (23 - lmul_offset_bits(mantissa_bits))))
    zero = ((ia & 0x7F800000) == 0) | ((ib & 0x7F800000) == 0) | (r <= 0)
    r = r.clamp_max(0x7F7FFFFF)  # overflow saturates at the largest finite float
    out = torch.where(zero, torch.zeros_like(r), r | sign)
    return out.view(torch.float32)


def lmul_matmul(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int, chunk: int = 64) -> torch.Tensor:
    """a [..., N, K] x b [..., K, M] with every product an L-Mul, accumulated in float32 (in key order)."""
    outs = []
    for i in range(0, a.shape[-2], chunk):
        ai = a[..., i:i + chunk, :]
        outs.append(lmul(ai.unsqueeze(-1), b.unsqueeze(-3), mantissa_bits).sum(dim=-2))
    return torch.cat(outs, dim=-2)


def lmul_attention_ref(q, k, v, mask, scale: float, mantissa_bits: int) -> torch.Tensor:
    s = lmul_matmul(q.to(torch.float32) * scale, k.to(torch.float32).transpose(-1, -2), mantissa_bits)
    if mask is not None:
        # rows whose keys are all masked: SDPA's CPU kernel gives 0, plain softmax NaN
        s = s + _broadcast_mask(mask, s.shape)
    p = torch.softmax(s, dim=-1)
    return lmul_matmul(p, v.to(torch.float32), mantissa_bits).to(v.dtype)


# ---- linear attention ---------------------------------------------------------------------------------
FEATURE_MAPS = ("elu", "relu")


def linear_attention_ref(q, k, v, mask, scale: float, feature_map: str = "elu") -> torch.Tensor:
    """Kernelized linear attention, O(N): phi(q) (phi(k)^T v) / (phi(q) . sum_j phi(k_j)).

    q and k are scaled by sqrt(scale) each before the feature map. A mask must be a key mask (the same for
    every query: [B, 1|H, 1, M]); exp(mask) weighs each key, which is exactly what an additive mask does
    to softmax attention (0 keeps a key, a very negative value drops it)."""
    root = math.sqrt(scale)
    if feature_map == "elu":
        fq, fk = torch.nn.functional.elu(q * root) + 1, torch.nn.functional.elu(k * root) + 1
    elif feature_map == "relu":
        fq, fk = torch.relu(q * root), torch.relu(k * root)
    else:
        raise ValueError(f"feature_map={feature_map!r}; valid: {list(FEATURE_MAPS)}")
    if mask is not None:
        fk = fk * torch.exp(key_mask(additive_mask(mask))).transpose(-1, -2)  # [B, H|1, M, 1]
    kv = fk.transpose(-1, -2) @ v  # [B, H, D, Dv]
    z = fk.sum(dim=-2, keepdim=True)  # [B, H, 1, D]
    den = (fq * z).sum(dim=-1, keepdim=True).clamp_min(1e-6)
    return (fq @ kv) / den


# ---- the custom ops -------------------------------------------------------------------------------------
# Registered under the `effopt` namespace: graphs that contain them (a reparameterized model, or the
# backend's approximate passes) keep them as single nodes, which the lowering stage maps to TVM kernels.
# Backward: straight-through estimators, computed by differentiating a surrogate that has the same forward
# values (hamming) or by the exact computation the op approximates (lmul: the gradient of float products).
from typing import Optional  # noqa: E402

Tensor = torch.Tensor


def out_like(q, v):
    b, h = torch.broadcast_shapes(q.shape[:-2], v.shape[:-2])
    return q.new_empty((b, q.shape[-2], h, v.shape[-1]), dtype=v.dtype).transpose(1, 2)


def sdpa_layout(out: torch.Tensor) -> torch.Tensor:
    """[B, H, N, D] stored as [B, N, H, D], as torch's SDPA returns it: models view its transpose(1, 2)
    as [B, N, H*D] without a copy, so the approximate ops must keep that layout."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


class ExactAttention(torch.nn.Module):
    """The softmax attention an approximate attention op replaced, called with that op's arguments
    (q, k, v, mask, ...): what runs where the target's approximate kernel measured slower
    (node.meta["float_form"], read by the lowering)."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = float(scale)

    def forward(self, q, k, v, mask, *rest):
        return sdpa_layout(torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                                             scale=self.scale))


@torch.library.custom_op("effopt::hamming_attention", mutates_args=())
def hamming_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], proj: Tensor,
                      beta: float) -> Tensor:
    """Hamming attention of q, k projected by proj [D, bits] (see the module docstring)."""
    return sdpa_layout(hamming_attention_ref(q.to(proj.dtype) @ proj, k.to(proj.dtype) @ proj, v, mask, beta))


@hamming_attention.register_fake
def _(q, k, v, mask, proj, beta):
    return out_like(q, v)


_reference = threading.local()
_kernel_failed: list[str] = []  # why effopt's eager kernels are unavailable in this process, once known


@contextlib.contextmanager
def reference_kernels():
    """Run the ops' PyTorch references in this thread, never effopt's TVM kernels (the lowering's self-check
    compares its kernels with the references under this)."""
    before = getattr(_reference, "on", False)
    _reference.on = True
    try:
        yield
    finally:
        _reference.on = before


# name -> the compiled kernel an op's eager forward calls instead of its slow reference; the lowering stage
# (effopt/lowering/eager.py) registers them when it is imported, so this layer never imports it
EAGER_KERNELS: dict = {}


def _eager_kernel(name: str, *tensors: Tensor):
    """effopt's TVM kernel `name` (registered in EAGER_KERNELS) for these inputs, or None where it does not
    apply (reference mode, not float32 4-D CPU tensors of one batch and head count) or cannot be built."""
    if getattr(_reference, "on", False) or _kernel_failed:
        return None
    q, k, v = tensors[:3]
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4 for t in (q, k, v)) \
            or not q.shape[:2] == k.shape[:2] == v.shape[:2]:
        return None
    return EAGER_KERNELS.get(name)


def _lmul_forward(q, k, v, mask, scale, mantissa_bits):
    kernel = _eager_kernel("lmul_attention", q, k, v)
    if kernel is not None:
        try:
            return kernel(q, k, v, mask, scale, mantissa_bits)
        except Exception as e:  # noqa: BLE001 - TVM raises many error types; the reference is always there
            _kernel_failed.append(str(e))
            warnings.warn(f"effopt: the L-Mul TVM kernel failed ({str(e).splitlines()[0][:200]}); eager "
                          "L-Mul attention runs the much slower PyTorch reference", RuntimeWarning, stacklevel=3)
    return lmul_attention_ref(q, k, v, mask, scale, mantissa_bits)


@torch.library.custom_op("effopt::lmul_attention", mutates_args=())
def lmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                   mantissa_bits: int) -> Tensor:
    """L-Mul attention (see the module docstring). Eager runs effopt's TVM kernel for float32 CPU inputs (the
    PyTorch reference takes seconds per attention at ViT sizes), the reference otherwise or under
    `reference_kernels()`."""
    return sdpa_layout(_lmul_forward(q, k, v, mask, scale, mantissa_bits))


@lmul_attention.register_fake
def _(q, k, v, mask, scale, mantissa_bits):
    return out_like(q, v)


@torch.library.custom_op("effopt::linear_attention", mutates_args=())
def linear_attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float,
                     feature_map: str) -> Tensor:
    return sdpa_layout(linear_attention_ref(q, k, v, mask, scale, feature_map))


@linear_attention.register_fake
def _(q, k, v, mask, scale, feature_map):
    return out_like(q, v)


def save_inputs(ctx, inputs, output):
    ctx.inputs = inputs
    ctx.save_for_backward(*[t for t in inputs if isinstance(t, torch.Tensor)])


def surrogate_grads(fn, ctx, grad):
    """Gradients of `fn` (a differentiable surrogate) for the op's tensor inputs, None for the rest."""
    saved = iter(ctx.saved_tensors)
    args = [next(saved).detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
            for t in ctx.inputs]
    with torch.enable_grad():
        out = fn(*args)
        wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
        got = iter(torch.autograd.grad(out, wrt, grad, allow_unused=True)) if wrt else iter(())
    return tuple(next(got) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args)


def _hamming_surrogate(q, k, v, mask, proj, beta):
    return hamming_attention_surrogate(q.to(proj.dtype) @ proj, k.to(proj.dtype) @ proj, v, mask, beta)


def _lmul_surrogate(q, k, v, mask, scale, mantissa_bits):
    # straight through: the gradient of the float products L-Mul approximates
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


torch.library.register_autograd("effopt::hamming_attention",
                                lambda ctx, g: surrogate_grads(_hamming_surrogate, ctx, g), setup_context=save_inputs)
torch.library.register_autograd("effopt::lmul_attention",
                                lambda ctx, g: surrogate_grads(_lmul_surrogate, ctx, g), setup_context=save_inputs)
torch.library.register_autograd("effopt::linear_attention",
                                lambda ctx, g: surrogate_grads(linear_attention_ref, ctx, g), setup_context=save_inputs)


# ---- declarations (effopt/ops/spec.py) ------------------------------------------------------------------------
def _approximate_products(b, out):  # attention MACs that are not float multiplications
    return attention_macs(b["q"], b["k"], b["v"]), 0


def _float_products(b, out):
    m = attention_macs(b["q"], b["k"], b["v"])
    return m, m


declare(hamming_attention, alone=True, cost=_approximate_products)
# L-Mul truncates mantissas: a probability whose last bit differs between kernel and reference (their exp
# differ) can land on the other side of a truncation step and move its product by up to 2^-mantissa_bits
# relative. Such flips are rare and local, so it is checked by relative L2 error, which an indexing or layout
# bug would still fail by orders of magnitude.
declare(lmul_attention, tolerance={"relative_l2": 1e-3}, alone=True, cost=_approximate_products)
# a few small GEMMs and elementwise ops: torch's kernels (MKL) run it
declare(linear_attention, library=True, cost=_float_products)

"""Attention: scaled_dot_product_attention as effopt's tiled online-softmax kernel (kernels/flash.py),
in a region of its own so that the measured choice sets it against torch's fused SDPA per shape."""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
from tvm import relax

from ..kernels import flash
from ..rules import ISOLATED, LOWERABLE, lowers
from ...ops.sdpa import FLASH_CPU, sdpa_arguments

aten = torch.ops.aten


def _sdpa_lowerable(node: fx.Node) -> bool:
    f = sdpa_arguments(node.target, node.args, node.kwargs)
    if f["dropout_p"] or f["is_causal"] or f["enable_gqa"]:
        return False
    vals = [x.meta.get("val") if isinstance(x, fx.Node) else None for x in (f["q"], f["k"], f["v"])]
    if not all(isinstance(v, torch.Tensor) and v.dim() == 4 and v.dtype == torch.float32 for v in vals):
        return False
    if isinstance(vals[0].shape[-1], torch.SymInt) or isinstance(vals[2].shape[-1], torch.SymInt):
        return False
    if node.target is FLASH_CPU:  # only the attention output may be used, not the log-sum-exp
        return all(u.target is operator.getitem and u.args[1] == 0 for u in node.users)
    return True


@lowers(aten.scaled_dot_product_attention.default, FLASH_CPU)
def _sdpa(cv, node, *args, **kwargs):
    f = sdpa_arguments(node.target, args, kwargs)
    scale = f["scale"]
    scale = 1.0 / math.sqrt(int(node.args[0].meta["val"].shape[-1])) if scale is None else float(scale)
    out = flash.emit(cv.bb, f["q"], f["k"], f["v"], f["attn_mask"], scale)
    if node.target is FLASH_CPU:  # (output, log-sum-exp): the latter is unused (checked), a placeholder
        lse = node.meta["val"][1]
        return relax.Tuple([out, relax.op.zeros(cv.shape(lse), "float32")])
    return out


for _op in (aten.scaled_dot_product_attention.default, FLASH_CPU):
    LOWERABLE[_op] = _sdpa_lowerable
    ISOLATED.add(_op)

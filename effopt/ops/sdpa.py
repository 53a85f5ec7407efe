"""torch's own scaled-dot-product attention ops, as the graphs hold them: the arguments by name. Every stage
reads an SDPA node's arguments through `sdpa_arguments`."""
from __future__ import annotations

import torch

aten = torch.ops.aten

FLASH_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default
_SDPA_ARGS = {aten.scaled_dot_product_attention.default: ("q", "k", "v", "attn_mask", "dropout_p", "is_causal",
                                                          "scale", "enable_gqa"),
              FLASH_CPU: ("q", "k", "v", "dropout_p", "is_causal")}


def sdpa_arguments(target, args, kwargs) -> dict:
    """The arguments of an SDPA call (`scaled_dot_product_attention` or the CPU flash op AOT makes of it) by
    name; args and kwargs may be fx nodes or lowered values. Missing ones take SDPA's defaults."""
    out = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    out.update(zip(_SDPA_ARGS[target], args))
    out.update(kwargs)
    return out

"""What a user would pick instead of effopt, built the same way in every benchmark: Inductor with
`freezing=True` (its documented CPU inference setting) and torch's one-line int8,
`quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)` (fbgemm / oneDNN, eager, no compiler). Each works on a
copy, so the model the other variants compile stays as it is."""
from __future__ import annotations

import copy
import warnings

import torch


def inductor_frozen(model):
    return torch.compile(copy.deepcopy(model), backend="inductor", options={"freezing": True})


def torch_int8(model):
    """quantize_dynamic's copy of `model`. It swaps the Linear modules inside `model`, never `model` itself: wrap a
    bare Linear in a Sequential."""
    with warnings.catch_warnings():  # torch.ao's notice that eager quantization is migrating to torchao
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)

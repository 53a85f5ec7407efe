"""Calling compiled TVM functions from the torch graph: torch tensors in and out through DLPack, no copies
except where TVM's kernels need a compact, aligned buffer that the input is not."""
from __future__ import annotations

import os

import torch
import tvm_ffi

# TVM's own thread pool and torch's OpenMP pool spin against each other (ViT-S fell to 0.59x eager on
# 2 cores with TVM_NUM_THREADS=2). effopt's kernels run their parallel loops on torch's pool instead
# (lowering/threads.py); TVM's own pool is kept to one thread, for the case where that launcher cannot
# be built, unless the user sets TVM_NUM_THREADS.
os.environ.setdefault("TVM_NUM_THREADS", "1")

_ALIGN = 64  # TVM kernels assume 64-byte aligned buffers


def compact(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() and t.data_ptr() % _ALIGN == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


class TVMKernel(torch.nn.Module):
    """One region of the graph, compiled by TVM; called in place of the region's eager submodule."""

    def __init__(self, fn, tensor_inputs: list[int], single_output: bool, name: str, sym_sources=(),
                 out_layouts=(), out_strides=()):
        super().__init__()
        self.fn, self.tensor_inputs, self.single_output, self.kernel_name = fn, tensor_inputs, single_output, name
        self.sym_sources = list(sym_sources)  # (tensor input, dim, divisor) per symbolic size
        # per output: the memory order the kernel wrote it in (None: contiguous), so that the caller gets
        # the strides eager would have produced; and eager's strides where they are neither (restrided copy)
        self.inverse = [None if p is None else [p.index(d) for d in range(len(p))] for p in out_layouts]
        self.inverse = self.inverse if any(p is not None for p in self.inverse) else None
        self.restride = list(out_strides) if any(s is not None for s in out_strides) else None

    def forward(self, *args):
        tensors = [compact(args[i]) for i in self.tensor_inputs]
        if self.sym_sources:
            sizes = tvm_ffi.Shape(tuple(tensors[k].shape[d] // c for k, d, c in self.sym_sources))
            out = self.fn(*tensors, sizes)
        else:
            out = self.fn(*tensors)
        outs = [o if isinstance(o, torch.Tensor) else torch.from_dlpack(o) for o in out]
        if self.inverse is not None:
            outs = [o if inv is None else o.permute(inv) for o, inv in zip(outs, self.inverse)]
        if self.restride is not None:
            outs = [o if st is None else torch.empty_strided(o.shape, st, dtype=o.dtype).copy_(o)
                    for o, st in zip(outs, self.restride)]
        return outs[0] if self.single_output else tuple(outs)

    def extra_repr(self) -> str:
        return f"tvm:{self.kernel_name}"

"""Indexing: index_select, gather, embedding, advanced indexing."""
from __future__ import annotations

import torch
from tvm import relax

from ..rules import Unsupported, lowers

aten = torch.ops.aten


@lowers(aten.index_select.default)
def _index_select(cv, node, x, dim, index):
    return relax.op.take(x, index, int(dim) % node.meta["val"].dim())


@lowers(aten.gather.default)
def _gather(cv, node, x, dim, index, *, sparse_grad=False):
    return relax.op.gather_elements(x, index, int(dim) % node.meta["val"].dim())


@lowers(aten.embedding.default)
def _embedding(cv, node, weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    # "clip", not "fast": an id past the vocabulary must not read outside the table (eager raises there)
    return relax.op.take(weight, indices, axis=0, mode="clip")


@lowers(aten.index.Tensor)
def _index(cv, node, x, indices):
    # Advanced indexing (Hugging Face builds attention masks with padding_mask[batch_idx, kv_idx]).
    if any(i is None for i in indices):
        present = [k for k, i in enumerate(indices) if i is not None]
        if len(present) != 1:
            raise Unsupported("index with None between several index tensors")
        # "wrap": negative indices count from the end, as in torch; none reads outside x
        return relax.op.take(x, cv.cast(indices[present[0]], "int64"), axis=present[0], mode="wrap")
    return relax.op.index_tensor(x, relax.Tuple([cv.cast(i, "int64") for i in indices]))

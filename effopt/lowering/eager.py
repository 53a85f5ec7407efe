"""effopt's TVM kernels called from eager PyTorch, for custom ops whose PyTorch reference is too slow to
run a model with.

L-Mul's reference (`effopt.ops.lmul_attention_ref`) does every product of both N x M x D contractions as
a separate integer tensor op: about 3.5 s per attention of DINOv2 at batch 8, minutes per forward. The
eager forward of `effopt::lmul_attention` (what the accuracy guard, `effopt.reparameterize`'s fine-tuning
and any un-lowered graph run) calls the same TVM kernel that the lowering uses instead, compiled once per
input signature in this process. The reference stays the oracle: the lowering's self-check runs it under
`effopt.ops.reference_kernels()`, and tests compare this path with it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading

import torch

from . import threads
from .cache import default_dir
from .runtime import compact

_lock = threading.Lock()
_compiled: dict[tuple, object] = {}


def build_function(emit_body, *param_types, target="host"):
    """One Relax function `emit_body(bb, *params)` over tensors of `param_types` ((shape, dtype) each),
    compiled alone into a callable taking and returning tensors, its parallel loops on torch's OpenMP
    threads as in compiled graphs (for the eager path here, and for kernel tests and benchmarks)."""
    import tvm
    from tvm import relax

    from ..autotune.targets import resolve_target
    from .build import build_module

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(list(shape), dtype)) for i, (shape, dtype) in
              enumerate(param_types)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(emit_body(bb, *params))
        bb.emit_func_output(out)
    executable = build_module(bb.get(), resolve_target(target))
    build_dir = tempfile.mkdtemp(prefix="effopt-eager-")
    try:
        lib_path = os.path.join(build_dir, "lib.so")
        executable.export_library(lib_path)
        module = tvm.runtime.load_module(lib_path)
        launch = threads.launcher(os.path.join(default_dir(), "runtime"))
        if launch is not None:
            threads.attach(lib_path, launch)
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)  # the loaded library stays mapped
    return relax.VirtualMachine(module, tvm.cpu())["main"]


def _compile(key, emit_body, *param_types):
    """`build_function`, cached in this process by `key`."""
    fn = _compiled.get(key)
    if fn is not None:
        return fn
    with _lock:
        if key not in _compiled:
            _compiled[key] = build_function(emit_body, *param_types)
        return _compiled[key]


def lmul_attention(q, k, v, mask, scale: float, mantissa_bits: int) -> torch.Tensor:
    """L-Mul attention of float32 CPU tensors q [B, H, N, D], k [B, H, M, D], v [B, H, M, Dv] with an optional
    mask (boolean, True: attend, or additive float32) broadcastable to [B, H, N, M]; out [B, H, N, Dv]."""
    from .kernels import lmul

    from ..ops import additive_mask

    tensors = [compact(t) for t in (q, k, v)]
    if mask is not None:
        tensors.append(compact(additive_mask(mask).to(torch.float32)))
    types = tuple((tuple(t.shape), "float32") for t in tensors)
    key = ("lmul_attention", types, float(scale), int(mantissa_bits))

    def body(bb, q, k, v, mask=None):
        return lmul.emit(bb, q, k, v, mask, float(scale), int(mantissa_bits))

    fn = _compile(key, body, *types)
    return torch.from_dlpack(fn(*tensors))


def clear() -> None:
    """Forget the compiled kernels (tests)."""
    with _lock:
        _compiled.clear()

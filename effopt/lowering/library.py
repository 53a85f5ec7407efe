"""The library bridge: ops that run on vendor library kernels (MKL/oneDNN through torch's own kernels).

TVM's untuned GEMM/conv schedules lose to MKL by an order of magnitude on CPU, so these ops are not
lowered: they stay calls into torch's kernels inside the compiled program, and the TVM regions around
them exchange tensors with them through DLPack without copies. A tuned TVM schedule can replace one of
them only where it is measured faster (the autotune stage).
"""
import operator

import torch

from .. import ops as _effopt_ops  # noqa: F401 - registers torch.ops.effopt.*
from ..ops.spec import specs

aten = torch.ops.aten

LIBRARY_OPS = frozenset({
    aten._int_mm.default,  # int8 GEMM, int32 accumulation (oneDNN VNNI): the quantize pass's linears
    aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default,
    aten.convolution.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default, aten.scaled_dot_product_attention.default,
    # torch's fused fast paths for nn.TransformerEncoderLayer / nn.MultiheadAttention in inference
    aten._transformer_encoder_layer_fwd.default, aten._native_multi_head_attention.default,
}) | {s.op for s in specs() if s.library}  # effopt's ops that torch runs (declared in effopt/ops/)

# Zero-cost in torch (they make views); in TVM they cost nothing only when fused into a compute kernel,
# so a region made only of these is not worth a kernel.
VIEW_OPS = frozenset({
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default, aten.transpose.int,
    aten.t.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.unbind.int, aten.alias.default,
    operator.getitem,
})


def is_symbolic_scalar_op(node) -> bool:
    """sym_size and Python arithmetic on SymInts: shape bookkeeping, not tensor compute."""
    if node.target in (aten.sym_size.int, aten.sym_stride.int, aten.sym_numel.default):
        return True
    val = node.meta.get("val")
    return not isinstance(node.target, torch._ops.OpOverload) and not isinstance(val, torch.Tensor) \
        and node.target is not operator.getitem


# ---- GEMM kernel choice -------------------------------------------------------------------------------
# torch ships two fp32 GEMM libraries: MKL (aten.addmm) and oneDNN (mkldnn._linear_pointwise, which also
# fuses a GELU/ReLU epilogue). Which is faster depends on shape and CPU (oneDNN was ~12% faster on every
# ViT-S/MiniLM linear on a Zen 4), so each distinct shape is timed once per compile.
EPILOGUES = {aten.gelu.default: "gelu", aten.relu.default: "relu"}


def onednn_supported() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn_weight(w: torch.Tensor, m: int) -> torch.Tensor:
    """The weight [N, K] in oneDNN's blocked layout for M rows (reordered once at compile time, as
    Inductor's freezing does: 3-4% faster per call than the plain layout on Zen 3/4/5), or plain where
    oneDNN cannot reorder it."""
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), m)
    except (RuntimeError, AttributeError):
        return w.contiguous()


def linear_parts(gm, node):
    """(x, weight [N, K] constant tensor, bias node or None) for addmm/mm with a frozen weight, else None."""
    import torch.fx as fx

    if node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        bias, x, wt = node.args
    elif node.target is aten.mm.default:
        (x, wt), bias = node.args, None
    else:
        return None
    if not isinstance(wt, fx.Node) or wt.op != "get_attr" or (bias is not None and bias.op != "get_attr"):
        return None
    w = getattr(gm, wt.target).t()  # the graph holds t(W); oneDNN takes W as [N, K]
    if w.dim() != 2 or (bias is not None and getattr(gm, bias.target).dim() != 1):
        return None
    return x, w, bias


def _epilogue(node):
    """The activation that is the GEMM's only consumer (through at most one view), to fuse into it."""
    users = list(node.users)
    if len(users) != 1:
        return None, None
    u = users[0]
    view = None
    if u.target in (aten.view.default, aten._unsafe_view.default) and len(u.users) == 1:
        view, u = u, next(iter(u.users))
    exact_gelu = u.target is aten.gelu.default and u.kwargs.get("approximate", "none") == "none" and len(u.args) == 1
    if exact_gelu or (u.target is aten.relu.default and len(u.args) == 1):
        return u, view
    return None, None


def select_gemm_kernels(gm, decisions: dict) -> list[dict]:
    """Rewrite frozen-weight GEMMs to oneDNN where measured faster; returns one record per distinct shape.

    `decisions` maps "MxNxK:dtype:epilogue" to a measured Choice; shapes not in it are timed and added."""
    from .select import check_and_time, concrete

    if not onednn_supported():
        return []
    gen = torch.Generator().manual_seed(0)
    records = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        parts = linear_parts(gm, node)
        if parts is None:
            continue
        x, w, bias = parts
        xval = x.meta["val"]
        if xval.dtype not in (torch.float32, torch.bfloat16) or w.dtype != xval.dtype:
            continue
        act, view = _epilogue(node)
        attr = EPILOGUES[act.target] if act is not None else "none"
        m = xval.shape[0]
        key = (m.node.hint if isinstance(m, torch.SymInt) else int(m), *w.shape, str(xval.dtype), attr)
        dkey = "{}x{}x{}:{}:{}".format(*key)
        b = getattr(gm, bias.target) if bias is not None else None
        if dkey not in decisions:
            xin = concrete(xval, gen)
            wt = w.t()  # the original [K, N] view, as the graph passed it to addmm

            def reference(x_, w_=wt, b_=b, act_=act):
                y = torch.addmm(b_, x_, w_) if b_ is not None else torch.mm(x_, w_)
                return act_.target(y) if act_ is not None else y

            def onednn(x_, w_=_onednn_weight(w, key[0]), b_=b, attr_=attr):
                return torch.ops.mkldnn._linear_pointwise(x_, w_, b_, attr_, [], "none" if attr_ == "gelu" else "")

            decisions[dkey] = check_and_time(onednn, reference, [xin], force=False)
        c = decisions[dkey]
        records.setdefault(key, {"shape (M,N,K)": key[:3], "dtype": key[3], "epilogue": key[4],
                                 "kernel": "onednn" if c.use_candidate else "mkl", "onednn_us": c.candidate_us,
                                 "mkl_us": c.baseline_us, "uses": 0})["uses"] += 1
        if not c.use_candidate:
            continue
        from ..graph import add_constant

        w_node = add_constant(gm, _onednn_weight(w, key[0]), node, "onednn_w")
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                         (x, w_node, bias, attr, [], "none" if attr == "gelu" else ""))
        new.meta = dict((act if act is not None and view is None else node).meta)
        if act is None:
            node.replace_all_uses_with(new)
        elif view is None:
            act.replace_all_uses_with(new)
            gm.graph.erase_node(act)
        else:
            view.args = (new, *view.args[1:])
            act.replace_all_uses_with(view)
            gm.graph.erase_node(act)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return list(records.values())

LIBRARY_OPS = LIBRARY_OPS | {torch.ops.mkldnn._linear_pointwise.default} if onednn_supported() else LIBRARY_OPS


# ---- lowering step 1, library choice: each frozen-weight GEMM on MKL or oneDNN, whichever measured faster --------
def choose_library(gm, options, record) -> None:
    """The GEMMs' MKL/oneDNN choices (remembered per target in the decision store), and the library calls
    the graph then makes, counted in the record."""
    from .cache import DecisionStore
    from .select import Choice

    store = DecisionStore(options.cache_dir, record.target) if options.cache else None
    saved = store.load("gemm") if store else {}
    try:
        decisions = {k: Choice.from_json(v) for k, v in saved.items()}
    except (KeyError, TypeError, ValueError, AttributeError):
        decisions = {}
    record.gemms = select_gemm_kernels(gm, decisions)
    if store and decisions.keys() - saved.keys():
        store.save("gemm", {k: v.to_json() for k, v in decisions.items()})
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in LIBRARY_OPS:
            name = n.target._opname if isinstance(n.target, torch._ops.OpOverload) else str(n.target)
            record.library_calls[name] = record.library_calls.get(name, 0) + 1

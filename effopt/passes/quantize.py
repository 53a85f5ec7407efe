"""Int8 post-training quantization (the `quantize` option): frozen linear layers become

    (xq, step) = effopt::quantize_rows(x, scale)        per-token (dynamic) or calibrated (static) scale
    acc        = aten._int_mm(xq, wq^T)                  int8 GEMM, int32 accumulation (torch: oneDNN VNNI)
    y          = float(acc) * (step * w_step) + bias     per-output-channel symmetric weights

layer by layer under the accuracy guard. The quantizer lowers to effopt's TVM kernel and the dequantize,
bias and what follows (GELU, residual add) fuse into the next TVM region; the GEMM is a library call.

    mode    'dynamic' ("int8-dynamic"): activation scales per token at run time;
            'static' ("int8"): one scale per layer input, max|x| / 127 over the calibration inputs.
    layers  'all' (every linear with a frozen float32 weight) or 'mlp' (as shift_add).
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass

import torch
import torch.fx as fx

from .. import int8_ops
from .records import PassRecord
from ..options import check_parameters

aten = torch.ops.aten
MODES = ("static", "dynamic")
_ALIASES = {"int8": "static", "int8-dynamic": "dynamic"}


@dataclass(frozen=True)
class QuantConfig:
    mode: str = "dynamic"
    """'dynamic' (per-token activation scales) or 'static' (calibrated per-tensor scales)."""
    layers: str = "all"
    """'all' or 'mlp'."""

    @classmethod
    def parse(cls, value) -> "QuantConfig":
        if isinstance(value, QuantConfig):
            return value
        given = value
        if isinstance(value, str):
            value = {"mode": _ALIASES.get(value, value)} if value in _ALIASES else None
        if not isinstance(value, dict):
            raise ValueError(f"quantize={given!r} is invalid; valid: {list(_ALIASES)} or a dict {{'mode': "
                             "'static'|'dynamic', 'layers': 'all'|'mlp'}")
        check_parameters("quantize", value, ("mode", "layers"))
        cfg = cls(**value)
        if cfg.mode not in MODES:
            raise ValueError(f"quantize mode={cfg.mode!r}; valid: {list(MODES)}")
        if cfg.layers not in ("all", "mlp"):
            raise ValueError(f"quantize layers={cfg.layers!r}; valid: ['all', 'mlp']")
        return cfg

    def __str__(self) -> str:
        return f"int8({self.mode}, {self.layers})"


def _call(gm: fx.GraphModule, target, args, before: fx.Node, kwargs=None) -> fx.Node:
    """A new node target(*args, **kwargs) before `before`, with its fake value."""
    from .approximate import _fake

    with gm.graph.inserting_before(before):
        n = gm.graph.call_function(target, tuple(args), kwargs or {})
    if target is operator.getitem:
        n.meta["val"] = args[0].meta["val"][args[1]]
    elif target is aten._to_copy.default:
        n.meta["val"] = args[0].meta["val"].to(kwargs["dtype"])
    else:
        n.meta["val"] = _fake(target, args)
    return n


def _dequantize(gm: fx.GraphModule, acc: fx.Node, scale: fx.Node, bias, before: fx.Node) -> list[fx.Node]:
    """float(acc) * scale (+ bias): the nodes added, the result last."""
    accf = _call(gm, aten._to_copy.default, (acc,), before, {"dtype": torch.float32})
    out = [accf, _call(gm, aten.mul.Tensor, (accf, scale), before)]
    if bias is not None:
        out.append(_call(gm, aten.add.Tensor, (out[-1], bias), before))
    return out


class Int8Rewriter:
    """Applies and reverts the int8 form of each linear site (effopt.passes.shift_add.LinearSite)."""

    def __init__(self, gm: fx.GraphModule, scales: dict | None):
        self.gm, self.scales = gm, scales or {}

    def apply(self, site) -> None:
        from .constant_fold import add_constant

        wq, w_step = int8_ops.quantize_weight(site.weight)
        at = site.node
        wq_t = add_constant(self.gm, wq.t().contiguous(), at, "int8_w")
        ws = add_constant(self.gm, w_step, at, "int8_ws")
        q = _call(self.gm, torch.ops.effopt.quantize_rows.default, (site.x, self.scales.get(site.name)), at)
        xq, step = _call(self.gm, operator.getitem, (q, 0), at), _call(self.gm, operator.getitem, (q, 1), at)
        acc = _call(self.gm, aten._int_mm.default, (xq, wq_t), at)
        scale = _call(self.gm, aten.mul.Tensor, (step, ws), at)
        added = [wq_t, ws, q, xq, step, acc, scale, *_dequantize(self.gm, acc, scale, site.bias, at)]
        y = added[-1]
        y.meta.update({k: v for k, v in site.node.meta.items() if k != "val"})
        site.node.replace_all_uses_with(y, propagate_meta=False)
        site.new, site.added = y, added
        self.gm.recompile()

    def revert(self, site) -> None:
        from .shift_add import undo_rewrite

        undo_rewrite(self.gm, site)


def calibrate_scales(gm: fx.GraphModule, sites, calibration) -> dict[str, float]:
    """Static scales: max|x| / 127 of each site's input over the calibration inputs."""
    wanted = {s.x: s.name for s in sites}
    amax: dict[str, float] = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                amax[wanted[n]] = max(amax.get(wanted[n], 0.0), float(out.abs().max()))
            return out

    with torch.no_grad():
        for args in calibration:
            Rec(gm).run(*args)
    return {name: max(a, 1e-12) / int8_ops.QMAX for name, a in amax.items()}


def quantize(gm: fx.GraphModule, config: QuantConfig, calibration, budget, metric) -> PassRecord:
    """The `quantize` option: gm's linear layers as int8, guarded on the calibration inputs."""
    from ..guard import guarded_apply
    from .dce import DeadCodeElimination
    from .manager import count_nodes
    from .shift_add import ShiftConfig, linear_sites

    t0 = time.perf_counter()
    record = PassRecord("quantize_int8", nodes_before=count_nodes(gm))
    sites = [s for s in linear_sites(gm, ShiftConfig(config.layers)) if s.conv is None and not s.trained]
    if config.mode == "static" and not calibration:
        raise ValueError("quantize='int8' (static activation scales) needs calibration data: pass "
                         "options={'calibration': [inputs, ...]}, or use quantize='int8-dynamic'")
    scales = calibrate_scales(gm, sites, calibration) if config.mode == "static" else None
    rewriter = Int8Rewriter(gm, scales)
    guard = guarded_apply(lambda args: gm(*args), sites, rewriter.apply, rewriter.revert, calibration, budget,
                          metric, f"quantize={config}")
    DeadCodeElimination()(gm)
    kept = [s for s in sites if s.new is not None]
    for s in kept:
        record.add_match(s.node)
    before = sum(4 * s.weight.numel() for s in kept)
    after = sum(s.weight.numel() + 4 * s.weight.shape[0] for s in kept)
    record.notes.append(guard.summary())
    if kept:
        record.notes.append(f"{len(kept)} int8 layer(s); weights {before / 2 ** 20:.2f} -> {after / 2 ** 20:.2f} MB")
    record.guard = guard
    record.seconds = time.perf_counter() - t0
    record.nodes_after = count_nodes(gm)
    return record





# ---- graphs already quantized with PT2E (torchao prepare_pt2e / convert_pt2e) ------------------------------
def pt2e_int8(gm: fx.GraphModule) -> PassRecord:
    """Linears of a PT2E-quantized graph, dequantize_per_tensor(quantize_per_tensor(x)) @
    dequantize_per_channel(wq)^T (+ bias), run as real int8: effopt::quantize_affine (PT2E's own rounding,
    uint8 shifted into int8) -> torch._int_mm with wq -> + (128 - zero_point) * sum_k wq (the shift's
    compensation, exact in int32) -> float * (scale * w_scale) + bias. PT2E's eager graph computes the same
    integers in float after dequantizing, so the results agree within float rounding."""
    from .constant_fold import add_constant
    from .dce import DeadCodeElimination
    from .manager import count_nodes
    from .shift_add import _VIEWS, attr

    qd = torch.ops.quantized_decomposed
    t0 = time.perf_counter()
    record = PassRecord("pt2e_int8", nodes_before=count_nodes(gm))
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            bias, x, wt = node.args
        elif node.target is aten.mm.default:
            (x, wt), bias = node.args, None
        else:
            continue
        views, dq = [], x
        while isinstance(dq, fx.Node) and dq.op == "call_function" and dq.target in _VIEWS and len(dq.users) == 1:
            views.append(dq)
            dq = dq.args[0]
        if not (isinstance(dq, fx.Node) and dq.target is qd.dequantize_per_tensor.default):
            continue
        q = dq.args[0]
        if not (isinstance(q, fx.Node) and q.target is qd.quantize_per_tensor.default) \
                or tuple(q.args[1:6]) != tuple(dq.args[1:6]) or q.args[5] not in (torch.uint8, torch.int8):
            continue
        scale, zp, qmin, qmax = float(q.args[1]), int(q.args[2]), int(q.args[3]), int(q.args[4])
        if not (isinstance(wt, fx.Node) and wt.target in (aten.t.default, aten.permute.default)):
            continue
        dqw = wt.args[0]
        if not (isinstance(dqw, fx.Node) and dqw.target is qd.dequantize_per_channel.default):
            continue
        wq_n, ws_n, wzp_n, axis = dqw.args[:4]
        if axis != 0 or not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in (wq_n, ws_n, wzp_n)):
            continue
        wq, ws, wzp = (attr(gm, a.target) for a in (wq_n, ws_n, wzp_n))
        if wq.dtype != torch.int8 or wq.dim() != 2 or bool(wzp.ne(0).any()):
            continue
        xi = _call(gm, torch.ops.effopt.quantize_affine.default, (q.args[0], scale, zp, qmin, qmax), node)
        for v in reversed(views):
            xi = _call(gm, v.target, (xi, *v.args[1:]), node)
        shift = 128 if qmax > 127 else 0
        acc = _call(gm, aten._int_mm.default, (xi, add_constant(gm, wq.t().contiguous(), node, "pt2e_w")), node)
        comp = ((shift - zp) * wq.to(torch.int32).sum(dim=1)).to(torch.int32)
        if bool(comp.ne(0).any()):
            acc = _call(gm, aten.add.Tensor, (acc, add_constant(gm, comp, node, "pt2e_comp")), node)
        step = add_constant(gm, (scale * ws.to(torch.float64)).to(torch.float32), node, "pt2e_s")
        y = _dequantize(gm, acc, step, bias, node)[-1]
        node.replace_all_uses_with(y, propagate_meta=False)
        record.add_match(node)
    if record.matches:
        DeadCodeElimination()(gm)
        record.notes.append(f"{record.matches} PT2E-quantized linear(s) run as int8 GEMMs")
    gm.graph.lint()
    gm.recompile()
    record.seconds = time.perf_counter() - t0
    record.nodes_after = count_nodes(gm)
    return record


def has_pt2e_ops(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "namespace", None) == "quantized_decomposed"
               for n in gm.graph.nodes)
__all__ = ["QuantConfig", "Int8Rewriter", "quantize", "calibrate_scales", "pt2e_int8", "has_pt2e_ops", "MODES"]

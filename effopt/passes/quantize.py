"""Int8 post-training quantization (the `quantize` option): frozen linear layers become one op,

    y = effopt::int8_linear(x)   quantize (per token, or a calibrated per-tensor scale), int8 GEMM with
                                 int32 accumulation, float(acc) * (step * w_step) + bias, then the
                                 activation (ReLU, GELU) and residual add that follow it, fused in

layer by layer under the accuracy guard, weights int8 per output channel (symmetric). It lowers to one TVM
kernel on AVX-512 VNNI (lowering/kernels/int8.py), measured per shape against its torch form (torch's int8
GEMM, oneDNN). Layers with a number of outputs that is not a multiple of 16, and every layer with
fuse=False, stay as effopt::quantize_rows (TVM) -> aten._int_mm (library) -> dequantize (TVM), where
torch's int8 GEMM is exact and fast on this CPU (int8_ops.int_mm_usable); elsewhere they stay float32.

    mode    'dynamic' ("int8-dynamic"): activation scales per token at run time;
            'static' ("int8"): one scale per layer input, max|x| / 127 over the calibration inputs.
    layers  'all' (every linear with a frozen float32 weight) or 'mlp' (as shift_add).
    fuse    True (default) or False.
"""
from __future__ import annotations

import operator
import time

import torch
import torch.fx as fx

from ..ops import int8 as int8_ops
from ..graph import fake_call
from ..ops.spec import spec_of
from .guarded import GuardedPass
from .records import PassRecord
from ..options.quantize import MODES, QuantConfig

aten = torch.ops.aten
def _call(gm: fx.GraphModule, target, args, before: fx.Node, kwargs=None) -> fx.Node:
    """A new node target(*args, **kwargs) before `before`, with its fake value."""

    with gm.graph.inserting_before(before):
        n = gm.graph.call_function(target, tuple(args), kwargs or {})
    if target is operator.getitem:
        n.meta["val"] = args[0].meta["val"][args[1]]
    elif target is aten._to_copy.default:
        n.meta["val"] = args[0].meta["val"].to(kwargs["dtype"])
    else:
        n.meta["val"] = fake_call(target, args)
    return n


def _dequantize(gm: fx.GraphModule, acc: fx.Node, scale: fx.Node, bias, before: fx.Node) -> list[fx.Node]:
    """float(acc) * scale (+ bias): the nodes added, the result last."""
    accf = _call(gm, aten._to_copy.default, (acc,), before, {"dtype": torch.float32})
    out = [accf, _call(gm, aten.mul.Tensor, (accf, scale), before)]
    if bias is not None:
        out.append(_call(gm, aten.add.Tensor, (out[-1], bias), before))
    return out


_RESHAPES = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
INT8_LINEAR = torch.ops.effopt.int8_linear.default
INT8 = spec_of(INT8_LINEAR)  # its arguments by name


def int8_linear(gm: fx.GraphModule, x: fx.Node, wq: torch.Tensor, w_step: torch.Tensor, bias, scale,
                quant: tuple[int, int, int], before: fx.Node, smooth: torch.Tensor | None = None) \
        -> list[fx.Node] | None:
    """effopt::int8_linear(x) with wq [N, K] packed for VNNI: the nodes added (the result last), or None
    where N is not a multiple of 16. `quant` is the activations' (offset, lo, hi) as uint8; `smooth` the
    per-input-channel factor x is multiplied by before quantization (SmoothQuant's 1 / s)."""
    from ..graph import add_constant

    if wq.shape[0] % 16:
        return None
    offset, lo, hi = quant
    packed, wsum = int8_ops.pack_weight(wq, offset)
    consts = [add_constant(gm, packed, before, "int8_w"), add_constant(gm, wsum, before, "int8_wsum"),
              add_constant(gm, w_step.to(torch.float32), before, "int8_ws")]
    if smooth is not None:
        consts.append(add_constant(gm, smooth.to(torch.float32), before, "int8_smooth"))
    out_scale, out_offset, out_lo, out_hi = None, *int8_ops.SYMMETRIC
    y = _call(gm, INT8_LINEAR, INT8.arguments(
        x=x, packed=consts[0], wsum=consts[1], w_step=consts[2], bias=bias, scale=scale, offset=offset, lo=lo, hi=hi,
        in_features=wq.shape[1], activation="none", residual=None, smooth=consts[3] if smooth is not None else None,
        out_scale=out_scale, out_offset=out_offset, out_lo=out_lo, out_hi=out_hi), before)
    return [*consts, y]


_EPILOGUES = {aten.relu.default: "relu", aten.gelu.default: "gelu"}


def _epilogue(cur: fx.Node):
    """(reshapes, op) that follow cur, each the only user of the one before, or None (fuse_epilogues and
    fold_requantize look through the same reshapes)."""
    views, u = [], cur
    while len(u.users) == 1:
        (nxt,) = u.users
        if nxt.target not in _RESHAPES:
            return views, nxt
        views.append(nxt)
        u = nxt
    return None


def fuse_epilogues(gm: fx.GraphModule) -> dict[str, int]:
    """Each int8_linear takes in the elementwise ops that follow it alone (through reshapes, which they
    commute with): an activation (ReLU, GELU), then a residual add of a tensor of the same shape. Returns
    the counts fused."""
    counts = {"activation": 0, "residual": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not INT8_LINEAR:
            continue
        cur = node
        for kind in ("activation", "residual"):
            found = _epilogue(cur)
            if found is None:
                break
            views, u = found
            last = views[-1] if views else cur
            args = INT8.bind(cur)
            if kind == "activation":
                approx = u.kwargs.get("approximate", "none")
                if u.target not in _EPILOGUES or len(u.args) != 1 or set(u.kwargs) - {"approximate"} \
                        or approx not in ("none", "tanh"):
                    continue
                args["activation"] = "gelu_tanh" if approx == "tanh" else _EPILOGUES[u.target]
            else:
                if u.target is not aten.add.Tensor or u.kwargs or len(u.args) != 2:
                    break
                other = u.args[1] if u.args[0] is last else u.args[0]
                val = getattr(other, "meta", {}).get("val")
                if other is last or not isinstance(val, torch.Tensor) or val.shape != last.meta["val"].shape \
                        or val.dtype != torch.float32:
                    break
                args["residual"] = _call(gm, aten.reshape.default, (other, list(cur.meta["val"].shape)), u) \
                    if views else other
            new = _call(gm, INT8_LINEAR, INT8.arguments(**args), u)
            new.meta.update({k: v for k, v in cur.meta.items() if k != "val"})
            out = new
            for v in views:  # the same reshapes, after the fused op
                out = _call(gm, v.target, (out, *v.args[1:]), u)
            u.replace_all_uses_with(out, propagate_meta=False)
            for dead in [u, *reversed(views), cur]:
                gm.graph.erase_node(dead)
            cur = new
            counts[kind] += 1
    gm.graph.lint()
    gm.recompile()
    return counts


def fold_requantize(gm: fx.GraphModule) -> int:
    """An int8_linear whose only consumer (through reshapes) is another int8_linear with a static scale:
    the float result that the second quantizes again (a dequantize -> quantize pair) becomes the first
    kernel's uint8 output, requantized with the second's scale and offset, and the second skips its
    quantizer. Returns the number of pairs folded."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not INT8_LINEAR or INT8.bind(node)["out_scale"] is not None:
            continue
        found = _epilogue(node)
        if found is None:
            continue
        views, nxt = found
        u = views[-1] if views else node
        if nxt.target is not INT8_LINEAR:
            continue
        a, b = INT8.bind(node), INT8.bind(nxt)
        if b["x"] is not u or b["scale"] is None or b["smooth"] is not None:
            continue
        # the first's output quantized as the second quantizes its input (its scale, offset and range)
        a.update(out_scale=b["scale"], out_offset=b["offset"], out_lo=b["lo"], out_hi=b["hi"])
        first = _call(gm, INT8_LINEAR, INT8.arguments(**a), node)
        first.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        x = first
        for v in views:  # the same reshapes, on the uint8 values
            x = _call(gm, v.target, (x, *v.args[1:]), nxt)
        second = _call(gm, INT8_LINEAR, INT8.arguments(**{**b, "x": x}), nxt)
        second.meta.update({k: v for k, v in nxt.meta.items() if k != "val"})
        nxt.replace_all_uses_with(second, propagate_meta=False)
        for dead in [nxt, *reversed(views), node]:
            gm.graph.erase_node(dead)
        folded += 1
    gm.graph.lint()
    gm.recompile()
    return folded


class Int8Rewriter:
    """Applies and reverts the int8 form of each linear site (effopt.passes.shift_add.LinearSite); with
    SmoothQuant configured, `retry` turns a site over budget into its smoothed form."""

    def __init__(self, gm: fx.GraphModule, stats: dict | None, fuse: bool = True, smooth: float | None = None,
                 static: bool = False, mixed: bool = False, activations: str = "int8"):
        self.gm, self.stats, self.fuse, self.alpha, self.static = gm, stats or {}, fuse, smooth, static
        # per-token activations of the fused op: symmetric int8, or uint7 with a zero point (TOKEN_AFFINE)
        self.token_quant = int8_ops.TOKEN_AFFINE if activations == "uint7" else int8_ops.SYMMETRIC
        self.mixed = mixed  # static layers over budget are retried with dynamic (per-token) scales
        self.smoothed: set[str] = set()
        self.dynamic: set[str] = set()  # mixed: the layers that went dynamic

    def _weights(self, site):
        """(wq, w_step, smooth, scale) of the site, in its plain or smoothed form."""
        w, amax = site.weight.detach().to(torch.float32), self.stats.get(site.name)
        smooth = None
        if site.name in self.smoothed:  # SmoothQuant: s_j = max|x_j|^a / max|w_j|^(1-a); x / s, w * s
            s = (amax.clamp_min(1e-5) ** self.alpha / w.abs().amax(dim=0).clamp_min(1e-5) ** (1 - self.alpha))
            w, smooth = w * s, (1.0 / s).to(torch.float32)
            amax = amax * smooth  # max|x_j / s_j|: the maximum commutes with a positive factor
        wq, w_step = int8_ops.quantize_weight(w)
        static = self.static and site.name not in self.dynamic
        scale = max(float(amax.max()), 1e-12) / int8_ops.QMAX if static else None
        return wq, w_step, smooth, scale

    def retry(self, site) -> bool:
        """A layer over budget in a more careful form: SmoothQuant (where configured), then (mode 'mixed')
        dynamic activation scales."""
        smooth = self.alpha is not None and site.name not in self.smoothed and not site.weight.shape[0] % 16 \
            and self.fuse
        dynamic = self.mixed and site.name not in self.dynamic
        if not (smooth or dynamic):
            return False
        self.revert(site)
        (self.smoothed if smooth else self.dynamic).add(site.name)
        self.apply(site)
        return True

    def apply(self, site) -> None:
        from ..graph import add_constant

        wq, w_step, smooth, scale = self._weights(site)
        at = site.node
        quant = self.token_quant if scale is None else int8_ops.SYMMETRIC
        fused = int8_linear(self.gm, site.x, wq, w_step, site.bias, scale, quant, at, smooth) if self.fuse else None
        if fused is not None:
            added = fused
        else:  # output channels not a multiple of 16: quantizer, torch's int8 GEMM, dequantization
            wq_t = add_constant(self.gm, wq.t().contiguous(), at, "int8_w")
            ws = add_constant(self.gm, w_step, at, "int8_ws")
            q = _call(self.gm, torch.ops.effopt.quantize_rows.default, (site.x, scale), at)
            xq, step = _call(self.gm, operator.getitem, (q, 0), at), _call(self.gm, operator.getitem, (q, 1), at)
            acc = _call(self.gm, aten._int_mm.default, (xq, wq_t), at)
            sc = _call(self.gm, aten.mul.Tensor, (step, ws), at)
            added = [wq_t, ws, q, xq, step, acc, sc, *_dequantize(self.gm, acc, sc, site.bias, at)]
        y = added[-1]
        y.meta.update({k: v for k, v in site.node.meta.items() if k != "val"})
        if fused is not None:  # where the target's int8 kernel loses to the float32 layer, that runs
            y.meta["float_form"] = int8_ops.FloatLinear(site.weight)
        site.node.replace_all_uses_with(y, propagate_meta=False)
        site.new, site.added = y, added
        self.gm.recompile()

    def revert(self, site) -> None:
        from .shift_add import undo_rewrite

        undo_rewrite(self.gm, site)


def calibrate(gm: fx.GraphModule, sites, calibration) -> dict[str, torch.Tensor]:
    """max|x| per input channel [K] of each site's input over the calibration inputs."""
    wanted = {s.x: s.name for s in sites}
    amax: dict[str, torch.Tensor] = {}

    class Rec(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                a = out.detach().abs().reshape(-1, out.shape[-1]).amax(dim=0).to(torch.float32)
                name = wanted[n]
                amax[name] = torch.maximum(amax[name], a) if name in amax else a
            return out

    with torch.no_grad():
        for args in calibration:
            Rec(gm).run(*args)
    return amax


class QuantizePass(GuardedPass):
    """The `quantize` option: gm's linear layers as int8, guarded; a layer over budget is retried as
    SmoothQuant where configured."""

    name = "quantize"

    def record_name(self) -> str:
        return "quantize_int8"

    def sites(self, gm, record):
        from ..options.shift_add import ShiftConfig
        from .shift_add import linear_sites

        config, calibration = self.config, self.ctx.calibration
        if config.mode in ("static", "mixed") and not calibration:
            raise ValueError("quantize='int8' (static activation scales) needs calibration data: pass "
                             "options={'calibration': [inputs, ...]}, or use quantize='int8-dynamic'")
        if config.smooth is not None and not calibration:
            raise ValueError("quantize smooth (SmoothQuant) needs calibration data for the activation ranges: pass "
                             "options={'calibration': [inputs, ...]}")
        sites = [s for s in linear_sites(gm, ShiftConfig(config.layers)) if s.conv is None and not s.trained]
        self.library = int8_ops.int_mm_usable()
        self.unfusable = [s for s in sites if not config.fuse or s.weight.shape[0] % 16] if self.library else []
        return [s for s in sites if s not in self.unfusable]

    def rewriter(self, gm, sites, record):
        config = self.config
        stats = calibrate(gm, sites, self.ctx.calibration) if config.mode != "dynamic" or config.smooth is not None \
            else None
        return Int8Rewriter(gm, stats, config.fuse, config.smooth, config.mode != "dynamic", config.mode == "mixed",
                            config.activations)

    def finish(self, gm, sites, rewriter, guard, record):
        from .dce import DeadCodeElimination

        config = self.config
        DeadCodeElimination()(gm)
        kept = [s for s in sites if s.new is not None]
        fused = fuse_epilogues(gm)
        fused["requantize"] = fold_requantize(gm)
        for s in kept:
            record.add_match(s.node)
        before = sum(4 * s.weight.numel() for s in kept)
        after = sum(s.weight.numel() + 4 * s.weight.shape[0] for s in kept)
        record.notes.append(guard.summary())
        unfusable = self.unfusable
        if unfusable:
            record.notes.append(f"{len(unfusable)} layer(s) stay float32 ({', '.join(s.name for s in unfusable[:4])}"
                                f"{', ...' if len(unfusable) > 4 else ''}): their int8 form is torch's int8 GEMM "
                                f"({'fuse=False' if not config.fuse else 'outputs not a multiple of 16'}), and "
                                f"{self.library}")
        if kept:
            bound = [INT8.bind(n) for n in gm.graph.nodes if n.target is INT8_LINEAR]
            one, affine = len(bound), sum(1 for b in bound if int8_ops.token_zero_point(b["scale"], b["lo"]))
            record.notes.append(f"{len(kept)} int8 layer(s); weights {before / 2 ** 20:.2f} -> {after / 2 ** 20:.2f} MB; "
                                f"{one} as one quantize-GEMM-dequantize kernel"
                                + (f" ({affine} with uint7 per-token activations, zero point per token)" if affine
                                   else "")
                                + (f" with {fused['activation']} activation(s) and {fused['residual']} residual add(s) "
                                   f"fused in; {fused['requantize']} dequantize-quantize pair(s) folded into a "
                                   "requantize" if config.fuse else " (fuse off)"))
        smoothed = [s.name for s in kept if s.name in rewriter.smoothed]
        if smoothed:
            record.notes.append(f"SmoothQuant (alpha {config.smooth:g}) on {len(smoothed)} layer(s) over budget as "
                                f"plain int8: {', '.join(smoothed)}")
        if config.mode == "mixed":
            dyn = [s.name for s in kept if s.name in rewriter.dynamic]
            record.notes.append(f"mixed: {len(kept) - len(dyn)} layer(s) with static activation scales, {len(dyn)} "
                                f"dynamic (over budget as static){': ' + ', '.join(dyn) if dyn else ''}")
        return gm


# ---- graphs already quantized with PT2E (torchao prepare_pt2e / convert_pt2e) ------------------------------
def pt2e_int8(gm: fx.GraphModule) -> PassRecord:
    """Linears of a PT2E-quantized graph, dequantize_per_tensor(quantize_per_tensor(x)) @
    dequantize_per_channel(wq)^T (+ bias), run as real int8: effopt::quantize_affine (PT2E's own rounding,
    uint8 shifted into int8) -> torch._int_mm with wq -> + (128 - zero_point) * sum_k wq (the shift's
    compensation, exact in int32) -> float * (scale * w_scale) + bias. PT2E's eager graph computes the same
    integers in float after dequantizing, so the results agree within float rounding."""
    from ..graph import add_constant
    from .dce import DeadCodeElimination
    from .manager import count_nodes
    from ..graph import VIEWS as _VIEWS, attr

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
        shift = 128 if qmax > 127 else 0
        xf = q.args[0]  # the float input, in the GEMM's shape
        for v in reversed(views):
            xf = _call(gm, v.target, (xf, *v.args[1:]), node)
        # as uint8 for VNNI: PT2E's q (uint8), or its int8 q + 128
        fused = int8_linear(gm, xf, wq, ws.to(torch.float32), bias, scale,
                            (zp + 128 - shift, qmin + 128 - shift, qmax + 128 - shift), node)
        if fused is not None:
            y = fused[-1]
        elif int8_ops.int_mm_usable() is not None:  # PT2E's own dequantize + float GEMM stays
            record.notes.append(f"{node.name} stays as PT2E's float form: {int8_ops.int_mm_usable()}")
            continue
        else:
            xi = _call(gm, torch.ops.effopt.quantize_affine.default, (xf, scale, zp, qmin, qmax), node)
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
        fused = fuse_epilogues(gm)
        folded = fold_requantize(gm)
        record.notes.append(f"{record.matches} PT2E-quantized linear(s) run as int8 GEMMs; "
                            f"{fused['activation']} activation(s) and {fused['residual']} residual add(s) fused in; "
                            f"{folded} dequantize-quantize pair(s) folded into a requantize")
    gm.graph.lint()
    gm.recompile()
    record.seconds = time.perf_counter() - t0
    record.nodes_after = count_nodes(gm)
    return record


def has_pt2e_ops(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and getattr(n.target, "namespace", None) == "quantized_decomposed"
               for n in gm.graph.nodes)
__all__ = ["QuantConfig", "Int8Rewriter", "QuantizePass", "calibrate", "pt2e_int8", "has_pt2e_ops", "fold_requantize", "fuse_epilogues", "MODES"]

"""Shift/add reparameterization (the `shift_add` option): frozen linear layers become `effopt::shift_linear`
on power-of-two weights (effopt/ops/shift.py), layer by layer under the accuracy guard.

    layers  'mlp': the MLP's linears (a GEMM that feeds or is fed by an activation: GELU, ReLU, SiLU ...),
            as ShiftAddViT reparameterizes first; 'all': every linear with a frozen weight, and every 2-D
            convolution of one group (a linear on each patch; the float path). Grouped and transposed
            convolutions stay as they are, with the reason in the pass record.
    terms   powers of two per weight (1: 4 bits, 8x smaller than fp32; 2, 3: more precision).
    activation_bits  0: the float path (x * 2^-e on exponent bits); 8 or 4: MatShift's integer path.

A graph from `effopt.reparameterize(..., shift_add=...)` already carries `shift_weight` (and `act_quant`)
ops on its trained weights: those layers are converted with their own terms and bits, whatever `layers`
says, and without the guard (the user fine-tuned them for it).

The pass record lists each rewritten layer and its savings: multiplications removed per call, weight bytes
before and after, and an energy estimate from Horowitz's 45 nm per-operation figures (ISSCC 2014,
"Computing's energy problem"): fp32 multiply 3.7 pJ, fp32 add 0.9 pJ, int32 add 0.1 pJ. Assumptions: a
multiply-accumulate in fp32 costs a multiply and an add; a shift term of the float path an int32 add (the
exponent subtract) and an fp32 add (accumulation); of the integer path, a shift (counted as an int32 add)
and an int32 add. Memory traffic is not counted (it favours the packed weights further).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..ops import shift as so
from .guarded import GuardContext, GuardedPass
from ..graph import add_constant, attr, source_location, through_views
from ..ops.spec import spec_of
from ..options.shift_add import LAYERS, ShiftConfig

aten = torch.ops.aten

ENERGY_PJ = {"fp32_mul": 3.7, "fp32_add": 0.9, "int32_add": 0.1}
ENERGY_SOURCE = "Horowitz, ISSCC 2014, 45 nm"
ACTIVATIONS = {aten.gelu.default, aten.relu.default, aten.silu.default, aten.hardswish.default, aten.mish.default,
               aten.hardtanh.default, aten.relu6.default}
SHIFT_WEIGHT = torch.ops.effopt.shift_weight.default
ACT_QUANT = torch.ops.effopt.act_quant.default
SW, AQ = spec_of(SHIFT_WEIGHT), spec_of(ACT_QUANT)  # their arguments by name


@dataclass
class LinearSite:
    """One linear layer of the graph: `node` = addmm(bias, x, W^T) or mm(x, W^T) with W [N, K]."""

    node: fx.Node
    x: fx.Node
    wt: fx.Node  # the GEMM's weight operand
    weight: torch.Tensor  # [N, K], the frozen float weight (or the trained one under shift_weight)
    bias: fx.Node | None
    name: str
    terms: int
    bits: int
    trained: bool = False  # from effopt.reparameterize: shift_weight / act_quant in the graph
    conv: tuple | None = None  # a convolution's (kernel, stride, padding, dilation), each (h, w)
    new: fx.Node | None = None
    added: list = field(default_factory=list)  # the nodes the rewrite added, in creation order (erased by a revert)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(M tokens, N outputs, K inputs) per call (a convolution's tokens are its patches)."""
        if self.conv is None:
            m = self.x.meta["val"].shape[0]
            return (m.node.hint if isinstance(m, torch.SymInt) else int(m), *self.weight.shape)
        out = self.node.meta["val"].shape
        return (int(out[0]) * int(out[2]) * int(out[3]), *self.weight.shape)


def module_path(node: fx.Node) -> str | None:
    """The module that made `node`, as its attribute path in the user's model (e.g. 'encoder.layer.0.fc1')."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    path = re.sub(r"^L\['[^']*'\]\.?", "", path)
    path = re.sub(r"_modules\['([^']*)'\]", r"\1", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).strip(".") or None


def is_mlp(site_node: fx.Node, x: fx.Node) -> bool:
    """An MLP linear: its output goes (through views) into an activation, or its input comes from one."""
    after = through_views(site_node, True)
    before = through_views(x, False)
    return (after is not None and after.target in ACTIVATIONS) or before.target in ACTIVATIONS


def _weight(gm, wt: fx.Node) -> tuple[torch.Tensor, int | None] | None:
    """(W [N, K], trained terms or None) of a GEMM's right operand: a frozen W^T, t(W) (an exported
    module's parameter), or t(shift_weight(W)) (trained by effopt.reparameterize)."""
    if wt.op == "get_attr":
        w = attr(gm, wt.target)
        return (w.t(), None) if w.dim() == 2 else None
    if wt.op == "call_function" and wt.target in (aten.t.default, aten.permute.default, aten.transpose.int):
        w = wt.args[0]
        if isinstance(w, fx.Node) and w.op == "get_attr" and attr(gm, w.target).dim() == 2:
            return attr(gm, w.target), None
        if isinstance(w, fx.Node) and w.target is SHIFT_WEIGHT:
            b = SW.bind(w)
            if b["weight"].op == "get_attr" and attr(gm, b["weight"].target).dim() == 2:
                return attr(gm, b["weight"].target), int(b["terms"])
    return None


def _conv_site(gm, node: fx.Node, config: ShiftConfig | None, skipped: list) -> LinearSite | None:
    """A 2-D convolution of one group with a frozen weight (or one trained under shift_weight)."""
    x, w, b, stride, padding, dilation, transposed, _, groups = node.args
    name = module_path(node) or source_location(node) or node.name
    trained = isinstance(w, fx.Node) and w.target is SHIFT_WEIGHT
    bound = SW.bind(w) if trained else None
    wnode = bound["weight"] if trained else w
    if not trained and (config is None or config.layers != "all"):
        return None
    if not isinstance(wnode, fx.Node) or wnode.op != "get_attr" or (b is not None and b.op != "get_attr"):
        return None
    weight, xval = attr(gm, wnode.target), x.meta.get("val")
    if weight.dim() != 4 or not isinstance(xval, torch.Tensor) or xval.dim() != 4 or xval.dtype != torch.float32:
        return None
    if transposed or groups != 1 or any(not isinstance(d, int) for d in xval.shape):
        skipped.append(f"{name}: a {'transposed' if transposed else 'grouped' if groups != 1 else 'dynamic-shape'}"
                       " convolution stays in float (shift convolutions take one group, static shapes)")
        return None
    conv = (tuple(int(k) for k in weight.shape[2:]), tuple(stride), tuple(padding), tuple(dilation))
    return LinearSite(node, x, w, weight.detach().reshape(weight.shape[0], -1), b, name,
                      int(bound["terms"]) if trained else config.first_terms, 0, trained, conv=conv)


def linear_sites(gm: fx.GraphModule, config: ShiftConfig | None, skipped: list | None = None) -> list[LinearSite]:
    """The linear layers `config` selects, and every layer trained for shift weights (config None: only those).
    Why a layer that could have been chosen was not goes to `skipped`."""
    sites = []
    skipped = [] if skipped is None else skipped
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.convolution.default and len(node.args) == 9:
            site = _conv_site(gm, node, config, skipped)
            if site is not None:
                sites.append(site)
            continue
        if node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            bias, x, wt = node.args
            if not isinstance(bias, fx.Node) or bias.op != "get_attr" or attr(gm, bias.target).dim() != 1:
                continue
        elif node.target is aten.mm.default:
            (x, wt), bias = node.args, None
        else:
            continue
        if not isinstance(wt, fx.Node):
            continue
        found = _weight(gm, wt)
        xval = x.meta.get("val")
        if found is None or not isinstance(xval, torch.Tensor) or xval.dtype != torch.float32 or xval.dim() != 2:
            continue
        w, trained_terms = found
        if w.dtype != torch.float32:
            continue
        quant = through_views(x, False)
        trained_bits = int(AQ.bind(quant)["bits"]) if quant.op == "call_function" and quant.target is ACT_QUANT \
            else None
        trained = trained_terms is not None
        if not trained and (config is None or config.layers == "mlp" and not is_mlp(node, x)):
            continue
        name = module_path(node) or source_location(node) or node.name
        sites.append(LinearSite(node, x, wt, w.detach(), bias, name,
                                trained_terms if trained else config.first_terms,
                                trained_bits if trained_bits is not None else 0 if trained else config.activation_bits,
                                trained))
    return sites


class ShiftRewriter:
    """Applies and reverts the shift linear of each site; `finish()` erases what the rewrites left dead."""

    def __init__(self, gm: fx.GraphModule, escalate: bool = False):
        self.gm, self.escalate = gm, escalate

    def retry(self, site: LinearSite) -> bool:
        """terms='auto': a layer over budget again with one more power of two per weight (up to 3)."""
        if not self.escalate or site.trained or site.terms >= max(so.TERMS):
            return False
        self.revert(site)
        site.terms += 1
        self.apply(site)
        return True

    def _x(self, site: LinearSite) -> fx.Node:
        """The GEMM's input without a trained act_quant (the integer path quantizes itself)."""
        quant = through_views(site.x, False)
        if not (quant.op == "call_function" and quant.target is ACT_QUANT):
            return site.x
        if quant is site.x:
            return AQ.bind(quant)["x"]
        with self.gm.graph.inserting_before(site.node):
            view = self.gm.graph.call_function(aten.reshape.default,
                                               (AQ.bind(quant)["x"], list(site.x.meta["val"].shape)))
        view.meta = dict(site.x.meta)
        return view

    def apply(self, site: LinearSite) -> None:
        graph = self.gm.graph
        codes, scale = so.quantize(site.weight, site.terms)
        packed = add_constant(self.gm, so.pack(codes), site.node, "shift_w")
        scale_node = add_constant(self.gm, scale, site.node, "shift_s")
        x = self._x(site)
        reshaped = [x] if x is not site.x and x.op == "call_function" and x.target is aten.reshape.default else []
        with graph.inserting_before(site.node):
            if site.conv is not None:
                new = graph.call_function(torch.ops.effopt.shift_conv2d.default,
                                          (x, packed, scale_node, site.bias, *(list(v) for v in site.conv)))
            else:
                new = graph.call_function(torch.ops.effopt.shift_linear.default,
                                          (x, packed, scale_node, site.bias, int(site.weight.shape[1]), site.bits))
        new.meta = dict(site.node.meta)
        if not site.trained:  # where the shift kernel loses on the target, the float32 layer it replaced runs
            # (a layer trained for shift weights has no such layer: its eager form, a GEMM on the dequantized
            # power-of-two weights, is the float32 alternative the lowering already measures)
            new.meta["float_form"] = so.FloatShift(site.weight)
        site.node.replace_all_uses_with(new, propagate_meta=False)
        site.new, site.added = new, [packed, scale_node, *reshaped, new]
        self.gm.recompile()

    def revert(self, site: LinearSite) -> None:
        undo_rewrite(self.gm, site)

    def finish(self) -> None:
        from .dce import DeadCodeElimination

        DeadCodeElimination()(self.gm)  # the replaced GEMMs, their weights' transposes and constants


def undo_rewrite(gm: fx.GraphModule, site: LinearSite) -> None:
    """Revert a site's rewrite: its users go back to the original node, and the nodes the rewrite added
    (`site.added`, in creation order, the result among them) are erased, constants with them."""
    site.new.replace_all_uses_with(site.node)
    for n in reversed(site.added):
        if n.op == "get_attr":
            delattr(gm, n.target)
        gm.graph.erase_node(n)
    site.new, site.added = None, []
    gm.recompile()


class TrainableShift:
    """For `effopt.reparameterize`: each site's weight goes through `shift_weight` (and its input through
    `act_quant` for the integer path), straight-through, so the float weights fine-tune under the rounding;
    the backend converts those layers to shift_linear when it compiles the result."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm

    def apply(self, site: LinearSite) -> None:
        graph = self.gm.graph
        user, w = (site.node, site.wt) if site.conv is not None else (site.wt, site.wt.args[0])
        with graph.inserting_before(user):
            sw = graph.call_function(SHIFT_WEIGHT, (w, site.terms))
        sw.meta = dict(w.meta)
        user.replace_input_with(w, sw)
        site.added = [sw]
        if site.bits:
            with graph.inserting_before(site.node):
                aq = graph.call_function(ACT_QUANT, (site.x, site.bits))
            aq.meta = dict(site.x.meta)
            site.node.replace_input_with(site.x, aq)
            site.added.append(aq)
        site.new = sw
        self.gm.recompile()

    def revert(self, site: LinearSite) -> None:
        for n in site.added:
            n.replace_all_uses_with(n.args[0])
            self.gm.graph.erase_node(n)
        site.new, site.added = None, []
        self.gm.recompile()


# ---- savings ----------------------------------------------------------------------------------------------
def layer_savings(site: LinearSite) -> dict:
    """Per call of the layer: multiplications, weight bytes and estimated energy, before and after."""
    m, n, k = site.shape
    e = ENERGY_PJ
    macs = m * n * k
    if site.bits:  # shift + int32 accumulate per term; quantize each activation, scale each output twice
        after_pj = macs * site.terms * 2 * e["int32_add"] + (m * k + 2 * m * n) * e["fp32_mul"]
        mults_after = m * k + 2 * m * n
    else:  # exponent subtract + fp32 accumulate per term; one scale per output
        after_pj = macs * site.terms * (e["int32_add"] + e["fp32_add"]) + m * n * e["fp32_mul"]
        mults_after = m * n
    return {"layer": site.name, "tokens": m, "out": n, "in": k, "terms": site.terms,
            "activation_bits": site.bits, "multiplications_before": macs, "multiplications_after": mults_after,
            "weight_bytes_before": 4 * n * k, "weight_bytes_after": so.weight_bytes(n, k, site.terms),
            "energy_uj_before": macs * (e["fp32_mul"] + e["fp32_add"]) * 1e-6, "energy_uj_after": after_pj * 1e-6}


def savings_summary(layers: list[dict]) -> str:
    if not layers:
        return "no layer rewritten"
    tot = {k: sum(d[k] for d in layers) for k in layers[0] if k.endswith(("_before", "_after"))}
    return (f"multiplications {tot['multiplications_before']:,} -> {tot['multiplications_after']:,} per call "
            f"({1 - tot['multiplications_after'] / tot['multiplications_before']:.1%} removed); weights "
            f"{tot['weight_bytes_before'] / 2 ** 20:.2f} -> {tot['weight_bytes_after'] / 2 ** 20:.2f} MB "
            f"({tot['weight_bytes_before'] / tot['weight_bytes_after']:.1f}x smaller); arithmetic energy "
            f"{tot['energy_uj_before']:.1f} -> {tot['energy_uj_after']:.1f} uJ per call "
            f"({tot['energy_uj_before'] / tot['energy_uj_after']:.1f}x less; {ENERGY_SOURCE})")


def has_trained_layers(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target is SHIFT_WEIGHT for n in gm.graph.nodes)


class ShiftAddPass(GuardedPass):
    """The `shift_add` option: gm's linear layers with power-of-two weights, the untrained ones guarded;
    config None converts only the layers trained for it (effopt.reparameterize). `trainable`
    (reparameterize itself): the layers become TrainableShift's straight-through forms instead."""

    name = "shift_add"
    guard_without_sites = False

    def __init__(self, config: ShiftConfig | None, ctx: GuardContext, trainable: bool = False,
                 record_name: str | None = None):
        super().__init__(config, ctx)
        self.trainable, self._record_name = trainable, record_name

    def record_name(self) -> str:
        return self._record_name or "shift_add"

    def sites(self, gm, record):
        self.skipped: list[str] = []
        self.all_sites = linear_sites(gm, self.config, self.skipped)
        if self.trainable:
            return self.all_sites
        return [s for s in self.all_sites if not s.trained]

    def rewriter(self, gm, sites, record):
        if self.trainable:
            return TrainableShift(gm)
        rewriter = ShiftRewriter(gm, escalate=self.config is not None and self.config.terms == "auto")
        for s in self.all_sites:  # trained for shift weights: converted without a guard
            if s.trained:
                rewriter.apply(s)
        return rewriter

    def finish(self, gm, sites, rewriter, guard, record):
        if not self.trainable:
            rewriter.finish()
        kept = [s for s in self.all_sites if s.new is not None]
        for s in kept:
            record.add_match(s.node)
        record.layers = [layer_savings(s) for s in kept]
        trained = [s for s in self.all_sites if s.trained] if not self.trainable else []
        if trained:
            record.notes.append(f"{len(trained)} layer(s) trained by effopt.reparameterize converted")
        if guard is not None:
            record.notes.append(guard.summary())
        elif not self.all_sites:
            record.notes.append(f"no linear layer with a frozen float32 weight matches layers={self.config.layers!r}")
            import warnings

            warnings.warn(f"effopt: shift_add={self.config}: no linear layer with a frozen float32 weight matches; "
                          "nothing was rewritten (layers='all' takes every linear; training graphs keep live "
                          "weights)", UserWarning, stacklevel=2)
        record.notes.append(savings_summary(record.layers))
        record.notes += [f"skipped {w}" for w in self.skipped]
        gm.graph.lint()
        gm.recompile()
        return gm


__all__ = ["ShiftConfig", "LinearSite", "ShiftRewriter", "TrainableShift", "undo_rewrite", "attr", "linear_sites", "layer_savings", "savings_summary",
           "ShiftAddPass", "has_trained_layers", "module_path", "ENERGY_PJ", "LAYERS"]

"""BatchNorm folding for inference: conv/linear followed by eval-mode BatchNorm becomes one conv/linear.

CNNs (ResNet, MobileNet) put a BatchNorm after nearly every convolution; folding it into the frozen
weights removes a full pass over the activations per layer.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..graph import add_constant
from .constant_fold import constant_value
from .manager import GraphPass
from .records import PassRecord

aten = torch.ops.aten


def _bn_scale_shift(gm, bn: fx.Node):
    _, weight, bias, mean, var, _momentum, eps = bn.args
    mean, var = constant_value(gm, mean), constant_value(gm, var)
    weight = constant_value(gm, weight) if weight is not None else torch.ones_like(mean)
    bias = constant_value(gm, bias) if bias is not None else torch.zeros_like(mean)
    scale = weight * torch.rsqrt(var + eps)
    return scale, bias - mean * scale


def _foldable(bn: fx.Node) -> fx.Node | None:
    """The getitem(bn, 0) to replace, when every BN argument is a constant and only the output is used."""
    if any(isinstance(a, fx.Node) and a.op != "get_attr" for a in bn.args[1:5]):
        return None
    users = list(bn.users)
    if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
        return None
    return users[0]


class FoldBatchNorm(GraphPass):
    name = "fold_batchnorm"

    def apply(self, gm: fx.GraphModule, record: PassRecord) -> None:
        for bn in list(gm.graph.nodes):
            if bn.target is not aten._native_batch_norm_legit_no_training.default:
                continue
            out = _foldable(bn)
            producer = bn.args[0]
            if out is None or not isinstance(producer, fx.Node) or len(producer.users) != 1:
                continue
            if producer.target is aten.convolution.default:
                new = self._fold_conv(gm, producer, bn)
            elif producer.target in (aten.addmm.default, aten.mm.default):
                new = self._fold_linear(gm, producer, bn)
            else:
                continue
            if new is None:
                continue
            out.replace_all_uses_with(new)
            for n in (out, bn, producer):
                gm.graph.erase_node(n)
            record.add_match(bn)

    def _fold_conv(self, gm, conv: fx.Node, bn: fx.Node) -> fx.Node | None:
        x, w, b, stride, padding, dilation, transposed, output_padding, groups = conv.args
        if transposed or not isinstance(w, fx.Node) or w.op != "get_attr" or (b is not None and b.op != "get_attr"):
            return None
        weight = constant_value(gm, w)
        scale, shift = _bn_scale_shift(gm, bn)
        new_w = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
        new_b = shift if b is None else constant_value(gm, b) * scale + shift
        w_node, b_node = add_constant(gm, new_w, conv, "bn_w"), add_constant(gm, new_b, conv, "bn_b")
        with gm.graph.inserting_before(conv):
            new = gm.graph.call_function(aten.convolution.default,
                                         (x, w_node, b_node, stride, padding, dilation, transposed, output_padding, groups))
        new.meta = dict(conv.meta)
        return new

    def _fold_linear(self, gm, mm: fx.Node, bn: fx.Node) -> fx.Node | None:
        # aten form of nn.Linear: addmm(bias, x, t(W)); after constant folding t(W) is a constant.
        if mm.target is aten.addmm.default:
            b, x, wt = mm.args[:3]
            if mm.kwargs or len(mm.args) > 3 or b.op != "get_attr":
                return None
        else:
            (x, wt), b = mm.args, None
        if not isinstance(wt, fx.Node) or wt.op != "get_attr" or bn.meta["val"][0].dim() != 2:
            return None
        scale, shift = _bn_scale_shift(gm, bn)
        new_wt = constant_value(gm, wt) * scale[None, :]
        new_b = shift if b is None else constant_value(gm, b) * scale + shift
        w_node, b_node = add_constant(gm, new_wt, mm, "bn_w"), add_constant(gm, new_b, mm, "bn_b")
        with gm.graph.inserting_before(mm):
            new = gm.graph.call_function(aten.addmm.default, (b_node, x, w_node))
        new.meta = dict(mm.meta)
        return new

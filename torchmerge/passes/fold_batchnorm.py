"""FoldBatchNorm: fold an inference BatchNorm into the convolution or linear layer that feeds it.

For y = BN(conv(x, W, b)) with s = γ / sqrt(var + eps):  W' = W · s (per output channel),
b' = (b − mean) · s + β, so conv(x, W', b') = y up to rounding. Linear layers (addmm/mm with a constant
[in, out] weight) followed by BatchNorm1d fold the same way along the output columns.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.constants import add_constant
from ..graph.rewrite import RewriteRule, RuleTablePass
from ._match import const_value, is_op, linear_parts

aten = torch.ops.aten
BN_OPS = (aten._native_batch_norm_legit_no_training.default,)


def _pattern(node: fx.Node):
    """Anchor: getitem(bn(producer, γ, β, mean, var, momentum, eps), 0)."""
    if node.target is not operator.getitem or node.args[1] != 0 or not is_op(node.args[0], *BN_OPS):
        return None
    bn = node.args[0]
    producer, gamma, beta, mean, var = bn.args[:5]
    eps = bn.args[6]
    stats = [const_value(a) if a is not None else None for a in (gamma, beta, mean, var)]
    if stats[2] is None or stats[3] is None:
        return None
    return {"bn": bn, "producer": producer, "stats": stats, "eps": eps}


def _check(gm, node, match):
    producer = match["producer"]
    if len(producer.users) != 1:
        return f"'{producer.name}' has other users than the batch norm"
    if any(u is not node and u.users for u in match["bn"].users):
        return "batch-norm statistics outputs are used"
    if is_op(producer, aten.convolution.default):
        if const_value(producer.args[1]) is None or (producer.args[2] is not None and const_value(producer.args[2]) is None):
            return "convolution weight or bias is not a constant"
        if producer.args[6]:
            return "transposed convolution"
        return None
    if linear_parts(producer) is not None:
        return None if producer.meta["val"].dim() == 2 else "linear output is not 2-D"
    return f"'{producer.name}' is not a convolution or linear layer"


def _replace(gm, node, match):
    producer = match["producer"]
    gamma, beta, mean, var = match["stats"]
    scale = torch.rsqrt(var + match["eps"])
    if gamma is not None:
        scale = scale * gamma
    shift = -mean * scale + (beta if beta is not None else 0)
    if is_op(producer, aten.convolution.default):
        w = const_value(producer.args[1])
        b = const_value(producer.args[2]) if producer.args[2] is not None else None
        new_w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
        new_b = shift if b is None else b * scale + shift
        args = list(producer.args)
        args[1] = add_constant(gm, new_w, producer.name + "_w_bn", before=producer)
        args[2] = add_constant(gm, new_b, producer.name + "_b_bn", before=producer)
        with gm.graph.inserting_before(producer):
            new = gm.graph.call_function(aten.convolution.default, tuple(args))
    else:
        x, wt, b = linear_parts(producer)
        new_wt = add_constant(gm, wt * scale, producer.name + "_w_bn", before=producer)
        new_b = add_constant(gm, shift if b is None else b * scale + shift, producer.name + "_b_bn", before=producer)
        with gm.graph.inserting_before(producer):
            new = gm.graph.call_function(aten.addmm.default, (new_b, x, new_wt))
    new.meta.update({k: v for k, v in producer.meta.items() if k != "val"})
    new.meta["val"] = node.meta["val"]
    return new


@dataclass(frozen=True)
class FoldBatchNorm(RuleTablePass):
    """Fold inference batch norms into the preceding convolution / linear layer."""

    name = "fold_batchnorm"

    def rules(self):
        return [RewriteRule("conv_or_linear_bn", _pattern, _replace, _check)]

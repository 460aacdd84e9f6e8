"""FoldLoRA: merge LoRA adapters applied at run time into the base weight, W' = W + Σₐ sₐ · Bₐ Aₐ.

Matches  add(base, branch)  where base = mm/addmm(x, Wᵀ[, b]) with a constant weight and
branch = [mul(·, s)] of mm(mm(x, Aᵀ), Bᵀ) (views around the matmuls allowed, as ATen's decomposition of
3-D linear layers produces) reading the same x. Each application removes one adapter; the driver repeats,
so several adapters on one layer fold one after another. Rounding differs from the unfolded graph
(one matmul instead of three), which is the usual LoRA-merge trade.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.constants import add_constant
from ..graph.rewrite import RewriteRule, RuleTablePass
from ._match import const_value, is_op, linear_parts, scalar_value, strip_views

aten = torch.ops.aten


def _lora_branch(node):
    """(x, delta_t) for [mul(s)] ∘ mm(mm(x, Aᵀ), Bᵀ), delta_t = s · Aᵀ Bᵀ  ([in, out]); else None."""
    scale = 1.0
    node = strip_views(node)
    if is_op(node, aten.mul.Tensor) and scalar_value(node.args[1]) is not None:
        scale, node = scalar_value(node.args[1]), strip_views(node.args[0])
    if not is_op(node, aten.mm.default):
        return None
    bt = const_value(node.args[1])
    inner = strip_views(node.args[0])
    if bt is None or not is_op(inner, aten.mm.default):
        return None
    at = const_value(inner.args[1])
    if at is None:
        return None
    return strip_views(inner.args[0]), (at @ bt) * scale, [node, inner]


def _pattern(node: fx.Node):
    if not is_op(node, aten.add.Tensor) or len(node.args) != 2 or node.kwargs:
        return None
    for base_side, branch_side in ((0, 1), (1, 0)):
        base = node.args[base_side]
        linear = strip_views(base)
        parts = linear_parts(linear)
        branch = _lora_branch(node.args[branch_side]) if isinstance(node.args[branch_side], fx.Node) else None
        if parts is None or branch is None:
            continue
        if strip_views(parts[0]) is branch[0]:
            return {"base": base, "linear": linear, "parts": parts, "delta_t": branch[1], "chain": branch[2]}
    return None


def _check(gm, node, match):
    linear, base = match["linear"], match["base"]
    if len(linear.users) != 1 or len(base.users) != 1:
        return f"base linear '{linear.name}' has other users"
    if match["delta_t"].shape != match["parts"][1].shape:
        return f"adapter shape {tuple(match['delta_t'].shape)} != weight {tuple(match['parts'][1].shape)}"
    if node.meta["val"].shape != base.meta["val"].shape:
        return "adapter output broadcasts against the base output"
    return None


def _replace(gm, node, match):
    linear = match["linear"]
    x, wt, b = match["parts"]
    new_wt = add_constant(gm, wt + match["delta_t"].to(wt.dtype), linear.name + "_lora", before=linear)
    args = (x, new_wt) if b is None else (linear.args[0], x, new_wt)
    with gm.graph.inserting_before(linear):
        new = gm.graph.call_function(linear.target, args)
    new.meta.update(linear.meta)
    linear.replace_all_uses_with(new)
    gm.graph.erase_node(linear)
    return new if match["base"] is linear else match["base"]


@dataclass(frozen=True)
class FoldLoRA(RuleTablePass):
    """Fold run-time LoRA branches (any number per layer) into their base linear weights."""

    name = "fold_lora"

    def rules(self):
        return [RewriteRule("linear_plus_lora", _pattern, _replace, _check)]

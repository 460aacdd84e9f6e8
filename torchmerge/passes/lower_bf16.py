"""LowerBF16: run the nodes a PrecisionPlan marks `bf16` in bfloat16, keeping fp32 at their boundaries.

Each covered node gets its floating inputs cast to bf16 (constant casts fold away in a later
FoldConstants) and its floating outputs cast back to the original dtype, so neighbours are unaffected.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.pass_base import GraphPass, PassResult
from ..precision.plan import PrecisionPlan

aten = torch.ops.aten


def _cast(gm: fx.GraphModule, value: fx.Node, dtype: torch.dtype) -> fx.Node:
    node = gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
    node.meta["nn_module_stack"] = value.meta.get("nn_module_stack")
    return node


def _is_float(value) -> bool:
    return isinstance(value, torch.Tensor) and value.dtype in (torch.float32, torch.float16, torch.float64)


@dataclass(frozen=True)
class LowerBF16(GraphPass):
    """Cast lowering for plan entries of kind bf16."""

    plan: PrecisionPlan
    name = "lower_bf16"

    def call(self, gm: fx.GraphModule) -> PassResult:
        targets = self.plan.targets(gm, "bf16")
        for node in targets:
            with gm.graph.inserting_before(node):
                def lower(a):
                    return _cast(gm, a, torch.bfloat16) if _is_float(a.meta.get("val")) else a
                node.args, node.kwargs = fx.node.map_arg((node.args, node.kwargs), lower)
            outputs = [u for u in node.users if u.target is operator.getitem] if isinstance(
                node.meta.get("val"), (tuple, list)) else [node]
            for out in outputs:
                if not _is_float(out.meta.get("val")):
                    continue
                dtype = out.meta["val"].dtype
                with gm.graph.inserting_after(out):
                    back = _cast(gm, out, dtype)
                out.replace_all_uses_with(back, delete_user_cb=lambda u: u is not back)
                back.meta["val"] = out.meta["val"]
            _refresh_vals(node)
        if targets:
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, bool(targets))


def _refresh_vals(node: fx.Node) -> None:
    """The lowered node and its getitems now produce bf16: drop their stale meta so the pipeline re-derives it."""
    node.meta.pop("val", None)
    for user in node.users:
        if user.target is operator.getitem:
            user.meta.pop("val", None)

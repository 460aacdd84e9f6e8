"""LowerLMul: run the matrix products a PrecisionPlan marks lmul(m, l) with L-Mul multiplications.

L-Mul (Luo & Sun 2024, arXiv 2410.00907) replaces each fp32 product by an integer addition of bit patterns
(semantics: torchmerge/ops/lmul.py). Lowered forms, per ATen node:
  mm(a, b)            → torchmerge.lmul_matmul(a, b, m, l)                 (linear layers, 2-D products)
  addmm(c, a, b)      → lmul_matmul(a, b, m, l) + c                         (bias added in fp32 after)
  bmm(a, b)           → sum_k torchmerge.lmul(a[..., :, :, None], b[..., None, :, :], m, l)
The bmm form (attention's Q·Kᵀ and P·V) broadcasts to [B, M, K, N] and sums over K with torch's own
summation order, so it is not bit-identical to lmul_matmul's sequential sum, and its memory grows with
M·K·N: meant for the short sequences of sentence encoders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.pass_base import GraphPass, NodeError, PassResult
from ..precision.plan import PrecisionPlan

aten = torch.ops.aten


def _ops():
    from .. import ops  # noqa: F401  (registers torch.ops.torchmerge.*)

    return torch.ops.torchmerge


def _lower(gm: fx.GraphModule, node: fx.Node, m: int, l: int) -> fx.Node:
    tm = _ops()
    g = gm.graph
    if node.target is aten.mm.default:
        return g.call_function(tm.lmul_matmul.default, (node.args[0], node.args[1], m, l))
    if node.target is aten.addmm.default:
        if node.kwargs or len(node.args) > 3:
            raise NodeError(node, "lmul lowers addmm only with beta = alpha = 1")
        product = g.call_function(tm.lmul_matmul.default, (node.args[1], node.args[2], m, l))
        return g.call_function(aten.add.Tensor, (product, node.args[0]))
    if node.target is aten.bmm.default:
        a = g.call_function(aten.unsqueeze.default, (node.args[0], -1))
        b = g.call_function(aten.unsqueeze.default, (node.args[1], -3))
        products = g.call_function(tm.lmul.default, (a, b, m, l))
        return g.call_function(aten.sum.dim_IntList, (products, [-2]))
    raise NodeError(node, f"lmul has no lowering for {node.target}; valid: aten.mm, aten.addmm, aten.bmm")


@dataclass(frozen=True)
class LowerLMul(GraphPass):
    """Lower plan entries of kind lmul (linear and activation × activation products)."""

    plan: PrecisionPlan
    name = "lower_lmul"

    def call(self, gm: fx.GraphModule) -> PassResult:
        targets = self.plan.targets(gm, "lmul")
        for node in targets:
            if node.meta["val"].dtype != torch.float32:
                raise NodeError(node, f"lmul needs float32 operands, got {node.meta['val'].dtype}; valid: float32")
            prec = targets[node]
            with gm.graph.inserting_before(node):
                new = _lower(gm, node, prec.m, prec.l)
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        if targets:
            gm.recompile()
        return PassResult(gm, bool(targets))

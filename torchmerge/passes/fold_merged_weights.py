"""FoldMergedWeights: turn weights computed at run time as base + Σ λᵢ·τᵢ into one constant per weight.

A merged model (e.g. torchmerge.merge.functional's module, or hand-written task arithmetic) computes each
weight from constants in forward. This pass evaluates exactly those arithmetic subgraphs — the same ATen
ops in the same order as the graph, hence bit-identical (0.0 difference in fp32) to the eagerly merged
weight — and leaves every other constant computation (transposes, dequantisation) to FoldConstants.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from .fold_constants import FoldConstants

aten = torch.ops.aten

MERGE_OPS = frozenset({
    aten.add, aten.sub, aten.mul, aten.div, aten.sum, aten.mean, aten.stack, aten.cat, aten.clone, aten.lerp,
    aten._to_copy, aten.view, aten.reshape, aten._unsafe_view, aten.expand, aten.unsqueeze, aten.squeeze,
    aten.select, aten.unbind, aten.alias, aten.lift_fresh_copy, aten.detach, aten.sign, aten.abs, aten.where,
    aten.gt, aten.ge, aten.lt, aten.eq, aten.scalar_tensor, aten.full_like, aten.zeros_like, operator.getitem,
})


@dataclass(frozen=True)
class FoldMergedWeights(FoldConstants):
    """FoldConstants restricted to the arithmetic that weight merging uses (MERGE_OPS)."""

    ops: frozenset | None = MERGE_OPS
    name = "fold_merged_weights"

"""DeadCodeElimination: drop nodes whose results are never used, then the constants nobody reads.

Folding leaves the inputs of folded subgraphs (e.g. every task vector τᵢ) dead; removing their attributes
too is what actually frees their memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from ..graph.constants import remove_unused_attributes
from ..graph.pass_base import GraphPass, PassResult


@dataclass(frozen=True)
class DeadCodeElimination(GraphPass):
    """Remove unused pure nodes (fx's impurity rules) and unreferenced tensor attributes."""

    name = "dce"

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = gm.graph.eliminate_dead_code()
        removed = remove_unused_attributes(gm)
        if changed:
            gm.recompile()
        return PassResult(gm, bool(changed or removed))

"""LowerLUT: run linear layers a PrecisionPlan marks lut(bits, group) as T-MAC table-lookup matmuls.

Weights are quantised per group of `group` inputs to `bits` bits and packed once, here at compile time
(torchmerge.ops.lut_pack.pack_lut_weights); the packed codes, scales and zero points become graph
constants read by torchmerge.lut_linear (T-MAC, Wei et al. 2024, arXiv 2407.00088). Only linear nodes
(mm / addmm with a constant weight) are lowered; the fp32 weight constant is dropped by DCE afterwards.
With `clip_search`, each group's range is shrunk by the ratio r ∈ CLIP_RATIOS that minimises the
group's squared weight error Σ (w − deq(q(clip(w, r·lo, r·hi))))² before packing (round-to-nearest with
min/max ranges wastes levels on outliers at 4 bits and below).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.constants import add_constant
from ..graph.pass_base import GraphPass, NodeError, PassResult
from ..precision.plan import PrecisionPlan
from ._match import linear_parts

aten = torch.ops.aten
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(9))  # 1.0 … 0.6


def clip_to_best_range(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """w [N, K] with every group clipped to the range ratio that minimises its quantisation error."""
    from ..ops.lut_pack import quantize_groups

    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
    if symmetric:
        lo = torch.minimum(lo, -hi)
        hi = -lo
    best, best_err = wg, None
    for r in CLIP_RATIOS:
        clipped = torch.maximum(torch.minimum(wg, r * hi), r * lo)
        q, s, z = quantize_groups(clipped.reshape(n, k), bits, group, symmetric)
        deq = (q.reshape(n, -1, group).float() - z[..., None]) * s[..., None]
        err = (deq - wg).pow(2).sum(-1, keepdim=True)
        if best_err is None:
            best, best_err = clipped, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, clipped, best), torch.minimum(err, best_err)
    return best.reshape(n, k)


def _schema_names() -> list[str]:
    return [a.name for a in torch.ops.torchmerge.lut_linear.default._schema.arguments]


@dataclass(frozen=True)
class LowerLUT(GraphPass):
    """Lower plan entries of kind lut: pack weights once, call torchmerge.lut_linear."""

    plan: PrecisionPlan
    symmetric: bool = False
    int8_tables: bool = False
    clip_search: bool = True
    name = "lower_lut"

    def call(self, gm: fx.GraphModule) -> PassResult:
        from ..ops import lut as lut_ops  # registers torch.ops.torchmerge.lut_linear

        resolved = self.plan.resolve(gm)
        targets = [n for n in gm.graph.nodes if n.name in resolved and resolved[n.name].kind == "lut"]
        for node in targets:
            prec = resolved[node.name]
            parts = linear_parts(node)
            if parts is None:
                raise NodeError(node, "lut lowers only linear layers (mm/addmm with a constant weight)")
            x, wt, bias = parts
            in_features = wt.shape[0]
            if in_features % prec.group:
                raise NodeError(node, f"{prec} needs in_features divisible by group {prec.group}, got "
                                      f"{in_features}; valid groups: multiples of 4 dividing {in_features}")
            w = wt.t().contiguous().float()
            if self.clip_search:
                w = clip_to_best_range(w, prec.bits, prec.group, self.symmetric)
            packed = lut_ops.pack_lut_weights(w, prec.bits, prec.group, self.symmetric)
            consts = [add_constant(gm, t, f"{node.name}_lut_{what}", before=node) if t is not None else None
                      for t, what in ((packed.qweight, "q"), (packed.scales, "scales"), (packed.zeros, "zeros"))]
            if "out_features" in _schema_names():  # the op takes N explicitly (padding hides it in qweight)
                consts.append(w.shape[0])
            bias_node = add_constant(gm, bias.reshape(-1).float(), f"{node.name}_lut_bias", before=node) \
                if bias is not None else None
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(torch.ops.torchmerge.lut_linear.default,
                                             (x, *consts, prec.bits, prec.group, self.int8_tables, bias_node))
            new.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
        if targets:
            gm.recompile()
        return PassResult(gm, bool(targets))

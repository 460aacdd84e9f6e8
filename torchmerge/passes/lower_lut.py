"""LowerLUT: run linear layers a PrecisionPlan marks lut(bits, group) as T-MAC table-lookup matmuls.

Weights are quantised per group of `group` inputs to `bits` bits and packed once, here at compile time
(torchmerge.ops.lut_pack.pack_lut_weights); the packed codes, scales and zero points become graph
constants read by torchmerge.lut_linear (T-MAC, Wei et al. 2024, arXiv 2407.00088). Only linear nodes
(mm / addmm with a constant weight) are lowered; the fp32 weight constant is dropped by DCE afterwards.
With `clip_search`, each group's range is shrunk by the ratio r ∈ lut_calibrate.CLIP_RATIOS minimising the
group's squared weight error Σ (w − deq(q(clip(w, r·lo, r·hi))))² before packing (round-to-nearest with
min/max ranges wastes levels on outliers at 4 bits and below).

With `calibration` (batches of graph inputs in placeholder order, as passes.calibrate.Calibrate takes),
the weights are quantised for the layer's *output* instead (torchmerge/passes/lut_calibrate.py): the graph
runs once in fp32 to collect each linear input's Gram matrix XᵀX and mean |x|; linears sharing an input
get one AWQ scale s per input channel (exponent searched on the output error), the weight W·diag(s) is
quantised by GPTQ (`method="gptq"`) or round-to-nearest (`"awq"`) on per-group grids clipped for output
error, and one `x · (1/s)` multiply feeds them. Still packed once, here; the LUT op is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.constants import add_constant
from ..graph.pass_base import GraphPass, NodeError, PassResult
from ..precision.plan import PrecisionPlan
from ._match import linear_parts, strip_views
from .calibrate import batches_digest
from .lut_calibrate import clip_candidates, collect_stats, quantize_shared_input

aten = torch.ops.aten


def clip_to_best_range(w: torch.Tensor, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """w [N, K] with every group clipped to the range ratio that minimises its quantisation error."""
    from ..ops.lut_pack import quantize_groups

    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    best, best_err = wg, None
    for flat in clip_candidates(w, group, symmetric):
        q, s, z = quantize_groups(flat, bits, group, symmetric)
        clipped = flat.reshape(n, -1, group)
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


METHODS = ("gptq", "awq")


@dataclass(frozen=True, eq=False)
class LowerLUT(GraphPass):
    """Lower plan entries of kind lut: pack weights once, call torchmerge.lut_linear."""

    plan: PrecisionPlan
    symmetric: bool = False
    int8_tables: bool = False
    clip_search: bool = True
    calibration: tuple = ()  # batches of graph inputs; empty: weight-only rounding (clip search)
    method: str = "gptq"  # with calibration: gptq | awq
    name = "lower_lut"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"lower_lut: method={self.method!r}; valid: {', '.join(METHODS)}")

    def options(self) -> dict:
        return {**super().options(), "calibration": batches_digest(self.calibration)}

    def call(self, gm: fx.GraphModule) -> PassResult:
        from ..ops import lut as lut_ops  # registers torch.ops.torchmerge.lut_linear

        targets = self.plan.targets(gm, "lut")
        parts = {}
        for node in targets:
            prec = targets[node]
            parts[node] = linear_parts(node)
            if parts[node] is None:
                raise NodeError(node, "lut lowers only linear layers (mm/addmm with a constant weight)")
            in_features = parts[node][1].shape[0]
            if in_features % prec.group:
                raise NodeError(node, f"{prec} needs in_features divisible by group {prec.group}, got "
                                      f"{in_features}; valid groups: multiples of 4 dividing {in_features}")
        calibrated = self._calibrate(gm, targets, parts) if self.calibration and targets else {}
        for node in targets:
            prec = targets[node]
            x, wt, bias = parts[node]
            w = wt.t().contiguous().float()
            if node in calibrated:
                x, packed = calibrated[node]
            else:
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

    def _calibrate(self, gm, targets, parts) -> dict:
        """{node: (scaled input node, LutWeights)}: calibrated codes, one x·(1/s) node per shared input."""
        from ..ops.lut_pack import LutWeights, pack_codes, to_blocks

        shared: dict = {}  # linears reading one value (through views) with one precision share a scale
        for node in targets:
            shared.setdefault((strip_views(parts[node][0]), targets[node]), []).append(node)
        first = {key: min((parts[n][0] for n in nodes), key=_order(gm)) for key, nodes in shared.items()}
        stats = collect_stats(gm, list(set(first.values())), self.calibration)
        out = {}
        for key, nodes in shared.items():
            prec, x = key[1], first[key]
            gram, absmean = stats[x]
            ws = [parts[n][1].t().contiguous().float() for n in nodes]
            act, codes = quantize_shared_input(ws, gram, absmean, prec.bits, prec.group, self.symmetric,
                                               self.clip_search, self.method)
            same_shape = len({tuple(parts[n][0].meta["val"].shape) if "val" in parts[n][0].meta else None
                              for n in nodes}) == 1
            for i, n in enumerate(nodes):
                xi = x if same_shape else parts[n][0]
                if i == 0 or not same_shape:
                    dtype = xi.meta["val"].dtype if "val" in xi.meta else torch.float32
                    with gm.graph.inserting_after(xi):
                        scaled = gm.graph.call_function(aten.mul.Tensor, (xi, xi))
                    inv = add_constant(gm, (1 / act).to(dtype), f"{n.name}_lut_inv_scale", before=scaled)
                    scaled.args = (xi, inv)
                q, s, z = codes[i]
                packed = LutWeights(pack_codes(q.long(), prec.bits), to_blocks(s),
                                    None if self.symmetric else to_blocks(z), q.shape[0])
                out[n] = (scaled, packed)
        return out


def _order(gm):
    index = {n: i for i, n in enumerate(gm.graph.nodes)}
    return index.__getitem__

"""Layer swapping.

Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language Models",
https://arxiv.org/abs/2410.01335 .

The output equals the base model, except that the transformer layers listed in an expert's
`layer_range` are taken verbatim from that expert:

    θ[name] = θ_e[name]   if name is in layer ℓ and ℓ ∈ layer_range(e)
    θ[name] = θ_e[name]   if name is not in any layer and e has `non_layer: true`
    θ[name] = θ₀[name]    otherwise

(In the paper the base is the math expert and the bottom and top layers come from the language
expert.) `layer_range` is a string of half-open ranges "start:end", comma separated, e.g.
"0:4, 28:32"; a negative bound counts from the number of layers ("-4:" = the last four layers), a
single number is one layer. Two experts may not claim the same layer. The paper's optional
blending at the range boundaries is not implemented.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from .base import MergeError, MergeMethod, Param, TensorInputs


_PART = re.compile(r"^\s*(-?\d+)?\s*:\s*(-?\d+)?\s*$|^\s*(-?\d+)\s*$")


def _check_range_text(text: Any) -> str | None:
    if all(_PART.match(part) for part in str(text).split(",") if part.strip()):
        return None
    return "comma-separated half-open ranges 'start:end' or single layer numbers, e.g. '0:4,28:32'"


def parse_layer_range(text: str, num_layers: int | None, where: str = "layer_range") -> set[int]:
    """The set of layer indices named by `text`, e.g. '0:4,-2:' with 32 layers -> {0,1,2,3,30,31}."""
    layers: set[int] = set()
    for part in str(text).split(","):
        if not part.strip():
            continue
        match = _PART.match(part)
        if match is None:
            raise MergeError(f"{where}: {part.strip()!r} is not a layer range; valid: {_check_range_text(part)}")
        lo, hi, single = match.groups()
        bounds = [int(single), None] if single is not None else [int(lo or 0), None if hi is None else int(hi)]
        if (single is None and bounds[1] is None) or any(b < 0 for b in bounds if b is not None):
            if num_layers is None:
                raise MergeError(f"{where}: {part.strip()!r} counts from the end but the number of layers is unknown; "
                                 "valid: explicit non-negative 'start:end'")
            bounds = [num_layers if b is None else (b + num_layers if b < 0 else b) for b in bounds]
        if single is not None:
            bounds[1] = bounds[0] + 1
        layers.update(range(bounds[0], bounds[1]))
    return layers


class LayerSwap(MergeMethod):
    name = "layer_swap"
    reference_url = "https://arxiv.org/abs/2410.01335"
    requires_base = True
    streaming = True
    params = (
        Param("layer_range", "", scope="model", kind=str, check=_check_range_text,
              doc="layers taken from this expert, e.g. '0:4,28:32' (half-open; negatives count from the end)"),
        Param("non_layer", False, scope="model", kind=bool,
              doc="take the tensors outside the layers (embeddings, final norm, head) from this expert"),
    )

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        if inputs.base is None:
            raise MergeError(f"tensor {inputs.name!r}: method 'layer_swap' needs a base model; set base_model")
        chosen = None
        for e in inputs.experts:
            if inputs.layer_index is None:
                takes = bool(e.params.get("non_layer", False))
            else:
                spec = e.params.get("layer_range", "")
                takes = inputs.layer_index in parse_layer_range(spec, inputs.num_layers, f"{e.model}: layer_range")
            if not takes:
                continue
            if chosen is not None:
                what = f"layer {inputs.layer_index}" if inputs.layer_index is not None else "non-layer tensors"
                raise MergeError(
                    f"tensor {inputs.name!r}: {what} claimed by both {chosen.model!r} and {e.model!r}; "
                    "valid: disjoint layer_range values and at most one expert with non_layer: true"
                )
            chosen = e
        if chosen is None:
            return inputs.base.clone()
        if chosen.tensor.shape != inputs.base.shape:
            raise MergeError(
                f"tensor {inputs.name!r}: model {chosen.model!r} has shape {tuple(chosen.tensor.shape)}, "
                f"the base has {tuple(inputs.base.shape)}; valid: equal shapes"
            )
        return chosen.tensor.clone()

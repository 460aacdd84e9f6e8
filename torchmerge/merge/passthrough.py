"""Passthrough: copy one model's tensor unchanged (optionally scaled) — layer stacking with `slices`."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import MergeError, MergeMethod, Param, TensorInputs


class Passthrough(MergeMethod):
    """θ = s·θ_src for the single source of each output tensor (s = `scale`, default 1: a copy).

    With `slices`, each output layer comes from one source's `layer_range` and layers are
    renumbered consecutively (mergekit's "frankenmerge" layer stacking)."""

    name = "passthrough"
    reference_url = "https://github.com/arcee-ai/mergekit#passthrough"
    params = (Param("scale", 1.0, scope="model", doc="multiplier applied to the copied tensor"),)

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        sources = list(inputs.experts)
        if inputs.base is not None and not sources:
            scale = inputs.base_params.get("scale", 1.0)
            return inputs.base if scale == 1.0 else inputs.base * scale
        if len(sources) != 1 or (inputs.base is not None and sources):
            raise MergeError(f"tensor {inputs.name!r}: passthrough takes exactly one model per slice; "
                             "give each slice a single source")
        e = sources[0]
        scale = e.params["scale"]
        return e.tensor if scale == 1.0 else e.tensor * scale

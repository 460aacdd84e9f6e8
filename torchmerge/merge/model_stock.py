"""Model Stock (Jang et al., arXiv 2403.19522)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import MergeError, MergeMethod, Param, TensorInputs


class ModelStock(MergeMethod):
    """θ = t·θ̄ + (1 − t)·θ₀ with θ̄ the mean of the N ≥ 2 experts and θ₀ the base.

    t = N·cos θ / (1 + (N − 1)·cos θ), cos θ the mean over expert pairs i < j of
    clamp(δᵢ·δⱼ / max(‖δᵢ‖‖δⱼ‖, 1e-6), −1, 1), δᵢ = θᵢ − θ₀ (Model Stock eq. 2, as mergekit 0.1.5).
    Over the flattened tensor by default; per row (last dim, 1-D tensors as one row) with
    ``filter_wise``. Where |1 + (N − 1)cos θ| < 1e-6 the base is kept (t = 0).
    Not streaming: the pairwise cosines keep the N task vectors in memory.
    """

    name = "model_stock"
    reference_url = "https://arxiv.org/abs/2403.19522"
    params = (Param("filter_wise", False, kind=bool, doc="one t per row instead of per tensor"),)
    requires_base = True
    streaming = False

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        base = inputs.base
        if base is None or len(inputs.experts) < 2:
            raise MergeError(
                f"tensor {inputs.name!r}: model_stock needs a base_model and at least two other models, "
                f"got {len(inputs.experts)}"
            )
        shape = base.shape
        flat = (lambda x: x.unsqueeze(0) if x.dim() == 1 else x) if params["filter_wise"] else (lambda x: x.reshape(-1))
        w0 = flat(base)
        total, offsets = None, []
        for expert in inputs.experts:
            w = flat(expert.tensor)
            total = w if total is None else total + w
            offsets.append(w - w0)
        cosines = []
        for i, a in enumerate(offsets):
            for b in offsets[i + 1 :]:
                norm_product = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
                cosines.append(((a * b).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(offsets)
        denominator = 1 + (n - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, 1.0, denominator))
        return (t * (total / n) + (1 - t) * w0).reshape(shape)

"""TALL masks and consensus merging.

Wang et al., "Localizing Task Information for Improved Model Merging and Compression",
ICML 2024, https://arxiv.org/abs/2405.07813 .

Notation, per tensor (statistics are taken per tensor, not over the whole flattened model):
θ₀ the base tensor, θ_t expert t, τ_t = θ_t − θ₀ its task vector, w_t its `weight`.

* Multi-task vector: τ_MTL = Σ_t w_t τ_t                      (task arithmetic, "consensus")
                 or τ_MTL = TIES(τ_1 … τ_T)                 ("consensus_ties", see `_ties_passes`)
* TALL mask of task t:  m_t = 1[ |τ_t| ≥ λ_t · |τ_MTL − τ_t| ]   (λ_t = per-model `tall_lambda`)
  (|θ₀ − θ_t| ≥ λ_t |θ_MTL − θ_t| in the paper's words: the weight carries task-t information
  that the multi-task model would lose.)
* Consensus mask:  c = 1[ Σ_t m_t ≥ k ]   (k=2 drops "catastrophic" and "selfish" weights,
  k=1 only catastrophic ones, k=0 keeps all and reduces to the plain multi-task vector).
* Merge:  θ = θ₀ + λ · (c ⊙ τ_MTL)        (λ = global `lambda`)

Streaming: pass 1 accumulates τ_MTL (consensus_ties needs two passes for it), pass 2 counts the
TALL masks; peak memory is a few tensors whatever the number of experts.

`tall_masks` returns (τ_MTL, [m_t]) for TALL-mask compression: θ_t ≈ θ₀ + m_t ⊙ τ_MTL.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from .base import MergeError, MergeMethod, Param, TensorInputs, in_range, one_of

_REF = "https://arxiv.org/abs/2405.07813"


def _delta(inputs: TensorInputs, expert) -> torch.Tensor:
    if expert.tensor.shape != inputs.base.shape:
        raise MergeError(
            f"tensor {inputs.name!r}: model {expert.model!r} has shape {tuple(expert.tensor.shape)}, "
            f"the base has {tuple(inputs.base.shape)}; valid: equal shapes"
        )
    return expert.tensor - inputs.base


def _require_base(inputs: TensorInputs, method: str) -> torch.Tensor:
    if inputs.base is None:
        raise MergeError(f"tensor {inputs.name!r}: method {method!r} needs a base model; set base_model")
    return inputs.base


def trim_top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the k = round(density·D) largest-magnitude entries of `delta` (TIES trim; ties at the cut kept)."""
    if density >= 1.0:
        return delta
    k = int(round(density * delta.numel()))
    if k <= 0:
        return torch.zeros_like(delta)
    flat = delta.abs().flatten()
    threshold = torch.topk(flat, k, sorted=True).values[-1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def _ties_passes(inputs: TensorInputs) -> torch.Tensor:
    """TIES merged task vector (Yadav et al. 2023, arXiv 2306.01708), two streaming passes.

    τ̂_t = w_t · trim(τ_t, density_t)   (keep the top density_t fraction by magnitude, per tensor)
    γ   = sign(Σ_t τ̂_t)                (elected sign, sign vote on summed weighted mass)
    τ   = Σ_t τ̂_t·1[sign τ̂_t = γ] / max(1, #{t: τ̂_t ≠ 0, sign τ̂_t = γ})   (disjoint mean)
    """
    total = torch.zeros_like(inputs.base)
    for e in inputs.experts:
        total += e.params.get("weight", 1.0) * trim_top_magnitude(_delta(inputs, e), e.params.get("density", 0.2))
    sign = torch.sign(total)
    agree_sum = torch.zeros_like(total)
    agree_count = torch.zeros_like(total)
    for e in inputs.experts:
        trimmed = e.params.get("weight", 1.0) * trim_top_magnitude(_delta(inputs, e), e.params.get("density", 0.2))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        agree_sum += torch.where(agree, trimmed, torch.zeros_like(trimmed))
        agree_count += agree.to(total.dtype)
    return agree_sum / agree_count.clamp(min=1.0)


def _multitask_vector(inputs: TensorInputs, aggregate: str) -> torch.Tensor:
    if aggregate == "ties":
        return _ties_passes(inputs)
    total = torch.zeros_like(inputs.base)
    for e in inputs.experts:
        total += e.params.get("weight", 1.0) * _delta(inputs, e)
    return total


def tall_mask(task_vector: torch.Tensor, multitask_vector: torch.Tensor, tall_lambda: float) -> torch.Tensor:
    """m_t = |τ_t| ≥ λ_t · |τ_MTL − τ_t|  (bool tensor)."""
    return task_vector.abs() >= tall_lambda * (multitask_vector - task_vector).abs()


def tall_masks(inputs: TensorInputs, aggregate: str = "sum") -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Return (τ_MTL, [m_1 … m_T]) for one tensor; λ_t from each expert's `tall_lambda` (default 0.4).

    For TALL-mask compression store θ₀, τ_MTL and the bool masks; expert t is then recovered as
    θ₀ + m_t ⊙ τ_MTL. The list holds one bool tensor per expert (memory O(#experts) in bits).
    """
    _require_base(inputs, "tall_masks")
    if aggregate not in ("sum", "ties"):
        raise MergeError(f"tall_masks: aggregate={aggregate!r}; valid: 'sum', 'ties'")
    mtl = _multitask_vector(inputs, aggregate)
    masks = [tall_mask(_delta(inputs, e), mtl, e.params.get("tall_lambda", 0.4)) for e in inputs.experts]
    return mtl, masks


class ConsensusMerge(MergeMethod):
    """Consensus merging: θ = θ₀ + λ · (1[Σ_t m_t ≥ k] ⊙ τ_MTL), m_t the TALL masks.

    `aggregate="sum"` ("consensus"): τ_MTL = Σ_t w_t τ_t (task arithmetic).
    `aggregate="ties"` ("consensus_ties"): τ_MTL = TIES merged task vector (per-model `density`).
    The TALL masks compare each unweighted τ_t with τ_MTL (see the module docstring).
    """

    reference_url = _REF
    requires_base = True
    streaming = True

    _COMMON = (
        Param("k", 2, kind=int, check=in_range(0, 1 << 30), doc="minimum number of tasks using a weight"),
        Param("lambda", 1.0, check=in_range(-1e6, 1e6), doc="scale of the masked multi-task vector"),
        Param("weight", 1.0, scope="model", doc="w_t in τ_MTL"),
        Param("tall_lambda", 0.4, scope="model", check=in_range(0.0, 1e6), doc="λ_t of the TALL mask"),
    )

    def __init__(self, name: str, aggregate: str):
        if one_of("sum", "ties")(aggregate):
            raise ValueError(f"aggregate {aggregate!r}")
        self.name = name
        self.aggregate = aggregate
        density = Param("density", 0.2, scope="model", check=in_range(0.0, 1.0), doc="TIES trim: fraction kept")
        self.params = self._COMMON + ((density,) if aggregate == "ties" else ())  # per instance: the family differs

    def param_specs(self) -> tuple[Param, ...]:
        return self.params

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        base = _require_base(inputs, self.name)
        mtl = _multitask_vector(inputs, self.aggregate)
        count = torch.zeros_like(base)
        for e in inputs.experts:
            count += tall_mask(_delta(inputs, e), mtl, e.params.get("tall_lambda", 0.4)).to(base.dtype)
        consensus = count >= params.get("k", 2)
        return base + params.get("lambda", 1.0) * torch.where(consensus, mtl, torch.zeros_like(mtl))


def make_methods() -> Sequence[MergeMethod]:
    return (ConsensusMerge("consensus", "sum"), ConsensusMerge("consensus_ties", "ties"))

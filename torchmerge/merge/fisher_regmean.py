"""Fisher merging and RegMean: merges weighted by precomputed per-expert statistics.

Both read per-expert auxiliary tensors stored under the same name as the merged tensor
(`expert.aux("fisher")`, `expert.aux("gram")`), computed by `torchmerge.merge.calibration`.
Both consume the experts in one streaming pass (peak memory a few tensors, or for RegMean two
in×in matrices plus one out×in accumulator).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import MergeError, MergeMethod, Param, TensorInputs, in_range


def _check_shape(inputs: TensorInputs, model: str, what: str, got: torch.Size, want: torch.Size) -> None:
    if tuple(got) != tuple(want):
        raise MergeError(
            f"tensor {inputs.name!r}: {what} of model {model!r} has shape {tuple(got)}; valid: {tuple(want)}"
        )


class FisherMerge(MergeMethod):
    """Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
    https://arxiv.org/abs/2111.09832), with diagonal Fisher F_i of each expert:

        θ = Σ_i w_i (F_i + ε) ⊙ θ_i / Σ_i w_i (F_i + ε)

    ε = `fisher_floor` (the paper code's floor, 1e-6) keeps entries with zero Fisher in every model at
    the w-weighted average. A name for which no expert has a Fisher tensor (e.g. a buffer) is merged as
    the w-weighted average Σ w_i θ_i / Σ w_i; a name where only some experts have one is an error.
    """

    name = "fisher"
    reference_url = "https://arxiv.org/abs/2111.09832"
    aux_inputs = ("fisher",)
    params = (
        Param("weight", 1.0, scope="model", check=in_range(0.0, 1e12), doc="w_i, the model's coefficient"),
        Param("fisher_floor", 1e-6, check=in_range(0.0, 1e12), doc="ε added to every Fisher entry"),
    )

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        eps = params.get("fisher_floor", 1e-6)
        num = den = plain = None
        plain_norm = 0.0
        for i, e in enumerate(inputs.experts):
            fisher = e.aux("fisher")
            w = e.params.get("weight", 1.0)
            _consistent_aux(inputs, e, "fisher", fisher is not None, plain is None if i else fisher is not None)
            if fisher is None:  # no expert has statistics for this name: w-weighted average
                plain = _accumulate(inputs, e, plain, w * e.tensor)
                plain_norm += w
                continue
            _check_shape(inputs, e.model, "the fisher tensor", fisher.shape, e.tensor.shape)
            f = w * (fisher.float() + eps)
            num = _accumulate(inputs, e, num, f * e.tensor)
            den = f if den is None else den + f
        if plain is not None:
            if plain_norm == 0:
                raise MergeError(f"tensor {inputs.name!r}: the model weights sum to 0; valid: a non-zero sum")
            return plain / plain_norm
        if num is None:
            raise MergeError(f"tensor {inputs.name!r}: no experts to merge; valid: at least one model")
        if bool((den <= 0).any()):
            raise MergeError(f"tensor {inputs.name!r}: Σ w_i(F_i+ε) has zero entries; "
                             "valid: positive weights or fisher_floor > 0")
        return num / den


def _consistent_aux(inputs: TensorInputs, e, key: str, has: bool, expected: bool) -> None:
    if has != expected:
        raise MergeError(
            f"tensor {inputs.name!r}: model {e.model!r} {'has' if has else 'lacks'} a {key!r} tensor but the first "
            f"model {'does not' if has else 'has one'}; valid: a {key} file covering this tensor for every model"
        )


def _accumulate(inputs: TensorInputs, e, total, term: torch.Tensor):
    if total is None:
        return term
    _check_shape(inputs, e.model, "the tensor", term.shape, total.shape)
    return total.add_(term)


def reduce_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """G' = α·G + (1 − α)·diag(G): off-diagonal entries scaled by α, the diagonal kept."""
    return alpha * gram + (1.0 - alpha) * torch.diag_embed(torch.diagonal(gram))


class RegMeanMerge(MergeMethod):
    """RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
    https://arxiv.org/abs/2212.09849).

    For a linear layer y = x Wᵀ (torch weight W is out×in) with Gram matrix G_i = X_iᵀX_i (in×in) of
    the layer inputs X_i seen by expert i, RegMean minimises Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²:

        Wᵀ = (Σ_i G_i')⁻¹ Σ_i G_i' W_iᵀ,   i.e.   W = (Σ_i W_i G_i') (Σ_i G_i')⁻¹

    (G symmetric), with G_i' = α G_i + (1 − α) diag(G_i) (`alpha`, the paper's reduction of the
    off-diagonal entries; α = 1 is the exact solution, α = 0 a per-input-feature weighted average).
    The solve runs in float64 (least squares when Σ G' is singular). Tensors without Gram matrices
    in every expert (biases, norms, embeddings) are the simple average (1/N) Σ_i θ_i; only some experts
    having one is an error.
    """

    name = "regmean"
    reference_url = "https://arxiv.org/abs/2212.09849"
    aux_inputs = ("gram",)
    params = (
        Param("alpha", 0.9, check=in_range(0.0, 1.0), doc="scale of the Gram matrices' off-diagonal entries"),
    )

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        alpha = params.get("alpha", 0.9)
        weighted = gram_sum = plain = None
        count = 0
        for i, e in enumerate(inputs.experts):
            gram = e.aux("gram")
            _consistent_aux(inputs, e, "gram", gram is not None, plain is None if i else gram is not None)
            count += 1
            if gram is None:  # not a linear weight with statistics: simple average
                plain = _accumulate(inputs, e, plain, e.tensor.clone())
                continue
            if e.tensor.dim() != 2:
                raise MergeError(f"tensor {inputs.name!r}: has a gram matrix but is {e.tensor.dim()}-D; "
                                 "valid: a 2-D linear weight (out x in)")
            n_in = e.tensor.shape[1]
            _check_shape(inputs, e.model, "the gram matrix", gram.shape, torch.Size((n_in, n_in)))
            g = reduce_off_diagonal(gram.double(), alpha)
            weighted = _accumulate(inputs, e, weighted, e.tensor.double() @ g)
            gram_sum = g if gram_sum is None else gram_sum + g
        if count == 0:
            raise MergeError(f"tensor {inputs.name!r}: no experts to merge; valid: at least one model")
        if plain is not None:
            return plain / count
        return _solve_right(weighted, gram_sum).to(torch.float32)


def _solve_right(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """X with X g = a for symmetric g: X = (g⁻¹ aᵀ)ᵀ; least squares when g is singular."""
    solution, info = torch.linalg.solve_ex(g, a.T)
    if int(info) != 0 or not bool(torch.isfinite(solution).all()):
        solution = torch.linalg.lstsq(g, a.T, driver="gelsd").solution
    return solution.T

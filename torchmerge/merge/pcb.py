"""PCB merging: Parameter Competition Balancing.

Du et al., "Parameter Competition Balancing for Model Merging", NeurIPS 2024,
https://arxiv.org/abs/2410.02396 (code: https://github.com/duguodong7/pcb-merging).

Per tensor, flattened to D entries; δ_i = θ_i − θ₀ for the N experts; Norm(x) = (x − min x)/(max x − min x)
(0 where max = min); Softmax over the D entries; T = `temperature`; p = `drop_ratio`.

variant="paper" (equations 2–6 of the paper):
    intra_i = Softmax(N · Norm(δ_i ⊙ δ_i) / T)
    inter_i = Σ_{j=1..N} Softmax(Norm(δ_i ⊙ δ_j))
    β_i     = intra_i ⊙ inter_i
    m_i     = 1[β_i ≥ sort↑(β_i)[⌊p·D⌋]]            (drop the p fraction with the smallest scores)
    β̂_i     = m_i ⊙ β_i
    τ       = Σ_i β̂_i ⊙ δ_i / Σ_i β̂_i               (0 where the denominator is 0)
    θ       = θ₀ + λ · τ

variant="official" (the authors' released code, which differs from the equations):
    a_i     = clamp(|δ_i|, sort↑|δ_i|[⌊10⁻⁴D⌋], sort↑|δ_i|[⌊(1−10⁻⁴)D⌋ − 1]),  δ'_i = sign(δ_i)·a_i
    intra_i = exp(N · Norm(a_i)² / T)
    inter_i = tanh(δ_i ⊙ Σ_j δ_j)
    β_i     = intra_i ⊙ inter_i
    s_i     = Norm(max(β_i, sort↑(β_i)[⌊p·D⌋]))        (scores under the cut become 0)
    τ       = Σ_i s_i ⊙ δ'_i / max(Σ_i s_i, 10⁻¹²),   θ = θ₀ + λ · τ
(the code's `pcb_ratio` r is the kept fraction: drop_ratio = 1 − r; its default r = 0.1 is drop_ratio 0.9.)

Memory and cost: peak memory is a handful of D-sized tensors, independent of N. The paper's
inter-balancing is pairwise, so variant="paper" does O(N²) elementwise work and reads every expert
N + 1 times (one outer pass, and an inner pass per expert); variant="official" needs Σ_j δ_j only
and reads every expert twice. Statistics (Norm, Softmax, the drop cut) are per tensor.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import MergeError, MergeMethod, Param, TensorInputs, in_range, one_of


def minmax_norm(x: torch.Tensor) -> torch.Tensor:
    """(x − min x) / (max x − min x), all zeros for a constant x."""
    lo, hi = x.min(), x.max()
    span = hi - lo
    if span <= 0:
        return torch.zeros_like(x)
    return (x - lo) / span


def _sorted_at(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """sort↑(x)[⌊fraction·D⌋], clipped to the last index."""
    index = min(int(x.numel() * fraction), x.numel() - 1)
    return torch.kthvalue(x.flatten(), index + 1).values


class PCBMerge(MergeMethod):
    name = "pcb"
    reference_url = "https://arxiv.org/abs/2410.02396"
    requires_base = True
    streaming = True
    params = (
        Param("drop_ratio", 0.9, check=in_range(0.0, 1.0, hi_open=True), doc="fraction of scores dropped per task"),
        Param("lambda", 1.0, check=in_range(-1e6, 1e6), doc="scale of the merged task vector"),
        Param("temperature", 1.0, check=in_range(0.0, 1e6, lo_open=True), doc="T of the intra-balancing softmax"),
        Param("variant", "paper", kind=str, check=one_of("paper", "official"), doc="paper equations or released code"),
    )

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        if inputs.base is None:
            raise MergeError(f"tensor {inputs.name!r}: method 'pcb' needs a base model; set base_model")
        n = len(inputs.experts)
        if n == 0:
            return inputs.base.clone()
        flat_base = inputs.base.flatten()
        drop, temp = params.get("drop_ratio", 0.9), params.get("temperature", 1.0)
        if params.get("variant", "paper") == "official":
            tau = self._official(inputs, flat_base, n, drop, temp)
        else:
            tau = self._paper(inputs, flat_base, n, drop, temp)
        return inputs.base + params.get("lambda", 1.0) * tau.view_as(inputs.base)

    def _deltas(self, inputs: TensorInputs, flat_base: torch.Tensor):
        for e in inputs.experts:
            if e.tensor.shape != inputs.base.shape:
                raise MergeError(
                    f"tensor {inputs.name!r}: model {e.model!r} has shape {tuple(e.tensor.shape)}, "
                    f"the base has {tuple(inputs.base.shape)}; valid: equal shapes"
                )
            yield e.tensor.flatten() - flat_base

    def _paper(self, inputs, flat_base, n, drop, temp) -> torch.Tensor:
        num = torch.zeros_like(flat_base)
        den = torch.zeros_like(flat_base)
        for d_i in self._deltas(inputs, flat_base):
            intra = torch.softmax(n * minmax_norm(d_i * d_i) / temp, dim=0)
            inter = torch.zeros_like(d_i)
            for d_j in self._deltas(inputs, flat_base):  # pairwise term: one more pass per expert
                inter += torch.softmax(minmax_norm(d_i * d_j), dim=0)
            beta = intra * inter
            beta = torch.where(beta >= _sorted_at(beta, drop), beta, torch.zeros_like(beta))
            num += beta * d_i
            den += beta
        return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))

    def _official(self, inputs, flat_base, n, drop, temp) -> torch.Tensor:
        total = torch.zeros_like(flat_base)
        for d in self._deltas(inputs, flat_base):
            total += d
        num = torch.zeros_like(flat_base)
        den = torch.zeros_like(flat_base)
        size = flat_base.numel()
        for d in self._deltas(inputs, flat_base):
            mag = d.abs()
            lo = torch.kthvalue(mag, min(int(size * 1e-4), size - 1) + 1).values
            hi = torch.kthvalue(mag, max(int(size * (1 - 1e-4)) - 1, 0) + 1).values
            mag = mag.clamp(lo, hi)
            intra = torch.exp(n * minmax_norm(mag) ** 2 / temp)
            beta = intra * torch.tanh(d * total)
            score = minmax_norm(beta.clamp(min=_sorted_at(beta, drop)))
            num += score * torch.sign(d) * mag
            den += score
        return num / den.clamp(min=1e-12)

"""Spherical interpolation methods: slerp, nuslerp, multislerp, karcher.

Semantics follow mergekit 0.1.5 (https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md),
computed in float32.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from .base import MergeError, MergeMethod, Param, TensorInputs, in_range
from .task_arithmetic import WEIGHT, members_in_config_order


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x)


class Slerp(MergeMethod):
    """Spherical linear interpolation between the base (t = 0) and one other model (t = 1).

    With both tensors flattened, norms n₀, n₁ (a norm ≤ 1e-8 counts as 1), d = clamp(v₀·v₁/(n₀n₁), −1, 1):
    if |d| > 0.9995 (nearly colinear) θ = (1−t)v₀ + t·v₁; else Θ = arccos d and
    θ = sin((1−t)Θ)/sin Θ · v₀ + sin(tΘ)/sin Θ · v₁ (Shoemake 1985, as mergekit 0.1.5).
    """

    name = "slerp"
    reference_url = "https://en.wikipedia.org/wiki/Slerp"
    params = (Param("t", check=in_range(0, 1), doc="0 gives the base, 1 the other model"),)
    requires_base = True
    dot_threshold = 0.9995
    eps = 1e-8

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        if inputs.base is None or len(inputs.experts) != 1:
            raise MergeError(
                f"tensor {inputs.name!r}: slerp needs a base_model and exactly one other model, got {len(inputs.experts)}"
            )
        v0, v1 = inputs.base.reshape(-1), inputs.experts[0].tensor.reshape(-1)
        t = torch.tensor(params["t"], dtype=torch.float32)  # float32 t, so 1 − t rounds as mergekit's
        if v0.numel() == 0:
            return ((1 - t) * v0 + t * v1).reshape(inputs.base.shape)
        n0, n1 = self._chunked_norm(v0), self._chunked_norm(v1)
        n0 = torch.where(n0 > self.eps, n0, 1.0)
        n1 = torch.where(n1 > self.eps, n1, 1.0)
        dot = torch.stack([((v0[c] / n0) * (v1[c] / n1)).sum() for c in self._chunks(v0)]).sum().clamp(-1, 1)
        linear = dot.abs() > self.dot_threshold
        theta = torch.acos(torch.where(linear, 0.0, dot))
        sin_theta = torch.sin(theta)
        coef0 = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
        coef1 = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
        return (coef0 * v0 + coef1 * v1).reshape(inputs.base.shape)

    @staticmethod
    def _chunks(v: torch.Tensor) -> list[slice]:
        # mergekit reduces in 2^20-element chunks; the same chunking gives the same rounding
        return [slice(i, i + (1 << 20)) for i in range(0, v.numel(), 1 << 20)]

    def _chunked_norm(self, v: torch.Tensor) -> torch.Tensor:
        return _norm(torch.stack([_norm(v[c]) for c in self._chunks(v)]))


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8) -> torch.Tensor:
    """Slerp of v₀→v₁ by t over rows (last dim; dim 0 when ``row_wise``) or the flattened tensor.

    Per row: u = v/max(‖v‖, 1e-7), c = clamp(u₀·u₁, −1, 1), Θ = arccos c;
    result = (sin((1−t)Θ)v₀ + sin(tΘ)v₁)/sin Θ, or (1−t)v₀ + t·v₁ where 1 − c² ≤ eps².
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


class NuSlerp(MergeMethod):
    """Slerp of two experts with t = w₂/(w₁ + w₂) (t = ½ when |w₁ + w₂| < 1e-6).

    With a base, interpolates the task vectors: θ = θ_base + nuslerp(t, θ₁ − θ_base, θ₂ − θ_base).
    ``nuslerp_flatten`` (default) treats the tensor as one vector; otherwise rows (last dim) or,
    with ``nuslerp_row_wise``, columns are interpolated independently (mergekit docs, "nuslerp").
    """

    name = "nuslerp"
    reference_url = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    params = (
        WEIGHT,
        Param("nuslerp_row_wise", False, kind=bool, doc="interpolate along dim 0 instead of the last dim"),
        Param("nuslerp_flatten", True, kind=bool, doc="treat the whole tensor as one vector"),
    )

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        if len(inputs.experts) != 2:
            raise MergeError(f"tensor {inputs.name!r}: nuslerp needs exactly two non-base models, got {len(inputs.experts)}")
        e0, e1 = inputs.experts[0], inputs.experts[1]
        w0, w1 = e0.params["weight"], e1.params["weight"]
        total = w0 + w1
        t = 0.5 if abs(total) < 1e-6 else w1 / total
        row_wise, flatten = params["nuslerp_row_wise"], params["nuslerp_flatten"]
        if inputs.base is None:
            return nuslerp(t, e0.tensor, e1.tensor, row_wise, flatten)
        base = inputs.base
        return base + nuslerp(t, e0.tensor - base, e1.tensor - base, row_wise, flatten)


class MultiSlerp(MergeMethod):
    """Barycentric interpolation on the hypersphere (multislerp, mergekit docs).

    With xᵢ = θᵢ − θ_base (or θᵢ), wᵢ normalised to Σwᵢ = 1 when ``normalize_weights``,
    uᵢ = xᵢ/(‖xᵢ‖ + eps), m = Σwᵢuᵢ/‖Σwᵢuᵢ‖, tangent T = Σwᵢ(uᵢ − (uᵢ·m)m):
    θ = (cos‖T‖′·m + sin‖T‖′/‖T‖′·T) · Σwᵢ‖xᵢ‖ (+ θ_base), ‖T‖′ = ‖T‖ + eps.
    When ‖Σwᵢuᵢ‖ < eps: two experts fall back to w₁x₁ + w₂x₂; more is an error. Streams in two passes
    (Σwᵢuᵢ is accumulated with raw weights and divided by Σwᵢ once, so rounding differs slightly from mergekit).
    """

    name = "multislerp"
    reference_url = "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"
    params = (
        WEIGHT,
        Param("normalize_weights", True, kind=bool, doc="divide weights by their sum"),
        Param("eps", 1e-8, check=in_range(0, 1, lo_open=True), doc="numerical floor"),
    )

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        n, eps, base = len(inputs.experts), params["eps"], inputs.base
        if n == 0:
            raise MergeError(f"tensor {inputs.name!r}: multislerp needs at least one non-base model")
        if n == 1:
            return inputs.experts[0].tensor
        raw, norms, mean = [], [], None
        for expert in inputs.experts:  # pass 1: norms and Σwᵢuᵢ
            x = expert.tensor if base is None else expert.tensor - base
            raw.append(expert.params["weight"])
            norms.append(_norm(x))
            term = (x / (norms[-1] + eps)) * raw[-1]
            mean = term if mean is None else mean + term
        weights = torch.tensor(raw, dtype=torch.float32)
        if params["normalize_weights"]:
            mean = mean / weights.sum()
            weights = weights / weights.sum()
        mean_norm = _norm(mean)
        if mean_norm < eps:
            return self._antipodal(inputs, weights, n)
        mean = mean / mean_norm
        tangent = torch.zeros_like(mean)
        for w, norm, expert in zip(weights, norms, inputs.experts):  # pass 2: tangent
            u = (expert.tensor if base is None else expert.tensor - base) / (norm + eps)
            tangent += (u - (u * mean).sum() * mean) * w
        tnorm = _norm(tangent) + eps
        result = (mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)) * (torch.stack(norms) * weights).sum()
        return result if base is None else result + base

    @staticmethod
    def _antipodal(inputs: TensorInputs, weights: torch.Tensor, n: int) -> torch.Tensor:
        if n != 2:
            raise MergeError(
                f"tensor {inputs.name!r}: multislerp weighted mean of unit vectors is zero (antipodal experts "
                f"with balancing weights); use different weights"
            )
        base = inputs.base
        xs = [e.tensor if base is None else e.tensor - base for e in inputs.experts]
        res = xs[0] * weights[0] + xs[1] * weights[1]
        return res if base is None else res + base


class Karcher(MergeMethod):
    """Weighted Karcher (Riemannian) mean on the unit sphere, rescaled by the mean norm.

    Members: the experts and the base when there is one (all weighted αᵢ = 1/N, as mergekit).
    uᵢ = θᵢ/‖θᵢ‖; only ‖θᵢ‖ > tol vote, with α renormalised over them. Start m = Σαᵢuᵢ/‖·‖
    (u of the first voter if that norm < tol), then up to ``max_iter`` times:
    T = Σ_{Θᵢ ≥ tol} αᵢ Θᵢ/sin Θᵢ (uᵢ − cos Θᵢ·m), Θᵢ = arccos clamp(m·uᵢ);
    stop if ‖T‖ < tol, else m ← normalise(cos‖T‖·m + sin‖T‖·T/‖T‖). Result: (Σαᵢ‖θᵢ‖)·m.
    Each iteration is one streamed pass over the members (arXiv 2603.04972, as mergekit 0.1.5).
    """

    name = "karcher"
    reference_url = "https://arxiv.org/abs/2603.04972"
    params = (
        Param("max_iter", 10, kind=int, check=in_range(0, 1000), doc="iterations of the fixed-point update"),
        Param("tol", 1e-5, check=in_range(0, 1, lo_open=True), doc="convergence and zero-norm tolerance"),
    )

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        tol, max_iter = params["tol"], params["max_iter"]
        members = lambda: (t for t, _ in members_in_config_order(inputs, include_base=True))  # noqa: E731
        norms = [_norm(t) for t in members()]
        count = len(norms)
        if count == 0:
            raise MergeError(f"tensor {inputs.name!r}: karcher needs at least one model")
        if count == 1:
            return next(members())
        alpha = 1.0 / count
        valid = [i for i, nrm in enumerate(norms) if nrm.item() > tol]
        if not valid:
            return next(members()) * 0
        a = alpha / sum([alpha] * len(valid))
        units = lambda: ((i, t / norms[i]) for i, t in enumerate(members()) if i in valid)  # noqa: E731
        mean = None
        for _, u in units():
            mean = a * u if mean is None else mean + a * u
        mean_norm = _norm(mean)
        mean = next(units())[1] if mean_norm.item() < tol else mean / mean_norm
        for _ in range(max_iter):
            tangent = torch.zeros_like(mean)
            for _, u in units():
                dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
                theta = torch.arccos(dot)
                if theta.item() < tol:
                    continue
                tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
            tnorm = _norm(tangent)
            if tnorm.item() < tol:
                break
            mean = torch.cos(tnorm) * mean + torch.sin(tnorm) * (tangent / tnorm)
            unit_norm = _norm(mean)
            if unit_norm.item() > tol:
                mean = mean / unit_norm
        return sum(alpha * nrm for nrm in norms) * mean


def interpolation_methods() -> list[MergeMethod]:
    return [Slerp(), NuSlerp(), MultiSlerp(), Karcher()]

"""Linear averaging and generalized task arithmetic (task arithmetic, TIES, DARE, Breadcrumbs, DELLA).

All methods here consume experts one at a time: peak memory is a handful of tensors of one
name's shape, whatever the number of experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from . import sparsify as sp
from ..ops.merge_kernels import (merge_finish, ties_accumulate_, ties_accumulate_reference, ties_resolve,
                                 ties_resolve_reference)
from .base import REQUIRED, MergeError, MergeMethod, Param, TensorInputs, in_range, one_of

_F32 = torch.float32
_FINISH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


WEIGHT = Param("weight", REQUIRED, scope="model", kind=float, doc="coefficient of this model (any finite number)")


def members_in_config_order(inputs: TensorInputs, include_base: bool) -> Iterator[tuple[torch.Tensor, Mapping[str, Any]]]:
    """Yield (tensor, params) for the experts and, when ``include_base``, the base at its config position.

    The base's position is the first config index the experts skip (the end when none is skipped),
    so summation order, hence rounding, matches mergekit's input order.
    """
    pending = include_base and inputs.base is not None
    position = 0
    for expert in inputs.experts:
        if pending and expert.index > position:
            yield inputs.base, inputs.base_params
            pending = False
            position += 1
        yield expert.tensor, expert.params
        position += 1
    if pending:
        yield inputs.base, inputs.base_params


class Linear(MergeMethod):
    """Weighted average (Model Soups, arXiv 2203.05482).

    θ = Σᵢ wᵢ·θᵢ / Σᵢ wᵢ with ``normalize`` (default, as mergekit), else Σᵢ wᵢ·θᵢ. The sum runs
    over the experts and, when the base model is also listed with a weight, the base. Terms are
    accumulated in config order in float32 (bit-identical to mergekit 0.1.5 on float32 inputs).
    """

    name = "linear"
    reference_url = "https://arxiv.org/abs/2203.05482"
    params = (WEIGHT, Param("normalize", True, kind=bool, doc="divide by the sum of weights"))
    requires_base = False

    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        result: torch.Tensor | None = None
        weights: list[float] = []
        for tensor, member_params in members_in_config_order(inputs, "weight" in inputs.base_params):
            w = member_params["weight"]
            weights.append(w)
            if result is None:
                result = torch.zeros_like(tensor, dtype=_F32)
            result.addcmul_(tensor, torch.tensor(w, dtype=_F32))
        if result is None:
            raise MergeError(f"tensor {inputs.name!r}: linear needs at least one model")
        if params["normalize"]:
            total = torch.tensor(weights, dtype=_F32).sum()
            if total == 0:
                raise MergeError(
                    f"tensor {inputs.name!r}: linear weights {weights} sum to 0; use weights with a nonzero sum or normalize: false"
                )
            result.div_(total)
        return result


@dataclass(frozen=True)
class TaskArithmeticVariant:
    """One registered member of the family: which sparsifier, whether TIES sign consensus, defaults."""

    name: str
    reference_url: str
    sparsify: str | None  # one of sparsify.SPARSIFY_METHODS, or None
    consensus: bool
    default_normalize: bool
    default_rescale: bool


VARIANTS: tuple[TaskArithmeticVariant, ...] = (
    TaskArithmeticVariant("task_arithmetic", "https://arxiv.org/abs/2212.04089", None, False, False, False),
    TaskArithmeticVariant("ties", "https://arxiv.org/abs/2306.01708", "magnitude", True, True, False),
    TaskArithmeticVariant("dare_ties", "https://arxiv.org/abs/2311.03099", "random", True, False, True),
    TaskArithmeticVariant("dare_linear", "https://arxiv.org/abs/2311.03099", "random", False, False, True),
    TaskArithmeticVariant("breadcrumbs", "https://arxiv.org/abs/2312.06795", "magnitude_outliers", False, False, False),
    TaskArithmeticVariant("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", "magnitude_outliers", True, False, False),
    TaskArithmeticVariant("della", "https://arxiv.org/abs/2406.11617", "della_magprune", True, True, True),
    TaskArithmeticVariant("della_linear", "https://arxiv.org/abs/2406.11617", "della_magprune", False, False, True),
)


class GeneralizedTaskArithmetic(MergeMethod):
    """θ = θ_base + λ · M(τ₁…τₙ), τᵢ = S(θᵢ − θ_base) sparsified (Task Arithmetic, arXiv 2212.04089).

    Without consensus: M = Σᵢ wᵢτᵢ / D, D = Σᵢ wᵢ when ``normalize`` (D = 1 when |Σwᵢ| < 1e-8), else 1.

    With consensus (TIES, arXiv 2306.01708): per element, vᵢ = wᵢτᵢ (``sign_vote: weighted``,
    mergekit) or τᵢ (``unweighted``, the paper); the elected sign is + where Σᵢ vᵢ ≥ 0
    (``consensus: sum``) or Σᵢ sign(vᵢ) ≥ 0 (``count``), else −; agreeing experts
    Aᵢ = [sign(vᵢ) = elected] give M = Σᵢ Aᵢwᵢτᵢ / D with D = Σᵢ Aᵢwᵢ (``divisor: weights``,
    mergekit) or Σᵢ Aᵢ (``count``, the paper's disjoint mean) when ``normalize``; D = 0 → 1.

    Streaming in one pass: the running sums Σvᵢ, Σ[vᵢ>0]wᵢτᵢ, Σ[vᵢ<0]wᵢτᵢ and the two matching
    divisors are all M needs, so memory does not grow with the number of experts. The sums run in
    config order in float32, the order of mergekit 0.1.5's stacked sums.

    Sparsifiers S and their parameters are described in ``torchmerge.merge.sparsify``. Random ones
    draw from ``inputs.generator("sparsify:<expert index>")``. ``int8_mask`` is accepted for
    mergekit configs and has no effect (mergekit's mask is boolean either way).
    """

    requires_base = True

    def __init__(self, variant: TaskArithmeticVariant):
        self.variant = variant
        self.name = variant.name
        self.reference_url = variant.reference_url
        self._specs = self._build_specs(variant)
        self._thresholds: dict[tuple[str, int], float] = {}

    @staticmethod
    def _build_specs(v: TaskArithmeticVariant) -> tuple[Param, ...]:
        specs = [
            WEIGHT,
            Param("density", 1.0, scope="model", check=in_range(0, 1, lo_open=True), doc="fraction of δ kept"),
            Param("lambda", 1.0, doc="scale of the merged task vector"),
            Param("normalize", v.default_normalize, kind=bool, doc="divide by the (agreeing) weight sum"),
            Param("rescale", v.default_rescale, kind=bool, doc="rescale sparsified δ (see rescale_mode)"),
            Param("int8_mask", False, kind=bool, doc="accepted for mergekit configs; no effect"),
        ]
        if v.sparsify is not None:
            specs.append(Param("rescale_mode", "l1", kind=str, check=one_of(*sp.RESCALE_MODES),
                               doc="l1: match ‖δ‖₁ (mergekit); inverse_density: ÷ keep probability (papers)"))
        if v.sparsify in ("magnitude", "magnitude_outliers"):
            specs.append(Param("tie_break", "sort", kind=str, check=one_of(*sp.TIE_BREAKS),
                               doc="sort: mergekit's argsort set; index: lowest index first"))
        if v.sparsify == "magnitude":
            specs.append(Param("trim_scope", "tensor", kind=str, check=one_of("tensor", "model"),
                               doc="tensor: top-k per tensor (mergekit); model: per expert over the model (paper)"))
        if v.sparsify == "magnitude_outliers":
            specs.append(Param("gamma", 0.01, scope="model", check=in_range(0, 1), doc="fraction of largest |δ| dropped"))
        if v.sparsify == "della_magprune":
            specs.append(Param("epsilon", 0.15, scope="model", check=in_range(0, 1, hi_open=True),
                               doc="half-width of the keep-probability range"))
        if v.consensus:
            specs += [
                Param("consensus", "sum", kind=str, check=one_of("sum", "count"), doc="sign election rule"),
                Param("sign_vote", "weighted", kind=str, check=one_of("weighted", "unweighted"),
                      doc="elect on wᵢτᵢ (mergekit) or τᵢ (paper)"),
                Param("divisor", "weights", kind=str, check=one_of("weights", "count"),
                      doc="disjoint mean ÷ Σ agreeing weights (mergekit) or ÷ agreeing count (paper)"),
            ]
        return tuple(specs)

    def param_specs(self) -> tuple[Param, ...]:
        return self._specs

    def thread_invariant(self, params: Mapping[str, Any]) -> bool:
        # plain sums, and the TIES trim by our own top-k kernel without rescaling (rescaling sums |δ|)
        sparsify = self.variant.sparsify
        return sparsify is None or (sparsify == "magnitude" and not params.get("rescale")
                                    and params.get("trim_scope") == "tensor")

    # ---------------------------------------------------------------- sparsification
    def _sparsify(self, delta: torch.Tensor, expert, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        method = self.variant.sparsify
        if method is None:
            return delta
        p = expert.params
        density = p.get("density", 1.0)
        rescale = params["rescale_mode"] if params["rescale"] else None
        if method == "magnitude":
            if params["trim_scope"] == "model":
                return sp.threshold_drop(delta, self._model_threshold(expert, inputs), density, rescale)
            return sp.magnitude(delta, density, rescale, params["tie_break"])
        if method == "magnitude_outliers":
            return sp.magnitude_outliers(delta, density, p.get("gamma", 0.01), rescale, params["tie_break"])
        generator = inputs.generator(f"sparsify:{expert.index}")
        if method == "random":
            return sp.random_drop(delta, density, generator, rescale)
        return sp.della_magprune(delta, density, p.get("epsilon", 0.15), generator, rescale, inputs.name)

    def _model_threshold(self, expert, inputs: TensorInputs) -> float:
        try:
            return self._thresholds[(expert.model, expert.index)]
        except KeyError:
            raise MergeError(
                f"tensor {inputs.name!r}: ties with trim_scope: model needs prepare() over all tensor names "
                f"first; no threshold for model {expert.model!r}"
            ) from None

    # ---------------------------------------------------------------- merge
    def merge(self, inputs: TensorInputs, params: Mapping[str, Any]) -> torch.Tensor:
        if inputs.base_stored is None:
            raise MergeError(f"tensor {inputs.name!r}: {self.name} needs a base_model")
        if len(inputs.experts) == 0:
            return inputs.base.clone()
        fused = inputs.compute_dtype == _F32
        base = inputs.fused_base()  # fp32 compute: as stored (bf16 too), the kernels convert while reading
        divisor = None
        if self.variant.consensus:
            mixed = self._merge_consensus(base, inputs, params)
        else:
            mixed, divisor = self._merge_sum(base, inputs, params)
        lam = params["lambda"] if params["lambda"] != 1 else None
        if fused:  # one fused pass: base + ((mixed / divisor) · λ), same roundings
            out_dtype = inputs.out_dtype if inputs.out_dtype in _FINISH_DTYPES else None
            return merge_finish(base, mixed, divisor, lam, out_dtype)
        if divisor is not None:
            mixed /= torch.tensor(divisor, dtype=mixed.dtype)
        if lam is not None:
            mixed *= lam
        return base + mixed

    def _weighted_deltas(self, base, inputs, params) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (τᵢ, wᵢτᵢ, float32 wᵢ) one expert at a time."""
        for expert in inputs.experts:
            w = torch.tensor(expert.params["weight"], dtype=_F32)
            tau = self._sparsify(expert.delta_from(base), expert, inputs, params)
            yield tau, tau * w, w

    def _merge_sum(self, base, inputs, params) -> tuple[torch.Tensor, float | None]:
        """(Σ wᵢτᵢ, the normalising divisor or None)."""
        mixed = None
        total = torch.zeros((), dtype=_F32)
        if self.variant.sparsify is None:  # plain task arithmetic: one fused pass per expert
            for expert in inputs.experts:
                mixed = expert.accumulate_delta(mixed, base, expert.params["weight"])
                total += torch.tensor(expert.params["weight"], dtype=_F32)
        else:
            for _, wtau, w in self._weighted_deltas(base, inputs, params):
                mixed = wtau if mixed is None else mixed.add_(wtau)  # 0 + x = x exactly: start from the first
                total += w
        divisor = None
        if params["normalize"]:
            divisor = float(torch.where(total.abs() < 1e-8, torch.ones_like(total), total))
        return mixed, divisor

    def _merge_consensus(self, base, inputs, params) -> torch.Tensor:
        weighted_vote = params["sign_vote"] == "weighted"
        count_vote = params["consensus"] == "count"
        count_divisor = params["divisor"] == "count"
        if inputs.compute_dtype != _F32:  # the fused kernels are fp32; other compute dtypes use the torch ops
            return self._merge_consensus_unfused(base, inputs, params)
        buffers = [torch.empty(base.shape, dtype=_F32) for _ in range(5)]  # vote, pos_sum, neg_sum, pos_div, neg_div
        for i, expert in enumerate(inputs.experts):
            w = expert.params["weight"]
            delta, keep = expert.delta_from(base), None
            if self._plain_magnitude_trim(expert, params) and delta.numel():  # the kernel applies the mask
                keep = sp.magnitude_keep(delta, expert.params["density"], params["tie_break"])
            else:
                delta = self._sparsify(delta, expert, inputs, params)
            ties_accumulate_(*buffers, delta, w, 1.0 if count_divisor else w, weighted_vote, count_vote, i == 0, keep)
        return ties_resolve(*buffers, params["normalize"])

    def _plain_magnitude_trim(self, expert, params) -> bool:
        """Per-tensor magnitude trim without rescaling: τ = δ·[kept], which ties_accumulate_ can apply itself."""
        return (self.variant.sparsify == "magnitude" and params["trim_scope"] == "tensor" and not params["rescale"]
                and expert.params.get("density", 1.0) < 1)

    def _merge_consensus_unfused(self, base, inputs, params) -> torch.Tensor:
        buffers = [torch.empty_like(base) for _ in range(5)]
        for i, (tau, _, w) in enumerate(self._weighted_deltas(base, inputs, params)):
            ties_accumulate_reference(*buffers, tau, float(w), 1.0 if params["divisor"] == "count" else float(w),
                                      params["sign_vote"] == "weighted", params["consensus"] == "count", i == 0)
        return ties_resolve_reference(*buffers, params["normalize"])

    # ---------------------------------------------------------------- whole-model trim
    def prepare(self, tensor_names: Sequence[str], load_all: Callable[[str], TensorInputs], params: Mapping[str, Any]) -> None:
        """For ``trim_scope: model``: per expert, the TIES reference code's threshold over the whole model.

        With N the expert's total element count, the threshold is the (N − ⌊density·N⌋)-th smallest
        |δ| over all tensors (exact, by radix histogram); trimming keeps |δ| ≥ threshold.
        """
        self._thresholds = {}
        if self.variant.sparsify != "magnitude" or params.get("trim_scope") != "model":
            return
        counters: dict[tuple[str, int], sp.ModelThreshold] = {}
        densities: dict[tuple[str, int], float] = {}
        for name in tensor_names:
            inputs = load_all(name)
            for expert in inputs.experts:
                key = (expert.model, expert.index)
                density = expert.params.get("density", 1.0)
                if densities.setdefault(key, density) != density:
                    raise MergeError(
                        f"tensor {name!r}: trim_scope: model needs one density per model; {expert.model!r} has "
                        f"{densities[key]} and {density}"
                    )
                counters.setdefault(key, sp.ModelThreshold()).count_high(expert.tensor - inputs.base)
        ranks = {key: c.total - int(densities[key] * c.total) for key, c in counters.items()}
        for key, counter in counters.items():
            if ranks[key] >= 1:
                counter.choose_bucket(ranks[key])
        for name in tensor_names:
            inputs = load_all(name)
            for expert in inputs.experts:
                key = (expert.model, expert.index)
                if ranks[key] >= 1:
                    counters[key].count_low(expert.tensor - inputs.base)
        self._thresholds = {
            key: (counter.value(ranks[key]) if ranks[key] >= 1 else 0.0) for key, counter in counters.items()
        }


def generalized_task_arithmetic_methods() -> list[GeneralizedTaskArithmetic]:
    return [GeneralizedTaskArithmetic(v) for v in VARIANTS]

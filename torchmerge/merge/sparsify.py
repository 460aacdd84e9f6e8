"""Sparsifiers for task vectors (δ = expert − base), one per method family.

Each returns a tensor of δ's shape with dropped elements set to zero, optionally rescaled:

* ``magnitude``  (TIES, arXiv 2306.01708): keep the k = max(1, ⌊density·n⌋) largest |δ|.
* ``magnitude_outliers`` (Model Breadcrumbs, arXiv 2312.06795): sort |δ| ascending, drop the
  ⌊γ·n⌋ largest and then the smallest, keeping ranks [n_bot, n_bot + ⌊density·n⌋) with
  n_bot = max(0, n − ⌊density·n⌋ − ⌊γ·n⌋).
* ``random`` (DARE, arXiv 2311.03099): keep each element with probability density (= 1 − p).
* ``della_magprune`` (DELLA, arXiv 2406.11617): along dim 1 (1-D tensors as one row), element of
  ascending magnitude rank r ∈ [1, c] is kept with probability
  p_r = density − ε + 2ε·(r − 1)/(c − 1).

Rescaling (``rescale``): ``"l1"`` multiplies the kept tensor by ‖δ‖₁ / ‖kept‖₁ (skipped when either
norm is < 1e-7) — mergekit 0.1.5's ``rescale: true``; ``"inverse_density"`` divides each kept element
by its keep probability (1/(1 − p) of the DARE paper, 1/p_r of the DELLA paper).

Ties at the selection boundary: mergekit keeps the elements that ``torch.argsort`` (an unstable
introsort on CPU) puts first. ``tie_break="sort"`` reproduces that set exactly: a linear-time
selection (``kthvalue``) decides every element whose magnitude differs from the boundary value, and
only when equal magnitudes straddle the boundary (or NaN is present) is the set taken from
``torchmerge::topk_mask_like_sort``, which replays that introsort only along the path holding rank k
(expected O(n)). With the native kernel built that op is cheaper than the selection itself, so it is
called directly. ``tie_break="index"`` keeps the lowest flat indices among equal magnitudes.
"""

from __future__ import annotations

import torch

from ..ops import native_available
from ..ops.topk_mask import topk_mask_like_sort
from .base import MergeError

SPARSIFY_METHODS = ("magnitude", "magnitude_outliers", "random", "della_magprune")
RESCALE_MODES = ("l1", "inverse_density")
TIE_BREAKS = ("sort", "index")
_NORM_EPS = 1e-7
_EXACT_F32 = (torch.float32, torch.bfloat16, torch.float16)  # dtypes whose float32 upcast keeps argsort's order


def _first_smallest(a: torch.Tensor, count: int, tie_break: str) -> torch.Tensor:
    """Mask of the ``count`` elements of 1-D ``a`` that come first in ascending order."""
    n = a.numel()
    if count <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if count >= n:
        return torch.ones(n, dtype=torch.bool)
    thr = torch.kthvalue(a, count).values
    below = a < thr
    equal = a == thr
    need = count - int(below.sum())
    if need == int(equal.sum()):
        return below | equal
    if tie_break == "sort":
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.sort(a, descending=False).indices[:count]] = True
        return mask
    return below | (equal & (torch.cumsum(equal, 0, dtype=torch.int64) <= need))


def _argsort_prefix_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of ``argsort(a, descending=True)[:k]``; dtypes that upcast to float32 exactly use the O(n) op."""
    if a.dtype in _EXACT_F32:
        return topk_mask_like_sort(a.to(torch.float32).contiguous(), k)
    mask = torch.zeros(a.numel(), dtype=torch.bool)
    mask[torch.argsort(a, descending=True)[:k]] = True
    return mask


def top_k_mask(a: torch.Tensor, k: int, tie_break: str = "sort", absolute: bool = False) -> torch.Tensor:
    """Mask of the k largest elements of 1-D ``a`` (of ``|a|`` when ``absolute``), the set
    ``argsort(a, descending=True)[:k]`` keeps."""
    n = a.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if tie_break == "sort" and native_available() and a.dtype in _EXACT_F32:
        # one O(n) pass beats kthvalue alone; |a| is taken inside the kernel's copy
        return topk_mask_like_sort(a.to(torch.float32).contiguous(), k, absolute)
    if absolute:
        a = a.abs()
    if bool(torch.isnan(a).any()):  # argsort puts NaN first; the '>'/'==' tests below cannot see NaN
        return _argsort_prefix_mask(a, k)
    thr = torch.kthvalue(a, n - k + 1).values
    above = a > thr
    equal = a == thr
    need = k - int(above.sum())
    if need == int(equal.sum()):
        return above | equal
    if tie_break == "sort":
        return _argsort_prefix_mask(a, k)
    return above | (equal & (torch.cumsum(equal, 0, dtype=torch.int64) <= need))


def _rescaled(delta: torch.Tensor, keep: torch.Tensor, rescale: str | None, keep_prob) -> torch.Tensor:
    masked = torch.mul(delta, keep)  # bool promotes to 1.0 / 0.0 inside the multiply: no temporary
    if rescale is None:
        return masked
    if rescale == "inverse_density":
        return masked / keep_prob
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < _NORM_EPS or after < _NORM_EPS:
        return masked
    return masked * (before / after)


def magnitude_keep(delta: torch.Tensor, density: float, tie_break: str = "sort") -> torch.Tensor:
    """The TIES trim mask: True for the k = max(1, ⌊density·n⌋) largest |δ| (density < 1, n > 0)."""
    k = max(1, int(density * delta.numel()))
    return top_k_mask(delta.reshape(-1), k, tie_break, absolute=True).reshape(delta.shape)


def magnitude(delta: torch.Tensor, density: float, rescale: str | None = None, tie_break: str = "sort") -> torch.Tensor:
    """TIES trim: keep the k = max(1, ⌊density·n⌋) largest |δ| (δ unchanged when density ≥ 1)."""
    if density >= 1:
        return delta
    if delta.numel() == 0:
        return torch.zeros_like(delta)
    return _rescaled(delta, magnitude_keep(delta, density, tie_break), rescale, density)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float, rescale: str | None = None, tie_break: str = "sort"
) -> torch.Tensor:
    """Breadcrumbs: keep ascending-|δ| ranks [n_bot, n_bot + ⌊density·n⌋), n_bot = max(0, n − ⌊density·n⌋ − ⌊γ·n⌋)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    a = delta.abs().reshape(-1)
    keep = _first_smallest(a, n_bot + target, tie_break) & ~_first_smallest(a, n_bot, tie_break)
    return _rescaled(delta, keep.reshape(delta.shape), rescale, density)


def random_drop(delta: torch.Tensor, density: float, generator: torch.Generator, rescale: str | None = None) -> torch.Tensor:
    """DARE: keep each element independently with probability density, drawn from ``generator``."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return _rescaled(delta, keep, rescale, density)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA keep probabilities p = density − ε + 2ε·(r − 1)/(c − 1), r the ascending |δ| rank along dim 1.

    1-D tensors are ranked as one row; a row of one element (c = 1) gets p = density.
    """
    t = delta.unsqueeze(0) if delta.dim() < 2 else delta
    c = t.shape[1]
    if c == 1:
        return torch.full_like(delta, density)
    ranks = torch.argsort(torch.argsort(t.abs(), dim=1), dim=1).to(torch.float32)
    probs = (density - epsilon) + ranks / (c - 1) * 2 * epsilon
    return probs.reshape(delta.shape)


def della_magprune(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, rescale: str | None = None, name: str = ""
) -> torch.Tensor:
    """DELLA MagPrune: drop element i with probability 1 − p_i (see ``della_probabilities``)."""
    if density >= 1:
        return delta
    if not (0 < density - epsilon and density + epsilon < 1):
        raise MergeError(
            f"tensor {name!r}: della needs density ± epsilon inside (0, 1), got density={density}, epsilon={epsilon}"
        )
    probs = della_probabilities(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=generator) < probs
    return _rescaled(delta, keep, rescale, probs)


def threshold_drop(delta: torch.Tensor, threshold: float, density: float, rescale: str | None = None) -> torch.Tensor:
    """Whole-model TIES trim (TIES reference code): keep |δ| ≥ the expert's model-wide threshold."""
    if density >= 1:
        return delta
    return _rescaled(delta, delta.abs() >= threshold, rescale, density)


class ModelThreshold:
    """Exact k-th smallest |δ| over many tensors by a two-level radix histogram of float32 bits.

    Non-negative float32 values order like their int32 bit patterns, so counting the high 16 bits
    finds the bucket holding rank ``rank`` (1-based, ascending), and counting the low 16 bits inside
    that bucket finds the value. Memory: two 64 Ki-entry histograms, whatever the model size.
    """

    def __init__(self) -> None:
        self.high = torch.zeros(1 << 15, dtype=torch.int64)
        self.total = 0
        self.bucket: int | None = None
        self.low = torch.zeros(1 << 16, dtype=torch.int64)
        self.below = 0

    @staticmethod
    def _bits(delta: torch.Tensor) -> torch.Tensor:
        return delta.abs().reshape(-1).to(torch.float32).contiguous().view(torch.int32)

    def count_high(self, delta: torch.Tensor) -> None:
        bits = self._bits(delta)
        self.high += torch.bincount(bits >> 16, minlength=1 << 15)[: 1 << 15]
        self.total += bits.numel()

    def choose_bucket(self, rank: int) -> None:
        cum = torch.cumsum(self.high, 0)
        self.bucket = int(torch.searchsorted(cum, torch.tensor(rank)))
        self.below = int(cum[self.bucket - 1]) if self.bucket > 0 else 0

    def count_low(self, delta: torch.Tensor) -> None:
        bits = self._bits(delta)
        inside = bits[(bits >> 16) == self.bucket] & 0xFFFF
        self.low += torch.bincount(inside, minlength=1 << 16)

    def value(self, rank: int) -> float:
        cum = torch.cumsum(self.low, 0) + self.below
        low = int(torch.searchsorted(cum, torch.tensor(rank)))
        bits = torch.tensor([(self.bucket << 16) | low], dtype=torch.int32)
        return float(bits.view(torch.float32)[0])

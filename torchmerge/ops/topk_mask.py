"""Top-k selection mask that reproduces torch's CPU argsort under ties (TIES trimming, arXiv 2306.01708).

Op (namespace ``torchmerge``; kernel in csrc/topk_sort_mask.cpp):

  topk_mask_like_sort(Tensor values, int k) -> Tensor

values: 1-D float32 [n]; 0 ≤ k ≤ n. Returns a bool [n] mask, true exactly on the set
``torch.argsort(values, descending=True)[:k]`` — the reference below *is* that definition. Among equal
values the set depends on how torch's CPU sort (libstdc++ std::sort, an unstable introsort with torch's
KeyValueCompDesc: NaN first, NaNs equal, then '>') orders equal keys; mergekit 0.1.5 trims with that
argsort, so matching it is what makes TIES merges byte-identical.

The kernel replays only the introsort partitions on the path that holds position k (median-of-3 to
first, unguarded partition, depth limit 2·⌊log2 n⌋ with its heapsort fallback, then the stable
insertion sort of the ≤ 16-element segment straddling k): expected O(n) instead of O(n log n).
"""

from __future__ import annotations

import torch

from ._loader import define_op

__all__ = ["topk_mask_like_sort", "topk_mask_like_sort_reference"]


def check_topk_mask_like_sort(values, k) -> None:
    """Raise a one-line ValueError naming the first bad argument."""
    op = "topk_mask_like_sort"
    if not isinstance(values, torch.Tensor) or values.dim() != 1:
        got = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ValueError(f"{op}: values must be 1-D; got shape {got}")
    if values.dtype != torch.float32:
        raise ValueError(f"{op}: values must be a torch.float32 tensor; got {values.dtype}")
    n = values.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"{op}: k must be in [0, {n}] (values.numel()); got {k}")


def topk_mask_like_sort_reference(values: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    """mask[i] = i ∈ torch.argsort(v, descending=True)[:k] (unstable CPU sort, as mergekit calls it),
    v = |values| when `absolute` (the TIES trim key), else values."""
    check_topk_mask_like_sort(values, k)
    if absolute:
        values = values.abs()
    mask = torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    mask[torch.argsort(values, descending=True)[:k]] = True
    return mask


def _topk_mask_like_sort_fake(values, k, absolute=False):
    check_topk_mask_like_sort(values, k)
    return values.new_empty(values.shape, dtype=torch.bool)


define_op(
    "topk_mask_like_sort",
    "(Tensor values, int k, bool absolute=False) -> Tensor",
    reference=topk_mask_like_sort_reference,
    fake=_topk_mask_like_sort_fake,
)


def topk_mask_like_sort(values: torch.Tensor, k: int, absolute: bool = False) -> torch.Tensor:
    """Bool mask of ``torch.argsort(values, descending=True)[:k]``, of ``|values|`` when ``absolute``
    (``torch.ops.torchmerge.topk_mask_like_sort``; the absolute value is taken in the kernel's own copy)."""
    check_topk_mask_like_sort(values, k)
    return torch.ops.torchmerge.topk_mask_like_sort(values, k, absolute)

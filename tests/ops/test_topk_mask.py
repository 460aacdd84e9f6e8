"""topk_mask_like_sort: the exact set torch.argsort(descending=True)[:k] keeps, ties and NaN included."""

from __future__ import annotations

import random

import pytest
import torch

import torchmerge.ops  # noqa: F401  (defines the op, loads the kernel)
from torchmerge.ops.topk_mask import topk_mask_like_sort, topk_mask_like_sort_reference

op = torch.ops.torchmerge.topk_mask_like_sort


def argsort_mask(a: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(a.numel(), dtype=torch.bool)
    mask[torch.argsort(a, descending=True)[:k]] = True
    return mask


def tie_heavy(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "small_int":
        return torch.randint(0, int(torch.randint(2, 50, (1,), generator=g)), (n,), generator=g).float()
    if kind == "bf16_abs":  # |δ| of bf16 weights: many equal magnitudes
        return (0.01 * torch.randn(n, generator=g)).bfloat16().float().abs()
    if kind == "all_equal":
        return torch.full((n,), 0.25)
    a = torch.randint(-3, 4, (n,), generator=g).float()  # signed ints with NaN and -0.0
    a[torch.rand(n, generator=g) < 0.1] = float("nan")
    a[torch.rand(n, generator=g) < 0.1] = -0.0
    return a


def median_of_3_killer(n: int, seed: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Input that drives libstdc++ introsort to its depth limit (McIlroy's antiqsort adversary).

    Replays introsort's partitions along the larger side, naming values lazily: an undecided ("gas")
    element compared with another one is frozen to the next smallest value, so every partition peels
    off few elements. Gas left at the depth limit only ever compared as larger than frozen values, so
    it may hold any tied values above them: the heapsort fallback then decides among ties.
    Returns (values for a descending sort, the [f, l) range left to the heapsort).
    """
    val: list[int | None] = [None] * n
    state = {"solid": 0, "cand": -1}

    def before(x: int, y: int) -> bool:
        if val[x] is None and val[y] is None:
            z = x if x == state["cand"] else y
            val[z], state["solid"] = state["solid"], state["solid"] + 1
        if val[x] is None:
            state["cand"] = x
        elif val[y] is None:
            state["cand"] = y
        return (n if val[x] is None else val[x]) < (n if val[y] is None else val[y])

    a, f, l, depth = list(range(n)), 0, n, 2 * (n.bit_length() - 1)
    while l - f > 16 and depth > 0:
        depth -= 1
        p, q, r = f + 1, f + (l - f) // 2, l - 1
        if before(a[p], a[q]):
            m = q if before(a[q], a[r]) else (r if before(a[p], a[r]) else p)
        else:
            m = p if before(a[p], a[r]) else (r if before(a[q], a[r]) else q)
        a[f], a[m] = a[m], a[f]
        lo, hi = f + 1, l
        while True:
            while before(a[lo], a[f]):
                lo += 1
            hi -= 1
            while before(a[f], a[hi]):
                hi -= 1
            if lo >= hi:
                break
            a[lo], a[hi] = a[hi], a[lo]
            lo += 1
        f, l = (f, lo) if lo - f >= l - lo else (lo, l)
    assert depth == 0, "adversary did not reach the depth limit"
    gas = random.Random(seed).choices(range(4), k=n)
    rank = [v if v is not None else state["solid"] + gas[i] for i, v in enumerate(val)]
    return -torch.tensor(rank, dtype=torch.float32), (f, l)  # smaller rank sorts first in descending order


KINDS = ["small_int", "bf16_abs", "all_equal", "nan_signed"]


@pytest.mark.parametrize("kind", KINDS)
def test_matches_argsort_on_tie_heavy_inputs(kind):
    g = torch.Generator().manual_seed(KINDS.index(kind))
    rng = random.Random(KINDS.index(kind))
    for n in [1, 2, 3, 15, 16, 17, 18, 31, 32, 33, 100, 129, 257, 1000, 5000, 70_000, 300_000]:
        a = tie_heavy(kind, n, g)
        for k in sorted({0, 1, n // 2, n - 1, n, *(rng.randint(0, n) for _ in range(4))}):
            assert torch.equal(op(a, k), argsort_mask(a, k)), f"{kind} n={n} k={k}"


def test_matches_argsort_at_2m_elements():
    g = torch.Generator().manual_seed(7)
    n = 2_000_000
    a = (0.02 * torch.randn(n, generator=g)).bfloat16().float().abs()
    for k in (1, n // 5, n // 2, n - 3):
        assert torch.equal(op(a, k), argsort_mask(a, k)), f"k={k}"


@pytest.mark.parametrize("n", [200, 1000, 3000])
def test_heapsort_fallback_at_the_depth_limit(n):
    a, (f, l) = median_of_3_killer(n, seed=n)
    assert l - f > 16
    for k in list(range(max(0, f - 3), min(n, l + 3) + 1)) + [0, n]:
        assert torch.equal(op(a, k), argsort_mask(a, k)), f"n={n} k={k}"


def test_reference_is_the_definition_and_keeps_exactly_k():
    g = torch.Generator().manual_seed(3)
    a = tie_heavy("small_int", 1000, g)
    for k in (0, 1, 400, 1000):
        got = topk_mask_like_sort_reference(a, k)
        assert torch.equal(got, argsort_mask(a, k)) and int(got.sum()) == k


def test_non_contiguous_input():
    a = tie_heavy("small_int", 4000, torch.Generator().manual_seed(5))[::2]
    assert torch.equal(op(a, 777), argsort_mask(a, 777))


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    for a, k in [(tie_heavy("small_int", 300, g), 100), (tie_heavy("nan_signed", 64, g), 20), (torch.rand(5), 5)]:
        torch.library.opcheck(torch.ops.torchmerge.topk_mask_like_sort.default, (a, k))


@pytest.mark.parametrize(
    "values, k, message",
    [
        (torch.zeros(2, 3), 1, "values must be 1-D"),
        (torch.zeros(()), 0, "values must be 1-D"),
        (torch.zeros(8, dtype=torch.float64), 1, "values must be a torch.float32 tensor"),
        (torch.zeros(8, dtype=torch.bfloat16), 1, "values must be a torch.float32 tensor"),
        (torch.zeros(8), -1, r"k must be in \[0, 8\]"),
        (torch.zeros(8), 9, r"k must be in \[0, 8\]"),
    ],
)
def test_bad_input(values, k, message):
    with pytest.raises(ValueError, match=message):
        op(values, k)
    with pytest.raises(ValueError, match=message):
        topk_mask_like_sort(values, k)
    with pytest.raises(ValueError, match=message):
        topk_mask_like_sort_reference(values, k)


@pytest.mark.parametrize("n, k", [(1000, 300), (200_003, 77_777)])
def test_absolute_matches_argsort_of_abs(n, k):
    """absolute=True keeps argsort(|values|, descending)[:k]: the TIES trim set, signs and ties included."""
    g = torch.Generator().manual_seed(n)
    values = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).float()  # tie-heavy, both signs
    values[:5] = torch.tensor([-0.0, 0.0, float("nan"), -values[10].item(), values[10].item()])
    want = torch.zeros(n, dtype=torch.bool)
    want[torch.argsort(values.abs(), descending=True)[:k]] = True
    assert torch.equal(torch.ops.torchmerge.topk_mask_like_sort(values, k, True), want)

"""Fused merge kernels: bit-identical to the unfused fp32 arithmetic on every ISA path."""

from __future__ import annotations

import pytest
import torch

from torchmerge.ops import merge_kernels as mk

def _pair(n: int, e_dtype, b_dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g) * 0.02
    expert = base + torch.randn(n, generator=g) * 1e-3
    return expert.to(e_dtype), base.to(b_dtype)


@pytest.mark.parametrize("e_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 17, 100_003])
def test_delta_and_axpy_match_plain_fp32_ops(isa, e_dtype, b_dtype, n):
    expert, base = _pair(n, e_dtype, b_dtype)
    # independent reference: the plain torch ops, each rounded to fp32, as mergekit writes them
    want_delta = expert.to(torch.float32) - base.to(torch.float32)
    assert torch.equal(torch.ops.torchmerge.merge_delta(expert, base), want_delta)
    acc = torch.randn(n, generator=torch.Generator().manual_seed(1))
    want_acc = acc + want_delta * torch.tensor(0.3, dtype=torch.float32)
    torch.ops.torchmerge.merge_axpy_delta_(acc, expert, base, 0.3)
    assert torch.equal(acc, want_acc)


@pytest.mark.parametrize("e_dtype", [torch.float32, torch.bfloat16])
def test_scaled_delta_is_zero_plus_term(isa, e_dtype):
    expert, base = _pair(50_001, e_dtype, torch.float32)
    base[:8] = expert[:8].to(torch.float32)  # exact zeros: the term is ±0 and the sum must be +0
    want = torch.zeros(expert.shape) + (expert.to(torch.float32) - base) * torch.tensor(-0.7)
    got = torch.ops.torchmerge.merge_scaled_delta(expert, base, -0.7)
    assert torch.equal(got, want) and not torch.signbit(got[:8]).any()


@pytest.mark.parametrize("divisor, lam", [(None, None), (2.7, None), (None, 0.5), (0.3, 1.7)])
def test_finish_rounds_like_separate_ops(isa, divisor, lam):
    g = torch.Generator().manual_seed(3)
    base, mixed = torch.randn(70_001, generator=g), torch.randn(70_001, generator=g) * 1e-2
    m = mixed.clone()
    if divisor is not None:
        m = m / torch.tensor(divisor, dtype=torch.float32)
    if lam is not None:
        m = m * torch.tensor(lam, dtype=torch.float32)
    assert torch.equal(torch.ops.torchmerge.merge_finish(base, mixed, divisor, lam), base + m)
    for dtype in (torch.bfloat16, torch.float16):  # the cast rounds exactly as Tensor.to does
        assert torch.equal(torch.ops.torchmerge.merge_finish(base, mixed, divisor, lam, dtype), (base + m).to(dtype))
    for b_dtype in (torch.bfloat16, torch.float16):  # a stored base is read as is: fp32(b) + m
        b = base.to(b_dtype)
        for out_dtype in (None, torch.bfloat16):
            want = b.float() + m if out_dtype is None else (b.float() + m).to(out_dtype)
            assert torch.equal(torch.ops.torchmerge.merge_finish(b, mixed, divisor, lam, out_dtype), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_matches_isfinite(isa, dtype):
    n = 3 * (1 << 16) + 17  # several parallel chunks and a ragged tail
    big = torch.finfo(dtype).max
    t = torch.randn(n, dtype=torch.float32).to(dtype)
    t[5] = big  # the largest finite value has an exponent one below all ones: still finite
    t[6] = -torch.finfo(dtype).tiny / 2  # subnormal
    assert mk.all_finite(t) is True and bool(torch.isfinite(t).all())
    for pos in (0, 70_000, n - 1):
        for bad in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u[pos] = bad
            assert mk.all_finite(u) is False, (pos, bad)
    assert mk.all_finite(t[::2]) is True  # non-contiguous views are read correctly
    assert mk.all_finite(torch.tensor([], dtype=dtype)) is True
    assert mk.all_finite(torch.tensor([1, 2], dtype=torch.int32)) is True


@pytest.mark.parametrize("weighted_vote, count_vote", [(True, False), (False, False), (True, True)])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("mask_in_kernel", [False, True])
def test_ties_election_matches_plain_ops(isa, weighted_vote, count_vote, normalize, mask_in_kernel):
    """Against TIES' sign election written out plainly (mergekit's "sum" consensus, Yadav et al. 2023)."""
    g = torch.Generator().manual_seed(5)
    deltas = [torch.randn(30_011, generator=g) for _ in range(3)]
    keeps = [torch.rand(30_011, generator=g) < 0.4 for _ in range(3)]
    taus = [d * k.float() for d, k in zip(deltas, keeps)]
    weights = [0.3, -0.5, 0.9]
    bufs = [torch.full((30_011,), float("nan")) for _ in range(5)]  # garbage: `first` must overwrite it
    for i, (tau, w) in enumerate(zip(taus, weights)):
        args = (deltas[i], w, w, weighted_vote, count_vote, i == 0, keeps[i]) if mask_in_kernel else \
            (tau, w, w, weighted_vote, count_vote, i == 0)
        torch.ops.torchmerge.ties_accumulate_(*bufs, *args)
    got = torch.ops.torchmerge.ties_resolve(*bufs, normalize)
    wt = [t * torch.tensor(w) for t, w in zip(taus, weights)]
    votes = wt if weighted_vote else taus
    vote = torch.zeros(30_011)
    for v in votes:
        vote = vote + (torch.sign(v) if count_vote else v)
    up = vote >= 0
    agree = [torch.where(up, v > 0, v < 0) for v in votes]
    mixed = torch.zeros(30_011)
    div = torch.zeros(30_011)
    for a, x, w in zip(agree, wt, weights):
        mixed = mixed + torch.where(a, x, 0.0)
        div = div + torch.where(a, torch.tensor(w), 0.0)
    if normalize:
        mixed = mixed / torch.where(div == 0, 1.0, div)
    assert torch.equal(got, mixed)


def test_special_values_propagate(isa):
    expert = torch.tensor([float("nan"), float("inf"), 1.0, -0.0], dtype=torch.bfloat16)
    base = torch.tensor([0.0, 1.0, float("inf"), 0.0], dtype=torch.bfloat16)
    got = torch.ops.torchmerge.merge_delta(expert, base)
    want = expert.float() - base.float()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_opcheck():
    expert, base = _pair(64, torch.bfloat16, torch.float32)
    torch.library.opcheck(torch.ops.torchmerge.merge_delta.default, (expert, base))
    torch.library.opcheck(torch.ops.torchmerge.merge_axpy_delta_.default, (torch.zeros(64), expert, base, 0.5))
    torch.library.opcheck(torch.ops.torchmerge.merge_scaled_delta.default, (expert, base, 0.5))
    torch.library.opcheck(torch.ops.torchmerge.merge_finish.default, (base, torch.randn(64), 2.0, None))
    torch.library.opcheck(torch.ops.torchmerge.merge_finish.default, (expert, torch.randn(64), None, 0.5, torch.bfloat16))
    torch.library.opcheck(torch.ops.torchmerge.all_finite.default, (expert,))
    bufs = [torch.randn(64) for _ in range(5)]
    torch.library.opcheck(torch.ops.torchmerge.ties_accumulate_.default, (*bufs, torch.randn(64), 0.5, 0.5, True, False, False))
    torch.library.opcheck(torch.ops.torchmerge.ties_resolve.default, (*bufs, True))


@pytest.mark.parametrize("call, match", [
    (lambda: mk.merge_delta(torch.zeros(3), torch.zeros(4)), "shape"),
    (lambda: mk.merge_delta(torch.zeros(3, dtype=torch.int32), torch.zeros(3)), "float32, bfloat16 or float16"),
    (lambda: mk.merge_finish(torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16), None, None), "float32"),
    (lambda: mk.merge_finish(torch.zeros(3, dtype=torch.int32), torch.zeros(3), None, None), "base must be float32, bfloat16 or float16"),
    (lambda: mk.merge_axpy_delta_(torch.zeros(3, dtype=torch.float16), torch.zeros(3), torch.zeros(3), 1.0), "acc"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()

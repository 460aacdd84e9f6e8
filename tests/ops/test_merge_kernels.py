"""Fused merge kernels: bit-identical to the unfused fp32 arithmetic on every ISA path."""

from __future__ import annotations

import pytest
import torch

from torchmerge import ops
from torchmerge.ops import merge_kernels as mk

ISAS = ["auto", "avx2", "scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    if not ops.native_available():
        pytest.skip("native kernels not built")
    try:
        previous = ops.set_cpu_isa(request.param)
    except RuntimeError as e:  # this CPU lacks the ISA
        pytest.skip(str(e))
    yield request.param
    ops.set_cpu_isa(previous)


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


@pytest.mark.parametrize("call, match", [
    (lambda: mk.merge_delta(torch.zeros(3), torch.zeros(4)), "shape"),
    (lambda: mk.merge_delta(torch.zeros(3, dtype=torch.int32), torch.zeros(3)), "float32, bfloat16 or float16"),
    (lambda: mk.merge_finish(torch.zeros(3), torch.zeros(3, dtype=torch.bfloat16), None, None), "float32"),
    (lambda: mk.merge_axpy_delta_(torch.zeros(3, dtype=torch.float16), torch.zeros(3), torch.zeros(3), 1.0), "acc"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()

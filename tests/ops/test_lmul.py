"""L-Mul (arXiv 2410.00907): reference semantics, IEEE special values, kernel bit-exactness, errors."""

from __future__ import annotations

import math

import pytest
import torch

from torchmerge.ops.lmul import (
    default_offset_exp,
    lmul,
    lmul_matmul,
    lmul_matmul_reference,
    lmul_reference,
    round_mantissa,
)

INF, NAN = math.inf, math.nan


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), "NaN positions differ"
    diff = (got.view(torch.int32) != want.view(torch.int32)) & ~nan
    assert not diff.any(), f"{int(diff.sum())} elements differ, first at {diff.nonzero()[0].tolist()}"


def test_default_offset_matches_paper():
    assert [default_offset_exp(m) for m in (1, 2, 3, 4, 5, 10, 23)] == [1, 2, 3, 3, 4, 4, 4]


def test_round_mantissa_is_round_to_nearest_even():
    x = torch.tensor([1.03125, 1.09375, 1.0625, -1.03125, 1e-40, 3.4028235e38, INF, -INF])
    want = torch.tensor([1.0, 1.125, 1.0625, -1.0, 0.0, INF, INF, -INF])  # ties to even; FTZ; carry to inf
    assert_same_bits(round_mantissa(x, 4), want)
    assert torch.isnan(round_mantissa(torch.tensor([NAN]), 4)).all()


@pytest.mark.parametrize("m", [23, 4])
def test_mean_relative_error_matches_paper(m):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10**6, generator=g), torch.randn(10**6, generator=g)
    exact = x.double() * y.double()
    err = ((lmul(x, y, m).double() - exact).abs() / exact.abs()).mean().item()
    want = {23: 0.027, 4: 0.053}[m]
    assert abs(err - want) < 0.003, f"mean relative error {err:.4f} at m={m}, expected {want}±0.003"


# (x, y, expected) with IEEE-multiply expectations written by hand; m = 23, l = 4 (offset 2^-4).
SPECIAL_CASES = [
    (0.0, 2.0, 0.0), (-0.0, 2.0, -0.0), (0.0, -2.0, -0.0), (-0.0, -0.0, 0.0),
    (1e-40, 2.0, 0.0), (-1e-40, 3.0, -0.0), (1e-40, -1e-40, -0.0),  # subnormals flush to zero
    (INF, 2.0, INF), (INF, -2.0, -INF), (-INF, -INF, INF), (-INF, 1e30, -INF),
    (INF, 0.0, NAN), (-0.0, -INF, NAN), (INF, 1e-40, NAN),  # inf·0 (a subnormal counts as 0)
    (NAN, 1.0, NAN), (NAN, 0.0, NAN), (INF, NAN, NAN), (-NAN, -2.0, NAN),
    (1e30, 1e30, INF), (-1e30, 1e30, -INF), (3e38, 2.0, INF),  # overflow saturates
    (1e-30, 1e-30, 0.0), (-1e-30, 1e-30, -0.0), (1e-20, 1e-20, 0.0),  # underflow flushes
    (2.0**-63, 2.0**-63, 1.0625 * 2.0**-126), (2.0**-64, 2.0**-63, 0.0),  # smallest normal result / below
    (1.0, 1.0, 1.0625), (2.0, 3.0, 6.25), (-2.0, 3.0, -6.25),  # (1 + xm + ym + 2^-4)·2^(xe+ye)
    (-1.5, 1.5, -2.125),  # xm + ym + 2^-4 = 1.0625 carries into the exponent: 2^1 · 1.0625
]


def test_special_values_table(isa):
    x = torch.tensor([c[0] for c in SPECIAL_CASES], dtype=torch.float32)
    y = torch.tensor([c[1] for c in SPECIAL_CASES], dtype=torch.float32)
    want = torch.tensor([c[2] for c in SPECIAL_CASES], dtype=torch.float32)
    for got in (lmul(x, y), lmul(y, x), lmul_reference(x, y)):
        assert_same_bits(got, want)
    # the same values through the matmul (K = 1) hit every kernel path
    # (the sum starts at +0.0, so a -0 product reads +0 there)
    assert_same_bits(lmul_matmul(x[:, None], y[None, :]).diagonal(), want + 0.0)


def test_nan_is_canonical_quiet_nan():
    got = lmul(torch.tensor([NAN, INF]), torch.tensor([1.0, 0.0]))
    assert got.view(torch.int32).tolist() == [0x7FC00000, 0x7FC00000]


@pytest.mark.parametrize("m,l", [(23, -1), (4, -1), (4, 3), (2, -1), (7, 1), (10, 0), (23, 23)])
def test_elementwise_bit_exact_vs_reference(isa, m, l):
    g = torch.Generator().manual_seed(m * 31 + l)
    x = torch.randn(4099, generator=g) * torch.exp(torch.randn(4099, generator=g) * 20)
    y = torch.randn(1, 4099, generator=g)
    x[::97] = 0.0
    assert_same_bits(lmul(x, y, m, None if l == -1 else l), lmul_reference(x, y, m, l))


def _operands(kind: str, g: torch.Generator, shape_a, shape_b):
    a, b = torch.randn(*shape_a, generator=g), torch.randn(*shape_b, generator=g)
    if kind == "zeros":  # pruned weights: the masked path
        b[torch.rand(*shape_b, generator=g) < 0.3] = 0.0
        a[:, a.shape[1] // 2] = 0.0
    elif kind == "tiny":  # products underflow
        a[1::2] *= 1e-25
        b[:, ::3] *= 1e-15
    elif kind == "special":  # inf / NaN / 0·inf: the exact scalar fallback
        a[0, 3], a[1, 4], b[7, 2], b[8, 9] = INF, NAN, -INF, 0.0
        a[2, 8] = 0.0
    elif kind == "huge":  # products may overflow: scalar fallback
        a[0, 0], b[0, 0] = 1e30, 1e20
    return a, b


_SHAPES = [(37, 300, 150), (4, 1, 64), (9, 513, 70), (1, 20, 200)]
# planted inf/NaN/huge values need at least 3 rows and 10 columns on each side
_CASES = [(kind, s) for kind in ("normal", "zeros", "tiny", "special", "huge") for s in _SHAPES
          if kind not in ("special", "huge") or (s[0] >= 3 and s[1] >= 10 and s[2] >= 10)]


@pytest.mark.parametrize("kind, shape", _CASES)
def test_matmul_bit_exact_vs_reference(isa, kind, shape):
    m_, k, n = shape
    g = torch.Generator().manual_seed(m_ * k + n)
    a, b = _operands(kind, g, (m_, k), (k, n))
    for m, l in ((23, -1), (4, 3)):
        assert_same_bits(lmul_matmul(a, b, m, None if l == -1 else l), lmul_matmul_reference(a, b, m, l))


def test_matmul_batched_and_close_to_exact():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 64, generator=g), torch.randn(64, 32, generator=g)
    out = lmul_matmul(a, b)
    assert out.shape == (2, 3, 32)
    assert_same_bits(out, lmul_matmul_reference(a, b))
    rel = (out - a @ b).norm() / (a @ b).norm()
    assert rel < 0.1  # L-Mul products are ~3 % off each, errors partly cancel in the sum


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: lmul(torch.ones(3, dtype=torch.float64), torch.ones(3)), r"lmul: x must be a torch\.float32"),
        (lambda: lmul(torch.ones(3), torch.ones(3, dtype=torch.bfloat16)), r"lmul: y must be a torch\.float32"),
        (lambda: lmul(torch.ones(3), torch.ones(4)), r"broadcastable"),
        (lambda: lmul(torch.ones(3), torch.ones(3), 0), r"mantissa_bits must be an int in \[1, 23\]"),
        (lambda: lmul(torch.ones(3), torch.ones(3), 24), r"mantissa_bits must be an int in \[1, 23\]"),
        (lambda: lmul(torch.ones(3), torch.ones(3), 4, 24), r"offset_exp must be -1 .* \[0, 23\]"),
        (lambda: lmul_matmul(torch.ones(2, 3), torch.ones(4, 5)), r"a's last dim \(3\) must equal b's K"),
        (lambda: lmul_matmul(torch.ones(2, 3), torch.ones(3, 5, 1)), r"b must be 2-D \[K, N\]"),
        (lambda: lmul_matmul(torch.ones(2, 3, dtype=torch.int32), torch.ones(3, 5)), r"a must be a torch\.float32"),
        (lambda: lmul_matmul(torch.ones(2, 3), torch.ones(3, 5), 4, -2), r"offset_exp must be -1"),
    ],
)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_raw_op_raises_value_error_too():
    with pytest.raises(ValueError, match="mantissa_bits"):
        torch.ops.torchmerge.lmul(torch.ones(2), torch.ones(2), 30, -1)
    with pytest.raises(ValueError, match="must equal b's K"):
        torch.ops.torchmerge.lmul_matmul(torch.ones(2, 3), torch.ones(2, 3), 23, -1)


def test_opcheck():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 7, generator=g), torch.randn(7, generator=g)
    torch.library.opcheck(torch.ops.torchmerge.lmul.default, (x, y, 4, -1))
    torch.library.opcheck(torch.ops.torchmerge.lmul.default, (x, y, 23, 2))
    a, b = torch.randn(3, 6, 16, generator=g), torch.randn(16, 9, generator=g)
    torch.library.opcheck(torch.ops.torchmerge.lmul_matmul.default, (a, b, 23, -1))

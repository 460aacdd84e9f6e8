"""Quantisation helpers and calibration observers (torchmerge.ops.quant)."""

from fractions import Fraction
import math

import pytest
import torch

from torchmerge.ops import quant


def test_dyadic_multiplier_is_31_bit_and_accurate():
    real = torch.cat([(torch.rand(2000, dtype=torch.float64) + 0.1) * 10.0 ** torch.randint(-8, 3, (2000,)), torch.tensor([1.0, 0.5, 2**-20])])
    m, s = quant.dyadic_multiplier(real)
    assert m.dtype == s.dtype == torch.int32
    assert bool(((m.long() >= 2**30) & (m.long() < 2**31)).all()) and bool(((s >= 0) & (s <= 62)).all())
    approx = m.double() / torch.pow(2.0, s.double())
    assert float(((approx - real) / real).abs().max()) <= 2.0**-30


def test_dyadic_multiplier_edge_cases():
    m, s = quant.dyadic_multiplier(torch.tensor([0.0, -0.75, 1e-15]))
    assert (m[0].item(), s[0].item()) == (0, 0)
    assert m[1].item() == -(3 << 29) and s[1].item() == 31  # -0.75 = -(3·2^29) / 2^31
    assert s[2].item() == 62 and m[2].item() == round(1e-15 * 2**62)  # mantissa shrinks once s hits 62
    with pytest.raises(ValueError, match="multiplier"):
        quant.dyadic_multiplier(torch.tensor([2.0**31]))


def _round_half_up(v: int, s: int) -> int:
    return math.floor(Fraction(v, 2**s) + Fraction(1, 2))


def test_round_shift_is_round_half_up_including_negative_ties():
    v = torch.tensor([5, -5, 6, -6, 7, -7, 3, -3, 2**40 + 2**9, -(2**40) - 2**9], dtype=torch.int64)
    for s in (0, 1, 2, 10):
        got = quant.round_shift(v, s).tolist()
        assert got == [_round_half_up(int(a), s) for a in v]


def test_apply_dyadic_saturates():
    v = torch.tensor([10**6, -(10**6), 100], dtype=torch.int32)
    m, s = quant.dyadic_multiplier(torch.tensor([1.0]))
    out = quant.apply_dyadic(v, m, s, torch.int8)
    assert out.tolist() == [127, -128, 100] and out.dtype == torch.int8
    assert quant.apply_dyadic(v, m, s, torch.int16).tolist() == [32767, -32768, 100]


def test_weight_quantisation_is_symmetric_per_output_channel():
    w = torch.randn(16, 32) * torch.logspace(-3, 1, 16)[:, None]
    q, scale = quant.quantize_weight_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    # lossy, by at most half a step:
    assert bool(((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-7).all())


def test_activation_quantisation_int8_and_int16():
    x = torch.randn(1000) * 3
    for dtype, qmax in ((torch.int8, 127), (torch.int16, 32767)):
        scale = quant.scale_for(float(x.abs().max()), dtype)
        q = quant.quantize_per_tensor(x, scale, dtype)
        assert q.dtype == dtype and int(q.abs().max()) == qmax
        assert float((quant.dequantize(q, scale) - x).abs().max()) <= scale / 2 + 1e-6


def test_observers():
    batches = [torch.tensor([-1.0, 2.0]), torch.tensor([4.0, -3.0]), torch.tensor([1.0, -0.5])]
    mm, ema = quant.MinMaxObserver(), quant.EmaObserver()
    for b in batches:
        mm.update(b)
        ema.update(b)
    assert mm.amax() == 4.0 and mm.scale() == 4.0 / 127
    expected = 2.0
    for b in (4.0, 1.0):
        expected = 0.95 * expected + 0.05 * b
    assert ema.amax() == pytest.approx(expected, rel=1e-12)
    pct = quant.PercentileObserver(percentile=99.0)
    x = torch.arange(1, 1001, dtype=torch.float32)
    x[-1] = 1e6  # one outlier is clipped away
    pct.update(x)
    assert pct.amax() == 990.0 and pct.scale(torch.int16) == 990.0 / 32767


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="momentum"):
        quant.EmaObserver(momentum=1.5)
    with pytest.raises(ValueError, match="percentile"):
        quant.PercentileObserver(percentile=0)
    with pytest.raises(ValueError, match="no data"):
        quant.MinMaxObserver().scale()
    with pytest.raises(ValueError, match="dtype must be one of"):
        quant.quantize_per_tensor(torch.ones(2), 1.0, torch.float32)
    with pytest.raises(ValueError, match="weight must be a 2-D floating"):
        quant.quantize_weight_per_channel(torch.ones(3, dtype=torch.int8))

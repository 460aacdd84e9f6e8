"""Integer-only non-linear ops: accuracy vs float (≥1e5 values), hand formulas, opcheck, bad inputs."""

from fractions import Fraction
import math

import pytest
import torch

from torchmerge.ops import intnonlinear as nl, quant

GEN = torch.Generator().manual_seed(1234)


def _q(xf, dtype=torch.int8, amax=None):
    scale = quant.scale_for(float(xf.abs().max()) if amax is None else amax, dtype)
    return quant.quantize_per_tensor(xf, scale, dtype), scale


# ---- accuracy against float, ≥ 1e5 random inputs -----------------------------------------------------


@pytest.mark.parametrize("method, max_bound", [("shift", 0.12), ("poly", 0.12)])
def test_shiftmax_vs_softmax(method, max_bound):
    xq, scale = _q(torch.randn(512, 197, generator=GEN) * 3)  # ViT attention rows, 100 864 values
    y, out_scale = nl.shiftmax(xq, scale, method=method)
    err = (y.double() * out_scale - torch.softmax(xq.double() * scale, dim=-1)).abs()
    assert err.numel() >= 10**5 and y.dtype == torch.int8 and int(y.min()) >= 0
    assert float(err.max()) <= max_bound and float(err.mean()) <= 2e-3


def test_shiftmax_short_rows_and_16_bit_output():
    xq, scale = _q(torch.randn(2048, 64, generator=GEN) * 2)
    y, out_scale = nl.shiftmax(xq, scale)
    err = (y.double() * out_scale - torch.softmax(xq.double() * scale, -1)).abs()
    assert float(err.max()) <= 0.05 and float(err.mean()) <= 2e-3
    y16, s16 = nl.shiftmax(xq, scale, out_bits=16)
    err16 = (y16.double() * s16 - torch.softmax(xq.double() * scale, -1)).abs()
    assert y16.dtype == torch.int16 and float(err16.mean()) < float(err.mean()) / 2


def test_i_layernorm_vs_layernorm():
    d = 768
    for dtype in (torch.int8, torch.int16):
        xf = torch.randn(160, d, generator=GEN) * 2 + 0.5
        xq, scale = _q(xf, dtype)
        w, b = torch.randn(d, generator=GEN) * 0.5 + 1, torch.randn(d, generator=GEN) * 0.2
        ref = torch.nn.functional.layer_norm(xq.double() * scale, (d,), w.double(), b.double(), eps=0.0)
        out_scale = float(ref.abs().max()) * 1.05 / 32767
        y, s = nl.i_layernorm(xq, scale, w, b, out_scale, torch.int16)
        err = y.double() * s - ref
        assert err.numel() >= 10**5 and float(err.norm() / ref.norm()) <= 0.01
        y8, s8 = nl.i_layernorm(xq, scale, w, b, out_scale * 32767 / 127, torch.int8)
        assert float((y8.double() * s8 - ref).abs().max()) <= 1.5 * s8  # two half-step roundings + ŷ error


def test_isqrt_whole_32_bit_range():
    small = torch.arange(0, 2**16, dtype=torch.int64)  # every value below 2^16
    uniform = torch.randint(0, 2**32, (50_000,), generator=GEN, dtype=torch.int64)
    log_uniform = torch.pow(2.0, torch.rand(50_000, generator=GEN, dtype=torch.float64) * 32).long().clamp(max=2**32 - 1)
    roots = torch.randint(1, 2**16, (5_000,), generator=GEN, dtype=torch.int64)
    squares = torch.cat([roots * roots, roots * roots - 1, torch.tensor([2**31 - 1, 2**32 - 1, 1, 0])])
    n = torch.cat([small, uniform, log_uniform, squares])
    got = nl.isqrt(n)
    exact = torch.tensor([math.isqrt(v) for v in n.tolist()])
    assert int((got - exact).abs().max()) <= 1  # in fact exact: Newton from above stops at floor(sqrt)
    assert torch.equal(got, exact)
    n32 = n[n < 2**31].to(torch.int32)
    assert torch.equal(nl.isqrt(n32), exact[n < 2**31].to(torch.int32))


def test_shift_gelu_corrected_vs_published():
    xq, scale = _q(torch.randn(2048, 64, generator=GEN) * 3, amax=8.0)
    ref = torch.nn.functional.gelu(xq.double() * scale)
    y, s = nl.shift_gelu(xq, scale)
    err = (y.double() * s - ref).abs()
    assert float(err.max()) <= 0.07 and float(err.mean()) <= 0.015
    # the published form saturates: -20 in a row whose max is +20 gets σ ≈ 0.5 instead of 0
    s16 = 32 / 32767
    row = torch.tensor([[round(-20 / s16), round(20 / s16)] + [0] * 6], dtype=torch.int16)
    pub, ps = nl.shift_gelu(row, s16, published=True)
    fixed, fs = nl.shift_gelu(row, s16)
    assert 0.4 <= float(pub[0, 0]) / float(row[0, 0]) / 128 <= 0.6
    assert float(fixed[0, 0]) == 0.0 and abs(float(fixed[0, 1]) * fs - 20.0) < 0.2


def test_i_gelu_vs_gelu():
    scale = 1e-3
    xq = torch.round(torch.randn(800, 128, generator=GEN) * 3 / scale).to(torch.int32)
    y, s = nl.i_gelu(xq, scale)
    err = (y.double() * s - torch.nn.functional.gelu(xq.double() * scale)).abs()
    assert float(err.max()) <= 0.03 and float(err.mean()) <= 0.01


@pytest.mark.parametrize("method, dtype, amax, bound", [("shift", torch.int8, 10.0, 0.05), ("shift", torch.int16, 10.0, 0.05),
                                                        ("poly", torch.int16, 10.0, 0.003)])
def test_i_exp_vs_exp(method, dtype, amax, bound):
    xq, scale = _q(-torch.rand(100_000, generator=GEN) * amax, dtype, amax=amax)
    y, s = nl.i_exp(xq, scale, method)
    err = (y.double() * s - torch.exp(xq.double() * scale)).abs()
    assert float(err.max()) <= bound


# ---- independent hand formulas (Python integers / fractions, paper equations) -------------------------


def _hand_shift_exp(x: int, scale: float) -> int:
    """I-ViT: 2^p with p = 1.4375·x·s split as -q + f, f in (-1, 0]; 2^f ≈ 1 + f/2; result in units 1/(|x0|·2^15)."""
    x0 = math.floor(-16 / scale)
    t = max(23 * min(x, 0), 15 * x0)  # 16·1.4375·x in units of s/16
    q = math.floor(Fraction(t, x0))
    r = t - x0 * q
    return math.floor((Fraction(-x0) + Fraction(r, 2)) * 2 ** (15 - q))


def test_i_exp_and_shiftmax_match_hand_formula():
    scale = 0.07
    x = torch.randint(-128, 128, (6, 23), generator=GEN, dtype=torch.int8)
    e = nl.i_exp(x, scale)[0]
    assert e.tolist() == [[_hand_shift_exp(v, scale) for v in row] for row in x.tolist()]
    y = nl.shiftmax(x, scale)[0]
    for row, out in zip(x.tolist(), y.tolist()):
        es = [_hand_shift_exp(v - max(row), scale) for v in row]
        assert out == [min(math.floor(Fraction(v * 128, sum(es)) + Fraction(1, 2)), 127) for v in es] or all(
            abs(a - math.floor(Fraction(v * 128, sum(es)) + Fraction(1, 2))) <= 1 for a, v in zip(out, es))


def test_i_layernorm_matches_hand_formula():
    x = torch.randint(-128, 128, (3, 10), generator=GEN, dtype=torch.int8)
    mult, shift = quant.dyadic_multiplier(torch.full((10,), 0.01, dtype=torch.float64))
    bias = torch.arange(10, dtype=torch.int32)
    got = torch.ops.torchmerge.i_layernorm(x, mult, shift, bias, torch.int8)
    for row, out in zip(x.tolist(), got.tolist()):
        mean = Fraction(sum(row), len(row))
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / len(row))
        for c, (v, o) in enumerate(zip(row, out)):
            ideal = float(v - mean) / std * 2**12 * int(mult[c]) / 2 ** int(shift[c]) + c
            assert abs(o - ideal) <= 1.0


# ---- opcheck and bad inputs ---------------------------------------------------------------------------


def _samples():
    x8 = torch.randint(-128, 128, (4, 33), dtype=torch.int8)
    x16 = torch.randint(-3000, 3000, (2, 3, 17), dtype=torch.int16)
    mult, shift = quant.dyadic_multiplier(torch.full((17,), 0.003, dtype=torch.float64))
    return [
        ("isqrt", (torch.randint(0, 2**31 - 1, (50,), dtype=torch.int64),)),
        ("i_exp", (x8, 0.06, "shift")), ("i_exp", (x16, 0.003, "poly")),
        ("shiftmax", (x8, 0.06, 8, "shift")), ("shiftmax", (x16, 0.003, 12, "poly")),
        ("shift_gelu", (x8, 0.06, 8, False)), ("shift_gelu", (x16, 0.003, 8, True)),
        ("i_gelu", (x16.int() * 10, 3e-4)),
        ("i_layernorm", (x16, mult, shift, torch.zeros(17, dtype=torch.int32), torch.int16)),
    ]


@pytest.mark.parametrize("name, args", _samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    torch.library.opcheck(getattr(torch.ops.torchmerge, name), args)


X8 = torch.zeros(2, 8, dtype=torch.int8)
OK_P = (torch.ones(8, dtype=torch.int32), torch.ones(8, dtype=torch.int32), torch.zeros(8, dtype=torch.int32))


@pytest.mark.parametrize(
    "name, args, message",
    [
        ("isqrt", (torch.zeros(3),), "isqrt: x must be a tensor of dtype torch.int32 or torch.int64"),
        ("isqrt", (torch.tensor([-1]),), "isqrt: x must be non-negative"),
        ("i_exp", (torch.zeros(3), 0.1, "shift"), "i_exp: x must be a tensor of dtype torch.int8"),
        ("i_exp", (X8, -0.1, "shift"), "i_exp: scale must be a finite float > 0"),
        ("i_exp", (X8, 0.1, "taylor"), r"i_exp: method must be one of \('shift', 'poly'\)"),
        ("i_exp", (X8, 1e-6, "shift"), "i_exp: scale=1e-06 is too small for method='shift'"),
        ("shiftmax", (X8, 0.1, 1, "shift"), r"shiftmax: out_bits must be an int in \[2, 16\]"),
        ("shiftmax", (X8, float("nan"), 8, "shift"), "shiftmax: scale must be a finite float"),
        ("shift_gelu", (X8.int(), 0.1, 8, False), "shift_gelu: x must be a tensor of dtype torch.int8 or torch.int16"),
        ("shift_gelu", (X8, 0.1, 17, False), r"shift_gelu: sigmoid_bits must be an int in \[2, 16\]"),
        ("i_gelu", (X8.float(), 0.1), "i_gelu: x must be a tensor of dtype"),
        ("i_layernorm", (X8.int(), *OK_P, torch.int8), "i_layernorm: x must be a tensor of dtype torch.int8 or torch.int16"),
        ("i_layernorm", (X8, torch.ones(7, dtype=torch.int32), *OK_P[1:], torch.int8),
         r"i_layernorm: multiplier must be a torch.int32 tensor of shape \[8\]"),
        ("i_layernorm", (X8, OK_P[0], OK_P[1].long(), OK_P[2], torch.int8), r"i_layernorm: shift must be a torch.int32 tensor"),
        ("i_layernorm", (X8, *OK_P[:2], torch.zeros(8), torch.int8), r"i_layernorm: bias must be a torch.int32 tensor"),
        ("i_layernorm", (X8, *OK_P, torch.int32), "i_layernorm: out_dtype must be torch.int8 or torch.int16"),
    ],
)
def test_bad_inputs(name, args, message):
    for fn in (getattr(torch.ops.torchmerge, name), getattr(nl, f"{name}_reference")):
        with pytest.raises(ValueError, match=message):
            fn(*args)


def test_python_api_reports_output_scales():
    x8 = torch.randint(-128, 128, (4, 16), dtype=torch.int8)
    assert nl.shiftmax(x8, 0.05, out_bits=8)[1] == 2**-7
    assert nl.shift_gelu(x8, 0.05, sigmoid_bits=8)[1] == 0.05 / 128
    assert nl.i_exp(x8, 0.05)[1] == 1 / (320 * 2**15)  # x0 = floor(-16 / 0.05) = -320
    with pytest.raises(ValueError, match="out_scale must be a positive float"):
        nl.i_layernorm(x8, 0.05, torch.ones(16), None, 0.0)

"""int8_linear / requantize: reference vs hand formula, native vs reference, opcheck, bad inputs."""

from fractions import Fraction
import math

import pytest
import torch

import torchmerge.ops as ops
from torchmerge.ops import intlinear, quant

native = pytest.mark.skipif(not ops.native_available(), reason="torchmerge/_C.so not built")


def _case(m, k, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    bias = torch.randint(-(2**20), 2**20, (n,), dtype=torch.int32, generator=g)
    mult, shift = quant.dyadic_multiplier(torch.rand(n, dtype=torch.float64, generator=g) * 2e-4)
    return x, w, bias, mult, shift


def _hand(x, w, bias, mult, shift, out_dtype):
    """Python integers, explicit floor(v/2^s + 1/2) and saturation."""
    lo, hi = (-128, 127) if out_dtype == torch.int8 else (-32768, 32767)
    out = []
    for row in x.tolist():
        vals = []
        for n, wrow in enumerate(w.tolist()):
            acc = sum(a * b for a, b in zip(row, wrow)) + int(bias[n])
            v = math.floor(Fraction(acc * int(mult[n]), 2 ** int(shift[n])) + Fraction(1, 2))
            vals.append(min(max(v, lo), hi))
        out.append(vals)
    return torch.tensor(out, dtype=out_dtype)


@pytest.mark.parametrize("out_dtype", [torch.int8, torch.int16])
def test_reference_matches_hand_formula(out_dtype):
    x, w, bias, mult, shift = _case(5, 37, 9)
    if out_dtype == torch.int16:
        mult, shift = quant.dyadic_multiplier(torch.full((9,), 3e-3, dtype=torch.float64))
    got = intlinear.int8_linear_reference(x, w, bias, mult, shift, out_dtype)
    assert torch.equal(got, _hand(x, w, bias, mult, shift, out_dtype))
    assert got.abs().max() > 10  # the case exercises non-trivial values


def test_requantize_reference_matches_hand_formula():
    v = torch.randint(-(2**31), 2**31 - 1, (4, 6), dtype=torch.int32)
    mult, shift = quant.dyadic_multiplier(torch.rand(6, dtype=torch.float64) * 1e-7)
    got = intlinear.requantize_reference(v, mult, shift, torch.int16)
    hand = [[min(max(math.floor(Fraction(int(a) * int(mult[c]), 2 ** int(shift[c])) + Fraction(1, 2)), -32768), 32767)
             for c, a in enumerate(row)] for row in v.tolist()]
    assert got.tolist() == hand


@native
@pytest.mark.parametrize("shape", [(1, 64, 8), (5, 100, 7), (37, 256, 40), (64, 512, 48), (3, 2, 5, 72, 16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_bit_exact(shape, with_bias):
    *lead, k, n = shape
    x, w, bias, mult, shift = _case(math.prod(lead), k, n, seed=sum(shape))
    x = x.reshape(*lead, k)
    b = bias if with_bias else None
    for backend in ("auto", "onednn", "native"):
        previous = intlinear.set_int8_gemm(backend)
        try:
            for out_dtype in (torch.int8, torch.int16):
                got = torch.ops.torchmerge.int8_linear(x, w, b, mult, shift, out_dtype)
                assert torch.equal(got, intlinear.int8_linear_reference(x, w, b, mult, shift, out_dtype)), backend
        finally:
            intlinear.set_int8_gemm(previous)


def test_set_int8_gemm_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        intlinear.set_int8_gemm("mkl")


@native
def test_native_requantize_bit_exact():
    v = torch.randint(-(2**31), 2**31 - 1, (33, 20), dtype=torch.int32)
    mult, shift = quant.dyadic_multiplier(torch.rand(20, dtype=torch.float64) * 1e-5)
    for m, s in ((mult, shift), (mult[:1], shift[:1])):
        got = torch.ops.torchmerge.requantize(v, m, s, torch.int8)
        assert torch.equal(got, intlinear.requantize_reference(v, m, s, torch.int8))


@native
@pytest.mark.parametrize("in_dtype", [torch.int8, torch.int16])
def test_requantize_narrow_inputs_equal_their_int32_widening(isa, in_dtype):
    """int8/int16 inputs are widened inside the kernel: same result as requantizing x.to(int32) by hand."""
    info = torch.iinfo(in_dtype)
    v = torch.randint(info.min, info.max + 1, (67, 48), dtype=torch.int32).to(in_dtype)
    v[0, :2] = torch.tensor([info.min, info.max])
    mult, shift = quant.dyadic_multiplier(torch.rand(48, dtype=torch.float64) * 0.2)
    for m, s in ((mult, shift), (mult[:1], shift[:1])):
        for out_dtype in (torch.int8, torch.int16):
            want = intlinear.requantize_reference(v.to(torch.int32), m, s, out_dtype)
            assert torch.equal(intlinear.requantize_reference(v, m, s, out_dtype), want)
            assert torch.equal(torch.ops.torchmerge.requantize(v, m, s, out_dtype), want)


def test_end_to_end_close_to_float_linear():
    g = torch.Generator().manual_seed(3)
    xf, wf, bf = torch.randn(64, 256, generator=g), torch.randn(32, 256, generator=g) * 0.05, torch.randn(32, generator=g)
    yf = torch.nn.functional.linear(xf, wf, bf)
    wq, w_scale = quant.quantize_weight_per_channel(wf)
    x_scale, out_scale = quant.scale_for(float(xf.abs().max())), quant.scale_for(float(yf.abs().max()), torch.int16)
    bias, mult, shift = intlinear.int8_linear_params(x_scale, w_scale, out_scale, bf)
    y = intlinear.int8_linear(quant.quantize_per_tensor(xf, x_scale), wq, bias, mult, shift, torch.int16)
    rel = float((quant.dequantize(y, out_scale) - yf).norm() / yf.norm())
    assert rel < 0.02


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias):
    x, w, bias, mult, shift = _case(20, 64, 16)
    torch.library.opcheck(torch.ops.torchmerge.int8_linear, (x, w, bias if with_bias else None, mult, shift, torch.int8))
    torch.library.opcheck(torch.ops.torchmerge.requantize, (x.int() * 1000, mult[:1].expand(1), shift[:1], torch.int16))


def test_k_limit_is_explained():
    k = intlinear.MAX_K + 8
    assert intlinear.MAX_K * 127 * 128 <= 2**31 - 1 < (intlinear.MAX_K + 1) * 127 * 128
    x, w = torch.zeros(1, k, dtype=torch.int8), torch.zeros(2, k, dtype=torch.int8)
    mult, shift = torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
    for fn in (torch.ops.torchmerge.int8_linear, intlinear.int8_linear_reference):
        with pytest.raises(ValueError, match=rf"K={k} is too large.*K·127·128.*K ≤ {intlinear.MAX_K}"):
            fn(x, w, None, mult, shift, torch.int8)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(x=torch.zeros(2, 8)), "x must be a torch.int8"),
        (dict(weight=torch.zeros(4, 8, dtype=torch.int16)), "weight must be a 2-D torch.int8"),
        (dict(x=torch.zeros(2, 9, dtype=torch.int8)), r"x's last dim \(9\) must equal weight's K \(8\)"),
        (dict(bias=torch.zeros(4)), r"bias must be None or a torch.int32 tensor of shape \[4\]"),
        (dict(bias=torch.zeros(3, dtype=torch.int32)), r"bias must be None or a torch.int32 tensor of shape \[4\]"),
        (dict(multiplier=torch.ones(3, dtype=torch.int32)), r"multiplier must have shape \[4\] \(per channel\) or \[1\]"),
        (dict(shift=torch.ones(4, dtype=torch.int64)), "shift must be torch.int32"),
        (dict(out_dtype=torch.int32), "out_dtype must be torch.int8 or torch.int16"),
    ],
)
def test_bad_inputs(change, message):
    args = dict(x=torch.zeros(2, 8, dtype=torch.int8), weight=torch.zeros(4, 8, dtype=torch.int8), bias=None,
                multiplier=torch.ones(4, dtype=torch.int32), shift=torch.ones(4, dtype=torch.int32), out_dtype=torch.int8)
    args.update(change)
    for fn in (torch.ops.torchmerge.int8_linear, intlinear.int8_linear_reference):
        with pytest.raises(ValueError, match=message):
            fn(*args.values())
    with pytest.raises(ValueError, match=message):  # the fake (meta) implementation checks too
        with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args.values()]
            torch.ops.torchmerge.int8_linear(*fake_args)


def test_requantize_bad_inputs():
    with pytest.raises(ValueError, match="requantize: x must be a torch.int32, int16 or int8 tensor"):
        intlinear.requantize(torch.zeros(3, dtype=torch.int64), torch.ones(1, dtype=torch.int32), torch.ones(1, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shift must be in \[0, 62\]"):
        intlinear.requantize(torch.zeros(3, dtype=torch.int32), torch.ones(1, dtype=torch.int32), torch.full((1,), 63, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"shift must have shape \[3\]"):
        intlinear.requantize(torch.zeros(3, dtype=torch.int32), torch.ones(3, dtype=torch.int32), torch.ones(2, dtype=torch.int32))


# ---- int8_bmm ------------------------------------------------------------------------------------


def _bmm_hand(a: torch.Tensor, b: torch.Tensor) -> list:
    """Σ_k a[m, k]·b[k, n] with Python integers, batch by batch."""
    a2, b2 = a.reshape(-1, *a.shape[-2:]).tolist(), b.reshape(-1, *b.shape[-2:]).tolist()
    return [[[sum(x * y for x, y in zip(row, col)) for col in zip(*bm)] for row in am] for am, bm in zip(a2, b2)]


def test_int8_bmm_reference_matches_hand_sum():
    g = torch.Generator().manual_seed(11)
    a = torch.randint(-128, 128, (2, 3, 5, 9), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (2, 3, 9, 4), dtype=torch.int8, generator=g)
    got = intlinear.int8_bmm_reference(a, b)
    assert got.dtype == torch.int32 and got.shape == (2, 3, 5, 4)
    assert got.reshape(-1, 5, 4).tolist() == _bmm_hand(a, b)


@native
@pytest.mark.parametrize("sa, sb", [((384, 64, 32), (384, 32, 64)), ((12, 64, 64), (12, 64, 32)), ((3, 5, 7), (3, 7, 9)),
                                    ((2, 2, 33, 70), (2, 2, 70, 17)), ((1, 1), (1, 1)), ((20, 130), (130, 81)),
                                    ((4, 0, 8), (4, 8, 5)), ((2, 3, 0), (2, 0, 6))])
def test_int8_bmm_native_exact(isa, sa, sb):
    g = torch.Generator().manual_seed(sum(sa) + sum(sb))
    a = torch.randint(-128, 128, sa, dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, sb, dtype=torch.int8, generator=g)
    want = intlinear.int8_bmm_reference(a, b)
    assert torch.equal(torch.ops.torchmerge.int8_bmm(a, b), want)
    assert torch.equal(torch.ops.torchmerge.int8_bmm(a.transpose(-1, -2).contiguous().transpose(-1, -2), b), want)


@native
def test_int8_bmm_extremes_do_not_overflow(isa):
    """All -128 at the largest K the int32 accumulator takes: the sum is exactly K·2^14 < 2^31."""
    k = intlinear.MAX_K_BMM
    a = torch.full((1, 2, k), -128, dtype=torch.int8)
    b = torch.full((1, k, 3), -128, dtype=torch.int8)
    assert torch.equal(torch.ops.torchmerge.int8_bmm(a, b), torch.full((1, 2, 3), k * 16384, dtype=torch.int32))
    b[0, :, 1] = 127
    assert torch.ops.torchmerge.int8_bmm(a, b)[0, 0].tolist() == [k * 16384, -k * 128 * 127, k * 16384]


def test_int8_bmm_opcheck():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-128, 128, (3, 4, 8), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (3, 8, 6), dtype=torch.int8, generator=g)
    torch.library.opcheck(torch.ops.torchmerge.int8_bmm.default, (a, b))


@pytest.mark.parametrize("a, b, message", [
    (torch.zeros(2, 3, 4), torch.zeros(2, 4, 5, dtype=torch.int8), "a must be a torch.int8 tensor"),
    (torch.zeros(2, 3, 4, dtype=torch.int8), torch.zeros(4, 5, dtype=torch.int8), "b must be a torch.int8 tensor .* with a's 3 dims"),
    (torch.zeros(2, 3, 4, dtype=torch.int8), torch.zeros(3, 4, 5, dtype=torch.int8), "same batch dims"),
    (torch.zeros(2, 3, 4, dtype=torch.int8), torch.zeros(2, 5, 5, dtype=torch.int8), r"b's K \(5\) must equal a's last dim \(4\)"),
    (torch.zeros(1, 1, 131072, dtype=torch.int8), torch.zeros(1, 131072, 1, dtype=torch.int8), "K=131072 is too large"),
])
def test_int8_bmm_bad_inputs(a, b, message):
    for fn in (torch.ops.torchmerge.int8_bmm, intlinear.int8_bmm_reference):
        with pytest.raises(ValueError, match=message):
            fn(a, b)


# ---- add_requantized -----------------------------------------------------------------------------


@pytest.mark.parametrize("a_dtype, b_dtype, out_dtype", [(torch.int16, torch.int16, torch.int16),
                                                         (torch.int32, torch.int8, torch.int16),
                                                         (torch.int16, torch.int32, torch.int8)])
def test_add_requantized_equals_separate_ops(isa, a_dtype, b_dtype, out_dtype):
    """Native and reference equal the unfused graph: requantize each term, add in int32, clamp, narrow."""
    g = torch.Generator().manual_seed(9)
    shape = (3, 41, 96)
    a = torch.randint(torch.iinfo(a_dtype).min // 2, torch.iinfo(a_dtype).max // 2, shape, generator=g).to(a_dtype)
    b = torch.randint(torch.iinfo(b_dtype).min // 2, torch.iinfo(b_dtype).max // 2, shape, generator=g).to(b_dtype)
    a.view(-1)[:2] = torch.tensor([torch.iinfo(a_dtype).min, torch.iinfo(a_dtype).max], dtype=a_dtype)
    ma, sa = quant.dyadic_multiplier(torch.tensor([0.7], dtype=torch.float64))
    mb, sb = quant.dyadic_multiplier(torch.rand(96, dtype=torch.float64, generator=g) * 2)  # per channel, some > 1
    q = torch.iinfo(out_dtype)
    want = (intlinear.requantize_reference(a.to(torch.int32), ma, sa, out_dtype).to(torch.int32)
            + intlinear.requantize_reference(b.to(torch.int32), mb, sb, out_dtype).to(torch.int32)).clamp(q.min, q.max).to(out_dtype)
    assert torch.equal(intlinear.add_requantized_reference(a, ma, sa, b, mb, sb, out_dtype), want)
    if ops.native_available():
        assert torch.equal(torch.ops.torchmerge.add_requantized(a, ma, sa, b, mb, sb, out_dtype), want)
    assert (want == q.max).any() or (want == q.min).any() or out_dtype == torch.int16  # saturation exercised for int8


def test_add_requantized_opcheck_and_bad_inputs():
    a = torch.randint(-100, 100, (4, 8), dtype=torch.int16)
    m, s = torch.ones(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
    torch.library.opcheck(torch.ops.torchmerge.add_requantized.default, (a, m, s, a.clone(), m, s, torch.int16))
    for fn in (torch.ops.torchmerge.add_requantized, intlinear.add_requantized_reference):
        with pytest.raises(ValueError, match="b must be a torch.int32, int16 or int8 tensor of a's shape"):
            fn(a, m, s, a[:2], m, s, torch.int16)
        with pytest.raises(ValueError, match=r"mb must have shape \[8\]"):
            fn(a, m, s, a, torch.ones(3, dtype=torch.int32), s, torch.int16)
        with pytest.raises(ValueError, match="out_dtype must be torch.int8 or torch.int16"):
            fn(a, m, s, a, m, s, torch.int32)

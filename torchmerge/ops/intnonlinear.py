"""Integer-only non-linear ops: I-ViT (arXiv 2207.01405) Shiftmax / ShiftGELU / I-LayerNorm and
I-BERT (arXiv 2101.01321) polynomial i-exp / i-GELU, plus the integer square root they share.

Ops (namespace ``torchmerge``; kernels in csrc/int_nonlinear.cpp; all arithmetic is integer, the
float ``scale`` only fixes integer constants once, e.g. x0 = floor(-16 / scale)):

  isqrt(Tensor x) -> Tensor
  i_exp(Tensor x, float scale, str method) -> Tensor
  shiftmax(Tensor x, float scale, int out_bits, str method) -> Tensor
  shift_gelu(Tensor x, float scale, int sigmoid_bits, bool published) -> Tensor
  i_gelu(Tensor x, float scale) -> Tensor
  i_layernorm(Tensor x, Tensor multiplier, Tensor shift, Tensor bias, ScalarType out_dtype) -> Tensor

The Python wrappers of the same names take (int tensor, scale) and return (int tensor, output scale).
"""

from __future__ import annotations

import math

import torch

from ._loader import define_op
from .intlinear import check_shift_values
from .quant import dyadic_multiplier, round_shift

SHIFT_N = 15  # I-ViT Shiftmax: exponent clamp / fixed-point bits of 2^p
FINE_BITS = 4  # x·log2(e) ≈ 23x/16 is kept exactly, in units of scale/16 (see i_exp_reference)
GELU_N = 23  # I-ViT ShiftGELU uses a larger clamp
POLY_N = 30  # I-BERT i-exp clamp: x ≥ 30·ln2·(-1)
IBERT_EXP = (0.35815147, 0.96963238, 1.0)  # exp(p) ≈ 0.3585·(p + 1.353)^2 + 0.344 on (-ln2, 0]
IBERT_ERF = (-0.2888, -1.769, 1.0)  # erf(x) ≈ sign(x)·[a(min(|x|, -b) + b)^2 + 1]
IBERT_GELU_SHIFT = 14
LN_FRAC_BITS = 12  # i_layernorm: normalised value carries 12 fractional bits
MAX_LN_DIM = 1 << 16  # D·Σx² and S² stay below 2^63 for int16 inputs
_INT = (torch.int8, torch.int16, torch.int32)
_METHODS = ("shift", "poly")


def _check_int(x, op, dtypes=_INT, arg="x"):
    if x.dtype not in dtypes or x.dim() < 1:
        raise ValueError(f"{op}: {arg} must be a tensor of dtype {' or '.join(map(str, dtypes))} with ≥1 dim; got {x.dtype}")


def _check_scale(scale, op, low=0.0):
    if not (isinstance(scale, float) and math.isfinite(scale) and scale > low):
        raise ValueError(f"{op}: scale must be a finite float > {low:g}; got {scale!r}")


def _check_method(method, op):
    if method not in _METHODS:
        raise ValueError(f"{op}: method must be one of {_METHODS}; got {method!r}")


def _bit_length(n: torch.Tensor) -> torch.Tensor:
    """Number of significant bits of non-negative int64 values (0 for 0)."""
    bits, v = torch.zeros_like(n), n.clone()
    for sh in (32, 16, 8, 4, 2, 1):
        hit = (v >> sh) > 0
        bits += hit.to(torch.int64) * sh
        v = torch.where(hit, v >> sh, v)
    return bits + (v > 0).to(torch.int64)


def isqrt_reference(x):
    """floor(sqrt(x)) by integer Newton: x_0 = 2^ceil(bits(x)/2) ≥ sqrt(x), x_{i+1} = (x_i + x // x_i) >> 1,
    stopped at the fixed point (first i with x_{i+1} ≥ x_i). Exact (I-ViT §3.4, I-BERT Alg. 4)."""
    _check_int(x, "isqrt", (torch.int32, torch.int64))
    n = x.to(torch.int64)
    if bool((n < 0).any()):
        raise ValueError("isqrt: x must be non-negative")
    r = torch.ones_like(n) << ((_bit_length(n) + 1) >> 1)
    while True:
        nxt = (r + n // r.clamp(min=1)) >> 1
        if not bool((nxt < r).any()):
            return r.to(x.dtype)
        r = torch.minimum(r, nxt)


def _exp_limits(scale, method):
    """Integer constants of i_exp: (x0, clamp n). shift: x0 = floor(-16/s) (log2 domain, s/16 units);
    poly: x0 = floor(-ln2/s)."""
    if method == "shift":
        return math.floor(-(2.0**FINE_BITS) / scale), SHIFT_N
    return math.floor(-math.log(2.0) / scale), POLY_N


def check_i_exp(x, scale, method, op="i_exp"):
    _check_int(x, op)
    _check_scale(scale, op)
    _check_method(method, op)
    x0, n = _exp_limits(scale, method)
    top = -x0 << SHIFT_N if method == "shift" else _poly_c(scale)
    if top >= 2**31:
        lo = 2.0**-12 if method == "shift" else math.sqrt(IBERT_EXP[2] / IBERT_EXP[0] / 2**31)
        raise ValueError(f"{op}: scale={scale:g} is too small for method={method!r}: exp(0) would overflow int32; need scale ≥ {lo:.3g}")


def _poly_c(scale):
    return math.floor(IBERT_EXP[2] / IBERT_EXP[0] / (scale * scale))


def _exp_core(x, scale, method):
    """int64 e ≈ exp(x·scale) for x ≤ 0 (entries > 0 are treated as 0). See i_exp_reference."""
    x = x.to(torch.int64).clamp(max=0)
    x0, n = _exp_limits(scale, method)
    if method == "shift":
        x = (x << 4) + (x << 2) + (x << 1) + x  # 23x = 16·x·1.4375 ≈ 16·x·log2(e), exact
    x = torch.maximum(x, torch.full_like(x, n * x0))
    q = torch.div(x, x0, rounding_mode="floor")
    r = x - x0 * q
    if method == "shift":
        return ((r - 2 * x0) << (n - q)) >> 1
    b = math.floor(IBERT_EXP[1] / IBERT_EXP[0] / scale)
    return (r * (r + b) + _poly_c(scale)) >> q


def i_exp_reference(x, scale, method):
    """Integer exp of x·scale for x ≤ 0 (positive entries are clamped to 0), as int32.

    method="shift" (I-ViT eq. 6-8, default): x' = 23·x (= 16·x·1.4375 ≈ 16·x·log2(e), by shifts and adds);
      x0 = floor(-16/s); x' = max(x', 15·x0); q = floor(x'/x0); r = x' - x0·q;
      e = ((r - 2·x0) << (15 - q)) >> 1 = floor((|x0| + r/2)·2^(15-q)), i.e. 2^-q·(1 + p/2) for
      2^p, p = r/|x0| in (-1, 0]; output scale 1 / (|x0|·2^15) ≈ s / 2^19.
      I-ViT computes x + floor(x/2) - floor(x/16) in units of s; those floors add up to ±1 unit of
      error to the exponent (measured: up to 0.10 abs error on softmax of 197-long rows, N(0, 3²) logits,
      vs 0.02 here); keeping 4 fractional bits costs the same shifts and adds.
    method="poly" (I-BERT Alg. 2): x0 = floor(-ln2/s); x = max(x, 30·x0); q = floor(x/x0); r = x - x0·q;
      e = (r·(r + b) + c) >> q with b = floor(0.9696/0.3582/s), c = floor(1/0.3582/s²); output scale 0.3582·s².
      (I-BERT shifts left by 30 - q and divides the scale by 2^30; we shift right by q to stay in int32.)
    """
    check_i_exp(x, scale, method)
    return _exp_core(x, scale, method).to(torch.int32)


def i_exp_scale(scale, method="shift"):
    if method == "shift":
        return 1.0 / (-_exp_limits(scale, method)[0] * 2.0**SHIFT_N)
    return IBERT_EXP[0] * scale * scale


def check_shiftmax(x, scale, out_bits, method):
    op = "shiftmax"
    _check_int(x, op)
    _check_scale(scale, op, low=2.0**-20)
    _check_method(method, op)
    if not (isinstance(out_bits, int) and 2 <= out_bits <= 16):
        raise ValueError(f"shiftmax: out_bits must be an int in [2, 16]; got {out_bits!r}")


def shiftmax_reference(x, scale, out_bits, method):
    """Integer softmax over the last dim (I-ViT Shiftmax, eq. 9; method="poly" uses I-BERT's i-exp).

    e = i_exp(x - max(x)) (int64, no int32 limit); factor = floor(2^62 / Σe);
    out = min((e·factor + 2^(62-out_bits)) >> (63 - out_bits), 2^(out_bits-1) - 1)   (round half up).
    Output: int8 (out_bits ≤ 8) or int16, scale 2^-(out_bits-1). I-ViT uses a 31-bit factor
    floor((2^31-1)/Σe) and a floor at the end: the former loses up to 1/factor relative precision for long
    rows, the latter biases every output down by half a step (mean error 2.6e-3 → 1.7e-3 on 64-long rows).
    Measured (int8 logits, scale amax/127, 2^17+ values) vs float softmax, shift / poly:
    rows of 197 from N(0, 3²): max 0.020 / 0.030, mean 6.1e-4 / 6e-4; rows of 64 from N(0, 2²): max 0.022,
    mean 1.7e-3. Mean error is bounded below by the 8-bit output step (1/512 for probabilities ≫ 1/128).
    """
    check_shiftmax(x, scale, out_bits, method)
    x = x.to(torch.int64)
    e = _exp_core(x - x.amax(dim=-1, keepdim=True), scale, method)
    factor = (1 << 62) // e.sum(dim=-1, keepdim=True)
    out = ((e * factor + (1 << (62 - out_bits))) >> (63 - out_bits)).clamp(max=(1 << (out_bits - 1)) - 1)
    return out.to(torch.int8 if out_bits <= 8 else torch.int16)


def check_shift_gelu(x, scale, sigmoid_bits, published):
    op = "shift_gelu"
    _check_int(x, op, (torch.int8, torch.int16))
    _check_scale(scale, op, low=2.0**-14)
    if not (isinstance(sigmoid_bits, int) and 2 <= sigmoid_bits <= 16):
        raise ValueError(f"{op}: sigmoid_bits must be an int in [2, 16]; got {sigmoid_bits!r}")
    if not isinstance(published, bool):
        raise ValueError(f"{op}: published must be a bool; got {published!r}")


def _gelu_exp(x, x0, published):
    """I-ViT int_exp_shift with n = 23 (x may be positive only for the published exp(-x_max) term);
    the corrected variant keeps 4 fractional bits like _exp_core (23x with x0 = floor(-16/(1.702·s)))."""
    x = x + (x >> 1) - (x >> 4) if published else (x << 4) + (x << 2) + (x << 1) + x
    x = torch.maximum(x, torch.full_like(x, GELU_N * x0))
    q = torch.div(x, x0, rounding_mode="floor")
    r = x - x0 * q
    return ((r - 2 * x0) << (GELU_N - q).clamp(max=40)) >> 1


def shift_gelu_reference(x, scale, sigmoid_bits, published):
    """ShiftGELU (I-ViT eq. 10-11): GELU(x) ≈ x·σ(1.702x), σ by two shift-exponentials, x0 = floor(-1/(1.702·s)).

    Corrected (published=False, default): per element m = max(x, 0), σ = e(x - m) / (e(x - m) + e(-m)) with
      e the n=23 shift-exp on 23x, x0 = floor(-16/(1.702·s)) (4 fractional bits, as in i_exp); both
      exponents are ≤ 0 and one is exactly 0, so the sum never underflows;
      σ_int = (e(x-m)·floor(2^62 / sum) + 2^(62-sigmoid_bits)) >> (63 - sigmoid_bits)  (round half up).
    Published (published=True): m = max over the last dim (row), factor = floor((2^31-1)/min(sum, 2^31-1)),
      σ_int = (e·factor) >> (32 - sigmoid_bits). For very negative x in a row with a large max, both
      exponentials hit the 23·x0 clamp and σ ≈ 0.5 instead of 0.
    Output: x·σ_int as int32 with scale s / 2^(sigmoid_bits-1).
    Measured vs exact erf-GELU (2^17 values, rows of 64, sigmoid_bits = 8):
      int8,  s = 8/127,    N(0, 3²) clipped: corrected max 0.0625, mean 0.0138; published max 0.31, mean 0.0296;
      int16, s = 32/32767, N(0, 8²) clipped: corrected max 0.25,   mean 0.0267; published max 15.75, mean 2.42
      (published σ(-20) = 0.49 in a row whose max is 20; corrected 0). The corrected max error is the
      σ step 2^-(sigmoid_bits-1) times |x|; raise sigmoid_bits for more.
    """
    check_shift_gelu(x, scale, sigmoid_bits, published)
    x = x.to(torch.int64)
    x0 = math.floor((-1.0 if published else -(2.0**FINE_BITS)) / (scale * 1.702))
    if published:
        m = x.amax(dim=-1, keepdim=True)
        e, e_m = _gelu_exp(x - m, x0, True), _gelu_exp(-m, x0, True)
        total = (e + e_m).clamp(max=2**31 - 1)
        sig = (e * ((2**31 - 1) // total)) >> (32 - sigmoid_bits)
    else:
        m = x.clamp(min=0)
        e, e_m = _gelu_exp(x - m, x0, False), _gelu_exp(-m, x0, False)
        sig = (e * ((1 << 62) // (e + e_m)) + (1 << (62 - sigmoid_bits))) >> (63 - sigmoid_bits)
    sig = sig.clamp(max=(1 << (sigmoid_bits - 1)) - 1)
    return (x * sig).to(torch.int32)


def check_i_gelu(x, scale):
    _check_int(x, "i_gelu")
    _check_scale(scale, "i_gelu")


def _i_gelu_consts(scale):
    s = scale / math.sqrt(2.0)  # erf(x/√2): the erf input scale
    b = math.floor(IBERT_ERF[1] / s)
    c = math.floor(IBERT_ERF[2] / IBERT_ERF[0] / (s * s))
    sig_scale = -(s * s) * IBERT_ERF[0] * 2**IBERT_GELU_SHIFT  # > 0 (erf scale negated)
    one = math.floor(1.0 / sig_scale)
    return b, c, one, scale * sig_scale / 2


def i_gelu_reference(x, scale):
    """I-BERT i-GELU (Alg. 3): GELU(x) = x·(1 + erf(x/√2))/2 with the second-order erf polynomial.

    s' = s/√2; b = floor(-1.769/s'); c = floor((1/-0.2888)/s'²); L = -(|x| clipped to -b + b)² - c
    (≥ 0 is erf's magnitude in units 0.2888·s'²), erf_int = sign(x)·(L >> 14), one = floor(1/(0.2888·s'²·2^14));
    out = x·(erf_int + one) as int32 (saturating), scale s·0.2888·s'²·2^14 / 2. (Signs are flipped against
    I-BERT's negative erf scale so the output scale is positive; values are identical.) Meant for the
    int32 accumulator of a linear (s ≲ 1e-3) like I-BERT: with coarse int8 scales the >>14 leaves too few bits.
    """
    check_i_gelu(x, scale)
    b, c, one, _ = _i_gelu_consts(scale)
    x = x.to(torch.int64)
    a = torch.minimum(x.abs(), torch.full_like(x, -b))
    erf = torch.sign(x) * ((-((a + b) * (a + b) + c)) >> IBERT_GELU_SHIFT)
    return (x * (erf + one)).clamp(-(2**31), 2**31 - 1).to(torch.int32)


def check_i_layernorm(x, multiplier, shift, bias, out_dtype):
    op = "i_layernorm"
    _check_int(x, op, (torch.int8, torch.int16))
    d = x.shape[-1]
    if d > MAX_LN_DIM:
        raise ValueError(f"{op}: x's last dim D={d} must be ≤ {MAX_LN_DIM} (D·Σx² must fit int64)")
    for name, t in (("multiplier", multiplier), ("shift", shift), ("bias", bias)):
        if t.dtype != torch.int32 or tuple(t.shape) != (d,):
            raise ValueError(f"{op}: {name} must be a torch.int32 tensor of shape [{d}]; got {t.dtype} {tuple(t.shape)}")
    if out_dtype not in (torch.int8, torch.int16):
        raise ValueError(f"{op}: out_dtype must be torch.int8 or torch.int16; got {out_dtype}")


def i_layernorm_reference(x, multiplier, shift, bias, out_dtype):
    """I-LayerNorm (I-ViT §3.4, I-BERT §3.5) with exact integer variance over the last dim D.

    S = Σx; y = D·x - S (= D·(x - mean), exact); V = D·Σx² - S² (= Σ_i y_i² / D = D²·var, exact);
    k = max(0, (62 - bits(V)) // 2); σ = isqrt(V·4^k) (Newton from 2^ceil(bits/2), fixed point);
    ŷ = floor((y·2^(k+12)) / σ) ≈ (x - mean)/std · 2^12 (0 where V = 0), since y/sqrt(V) = (x - mean)/std;
    out = sat_{out_dtype}(((ŷ·m + 2^(s-1)) >> s) + bias), per-channel dyadic (m, s) and int32 bias from
    :func:`i_layernorm_params`. LayerNorm's eps is not modelled (var is exact; eps only matters for V ≈ 0).
    Unlike I-ViT (mean rounded to an integer, Newton from 2^16 for 10 fixed steps) the mean is never
    rounded and σ keeps ≥ 30 significant bits, so int8 rows with small spread stay accurate.
    Measured (768 channels, N(0.5, 2²) rows, 1.2·10^5 values, int16 output): relative L2 error 1.7e-4.
    """
    check_i_layernorm(x, multiplier, shift, bias, out_dtype)
    check_shift_values(shift, "i_layernorm")
    x = x.to(torch.int64)
    d = x.shape[-1]
    s_sum = x.sum(dim=-1, keepdim=True)
    y = d * x - s_sum
    v = d * (x * x).sum(dim=-1, keepdim=True) - s_sum * s_sum
    k = ((62 - _bit_length(v)) >> 1).clamp(min=0)
    sigma = isqrt_reference(v << (2 * k))
    y_hat = torch.div(y << (k + LN_FRAC_BITS), sigma.clamp(min=1), rounding_mode="floor")
    y_hat = torch.where(v > 0, y_hat, torch.zeros_like(y_hat))
    q = 32767 if out_dtype == torch.int16 else 127
    out = round_shift(y_hat * multiplier.to(torch.int64), shift) + bias.to(torch.int64)
    return out.clamp(-q - 1, q).to(out_dtype)


def _isqrt_fake(x):
    _check_int(x, "isqrt", (torch.int32, torch.int64))
    return torch.empty_like(x)


def _shiftmax_fake(x, scale, out_bits, method):
    check_shiftmax(x, scale, out_bits, method)
    return x.new_empty(x.shape, dtype=torch.int8 if out_bits <= 8 else torch.int16)


def _checked_fake(check, dtype):
    def fake(x, *args):
        check(x, *args)
        return x.new_empty(x.shape, dtype=dtype if dtype is not None else args[-1])
    return fake


define_op("isqrt", "(Tensor x) -> Tensor", reference=isqrt_reference, fake=_isqrt_fake)
define_op("i_exp", "(Tensor x, float scale, str method) -> Tensor", reference=i_exp_reference,
          fake=_checked_fake(check_i_exp, torch.int32))
define_op("shiftmax", "(Tensor x, float scale, int out_bits, str method) -> Tensor", reference=shiftmax_reference,
          fake=_shiftmax_fake)
define_op("shift_gelu", "(Tensor x, float scale, int sigmoid_bits, bool published) -> Tensor",
          reference=shift_gelu_reference, fake=_checked_fake(check_shift_gelu, torch.int32))
define_op("i_gelu", "(Tensor x, float scale) -> Tensor", reference=i_gelu_reference,
          fake=_checked_fake(check_i_gelu, torch.int32))
define_op("i_layernorm", "(Tensor x, Tensor multiplier, Tensor shift, Tensor bias, ScalarType out_dtype) -> Tensor",
          reference=i_layernorm_reference, fake=_checked_fake(check_i_layernorm, None))


# ---- Python API: (int tensor, scale) in, (int tensor, output scale) out -------------------------------


def i_exp(x, scale, method="shift"):
    """exp(x·scale) for x ≤ 0 → (int32, scale'); see :func:`i_exp_reference`."""
    return torch.ops.torchmerge.i_exp(x, float(scale), method), i_exp_scale(float(scale), method)


def shiftmax(x, scale, out_bits=8, method="shift"):
    """softmax over the last dim → (int8/int16 in [0, 2^(out_bits-1)), 2^-(out_bits-1))."""
    return torch.ops.torchmerge.shiftmax(x, float(scale), out_bits, method), 2.0 ** -(out_bits - 1)


def shift_gelu(x, scale, sigmoid_bits=8, published=False):
    """GELU → (int32, scale / 2^(sigmoid_bits-1)); published=True keeps I-ViT's saturating form."""
    out = torch.ops.torchmerge.shift_gelu(x, float(scale), sigmoid_bits, published)
    return out, float(scale) / 2 ** (sigmoid_bits - 1)


def i_gelu(x, scale):
    """I-BERT polynomial GELU → (int32, scale')."""
    return torch.ops.torchmerge.i_gelu(x, float(scale)), _i_gelu_consts(float(scale))[3]


def i_layernorm_params(weight, bias, out_scale):
    """(multiplier, shift, bias_int32) mapping ŷ·2^12 to round(LayerNorm(x)/out_scale): M_c = γ_c / (2^12·out_scale),
    bias_c = round(β_c / out_scale)."""
    if not out_scale > 0:
        raise ValueError(f"i_layernorm: out_scale must be a positive float; got {out_scale!r}")
    w = weight.detach().to(torch.float64)
    multiplier, shift = dyadic_multiplier(w / (2**LN_FRAC_BITS * out_scale))
    b = torch.zeros_like(w) if bias is None else bias.detach().to(torch.float64)
    return multiplier, shift, torch.round(b / out_scale).clamp(-(2**31), 2**31 - 1).to(torch.int32)


def i_layernorm(x, scale, weight, bias, out_scale, out_dtype=torch.int8):
    """LayerNorm over the last dim of int8/int16 x → (out_dtype, out_scale). ``scale`` (x's scale) does not
    change the result: LayerNorm is scale invariant and eps is not modelled."""
    _check_scale(float(scale), "i_layernorm")
    multiplier, shift, b = i_layernorm_params(weight, bias, float(out_scale))
    return torch.ops.torchmerge.i_layernorm(x, multiplier, shift, b, out_dtype), float(out_scale)


def isqrt(x):
    """floor(sqrt(x)) of non-negative int32/int64 values; see :func:`isqrt_reference`."""
    return torch.ops.torchmerge.isqrt(x)

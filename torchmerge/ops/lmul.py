"""L-Mul: linear-complexity multiplication by integer addition of float bit patterns.

Hongyin Luo, Wei Sun, "Addition is All You Need for Energy-efficient Language Models", arXiv 2410.00907.

Ops (namespace ``torchmerge``; kernels in csrc/lmul.cpp):

  lmul(Tensor x, Tensor y, int mantissa_bits=23, int offset_exp=-1) -> Tensor
  lmul_matmul(Tensor a, Tensor b, int mantissa_bits=23, int offset_exp=-1) -> Tensor

``offset_exp=-1`` selects the paper's default l(m): m for m ≤ 3, 3 for m = 4, 4 for m > 4.

Exact semantics (the references below define them bit for bit; the C++ kernels match them exactly):

1. Rounding. Each float32 input is rounded to m mantissa bits, round to nearest, ties to even, on its
   bit pattern; subnormals flush to ±0 first; a carry out of the mantissa raises the exponent (and can
   give ±inf); inf and NaN pass through.
2. Product of rounded x, y with magnitudes |x| = (1+xm)·2^xe, |y| = (1+ym)·2^ye. The paper's
   L-Mul(x, y) = (1 + xm + ym + 2^-l)·2^(xe+ye) is emulated on the IEEE bit patterns, like the paper's
   integer-adder implementation: with E(v) = bits(v) & 0x7FFFFFFF (exponent and mantissa fields),
       r = E(x) + E(y) − (127·2^23 − 2^(23−l))          (integers, no wrap-around)
       sign = sign(x) XOR sign(y)
   A mantissa sum ≥ 1 carries into the exponent field (this is the integer-add form, not the literal
   formula). Result bits: sign | r when 2^23 ≤ r < 0x7F800000; sign | 0 (±0) when r < 2^23 (underflow);
   sign | 0x7F800000 (±inf) when r ≥ 0x7F800000 (overflow).
3. Special values, as IEEE multiply: NaN·anything and 0·inf give NaN (canonical quiet NaN 0x7FC00000);
   inf·(non-zero) gives ±inf; 0·(finite) gives ±0 — with subnormal inputs counting as 0.
4. lmul_matmul(a [..., K], b [K, N]) = out [..., N] with float32 accumulation in the fixed order
       acc = +0.0;  for k = 0 .. K−1:  acc = fl32(acc + lmul(a[..., k], b[k, n]))
   i.e. a sequential fp32 sum over k (no FMA, no pairwise tree). The C++ kernel keeps this order per
   output element (it blocks over rows, columns and k-blocks but never reorders k), so it is bit-exact.

Mean relative error against the exact product over N(0,1) pairs: ≈2.7 % at m = 23 (l = 4),
≈5.3 % at m = 4, l = 3 (tests/ops/test_lmul.py).
"""

from __future__ import annotations

import torch

from ._loader import define_op

SIGN = -(2**31)  # 0x80000000 as int64 mask
INF_BITS = 0x7F800000
MIN_NORMAL_BITS = 0x00800000
QNAN_BITS = 0x7FC00000


def default_offset_exp(mantissa_bits: int) -> int:
    """The paper's l(m): m for m ≤ 3, 3 for m = 4, 4 for m > 4."""
    return mantissa_bits if mantissa_bits <= 3 else (3 if mantissa_bits == 4 else 4)


def _check_params(op: str, mantissa_bits: int, offset_exp: int) -> int:
    """Validate m and l; return the effective l."""
    if not isinstance(mantissa_bits, int) or not 1 <= mantissa_bits <= 23:
        raise ValueError(f"{op}: mantissa_bits must be an int in [1, 23]; got {mantissa_bits!r}")
    if not isinstance(offset_exp, int) or not (offset_exp == -1 or 0 <= offset_exp <= 23):
        raise ValueError(f"{op}: offset_exp must be -1 (paper default l(m)) or an int in [0, 23]; got {offset_exp!r}")
    return default_offset_exp(mantissa_bits) if offset_exp == -1 else offset_exp


def _check_float32(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be a torch.float32 tensor; got {got}")


def check_lmul(x, y, mantissa_bits, offset_exp) -> int:
    _check_float32("lmul", "x", x)
    _check_float32("lmul", "y", y)
    try:
        torch.broadcast_shapes(x.shape, y.shape)
    except RuntimeError:
        raise ValueError(f"lmul: x {tuple(x.shape)} and y {tuple(y.shape)} must be broadcastable") from None
    return _check_params("lmul", mantissa_bits, offset_exp)


def check_lmul_matmul(a, b, mantissa_bits, offset_exp) -> int:
    op = "lmul_matmul"
    _check_float32(op, "a", a)
    _check_float32(op, "b", b)
    if a.dim() < 1:
        raise ValueError(f"{op}: a must have shape [..., K]; got a 0-d tensor")
    if b.dim() != 2:
        raise ValueError(f"{op}: b must be 2-D [K, N]; got shape {tuple(b.shape)}")
    if a.shape[-1] != b.shape[0]:
        raise ValueError(f"{op}: a's last dim ({a.shape[-1]}) must equal b's K = b.shape[0] ({b.shape[0]})")
    return _check_params(op, mantissa_bits, offset_exp)


def round_mantissa(x: torch.Tensor, mantissa_bits: int) -> torch.Tensor:
    """Round float32 ``x`` to ``mantissa_bits`` mantissa bits (RNE on the bit pattern), flushing subnormals.

    Returns the rounded values as float32 (NaN and inf unchanged; a carry may round up to ±inf).
    """
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    sign, mag = bits & SIGN, bits & 0x7FFFFFFF
    shift = 23 - mantissa_bits
    if shift > 0:
        half = (1 << (shift - 1)) - 1
        rounded = ((mag + half + ((mag >> shift) & 1)) >> shift) << shift
    else:
        rounded = mag
    rounded = torch.where(mag < MIN_NORMAL_BITS, torch.zeros_like(mag), rounded)
    rounded = torch.where(mag > INF_BITS, mag, rounded)  # NaN keeps its payload
    return (sign | rounded).to(torch.int32).view(torch.float32).view(x.shape)


def _lmul_rounded(xr: torch.Tensor, yr: torch.Tensor, offset_exp: int) -> torch.Tensor:
    """L-Mul of already-rounded float32 tensors (broadcasting); see the module docstring, steps 2-3."""
    bx = xr.view(torch.int32).to(torch.int64)
    by = yr.view(torch.int32).to(torch.int64)
    sign = (bx ^ by) & SIGN
    mx, my = bx & 0x7FFFFFFF, by & 0x7FFFFFFF
    r = mx + my - ((127 << 23) - (1 << (23 - offset_exp)))
    x_zero, y_zero = mx == 0, my == 0  # subnormals were flushed by rounding
    x_inf, y_inf = mx == INF_BITS, my == INF_BITS
    nan = (mx > INF_BITS) | (my > INF_BITS) | (x_inf & y_zero) | (x_zero & y_inf)
    mag = torch.where(r >= INF_BITS, torch.full_like(r, INF_BITS), r)
    mag = torch.where(r < MIN_NORMAL_BITS, torch.zeros_like(r), mag)
    mag = torch.where(x_inf | y_inf, torch.full_like(r, INF_BITS), mag)
    mag = torch.where(x_zero | y_zero, torch.zeros_like(r), mag)
    out = torch.where(nan, torch.full_like(r, QNAN_BITS), sign | mag)
    return out.to(torch.int32).view(torch.float32)


def lmul_reference(x, y, mantissa_bits=23, offset_exp=-1):
    """Elementwise L-Mul (broadcasting); float32 result. Math: module docstring."""
    l = check_lmul(x, y, mantissa_bits, offset_exp)
    shape = torch.broadcast_shapes(x.shape, y.shape)
    xr = round_mantissa(x, mantissa_bits).expand(shape).contiguous()
    yr = round_mantissa(y, mantissa_bits).expand(shape).contiguous()
    return _lmul_rounded(xr, yr, l)


def lmul_matmul_reference(a, b, mantissa_bits=23, offset_exp=-1):
    """out[..., n] = Σ_k lmul(a[..., k], b[k, n]), fp32, summed sequentially k = 0..K−1 from +0.0."""
    l = check_lmul_matmul(a, b, mantissa_bits, offset_exp)
    k_dim, n = b.shape
    a2 = round_mantissa(a.reshape(-1, k_dim), mantissa_bits)
    br = round_mantissa(b, mantissa_bits)
    acc = torch.zeros(a2.shape[0], n, dtype=torch.float32)
    for k in range(k_dim):
        acc = acc + _lmul_rounded(a2[:, k : k + 1].contiguous(), br[k : k + 1, :].contiguous(), l)
    return acc.reshape(*a.shape[:-1], n)


def _lmul_fake(x, y, mantissa_bits=23, offset_exp=-1):
    check_lmul(x, y, mantissa_bits, offset_exp)
    return x.new_empty(torch.broadcast_shapes(x.shape, y.shape), dtype=torch.float32)


def _lmul_matmul_fake(a, b, mantissa_bits=23, offset_exp=-1):
    check_lmul_matmul(a, b, mantissa_bits, offset_exp)
    return a.new_empty((*a.shape[:-1], b.shape[1]), dtype=torch.float32)


define_op(
    "lmul",
    "(Tensor x, Tensor y, int mantissa_bits=23, int offset_exp=-1) -> Tensor",
    reference=lmul_reference,
    fake=_lmul_fake,
)
define_op(
    "lmul_matmul",
    "(Tensor a, Tensor b, int mantissa_bits=23, int offset_exp=-1) -> Tensor",
    reference=lmul_matmul_reference,
    fake=_lmul_matmul_fake,
)


def lmul(x: torch.Tensor, y: torch.Tensor, mantissa_bits: int = 23, offset_exp: int | None = None) -> torch.Tensor:
    """Elementwise L-Mul of float32 tensors (``torch.ops.torchmerge.lmul``); ``offset_exp=None`` → l(m)."""
    l = -1 if offset_exp is None else offset_exp
    check_lmul(x, y, mantissa_bits, l)
    return torch.ops.torchmerge.lmul(x, y, mantissa_bits, l)


def lmul_matmul(a: torch.Tensor, b: torch.Tensor, mantissa_bits: int = 23, offset_exp: int | None = None) -> torch.Tensor:
    """``a [..., K] @ b [K, N]`` with L-Mul products and sequential fp32 accumulation over k."""
    l = -1 if offset_exp is None else offset_exp
    check_lmul_matmul(a, b, mantissa_bits, l)
    return torch.ops.torchmerge.lmul_matmul(a, b, mantissa_bits, l)

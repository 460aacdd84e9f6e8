"""Quantisation helpers for the integer-only (I-ViT / I-BERT) family.

Conventions (design doc, "Numerics decisions already taken"; I-ViT arXiv 2207.01405 §3.1):
  * weights: symmetric, per output channel, int8 in [-127, 127], scale_c = max_k |W[c, k]| / 127;
  * activations: symmetric, per tensor, int8 (int16 for the residual stream), scale = amax / qmax,
    q = clamp(round_half_even(x / scale), -qmax - 1, qmax);
  * requantisation is dyadic: a real multiplier M is stored as an integer m (|m| < 2^31, i.e. 31 bits
    plus sign) and a right shift s in [0, 62] with M ≈ m / 2^s, and applied to an integer v as
    ``saturate((v * m + 2^(s-1)) >> s)`` (round half up; no rounding term when s = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_QMAX = {torch.int8: 127, torch.int16: 32767, torch.int32: 2**31 - 1}
MAX_SHIFT = 62


def _qmax(dtype: torch.dtype, arg: str = "dtype") -> int:
    if dtype not in _QMAX:
        raise ValueError(f"{arg} must be one of torch.int8, torch.int16, torch.int32; got {dtype}")
    return _QMAX[dtype]


def dyadic_multiplier(real: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """Decompose real multipliers M into (m int32, s int32) with M ≈ m · 2^-s.

    For M ≠ 0: M = f · 2^e with 0.5 ≤ |f| < 1 (frexp); m = round(f · 2^31) (so 2^30 ≤ |m| ≤ 2^31 - 1
    after renormalising m = 2^31 to 2^30 with e += 1), s = 31 - e. Relative error ≤ 2^-31.
    If s > 62 the mantissa is shifted right (rounded) by s - 62 and s = 62; M = 0 gives m = s = 0.
    |M| ≥ 2^31 cannot be represented with s ≥ 0 and raises ValueError.
    """
    r = torch.as_tensor(real, dtype=torch.float64).reshape(-1) if not isinstance(real, torch.Tensor) \
        else real.detach().to(torch.float64).reshape(-1)
    if not torch.isfinite(r).all() or (r.abs() >= 2.0**31).any():
        raise ValueError(f"real multiplier must be finite with |M| < 2^31; got max |M| = {r.abs().max().item()}")
    f, e = torch.frexp(r)
    m = torch.round(f * 2.0**31).to(torch.int64)
    full = m.abs() == 2**31
    m = torch.where(full, m // 2, m)
    e = e.to(torch.int64) + full.to(torch.int64)
    s = 31 - e
    excess = (s - MAX_SHIFT).clamp(min=0)
    m = round_shift(m, excess.clamp(max=MAX_SHIFT))
    s = s.clamp(max=MAX_SHIFT)
    zero = m == 0
    m, s = torch.where(zero, 0, m), torch.where(zero, 0, s)
    return m.to(torch.int32), s.to(torch.int32)


def round_shift(v: torch.Tensor, shift: torch.Tensor | int) -> torch.Tensor:
    """floor(v / 2^s + 1/2) on int64: ``(v + 2^(s-1)) >> s`` for s > 0, v for s = 0 (round half up)."""
    s = torch.as_tensor(shift, dtype=torch.int64)
    rounding = torch.where(s > 0, torch.ones_like(s) << (s - 1).clamp(min=0), torch.zeros_like(s))
    return (v.to(torch.int64) + rounding) >> s


def apply_dyadic(v: torch.Tensor, multiplier: torch.Tensor, shift: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """saturate_{out_dtype}((v · m + 2^(s-1)) >> s), evaluated in int64 (|v| < 2^31, |m| < 2^31)."""
    q = _qmax(out_dtype, "out_dtype")
    out = round_shift(v.to(torch.int64) * multiplier.to(torch.int64), shift)
    return out.clamp(-q - 1, q).to(out_dtype)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: W[c] ≈ q[c] · scale[c], q in [-127, 127] (dim 0 = channel)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-D floating tensor [out, in]; got {weight.dtype} {tuple(weight.shape)}")
    amax = weight.detach().abs().amax(dim=1).to(torch.float32)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def scale_for(amax: float, dtype: torch.dtype = torch.int8) -> float:
    """Symmetric per-tensor scale amax / qmax (1.0 when amax is 0, so an all-zero tensor stays exact)."""
    q = _qmax(dtype)
    return float(amax) / q if amax > 0 else 1.0


def quantize_per_tensor(x: torch.Tensor, scale: float, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """q = clamp(round_half_even(x / scale), -qmax-1, qmax) as ``dtype`` (int8 activations, int16 residuals)."""
    q = _qmax(dtype)
    if not scale > 0:
        raise ValueError(f"scale must be a positive float; got {scale}")
    return torch.round(x.detach().to(torch.float64) / scale).clamp(-q - 1, q).to(dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    return q.to(torch.float32) * (scale if not isinstance(scale, torch.Tensor) else scale.to(torch.float32))


@dataclass
class MinMaxObserver:
    """Running min/max over all calibration batches; symmetric scale from max(|min|, |max|)."""

    lo: float = math.inf
    hi: float = -math.inf

    def update(self, x: torch.Tensor) -> None:
        self.lo = min(self.lo, float(x.detach().min()))
        self.hi = max(self.hi, float(x.detach().max()))

    def amax(self) -> float:
        if self.hi < self.lo:
            raise ValueError("observer has seen no data; call update(x) with calibration batches first")
        return max(abs(self.lo), abs(self.hi))

    def scale(self, dtype: torch.dtype = torch.int8) -> float:
        return scale_for(self.amax(), dtype)


@dataclass
class EmaObserver:
    """amax_t = momentum · amax_{t-1} + (1 - momentum) · max|x_t| (first batch initialises)."""

    momentum: float = 0.95
    value: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {self.momentum}")

    def update(self, x: torch.Tensor) -> None:
        batch = float(x.detach().abs().max())
        self.value = batch if self.value is None else self.momentum * self.value + (1 - self.momentum) * batch

    def amax(self) -> float:
        if self.value is None:
            raise ValueError("observer has seen no data; call update(x) with calibration batches first")
        return self.value

    def scale(self, dtype: torch.dtype = torch.int8) -> float:
        return scale_for(self.amax(), dtype)


@dataclass
class PercentileObserver:
    """amax = mean over batches of the `percentile`-th percentile of |x| (clips rare outliers)."""

    percentile: float = 99.99
    values: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100]; got {self.percentile}")

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().abs().reshape(-1).float()
        k = max(1, min(flat.numel(), math.ceil(self.percentile / 100.0 * flat.numel())))
        self.values.append(float(flat.kthvalue(k).values))

    def amax(self) -> float:
        if not self.values:
            raise ValueError("observer has seen no data; call update(x) with calibration batches first")
        return sum(self.values) / len(self.values)

    def scale(self, dtype: torch.dtype = torch.int8) -> float:
        return scale_for(self.amax(), dtype)

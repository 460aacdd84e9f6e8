"""Integer-only linear layer and requantisation (I-ViT arXiv 2207.01405 §3.1, I-BERT arXiv 2101.01321 §3.1).

Ops (namespace ``torchmerge``; kernels in csrc/int8_linear.cpp):

  int8_linear(Tensor x, Tensor weight, Tensor? bias, Tensor multiplier, Tensor shift, ScalarType out_dtype) -> Tensor
  requantize(Tensor x, Tensor multiplier, Tensor shift, ScalarType out_dtype) -> Tensor
  int8_bmm(Tensor a, Tensor b) -> Tensor     (exact int32 a @ b of int8 activations; csrc/int8_bmm.cpp)
  add_requantized(Tensor a, Tensor ma, Tensor sa, Tensor b, Tensor mb, Tensor sb, ScalarType out_dtype) -> Tensor
      (the integer residual add: both terms requantised to one scale, saturated, summed, saturated; one pass)

Python helpers: :func:`int8_linear_params` turns float scales into (bias, multiplier, shift).
"""

from __future__ import annotations

import torch

from ._loader import define_op
from .quant import apply_dyadic, dyadic_multiplier

ACC_BOUND = 127 * 128  # max |x_k · w_k| with x in [-128, 127] and symmetric weights in [-127, 127]
MAX_K = (2**31 - 1) // ACC_BOUND  # 132104: largest K whose worst-case sum K·127·128 fits int32
MAX_K_BMM = (2**31 - 1) // (128 * 128)  # 131071: both operands of int8_bmm may hold -128
_OUT_DTYPES = (torch.int8, torch.int16)


def _check_out_dtype(out_dtype: torch.dtype, op: str) -> None:
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be torch.int8 or torch.int16; got {out_dtype}")


def _check_requant_params(multiplier: torch.Tensor, shift: torch.Tensor, channels: int, op: str,
                          names: tuple[str, str] = ("multiplier", "shift")) -> None:
    for name, t in zip(names, (multiplier, shift)):
        if t.dtype != torch.int32:
            raise ValueError(f"{op}: {name} must be torch.int32; got {t.dtype}")
        if t.dim() != 1 or t.shape[0] not in (1, channels):
            raise ValueError(f"{op}: {name} must have shape [{channels}] (per channel) or [1]; got {tuple(t.shape)}")


def check_shift_values(shift: torch.Tensor, op: str) -> None:
    """Data check (references and kernels only; fake tensors have no values): shifts lie in [0, 62]."""
    if shift.numel() and (int(shift.min()) < 0 or int(shift.max()) > 62):
        raise ValueError(f"{op}: shift must be in [0, 62]; got values in [{int(shift.min())}, {int(shift.max())}]")


def check_int8_linear(x, weight, bias, multiplier, shift, out_dtype) -> None:
    """Raise a one-line ValueError naming the first bad argument of int8_linear."""
    op = "int8_linear"
    if x.dtype != torch.int8 or x.dim() < 1:
        raise ValueError(f"{op}: x must be a torch.int8 tensor [..., K]; got {x.dtype} {tuple(x.shape)}")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"{op}: weight must be a 2-D torch.int8 tensor [N, K]; got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"{op}: x's last dim ({x.shape[-1]}) must equal weight's K ({k})")
    if k > MAX_K:
        raise ValueError(
            f"{op}: K={k} is too large: the int32 accumulator holds at most K·127·128 < 2^31, i.e. K ≤ {MAX_K}; "
            "split the reduction (e.g. two int8_linear calls on K-halves) or use a wider accumulator"
        )
    if bias is not None and (bias.dtype != torch.int32 or tuple(bias.shape) != (n,)):
        raise ValueError(f"{op}: bias must be None or a torch.int32 tensor of shape [{n}]; got {bias.dtype} {tuple(bias.shape)}")
    _check_requant_params(multiplier, shift, n, op)
    _check_out_dtype(out_dtype, op)


def int8_linear_reference(x, weight, bias, multiplier, shift, out_dtype):
    """out[..., n] = sat_{out_dtype}( ((acc + bias[n]) · m[n] + 2^(s[n]-1)) >> s[n] ),
    acc = Σ_k x[..., k] · weight[n, k] (exact int32; evaluated in float64, exact below 2^53).

    Rounding is half up (towards +inf at ties); no rounding term when s[n] = 0.
    """
    check_int8_linear(x, weight, bias, multiplier, shift, out_dtype)
    check_shift_values(shift, "int8_linear")
    acc = torch.matmul(x.to(torch.float64), weight.to(torch.float64).t()).to(torch.int64)
    if bias is not None:
        acc = acc + bias.to(torch.int64)
    return apply_dyadic(acc, multiplier, shift, out_dtype)


def _int8_linear_fake(x, weight, bias, multiplier, shift, out_dtype):
    check_int8_linear(x, weight, bias, multiplier, shift, out_dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=out_dtype)


def check_requantize(x, multiplier, shift, out_dtype) -> None:
    op = "requantize"
    if x.dtype not in (torch.int32, torch.int16, torch.int8) or x.dim() < 1:
        raise ValueError(f"{op}: x must be a torch.int32, int16 or int8 tensor [..., C]; got {x.dtype} {tuple(x.shape)}")
    _check_requant_params(multiplier, shift, x.shape[-1], op)
    _check_out_dtype(out_dtype, op)


def requantize_reference(x, multiplier, shift, out_dtype):
    """out[..., c] = sat_{out_dtype}((x[..., c] · m[c] + 2^(s[c]-1)) >> s[c]); m, s of shape [C] or [1]."""
    check_requantize(x, multiplier, shift, out_dtype)
    check_shift_values(shift, "requantize")
    return apply_dyadic(x, multiplier, shift, out_dtype)


def check_add_requantized(a, ma, sa, b, mb, sb, out_dtype) -> None:
    op = "add_requantized"
    ints = (torch.int32, torch.int16, torch.int8)
    if a.dtype not in ints or a.dim() < 1:
        raise ValueError(f"{op}: a must be a torch.int32, int16 or int8 tensor [..., C]; got {a.dtype} {tuple(a.shape)}")
    if b.dtype not in ints or b.shape != a.shape:
        raise ValueError(f"{op}: b must be a torch.int32, int16 or int8 tensor of a's shape {tuple(a.shape)}; "
                         f"got {b.dtype} {tuple(b.shape)}")
    _check_requant_params(ma, sa, a.shape[-1], op, ("ma", "sa"))
    _check_requant_params(mb, sb, a.shape[-1], op, ("mb", "sb"))
    _check_out_dtype(out_dtype, op)


def add_requantized_reference(a, ma, sa, b, mb, sb, out_dtype):
    """sat(requantize(a, ma, sa) + requantize(b, mb, sb)), each term saturated to out_dtype first
    (exactly the separate requantize, add in int32, clamp, narrow)."""
    check_add_requantized(a, ma, sa, b, mb, sb, out_dtype)
    check_shift_values(sa, "add_requantized")
    check_shift_values(sb, "add_requantized")
    q = torch.iinfo(out_dtype)
    total = apply_dyadic(a, ma, sa, out_dtype).to(torch.int32) + apply_dyadic(b, mb, sb, out_dtype).to(torch.int32)
    return total.clamp(q.min, q.max).to(out_dtype)


def _add_requantized_fake(a, ma, sa, b, mb, sb, out_dtype):
    check_add_requantized(a, ma, sa, b, mb, sb, out_dtype)
    return a.new_empty(a.shape, dtype=out_dtype)


def _requantize_fake(x, multiplier, shift, out_dtype):
    check_requantize(x, multiplier, shift, out_dtype)
    return x.new_empty(x.shape, dtype=out_dtype)


def check_int8_bmm(a, b) -> None:
    """Raise a one-line ValueError naming the first bad argument of int8_bmm."""
    op = "int8_bmm"
    if a.dtype != torch.int8 or a.dim() < 2:
        raise ValueError(f"{op}: a must be a torch.int8 tensor [..., M, K]; got {a.dtype} {tuple(a.shape)}")
    if b.dtype != torch.int8 or b.dim() != a.dim():
        raise ValueError(f"{op}: b must be a torch.int8 tensor [..., K, N] with a's {a.dim()} dims; got {b.dtype} {tuple(b.shape)}")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"{op}: a and b must have the same batch dims; got {tuple(a.shape)} and {tuple(b.shape)}")
    if b.shape[-2] != a.shape[-1]:
        raise ValueError(f"{op}: b's K ({b.shape[-2]}) must equal a's last dim ({a.shape[-1]})")
    if a.shape[-1] > MAX_K_BMM:
        raise ValueError(f"{op}: K={a.shape[-1]} is too large: the int32 accumulator holds at most K·128·128 < 2^31, "
                         f"i.e. K ≤ {MAX_K_BMM}; split the reduction")


def int8_bmm_reference(a, b):
    """out[..., m, n] = Σ_k a[..., m, k] · b[..., k, n], exact in int32 (evaluated in float64, exact below 2^53)."""
    check_int8_bmm(a, b)
    return torch.matmul(a.to(torch.float64), b.to(torch.float64)).to(torch.int32)


def _int8_bmm_fake(a, b):
    check_int8_bmm(a, b)
    return a.new_empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)


define_op("int8_bmm", "(Tensor a, Tensor b) -> Tensor", reference=int8_bmm_reference, fake=_int8_bmm_fake)
define_op("add_requantized", "(Tensor a, Tensor ma, Tensor sa, Tensor b, Tensor mb, Tensor sb, ScalarType out_dtype) -> Tensor",
          reference=add_requantized_reference, fake=_add_requantized_fake)
define_op(
    "int8_linear",
    "(Tensor x, Tensor weight, Tensor? bias, Tensor multiplier, Tensor shift, ScalarType out_dtype) -> Tensor",
    reference=int8_linear_reference,
    fake=_int8_linear_fake,
)
define_op(
    "requantize",
    "(Tensor x, Tensor multiplier, Tensor shift, ScalarType out_dtype) -> Tensor",
    reference=requantize_reference,
    fake=_requantize_fake,
)


def int8_linear_params(
    x_scale: float, w_scale: torch.Tensor, out_scale: float, bias: torch.Tensor | None = None
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(bias_int32, multiplier, shift) for y = x·Wᵀ + b quantised with the given scales.

    bias_int32[n] = round(b[n] / (x_scale · w_scale[n])); M[n] = x_scale · w_scale[n] / out_scale → dyadic.
    """
    w_scale = torch.as_tensor(w_scale, dtype=torch.float64).reshape(-1)
    if not (x_scale > 0 and out_scale > 0 and bool((w_scale > 0).all())):
        raise ValueError(f"x_scale, w_scale and out_scale must be positive; got {x_scale}, min {w_scale.min()}, {out_scale}")
    acc_scale = x_scale * w_scale
    bias_int = None
    if bias is not None:
        b = torch.round(bias.detach().to(torch.float64) / acc_scale)
        if b.abs().max() > 2**31 - 1:
            raise ValueError("bias: b / (x_scale · w_scale) overflows int32; x_scale or w_scale is too small")
        bias_int = b.to(torch.int32)
    multiplier, shift = dyadic_multiplier(acc_scale / out_scale)
    return bias_int, multiplier, shift


# Benchmark control: which int8 GEMM int8_linear uses ("auto" picks by M; "onednn" = torch._int_mm;
# "native" = our VNNI/AVX2/scalar tiles). Implemented in csrc/int8_linear.cpp.
torch.library.define("torchmerge::_set_int8_gemm", "(str backend) -> str")
_GEMM_BACKENDS = ("auto", "onednn", "native")


def set_int8_gemm(backend: str) -> str:
    """Force the int8 GEMM of int8_linear's native kernel; returns the previous setting."""
    from ._loader import native_available

    if backend not in _GEMM_BACKENDS:
        raise ValueError(f"_set_int8_gemm: backend must be one of {_GEMM_BACKENDS}; got {backend!r}")
    if not native_available():
        return "auto"  # the reference has a single GEMM (float64 matmul, exact)
    return torch.ops.torchmerge._set_int8_gemm(backend)


def int8_linear(x, weight, bias, multiplier, shift, out_dtype=torch.int8):
    """Integer-only linear; see :func:`int8_linear_reference` for the exact semantics."""
    return torch.ops.torchmerge.int8_linear(x, weight, bias, multiplier, shift, out_dtype)


def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 batched product a @ b of int8 tensors [..., M, K] · [..., K, N] (same batch dims)."""
    return torch.ops.torchmerge.int8_bmm(a, b)


def requantize(x, multiplier, shift, out_dtype=torch.int8):
    """Dyadic requantisation of int32/int16/int8 values; see :func:`requantize_reference`."""
    return torch.ops.torchmerge.requantize(x, multiplier, shift, out_dtype)


__all__ = ["int8_linear", "int8_bmm", "requantize", "set_int8_gemm", "int8_linear_params", "int8_linear_reference", "requantize_reference", "MAX_K"]

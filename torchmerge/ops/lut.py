"""T-MAC table-lookup linear layer for b-bit weights (b ∈ {1, 2, 3, 4}).

Jianyu Wei et al., "T-MAC: CPU Renaissance via Table Lookup for Low-Bit LLM Deployment on Edge",
arXiv 2407.00088. Packing, quantisation and the byte layout: torchmerge/ops/lut_pack.py.

Op (namespace ``torchmerge``; kernels in csrc/lut.cpp):

  lut_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int out_features, int bits,
             int group_size, bool int8_tables=False, Tensor? bias=None) -> Tensor

x [..., K] (float32 / bfloat16 / float16, computed in float32) → y [..., N] in x's dtype, where
y ≈ x @ dequantize_lut_weights(*packed, bits, group_size).T + bias. scales/zeros are float32 or
float16 (``pack_lut_weights(..., scale_dtype=)``). Python API:
``lut_linear(x, pack_lut_weights(w, bits, group_size, symmetric), bits, group_size, int8_tables=, bias=)``.

Exact math (``lut_linear_reference`` defines it; rows m of x, G = group_size, g a group of G inputs):

1. Tables, one per 4 activations x_{4t..4t+3} (a "±1 bit-serial" table):
       T_t[idx] = (((±x_{4t}) ± x_{4t+1}) ± x_{4t+2}) ± x_{4t+3},   sign j is + iff bit j of idx is 1.
   The 8 entries with bit 3 set are computed (in that order, fp32); the other 8 are mirrored:
   T_t[15 − idx] = −T_t[idx] (bit-identical to computing them).
2. Optional int8 tables: ts_g = max_{t∈g, idx} |T_t[idx]| / 127 (1 if that max is 0),
   Tq_t = RNE(T_t / ts_g) ∈ [−127, 127]; lookups are then summed exactly as integers.
3. For bit-plane i and table t, idx_{i,t}(n) = Σ_j 2^j · bit_i(q[n, 4t+j]). Since
   Σ_{k∈t} x_k·bit_i(q_k) = (T_t[idx] + Σ_{k∈t} x_k) / 2, with P_g(n) = Σ_i 2^i Σ_{t∈g} T_t[idx_{i,t}(n)]
   (fp32 tables) or ts_g·Σ_i 2^i Σ_{t∈g} Tq_t[idx_{i,t}(n)] (int8 tables) and Sx_g = Σ_{k∈g} x_k:
       y[n] = Σ_g s_g(n) · ( P_g(n)/2 + c_g(n)·Sx_g ) + bias[n],   c_g(n) = (2^b − 1)/2 − z_g(n).
   With fp32 tables this equals Σ_k x_k·s·(q_k − z), i.e. dequantise-then-matmul, up to float
   summation order. The kernels sum in their own order (tables and int8 codes are bit-identical;
   float sums differ in the last bits), so tests compare them with a tight tolerance.
4. int8-table error bound: every |Tq·ts − T| ≤ ts/2, hence
       |y_int8 − y_fp32| ≤ Σ_g |s_g(n)| · (2^b − 1) · G · ts_g / 16   (+ fp32 rounding).

Kernels: lookups by byte shuffle (vpshufb, 16-byte int8 table per 128-bit lane) on AVX-512BW and AVX2.
b = 1, 3 (plane-major bytes): vpmaddubsw with multipliers 2^i combines bit-planes in int16, flushed to
int32 at least every 64 inputs. b = 2, 4 (row-major words, lut_pack docstring): the 4 lookups in a
32-bit word belong to one row, so one vpdpbusd (AVX512-VNNI) with byte multipliers 2^i adds them
straight into int32 (AVX2 and AVX-512 without VNNI: vpmaddubsw then vpmaddwd). With AVX512-VBMI the
lookups are vpermb on tables replicated to 64 bytes, which reads 6 index bits and so needs no nibble
masking (same sums, bit for bit). fp32 tables use vpermps on the (shifted) index bytes. Scalar
fallback everywhere. The weight stream is prefetched 8 KiB ahead: at decode sizes the GEMV is DRAM-bound.
With fp32 tables and 128 or more activation rows (prefill, batches) the op dequantises weight blocks
(at most 4 MiB at a time) and multiplies them with an fp32 GEMM: step 3's definition itself, up to
summation order, and 2-4x faster than the lookups there. int8 tables always use the lookups.
"""

from __future__ import annotations

import torch

from ._loader import define_op
from .lut_pack import (
    ROWS_PER_BLOCK,
    LutWeights,
    check_bits,
    check_group_size,
    dequantize_lut_weights,
    from_blocks,
    pack_lut_weights,
    symmetric_zero,
    unpack_codes,
)

__all__ = ["LutWeights", "pack_lut_weights", "dequantize_lut_weights", "lut_linear", "lut_linear_reference"]

_X_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALE_DTYPES = (torch.float32, torch.float16)


def check_lut_linear(x, qweight, scales, zeros, out_features, bits, group_size, int8_tables, bias) -> int:
    """Raise a one-line ValueError naming the first bad argument; return N."""
    op = "lut_linear"
    if not isinstance(x, torch.Tensor) or x.dtype not in _X_DTYPES or x.dim() < 1:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a float32/bfloat16/float16 tensor [..., K]; got {got}")
    check_bits(op, bits)
    k = x.shape[-1]
    check_group_size(op, group_size, k)
    if not isinstance(out_features, int) or out_features < 1:
        raise ValueError(f"{op}: out_features must be a positive int (N); got {out_features!r}")
    n = out_features
    nb = -(-n // ROWS_PER_BLOCK)
    want_s = (nb, k // group_size, ROWS_PER_BLOCK)
    if not isinstance(scales, torch.Tensor) or scales.dtype not in _SCALE_DTYPES or tuple(scales.shape) != want_s:
        raise ValueError(f"{op}: scales must be torch.float32 or torch.float16 of shape [ceil(N/64), K/group_size, 64] = {list(want_s)}; "
                         f"got {getattr(scales, 'dtype', type(scales).__name__)} {tuple(getattr(scales, 'shape', ()))}")
    want_q = (nb, k // 8, bits, ROWS_PER_BLOCK)
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or tuple(qweight.shape) != want_q:
        got = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise ValueError(f"{op}: qweight must be torch.uint8 of shape [ceil(N/64), K/8, bits, 64] = {list(want_q)}; got {got}")
    if zeros is not None and (zeros.dtype != scales.dtype or zeros.shape != scales.shape):
        raise ValueError(f"{op}: zeros must be None (symmetric) or a tensor of scales' dtype and shape "
                         f"({scales.dtype}, {tuple(scales.shape)}); got {zeros.dtype} {tuple(zeros.shape)}")
    if not isinstance(int8_tables, bool):
        raise ValueError(f"{op}: int8_tables must be a bool; got {int8_tables!r}")
    if bias is not None and (bias.dtype != torch.float32 or tuple(bias.shape) != (n,)):
        raise ValueError(f"{op}: bias must be None or a torch.float32 tensor [{n}]; got {bias.dtype} {tuple(bias.shape)}")
    return n


def build_tables(x2: torch.Tensor) -> torch.Tensor:
    """T [M, K/4, 16] float32: 8 entries computed in the documented order, 8 mirrored (step 1)."""
    m, k = x2.shape
    xs = x2.reshape(m, k // 4, 1, 4)
    idx = torch.arange(8, 16)
    v = torch.where((idx & 1).bool(), xs[..., 0], -xs[..., 0])
    for j in (1, 2, 3):
        v = torch.where(((idx >> j) & 1).bool(), v + xs[..., j], v - xs[..., j])
    return torch.cat([-v.flip(-1), v], dim=-1)


def quantize_tables(tables: torch.Tensor, group_size: int):
    """(Tq int64 [M, K/4, 16], ts float32 [M, K/G]) per step 2."""
    m, nt, _ = tables.shape
    per_group = group_size // 4
    amax = tables.abs().reshape(m, nt // per_group, per_group * 16).amax(-1)
    ts = torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)
    tq = torch.round(tables / ts.repeat_interleave(per_group, dim=1)[..., None])
    return tq.to(torch.int64), ts


def lut_linear_reference(x, qweight, scales, zeros, out_features, bits, group_size, int8_tables=False, bias=None):
    """Pure-PyTorch definition of ``lut_linear`` (module docstring, steps 1-3)."""
    n = check_lut_linear(x, qweight, scales, zeros, out_features, bits, group_size, int8_tables, bias)
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(torch.float32)
    m, ng, per_group = x2.shape[0], k // group_size, group_size // 4
    tables = build_tables(x2)
    if int8_tables:
        tq, ts = quantize_tables(tables, group_size)
        lut = tq.reshape(m, (k // 4) * 16)
    else:
        lut = tables.reshape(m, (k // 4) * 16)
    sx = x2.reshape(m, ng, group_size).sum(-1)  # [M, K/G]
    # the gathered lookups are [M, bits, rows, K/4]: a few row blocks at a time bound the memory
    nb_total = qweight.shape[0]
    step = max(1, 2**24 // max(1, m * bits * ROWS_PER_BLOCK * (k // 4)))
    ys = []
    for nb0 in range(0, nb_total, step):
        nb1 = min(nb_total, nb0 + step)
        rows = min(n, nb1 * ROWS_PER_BLOCK) - nb0 * ROWS_PER_BLOCK
        qt = unpack_codes(qweight[nb0:nb1], bits, rows).reshape(rows, k // 4, 4)
        offsets = torch.arange(k // 4) * 16
        p = None
        for i in range(bits):
            idx = (((qt >> i) & 1) << torch.arange(4)).sum(-1) + offsets  # [rows, K/4]
            looked = lut[:, idx.reshape(-1)].reshape(m, rows, ng, per_group).sum(-1)  # [M, rows, K/G]
            p = looked * 2**i if p is None else p + looked * 2**i
        p = p.to(torch.float32)
        if int8_tables:
            p = p * ts[:, None, :]
        s_rows = from_blocks(scales[nb0:nb1], rows).float()
        if zeros is not None:
            z = from_blocks(zeros[nb0:nb1], rows).float()
        else:
            z = torch.full((rows, ng), symmetric_zero(bits))
        c = (2**bits - 1) / 2 - z  # [rows, K/G]
        ys.append((s_rows[None] * (0.5 * p + c[None] * sx[:, None, :])).sum(-1))
    y = torch.cat(ys, dim=1) if ys else x2.new_zeros(m, n)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


def _lut_linear_fake(x, qweight, scales, zeros, out_features, bits, group_size, int8_tables=False, bias=None):
    n = check_lut_linear(x, qweight, scales, zeros, out_features, bits, group_size, int8_tables, bias)
    return x.new_empty((*x.shape[:-1], n))


define_op(
    "lut_linear",
    "(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, int out_features, int bits, int group_size, "
    "bool int8_tables=False, Tensor? bias=None) -> Tensor",
    reference=lut_linear_reference,
    fake=_lut_linear_fake,
)


def lut_linear(
    x: torch.Tensor,
    packed: LutWeights,
    bits: int,
    group_size: int,
    *,
    int8_tables: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W packed by :func:`pack_lut_weights`; see the module docstring."""
    qweight, scales, zeros, n = packed
    # no Python-side check: both the C++ kernel and the reference validate (GEMV latency matters here)
    return torch.ops.torchmerge.lut_linear(x, qweight, scales, zeros, n, bits, group_size, int8_tables, bias)


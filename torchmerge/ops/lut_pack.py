"""Offline packing of weights for the T-MAC LUT kernels (``torchmerge::lut_linear``).

Jianyu Wei et al., "T-MAC: CPU Renaissance via Table Lookup for Low-Bit LLM Deployment on Edge",
arXiv 2407.00088. A b-bit weight q = Σ_i 2^i·q_i is split into b one-bit planes q_i; each plane is
multiplied by the activations through table lookups (see torchmerge/ops/lut.py).

Quantisation of w [N, K] per group of ``group_size`` consecutive k of one row (RNE = round half even):

* symmetric:  z = 2^(b-1) for b ≥ 2, z = 1/2 for b = 1;  s = max|w_g| / (2^b − 1 − z)
* asymmetric: lo = min(min w_g, 0), hi = max(max w_g, 0);  s = (hi − lo) / (2^b − 1);  z = clamp(RNE(−lo/s), 0, 2^b − 1)

then s = 1 where s = 0, and q = clamp(RNE(w/s + z), 0, 2^b − 1) (symmetric) or
q = clamp(RNE(w/s) + z, 0, 2^b − 1) (asymmetric); the dequantised weight is s·(q − z). Symmetric b = 2
is ternary {−s, 0, +s}; symmetric b = 1 is {−s/2, +s/2}.

Packed layout (``LutWeights``), NB = ceil(N/64), KC = K/8:

* ``qweight``: uint8 [NB, KC, b, 64]. Every nibble is a 4-bit table index: for row n = 64·nb + r,
  chunk c (k = 8c .. 8c+7), bit-plane i and half a ∈ {0, 1}, nibble (r, i, a) holds bit i of
  q[n, 8c + 4a .. 8c + 4a + 3] (bit j of the nibble = bit i of q[n, 8c + 4a + j]), the index into the
  table of activations 8c + 4a .. 8c + 4a + 3. The b·64 bytes of qweight[nb, c] hold the 128·b nibbles
  of that block and chunk; nibble (r, i, a) sits in byte β, low nibble (η = 0) or high (η = 1), with
  (``nibble_slots``, slot 2β + η):

  - b = 1 or 3 (plane-major): β = 64·i + p(r), η = a, where p = 16·lane + 8·h + j (lane < 4, h < 2,
    j < 8) holds row r = 32·h + 8·lane + j (``row_of_position``): so byte 64·i + p is bit-plane i of
    the 8 weights of one row; after a per-128-bit-lane byte shuffle, unpacklo/unpackhi of the two
    lookups and vpmaddubsw, the int16 results come out in natural row order.
  - b = 4 (row-major words): β = 64·⌊r/16⌋ + 4·(r mod 16) + i, η = a. Read as little-endian 32-bit
    words, word j of 64-byte line l holds the 4 planes of row 16·l + j, byte i = plane i: the low
    nibbles of a line index the first table of the chunk, the high nibbles the second, and one
    vpdpbusd with byte multipliers (1, 2, 4, 8) sums the 4 lookups of a row into an int32 lane.
  - b = 2 (row-major words): β = 64·⌊r/32⌋ + 4·(r mod 16) + 2·a + i, η = ⌊r/16⌋ mod 2: word j of
    line l holds rows 32·l + j (low nibbles) and 32·l + 16 + j (high nibbles), byte 2·a + i =
    plane i, half a; a lookup picks table 2c + a by the byte's position in the word, and vpdpbusd
    with multipliers (1, 2, 1, 2) sums them per row.

  Rows ≥ N are zero padding.
* ``scales``: float32 (or float16, ``scale_dtype``) [NB, K/group_size, 64]: scales[nb, g, r] is s of row 64·nb + r (natural row order),
  group g; padding rows hold 0. Blocked so the kernel streams one block's scales contiguously.
* ``zeros``: like ``scales`` (same dtype) holding integer-valued zero points (asymmetric), or None (symmetric: z above).
* ``out_features``: N.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

ROWS_PER_BLOCK = 64
BITS_CHOICES = (1, 2, 3, 4)


class LutWeights(NamedTuple):
    """Packed weights for ``lut_linear``: layout in the module docstring."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    out_features: int


def symmetric_zero(bits: int) -> float:
    """Fixed zero point of the symmetric grid: 2^(b−1) for b ≥ 2, 1/2 for b = 1."""
    return 0.5 if bits == 1 else float(2 ** (bits - 1))


def row_of_position() -> torch.Tensor:
    """row(p) = 32·h + 8·lane + j for byte position p = 16·lane + 8·h + j (int64 [64]; b = 1, 3)."""
    p = torch.arange(ROWS_PER_BLOCK)
    lane, h, j = p // 16, (p // 8) % 2, p % 8
    return 32 * h + 8 * lane + j


def nibble_slots(bits: int) -> torch.Tensor:
    """slot [64, bits, 2] (int64): nibble (r, i, a) of a chunk is nibble slot % 2 of byte slot // 2
    among its ``bits``·64 bytes (module docstring)."""
    r = torch.arange(ROWS_PER_BLOCK).reshape(-1, 1, 1)
    i = torch.arange(bits).reshape(1, -1, 1)
    a = torch.arange(2).reshape(1, 1, -1)
    if bits == 4:
        byte, nib = 64 * (r // 16) + 4 * (r % 16) + i, a
    elif bits == 2:
        byte, nib = 64 * (r // 32) + 4 * (r % 16) + 2 * a + i, (r // 16) % 2
    else:
        pos = torch.empty(ROWS_PER_BLOCK, dtype=torch.int64)
        pos[row_of_position()] = torch.arange(ROWS_PER_BLOCK)
        byte, nib = 64 * i + pos.reshape(-1, 1, 1), a
    return (2 * byte + nib).expand(ROWS_PER_BLOCK, bits, 2)


def to_blocks(t: torch.Tensor) -> torch.Tensor:
    """[N, ng] per-row group parameters -> [NB, ng, 64] (rows padded with 0)."""
    n, ng = t.shape
    nb = -(-n // ROWS_PER_BLOCK)
    out = torch.zeros(nb * ROWS_PER_BLOCK, ng, dtype=t.dtype)
    out[:n] = t
    return out.reshape(nb, ROWS_PER_BLOCK, ng).transpose(1, 2).contiguous()


def from_blocks(t: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`to_blocks`: [NB, ng, 64] -> [N, ng]."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


def check_bits(op: str, bits) -> None:
    if not isinstance(bits, int) or bits not in BITS_CHOICES:
        raise ValueError(f"{op}: bits must be one of {BITS_CHOICES}; got {bits!r}")


def check_group_size(op: str, group_size, k: int) -> None:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 8 or k % group_size:
        raise ValueError(
            f"{op}: group_size must be a positive multiple of 8 that divides K={k} (e.g. 32, 64, 128); got {group_size!r}"
        )


def quantize_groups(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, scale_dtype=torch.float32):
    """Return (q int64 [N, K], scales float32 [N, K/G], zeros float32 [N, K/G]) per the module docstring."""
    n, k = w.shape
    wg = w.to(torch.float32).reshape(n, k // group_size, group_size)
    qmax = 2**bits - 1
    if symmetric:
        z = torch.full((n, k // group_size), symmetric_zero(bits))
        s = wg.abs().amax(-1) / (qmax - symmetric_zero(bits))
        s = _representable(s, scale_dtype)
        q = torch.round(wg / s[..., None] + z[..., None])
    else:
        lo = wg.amin(-1).clamp(max=0.0)
        hi = wg.amax(-1).clamp(min=0.0)
        s = (hi - lo) / qmax
        s = _representable(s, scale_dtype)
        z = torch.round(-lo / s).clamp(0, qmax)
        q = torch.round(wg / s[..., None]) + z[..., None]
    q = q.clamp(0, qmax).to(torch.int64).reshape(n, k)
    return q, s, z


def _representable(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """s rounded to ``dtype`` (and back to float32); 1 where it is 0 (or underflows to 0)."""
    s = s.to(dtype).to(torch.float32)
    if torch.isinf(s).any():
        raise ValueError(f"pack_lut_weights: a group scale overflows {dtype}; use scale_dtype=torch.float32")
    return torch.where(s == 0, torch.ones_like(s), s)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Lay out integer codes q [N, K] (0 ≤ q < 2^bits) as ``qweight`` uint8 [NB, K/8, bits, 64]."""
    n, k = q.shape
    nb = -(-n // ROWS_PER_BLOCK)
    out = torch.empty(nb, k // 8, bits, ROWS_PER_BLOCK, dtype=torch.uint8)
    slots = nibble_slots(bits).reshape(-1)
    weights = 1 << torch.arange(4, dtype=torch.int32)
    for b0 in range(0, nb, 16):  # 1024 rows at a time bound the int32 temporaries
        b1 = min(nb, b0 + 16)
        qp = torch.zeros((b1 - b0) * ROWS_PER_BLOCK, k, dtype=torch.int32)
        rows = q[b0 * ROWS_PER_BLOCK : b1 * ROWS_PER_BLOCK]
        qp[: rows.shape[0]] = rows
        qp = qp.reshape(b1 - b0, ROWS_PER_BLOCK, k // 8, 1, 2, 4)  # [NB, r, c, 1, a, j]
        nib = (((qp >> torch.arange(bits, dtype=torch.int32).reshape(-1, 1, 1)) & 1) * weights).sum(-1)  # [NB, r, c, i, a]
        nib = nib.permute(0, 2, 1, 3, 4).reshape(b1 - b0, k // 8, -1)  # [NB, c, (r, i, a)]
        flat = torch.empty_like(nib)
        flat[..., slots] = nib
        bytes_ = flat[..., 0::2] | (flat[..., 1::2] << 4)
        out[b0:b1] = bytes_.reshape(b1 - b0, k // 8, bits, ROWS_PER_BLOCK).to(torch.uint8)
    return out


def unpack_codes(qweight: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: integer codes int64 [N, K]."""
    nb, kc = qweight.shape[0], qweight.shape[1]
    by = qweight.to(torch.int64).reshape(nb, kc, -1)
    flat = torch.stack([by & 15, by >> 4], dim=-1).reshape(nb, kc, -1)  # slot 2β + η
    nib = flat[..., nibble_slots(bits).reshape(-1)].reshape(nb, kc, ROWS_PER_BLOCK, bits, 2, 1)  # [NB, c, r, i, a, 1]
    bit = (nib >> torch.arange(4)) & 1  # [NB, c, r, i, a, j]
    q = (bit << torch.arange(bits).reshape(-1, 1, 1)).sum(3)  # [NB, c, r, a, j]
    return q.permute(0, 2, 1, 3, 4).reshape(nb * ROWS_PER_BLOCK, kc * 8)[:n]


def pack_lut_weights(
    w: torch.Tensor, bits: int, group_size: int = 32, symmetric: bool = True, scale_dtype: torch.dtype = torch.float32
) -> LutWeights:
    """Quantise ``w`` [N, K] (F.linear layout) per group to ``bits`` bits and pack it for ``lut_linear``.

    Math and layout: module docstring (T-MAC, arXiv 2407.00088). Offline, pure PyTorch.
    ``scale_dtype=torch.float16`` halves the scale traffic (T-MAC's choice); codes are chosen with the
    rounded scales, so dequantisation uses exactly the stored values.
    """
    op = "pack_lut_weights"
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        got = f"{w.dtype} {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{op}: w must be a 2-D floating-point tensor [N, K]; got {got}")
    check_bits(op, bits)
    check_group_size(op, group_size, w.shape[1])
    if not torch.isfinite(w).all():
        raise ValueError(f"{op}: w must be finite (found inf or NaN)")
    if scale_dtype not in (torch.float32, torch.float16):
        raise ValueError(f"{op}: scale_dtype must be torch.float32 or torch.float16; got {scale_dtype}")
    q, s, z = quantize_groups(w.detach().cpu(), bits, group_size, symmetric, scale_dtype)
    zeros = None if symmetric else to_blocks(z).to(scale_dtype)
    return LutWeights(pack_codes(q, bits), to_blocks(s).to(scale_dtype), zeros, w.shape[0])


def dequantize_lut_weights(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, out_features: int, bits: int, group_size: int
) -> torch.Tensor:
    """w [N, K] float32 = s·(q − z) per group, from packed weights (the independent reference for tests)."""
    n = out_features
    q = unpack_codes(qweight, bits, n).to(torch.float32)
    k = q.shape[1]
    z = from_blocks(zeros, n).float() if zeros is not None else torch.full((n, k // group_size), symmetric_zero(bits))
    s = from_blocks(scales, n).float()
    return ((q.reshape(n, -1, group_size) - z[..., None]) * s[..., None]).reshape(n, k)

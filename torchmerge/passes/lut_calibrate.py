"""Calibrated low-bit weight quantisation for LowerLUT: activation-aware scales, output-error clipping, GPTQ.

Everything is judged by the error of a linear layer's *output* on calibration inputs X [M, K], which
for a weight error ΔW [N, K] is ‖X·ΔWᵀ‖² = tr(ΔW·H·ΔWᵀ) with the Gram matrix H = XᵀX; so one pass over
the calibration batches collects H (float64) and the mean |x| per input channel, and nothing else.

1. AWQ (Lin et al. 2023, arXiv 2306.00978): per input channel s = mean|x|^α / √(max·min), the weight is
   quantised as W·diag(s) and the activation divided by s. α ∈ ALPHAS is searched per group of linear
   layers that share one input (Q, K, V), minimising their summed output error; α = 0 is s = 1, so the
   search never loses against plain rounding on the calibration data.
2. Per-group range clipping by output error: each group g of `group` inputs keeps the clip ratio
   r ∈ CLIP_RATIOS minimising Δ_g·H_gg·Δ_gᵀ (H's diagonal block), like AWQ's auto-clip.
3. GPTQ (Frantar et al. 2022, arXiv 2210.17323): the codes are chosen column by column and each
   column's rounding error is pushed onto the columns not yet quantised through the Cholesky factor
   of H⁻¹ (damped by DAMP·mean diag H); a group's grid (scale, zero) is chosen (step 2) on the
   updated weights when the sweep reaches it.
The grid and codes follow torchmerge.ops.lut_pack.quantize_groups (the LUT op's semantics are unchanged).
"""

from __future__ import annotations

import torch
import torch.fx as fx

ALPHAS = tuple(i / 10 for i in range(11))
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(9))  # 1.0 … 0.6
DAMP = 0.1  # 0.01 (GPTQ's default) overfits ~500 calibration rows: MiniLM held-out 0.978 vs 0.984
BLOCK = 128


def collect_stats(gm: fx.GraphModule, watched: list[fx.Node], batches):
    """{node: (H float64 [K, K], mean |x| float64 [K])} for each watched node (2-D [M, K] values)."""
    acc = {n: [0, 0.0, 0.0] for n in watched}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in acc:
                x = out.detach().reshape(-1, out.shape[-1]).double()
                a = acc[n]
                a[0], a[1], a[2] = a[0] + x.shape[0], a[1] + x.T @ x, a[2] + x.abs().sum(0)
            return out

    with torch.no_grad():
        for batch in batches:
            Recorder(gm).run(*batch)
    return {n: (h, s / m) for n, (m, h, s) in acc.items()}


def clip_candidates(w: torch.Tensor, group: int, symmetric: bool, ratios=CLIP_RATIOS):
    """w [N, K] with every group clipped to r·(its range), for each r in `ratios` (the range includes 0,
    and is symmetric about it when `symmetric`)."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True).clamp(max=0), wg.amax(-1, keepdim=True).clamp(min=0)
    if symmetric:
        lo = torch.minimum(lo, -hi)
        hi = -lo
    for r in ratios:
        yield torch.maximum(torch.minimum(wg, r * hi), r * lo).reshape(n, k)


def _grid(w: torch.Tensor, bits: int, group: int, symmetric: bool, hblocks: torch.Tensor | None, clip: bool):
    """(scales, zeros) [N, K/G] for w [N, K]: the clip ratio per group with the least (output) error."""
    from ..ops.lut_pack import quantize_groups

    n, k = w.shape
    best = None
    for clipped in clip_candidates(w, group, symmetric, CLIP_RATIOS if clip else (1.0,)):
        _, s, z = quantize_groups(clipped, bits, group, symmetric)
        d = dequant(quant(w, s, z, bits, group, symmetric), s, z, group) - w
        dg = d.reshape(n, k // group, group).double()
        err = (dg.pow(2).sum(-1) if hblocks is None else torch.einsum("ngi,gij,ngj->ng", dg, hblocks, dg))
        if best is None:
            best = [err, s, z]
        else:
            better = err < best[0]
            best = [torch.where(better, err, best[0]), torch.where(better, s, best[1]), torch.where(better, z, best[2])]
    return best[1], best[2]


def quant(w, s, z, bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """Integer codes (as float) of w [N, K] on the grid (s, z) [N, K/G], rounded as quantize_groups does."""
    n, k = w.shape
    wg, s, z = w.reshape(n, -1, group), s[..., None], z[..., None]
    q = torch.round(wg / s + z) if symmetric else torch.round(wg / s) + z
    return q.clamp(0, 2**bits - 1).reshape(n, k)


def dequant(q, s, z, group: int) -> torch.Tensor:
    n, k = q.shape
    return ((q.reshape(n, -1, group) - z[..., None]) * s[..., None]).reshape(n, k)


def _blocks(h: torch.Tensor, group: int) -> torch.Tensor:
    k = h.shape[0]
    idx = torch.arange(k).reshape(k // group, group)
    return h[idx[:, :, None], idx[:, None, :]]  # [K/G, G, G]


def rtn(w, h, bits, group, symmetric, clip=True):
    """Round to nearest on the output-error-clipped grid: (q, s, z)."""
    s, z = _grid(w, bits, group, symmetric, _blocks(h, group), clip)
    return quant(w, s, z, bits, group, symmetric), s, z


def gptq(w, h, bits, group, symmetric, clip=True):
    """GPTQ codes for w [N, K] given the Gram matrix h [K, K]: (q, s, z), grids chosen lazily per group."""
    n, k = w.shape
    w, h = w.double().clone(), h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(DAMP * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    hblocks = _blocks(h, group)
    q = torch.zeros_like(w)
    scales, zeros = torch.zeros(n, k // group), torch.zeros(n, k // group)
    block = group * max(1, BLOCK // group)  # a group's columns lie in one block
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=w.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % group == 0:
                g = col // group
                s, z = _grid(w1[:, i:i + group].float(), bits, group, symmetric, hblocks[g:g + 1], clip)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            s, z = scales[:, col // group, None], zeros[:, col // group, None]
            qc = quant(w1[:, i:i + 1].float(), s, z, bits, 1, symmetric)
            q[:, col] = qc[:, 0].double()
            e = (w1[:, i] - dequant(qc, s, z, 1)[:, 0].double()) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q.float(), scales, zeros


def output_error(w, q, s, z, act_scale, h, group) -> float:
    """tr(ΔW·H·ΔWᵀ) with ΔW = dequant(q)/act_scale − W."""
    d = (dequant(q, s, z, group) / act_scale - w).double()
    return float(((d @ h) * d).sum())


def quantize_shared_input(ws, h, absmean, bits, group, symmetric, clip=True, method="gptq", alphas=ALPHAS):
    """Quantise the weights ws (each [N_i, K]) of linears reading one input; returns (act_scale [K], [(q, s, z)]).

    α is searched with round-to-nearest (cheap); the chosen scaling is then quantised with `method`.
    """
    mag = absmean.float().clamp(min=1e-5)
    best = None
    for a in alphas:
        act = mag.pow(a)
        act = act / (act.max() * act.min()).sqrt()
        hs = h / act.double()[:, None] / act.double()[None, :]
        err = 0.0
        for w in ws:
            q, s, z = rtn(w * act, hs, bits, group, symmetric, clip)
            err += output_error(w, q, s, z, act, h, group)
        if best is None or err < best[0]:
            best = (err, act, hs)
    _, act, hs = best
    fn = gptq if method == "gptq" else rtn
    return act, [fn(w * act, hs, bits, group, symmetric, clip) for w in ws]

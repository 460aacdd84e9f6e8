"""Fused elementwise kernels for streaming merges.

Task arithmetic and TIES spend most of their time turning bf16 experts into fp32 deltas and
accumulating them; done as separate torch ops that is three or four passes over memory and a
temporary per step. These ops do it in one pass with the same fp32 roundings, so a merge that
uses them is bit-identical to one that doesn't (and to mergekit 0.1.5).

    merge_delta(e, b)              = fp32(e) − fp32(b)
    merge_axpy_delta_(acc, e, b, w): acc ← acc + (fp32(e) − fp32(b)) · fp32(w)
                                     (three fp32 roundings: subtract, multiply, add; no FMA)
    merge_scaled_delta(e, b, w)    = 0 + (fp32(e) − fp32(b)) · fp32(w)   (a fresh accumulator)
    merge_finish(b, m, div, lam)   = fp32(b) + ((m / div) · lam), the division and product only when given,
                                     optionally cast to out_dtype (round to nearest even, as Tensor.to)
    all_finite(t)                  = no element of t is NaN or ±Inf (floating t; True otherwise),
                                     read once at memory speed (exponent bits all ones means non-finite)

TIES sign election (Yadav et al., arXiv 2306.01708, in mergekit 0.1.5's "sum" consensus form), per
expert with trimmed task vector τ, weight w and divisor weight d (w, or 1 for the paper's count):
    ties_accumulate_: (with `keep`: τ ← τ·[keep], the TIES trim); wt = τ·w, v = wt (weighted vote) or τ; vote += v (or sign v);
                      pos_sum += [v>0]·wt; neg_sum += [v<0]·wt; pos_div += [v>0]·d; neg_div += [v<0]·d
                      (`first`: the buffers are uninitialised and get 0 + term)
    ties_resolve:     up = vote ≥ 0; m = up ? pos_sum : neg_sum; with normalize m /= (up ? pos_div : neg_div),
                      a zero divisor counting as 1
"""

from __future__ import annotations

import torch

from ._loader import define_op

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check(expert: torch.Tensor, base: torch.Tensor, op: str) -> None:
    if expert.dtype not in _FLOATS or base.dtype not in _FLOATS:
        raise ValueError(f"{op}: expert ({expert.dtype}) and base ({base.dtype}) must be float32, bfloat16 or float16")
    if expert.shape != base.shape:
        raise ValueError(f"{op}: expert shape {list(expert.shape)} must equal base shape {list(base.shape)}")


def merge_delta_reference(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    _check(expert, base, "merge_delta")
    return expert.float() - base.float()


def merge_axpy_delta_reference(acc: torch.Tensor, expert: torch.Tensor, base: torch.Tensor, weight: float) -> None:
    _check(expert, base, "merge_axpy_delta_")
    if acc.dtype != torch.float32 or acc.shape != expert.shape:
        raise ValueError(f"merge_axpy_delta_: acc must be float32 of shape {list(expert.shape)}, "
                         f"got {acc.dtype} {list(acc.shape)}")
    acc.add_((expert.float() - base.float()) * torch.tensor(weight, dtype=torch.float32))


def merge_scaled_delta_reference(expert: torch.Tensor, base: torch.Tensor, weight: float) -> torch.Tensor:
    _check(expert, base, "merge_scaled_delta")
    return torch.zeros(expert.shape) + (expert.float() - base.float()) * torch.tensor(weight, dtype=torch.float32)


def merge_finish_reference(base: torch.Tensor, mixed: torch.Tensor, divisor: float | None, lam: float | None,
                           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if base.dtype not in _FLOATS or mixed.dtype != torch.float32 or base.shape != mixed.shape:
        raise ValueError("merge_finish: base (float32/bfloat16/float16) and mixed (float32) must have one shape")
    m = mixed.clone()
    if divisor is not None:
        m /= torch.tensor(divisor, dtype=torch.float32)
    if lam is not None:
        m *= torch.tensor(lam, dtype=torch.float32)
    out = base.float() + m
    return out if out_dtype is None else out.to(out_dtype)


def all_finite_reference(t: torch.Tensor) -> bool:
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return bool(torch.isfinite(t).all())


def ties_accumulate_reference(vote, pos_sum, neg_sum, pos_div, neg_div, tau, weight: float, div_weight: float,
                              weighted_vote: bool, count_vote: bool, first: bool, keep=None) -> None:
    if keep is not None:
        tau = tau * keep.to(tau.dtype)
    wt = tau * torch.tensor(weight, dtype=torch.float32)
    v = wt if weighted_vote else tau
    pos, neg = v > 0, v < 0
    terms = (torch.sign(v) if count_vote else v, torch.where(pos, wt, 0.0), torch.where(neg, wt, 0.0),
             torch.where(pos, torch.tensor(div_weight, dtype=torch.float32), 0.0),
             torch.where(neg, torch.tensor(div_weight, dtype=torch.float32), 0.0))
    for buf, term in zip((vote, pos_sum, neg_sum, pos_div, neg_div), terms):
        if first:
            buf.zero_()
        buf.add_(term)


def ties_resolve_reference(vote, pos_sum, neg_sum, pos_div, neg_div, normalize: bool) -> torch.Tensor:
    up = vote >= 0
    mixed = torch.where(up, pos_sum, neg_sum)
    if normalize:
        divisor = torch.where(up, pos_div, neg_div)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return mixed


def _ties_acc_fake(*args) -> None:
    return None


def _ties_resolve_fake(vote, *args) -> torch.Tensor:
    return torch.empty_like(vote)


def _finish_fake(base, mixed, divisor, lam, out_dtype=None) -> torch.Tensor:
    return torch.empty_like(base, dtype=out_dtype or torch.float32)


def _scaled_fake(expert, base, weight) -> torch.Tensor:
    return expert.new_empty(expert.shape, dtype=torch.float32)


def _delta_fake(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    return expert.new_empty(expert.shape, dtype=torch.float32)


def _axpy_fake(acc, expert, base, weight) -> None:
    return None


define_op("merge_delta", "(Tensor expert, Tensor base) -> Tensor",
          reference=merge_delta_reference, fake=_delta_fake)
define_op("merge_scaled_delta", "(Tensor expert, Tensor base, float weight) -> Tensor",
          reference=merge_scaled_delta_reference, fake=_scaled_fake)
define_op("merge_finish", "(Tensor base, Tensor mixed, float? divisor, float? lam, ScalarType? out_dtype=None) -> Tensor",
          reference=merge_finish_reference, fake=_finish_fake)
define_op("ties_accumulate_",
          "(Tensor(a!) vote, Tensor(b!) pos_sum, Tensor(c!) neg_sum, Tensor(d!) pos_div, Tensor(e!) neg_div, "
          "Tensor tau, float weight, float div_weight, bool weighted_vote, bool count_vote, bool first, "
          "Tensor? keep=None) -> ()",
          reference=ties_accumulate_reference, fake=_ties_acc_fake)
define_op("ties_resolve", "(Tensor vote, Tensor pos_sum, Tensor neg_sum, Tensor pos_div, Tensor neg_div, bool normalize) -> Tensor",
          reference=ties_resolve_reference, fake=_ties_resolve_fake)
define_op("all_finite", "(Tensor t) -> bool", reference=all_finite_reference, fake=lambda t: True)
define_op("merge_axpy_delta_", "(Tensor(a!) acc, Tensor expert, Tensor base, float weight) -> ()",
          reference=merge_axpy_delta_reference, fake=_axpy_fake)


def merge_delta(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    _check(expert, base, "merge_delta")
    return torch.ops.torchmerge.merge_delta(expert, base)


def merge_axpy_delta_(acc: torch.Tensor, expert: torch.Tensor, base: torch.Tensor, weight: float) -> torch.Tensor:
    _check(expert, base, "merge_axpy_delta_")
    if acc.dtype != torch.float32 or acc.shape != expert.shape or not acc.is_contiguous():
        raise ValueError(f"merge_axpy_delta_: acc must be a contiguous float32 tensor of shape {list(expert.shape)}")
    torch.ops.torchmerge.merge_axpy_delta_(acc, expert, base, float(weight))
    return acc


def merge_scaled_delta(expert: torch.Tensor, base: torch.Tensor, weight: float) -> torch.Tensor:
    _check(expert, base, "merge_scaled_delta")
    return torch.ops.torchmerge.merge_scaled_delta(expert, base, float(weight))


def merge_finish(base: torch.Tensor, mixed: torch.Tensor, divisor: float | None, lam: float | None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if base.dtype not in _FLOATS or mixed.dtype != torch.float32 or base.shape != mixed.shape:
        raise ValueError(f"merge_finish: base must be float32, bfloat16 or float16 and mixed float32, of one shape; "
                         f"got {base.dtype}{list(base.shape)} and {mixed.dtype}{list(mixed.shape)}")
    if out_dtype not in (None, *_FLOATS):
        raise ValueError(f"merge_finish: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    return torch.ops.torchmerge.merge_finish(base, mixed, divisor, lam, out_dtype)


def ties_accumulate_(vote, pos_sum, neg_sum, pos_div, neg_div, tau, weight: float, div_weight: float,
                     weighted_vote: bool, count_vote: bool, first: bool, keep: torch.Tensor | None = None) -> None:
    torch.ops.torchmerge.ties_accumulate_(vote, pos_sum, neg_sum, pos_div, neg_div, tau.contiguous(), float(weight),
                                          float(div_weight), weighted_vote, count_vote, first,
                                          None if keep is None else keep.contiguous())


def ties_resolve(vote, pos_sum, neg_sum, pos_div, neg_div, normalize: bool) -> torch.Tensor:
    return torch.ops.torchmerge.ties_resolve(vote, pos_sum, neg_sum, pos_div, neg_div, normalize)


def all_finite(t: torch.Tensor) -> bool:
    """True when `t` has no NaN/Inf (always for integer/bool tensors): one read, no temporaries."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    return torch.ops.torchmerge.all_finite(t)

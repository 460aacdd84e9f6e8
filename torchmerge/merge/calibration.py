"""Statistics from calibration data for Fisher merging and RegMean.

* `compute_fisher`: diagonal empirical Fisher (Matena & Raffel, https://arxiv.org/abs/2111.09832),
      F[p] = (1/B) Σ_b (∂L_b/∂p)²
  over the B batches given, L_b = loss_fn(model, batch). One gradient per batch: pass batches of
  one example for the per-example empirical Fisher of the paper; larger batches give the Fisher of
  batch-mean gradients (cheaper, smaller by about the batch size for independent examples).
* `compute_gram`: for every nn.Linear, G = Σ_rows xᵀx over all its inputs x reshaped to (-1, in)
  (RegMean, Jin et al., https://arxiv.org/abs/2212.09849), keyed by the linear's weight name. The sum
  (not the mean) is returned, so models calibrated on more tokens weigh more in RegMean.

Both key tensors by `model.named_parameters()` names, which are the checkpoint names the merge engine
sees, and run the model in eval mode (dropout off), restoring its mode afterwards. `save_statistics`
writes them to safetensors for the per-model parameters `fisher:` / `gram:` of a merge config.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from .base import MergeError


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def compute_fisher(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher F[p] = mean over batches of (∂ loss_fn(model, batch) / ∂p)², float32.

    Only parameters with requires_grad are included; a parameter that never receives a gradient gets
    zeros. Existing .grad values are left untouched (gradients are taken with torch.autograd.grad).
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise MergeError("compute_fisher: the model has no parameters with requires_grad; valid: a trainable model")
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in named}
    count = 0
    with _eval_mode(model):
        for batch in batches:
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise MergeError(f"compute_fisher: loss_fn returned {type(loss).__name__}; valid: a scalar tensor")
            grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
            for (n, _), g in zip(named, grads):
                if g is not None:
                    sums[n] += g.detach().float() ** 2
            count += 1
    if count == 0:
        raise MergeError("compute_fisher: no batches given; valid: at least one batch")
    return {n: s / count for n, s in sums.items()}


def compute_gram(model: nn.Module, batches: Iterable[Any]) -> dict[str, torch.Tensor]:
    """G[name.weight] = Σ xᵀx over the inputs x (rows of shape (in,)) of every nn.Linear, float32.

    Accumulated in float64. A Linear never called gets no entry. Modules shared under two names
    are hooked once (under their first name, as named_modules reports them).
    """
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(key: str, n_in: int):
        def hook(_module, args, _kwargs=None):
            x = args[0].detach().reshape(-1, n_in).to(torch.float64)
            g = x.T @ x
            sums[key] = g if key not in sums else sums[key] + g

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            key = f"{name}.weight" if name else "weight"
            handles.append(module.register_forward_pre_hook(hook_for(key, module.in_features)))
    if not handles:
        raise MergeError("compute_gram: the model has no nn.Linear modules; valid: a model with linear layers")
    count = 0
    try:
        with _eval_mode(model), torch.no_grad():
            for batch in batches:
                _call(model, batch)
                count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise MergeError("compute_gram: no batches given; valid: at least one batch")
    return {k: v.to(torch.float32) for k, v in sums.items()}


def save_statistics(tensors: Mapping[str, torch.Tensor], path: str | Path, kind: str) -> Path:
    """Write `tensors` (from compute_fisher / compute_gram) to a safetensors file; `kind` is recorded in
    the metadata ("fisher" or "gram")."""
    from safetensors.torch import save_file

    if kind not in ("fisher", "gram"):
        raise MergeError(f"save_statistics: kind={kind!r}; valid: 'fisher', 'gram'")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise MergeError(f"save_statistics: {str(path)!r} does not end in .safetensors; valid: a .safetensors path")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    save_file(data, str(path), metadata={"torchmerge_statistics": kind})
    return path


def save_fisher(fisher: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    return save_statistics(fisher, path, "fisher")


def save_gram(gram: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    return save_statistics(gram, path, "gram")

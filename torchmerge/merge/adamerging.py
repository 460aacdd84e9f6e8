"""AdaMerging: merging coefficients learned by entropy minimisation on unlabelled test data.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
arXiv 2310.02575 (https://arxiv.org/abs/2310.02575).

With base weights θ_0, task vectors τ_t = θ_t − θ_0 (t = 1..T) and coefficients λ, the merged
body is f(x; θ(λ)), where (see `FunctionalMerge`)

    task-wise:   θ(λ)      = θ_0 + Σ_t λ_t · τ_t                       λ ∈ R^T
    layer-wise:  θ(λ)[l]   = θ_0[l] + Σ_t λ_t^l · τ_t[l]               λ ∈ R^{T×L}, l = parameter tensor
    block-wise:  θ(λ)[l]   = θ_0[l] + Σ_t λ_t^{b(l)} · τ_t[l]          λ ∈ R^{T×B}, b(l) = block of l
                 (aTLAS-style, Zhang et al., NeurIPS 2024, arXiv 2407.02880)

Task t has its own classification head h_t (not merged). AdaMerging minimises the summed
Shannon entropy of the predictions on one unlabelled batch B_t per task and step,

    L(λ) = Σ_t (1/|B_t|) Σ_{x ∈ B_t} H(softmax(h_t(f(x; θ(λ))))),   H(p) = −Σ_c p_c log p_c,

with Adam (paper: lr 1e-3, betas (0.9, 0.999), 500 steps, λ initialised to 0.3) and, after each
step, the projection λ ← clamp(λ, 0, 1) onto the box [0, 1] (the bounds are options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import MergeError
from .functional import GRANULARITIES, FunctionalMerge, Groups, task_vectors

__all__ = ["AdaMergingOptions", "adamerge", "prediction_entropy", "REFERENCE_URL"]

REFERENCE_URL = "https://arxiv.org/abs/2310.02575"

Batch = Any  # a Tensor (one positional input), a tuple/list of positional inputs, or a dict of keyword inputs


@dataclass(frozen=True)
class AdaMergingOptions:
    """What AdaMerging learns and how; defaults follow the paper (Sec. 4 / App. of arXiv 2310.02575).

    coefficients: "task" (one λ per task), "layer" (one λ per task per parameter tensor) or
        "block" (one λ per task per block from `groups`, aTLAS-style).
    groups: for "block": a function tensor name → block name, or a list of name prefixes.
    steps: Adam steps; each step uses one unlabelled batch of every task.
    lr, betas: Adam hyper-parameters.
    init: initial value of every λ.
    bounds: λ is clamped into [low, high] after every step.
    callback: called as callback(step, loss) after every step (e.g. to log the entropy).
    """

    coefficients: str = "layer"
    groups: Groups = None
    steps: int = 500
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    init: float = 0.3
    bounds: tuple[float, float] = (0.0, 1.0)
    callback: Callable[[int, float], None] | None = None

    def __post_init__(self):
        if self.coefficients not in GRANULARITIES:
            raise MergeError(
                f"AdaMergingOptions.coefficients: got {self.coefficients!r}; valid: one of {', '.join(map(repr, GRANULARITIES))}"
            )
        if self.coefficients == "block" and self.groups is None:
            raise MergeError("AdaMergingOptions.groups: coefficients='block' needs a function name → block or a list of prefixes")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise MergeError(f"AdaMergingOptions.steps: got {self.steps!r}; valid: an integer >= 0")
        if not self.lr > 0:
            raise MergeError(f"AdaMergingOptions.lr: got {self.lr!r}; valid: a number > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise MergeError(f"AdaMergingOptions.betas: got {self.betas!r}; valid: two numbers in [0, 1)")
        low, high = self.bounds
        if not low <= high:
            raise MergeError(f"AdaMergingOptions.bounds: got {self.bounds!r}; valid: (low, high) with low <= high")
        if not low <= self.init <= high:
            raise MergeError(f"AdaMergingOptions.init: got {self.init!r}; valid: a number in [{low}, {high}]")


def prediction_entropy(logits: Tensor) -> Tensor:
    """Mean over the batch of H(softmax(z)) = −Σ_c p_c log p_c, classes on the last dimension."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def _cycle(source: Tensor | Iterable[Batch], task: int) -> Iterator[Batch]:
    """Batches of one task forever; a Tensor is one (full) batch, other iterables are re-iterated."""
    if isinstance(source, (Tensor, Mapping)):
        while True:
            yield source
    try:
        iter(source)
    except TypeError:
        raise MergeError(
            f"unlabeled_batches_per_task[{task}]: got {type(source).__name__}; valid: a Tensor (one batch) or an iterable of batches"
        ) from None
    while True:
        empty = True
        for batch in source:
            empty = False
            yield batch
        if empty:
            raise MergeError(f"unlabeled_batches_per_task[{task}]: yielded no batch; valid: at least one batch")


def _call(model: Callable, batch: Batch):
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise MergeError(f"batch: got {type(batch).__name__}; valid: a Tensor, a tuple/list of inputs or a dict of keyword inputs")


def _resolve_vectors(base: nn.Module, experts_or_task_vectors: Sequence[nn.Module | Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    out = []
    for t, item in enumerate(experts_or_task_vectors):
        if isinstance(item, nn.Module):
            out.extend(task_vectors(base, [item]))
        elif isinstance(item, Mapping):
            out.append(dict(item))
        else:
            raise MergeError(
                f"experts_or_task_vectors[{t}]: got {type(item).__name__}; valid: an expert nn.Module or a task vector dict name → tensor"
            )
    return out


def adamerge(
    base: nn.Module,
    experts_or_task_vectors: Sequence[nn.Module | Mapping[str, Tensor]],
    unlabeled_batches_per_task: Sequence[Tensor | Iterable[Batch]],
    *,
    heads: Sequence[Callable[[Any], Tensor] | None] | None = None,
    options: AdaMergingOptions | None = None,
) -> FunctionalMerge:
    """Learn merging coefficients by AdaMerging (arXiv 2310.02575) and return the merged module.

    Args:
        base: the pretrained body θ_0 (its architecture is reused; it is copied, never modified).
        experts_or_task_vectors: per task, a fine-tuned expert module (τ_t = θ_t − θ_0) or a task
            vector dict name → τ_t already computed.
        unlabeled_batches_per_task: per task, a Tensor (one full batch) or an iterable of batches
            (Tensor, tuple of positional inputs, or dict of keyword inputs), cycled as needed.
            Labels are never read.
        heads: per task, a callable mapping the body's output to logits (task-specific head, not
            merged), or None when the body's output are the logits; None for all tasks by default.
        options: `AdaMergingOptions`; the paper's defaults when None.

    Returns the `FunctionalMerge` (in eval mode) with the learned λ (shape (T, G), within `options.bounds`).
    Heads and base receive no gradients: only λ is differentiated (via `torch.autograd.grad`).
    """
    options = options or AdaMergingOptions()
    vectors = _resolve_vectors(base, experts_or_task_vectors)
    num_tasks = len(vectors)
    if num_tasks == 0:
        raise MergeError("experts_or_task_vectors: empty; valid: at least one expert or task vector")
    if len(unlabeled_batches_per_task) != num_tasks:
        raise MergeError(
            f"unlabeled_batches_per_task: {len(unlabeled_batches_per_task)} entries; valid: one per task ({num_tasks})"
        )
    heads = [None] * num_tasks if heads is None else list(heads)
    if len(heads) != num_tasks:
        raise MergeError(f"heads: {len(heads)} entries; valid: one per task ({num_tasks}) or None")
    for t, head in enumerate(heads):
        if head is not None and not callable(head):
            raise MergeError(f"heads[{t}]: got {type(head).__name__}; valid: a callable body output → logits, or None")

    merged = FunctionalMerge(base, vectors, options.coefficients, groups=options.groups, init=options.init)
    merged.eval()  # dropout off, BatchNorm on running statistics: the objective is deterministic
    streams = [_cycle(source, t) for t, source in enumerate(unlabeled_batches_per_task)]
    lam = merged.coefficients
    optimizer = torch.optim.Adam([lam], lr=options.lr, betas=options.betas)
    low, high = options.bounds
    for step in range(options.steps):
        # The body is merged once per step and shared by every task's batch.
        weights = merged.merged_params()
        loss = lam.new_zeros(())
        for t in range(num_tasks):
            features = _call(lambda *a, **k: torch.func.functional_call(merged.base, weights, a, k), next(streams[t]))
            logits = features if heads[t] is None else heads[t](features)
            loss = loss + prediction_entropy(logits)
        (grad,) = torch.autograd.grad(loss, [lam])
        lam.grad = grad
        optimizer.step()
        with torch.no_grad():
            lam.clamp_(low, high)
        if options.callback is not None:
            options.callback(step, float(loss.detach()))
    lam.grad = None
    return merged


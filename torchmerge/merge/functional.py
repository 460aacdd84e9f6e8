"""A merged model whose merging coefficients are live parameters: θ = θ_base + Σ_t λ_t ⊙ τ_t.

`FunctionalMerge` keeps the base weights, the task vectors τ_t = θ_t − θ_base and the
coefficients λ as tensors of one module, and computes the merged weights inside `forward`
before calling the base architecture with `torch.func.functional_call`. This makes the
coefficients differentiable (AdaMerging learns them, see `adamerging.py`) and keeps the merge
visible to `torch.export`, where `torchmerge.passes.fold_merged_weights` collapses the weight
subgraph into one constant per weight.

For a merged tensor p in coefficient group g(p) the merged value is, with T tasks,

    θ[p] = (((θ_base[p] + λ[0, g(p)]·τ_0[p]) + λ[1, g(p)]·τ_1[p]) + … + λ[T−1, g(p)]·τ_{T−1}[p])

evaluated left to right in the tensor's dtype (a task whose τ lacks p contributes no term).
Floating buffers (BatchNorm running statistics) may be merged too; they use λ detached.
`merged_state_dict()` runs exactly these ATen ops in this order, so a graph pass that evaluates
the folded subgraph reproduces it bit for bit. Granularities (the shape of λ is (T, G)):

- "task":  G = 1, one λ per task (task arithmetic, Ilharco et al., ICLR 2023, arXiv 2212.04089;
  task-wise AdaMerging, Yang et al., ICLR 2024, arXiv 2310.02575).
- "layer": G = number of merged tensors, one λ per task per parameter tensor (layer-wise
  AdaMerging; the authors' code gives every parameter tensor its own coefficient).
- "block": G = number of named blocks, one λ per task per block of tensors (aTLAS-style
  anisotropic scaling, Zhang et al., NeurIPS 2024, arXiv 2407.02880); blocks come from a
  function name → block name, or from a list of name prefixes (longest match wins; "" is a
  catch-all).
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .base import MergeError

__all__ = ["FunctionalMerge", "task_vectors", "GRANULARITIES"]

GRANULARITIES = ("task", "layer", "block")
Groups = Union[Callable[[str], str], Sequence[str], None]


def _floating_state(source: nn.Module | Mapping[str, Tensor], what: str) -> dict[str, Tensor]:
    """Floating-point tensors of a module (parameters and buffers) or of a state dict."""
    if isinstance(source, nn.Module):
        items = list(source.named_parameters()) + list(source.named_buffers())
    elif isinstance(source, Mapping):
        items = list(source.items())
    else:
        raise MergeError(f"{what}: expected an nn.Module or a state dict (name → tensor), got {type(source).__name__}")
    return {k: v.detach() for k, v in items if isinstance(v, Tensor) and v.is_floating_point()}


def task_vectors(
    base_state: nn.Module | Mapping[str, Tensor],
    expert_states: Sequence[nn.Module | Mapping[str, Tensor]],
) -> list[dict[str, Tensor]]:
    """τ_t[p] = θ_t[p] − θ_base[p] for every floating-point tensor p of the base that expert t has.

    Modules contribute their parameters and floating buffers; state dicts their floating tensors.
    Integer buffers (e.g. `num_batches_tracked`) are never merged.
    """
    base = _floating_state(base_state, "base_state")
    out = []
    for t, expert in enumerate(expert_states):
        state = _floating_state(expert, f"expert_states[{t}]")
        vector = {}
        for name, theta in state.items():
            if name not in base:
                continue
            if theta.shape != base[name].shape:
                raise MergeError(
                    f"expert_states[{t}]: tensor {name!r} has shape {tuple(theta.shape)}; "
                    f"valid: the base shape {tuple(base[name].shape)}"
                )
            vector[name] = theta.to(base[name].dtype) - base[name]
        if not vector:
            raise MergeError(f"expert_states[{t}]: shares no floating-point tensor name with base_state")
        out.append(vector)
    return out


def _group_keys(names: Sequence[str], granularity: str, groups: Groups) -> list[str]:
    """The coefficient group of each merged tensor name, as a name."""
    if granularity == "task":
        return ["all"] * len(names)
    if granularity == "layer":
        return list(names)
    if groups is None:
        raise MergeError("groups: coefficients='block' needs groups=a function name → block or a list of name prefixes")
    if callable(groups):
        keys = [groups(n) for n in names]
        for n, k in zip(names, keys):
            if not isinstance(k, str):
                raise MergeError(f"groups: the grouping function returned {k!r} for {n!r}; valid: a block name (str)")
        return keys
    prefixes = sorted({str(p) for p in groups}, key=len, reverse=True)
    keys = []
    for n in names:
        hit = next((p for p in prefixes if n.startswith(p)), None)
        if hit is None:
            raise MergeError(
                f"groups: tensor {n!r} matches none of the prefixes {sorted(prefixes)}; "
                f"valid: add a prefix covering it (\"\" is a catch-all)"
            )
        keys.append(hit)
    return keys


class _Tensors(nn.Module):
    """One task's vectors as buffers p0, p1, … (buffer names cannot contain dots)."""

    def __init__(self, tensors: Sequence[Tensor | None]):
        super().__init__()
        self.present = tuple(t is not None for t in tensors)
        for i, tensor in enumerate(tensors):
            if tensor is not None:
                self.register_buffer(f"p{i}", tensor)

    def get(self, i: int) -> Tensor | None:
        return getattr(self, f"p{i}") if self.present[i] else None


class FunctionalMerge(nn.Module):
    """nn.Module computing θ = θ_base + Σ_t λ_t ⊙ τ_t in forward, then `base_module(*args)` with θ.

    Args:
        base_module: the pretrained architecture and weights θ_base. It is deep-copied and frozen,
            so training λ never touches the caller's module.
        task_vectors: one dict per task, name → τ_t (see `task_vectors()`); names must be floating
            parameters or buffers of `base_module`; τ is cast to the base tensor's dtype and device.
        coefficients: "task" (λ has shape (T, 1)), "layer" ((T, number of merged tensors)) or
            "block" ((T, number of blocks), blocks given by `groups`).
        groups: for "block" only: a function tensor name → block name, or a list of name prefixes.
        init: initial λ, a number for every entry or a tensor of shape (T, G).

    Attributes: `coefficients` (nn.Parameter of shape (T, G)), `param_names` (merged tensor names in
    base order), `group_names` (G names: "all", tensor names, or block names), `granularity`.
    """

    def __init__(
        self,
        base_module: nn.Module,
        task_vectors: Sequence[Mapping[str, Tensor]],
        coefficients: str = "task",
        *,
        groups: Groups = None,
        init: float | Tensor = 0.3,
    ):
        super().__init__()
        if not isinstance(base_module, nn.Module):
            raise MergeError(f"base_module: expected an nn.Module, got {type(base_module).__name__}")
        if coefficients not in GRANULARITIES:
            raise MergeError(f"coefficients: got {coefficients!r}; valid: one of {', '.join(map(repr, GRANULARITIES))}")
        if isinstance(task_vectors, Mapping) or len(task_vectors) == 0:
            raise MergeError("task_vectors: expected a non-empty list of dicts name → tensor, one per task")
        if groups is not None and coefficients != "block":
            raise MergeError(f"groups: only used with coefficients='block', got coefficients={coefficients!r}")
        self.base = copy.deepcopy(base_module).requires_grad_(False)
        targets = _floating_state(self.base, "base_module")
        for t, vector in enumerate(task_vectors):
            for name, tau in vector.items():
                if name not in targets:
                    raise MergeError(
                        f"task_vectors[{t}]: {name!r} is not a floating parameter or buffer of base_module; "
                        f"valid: names from base_module.named_parameters() / named_buffers()"
                    )
                if tuple(tau.shape) != tuple(targets[name].shape):
                    raise MergeError(
                        f"task_vectors[{t}]: {name!r} has shape {tuple(tau.shape)}; valid: {tuple(targets[name].shape)}"
                    )
        wanted = set().union(*(v.keys() for v in task_vectors))
        self.param_names: tuple[str, ...] = tuple(n for n in targets if n in wanted)
        self.granularity = coefficients
        keys = _group_keys(self.param_names, coefficients, groups)
        self.group_names: tuple[str, ...] = tuple(dict.fromkeys(keys))
        index = {k: g for g, k in enumerate(self.group_names)}
        self.param_group: tuple[int, ...] = tuple(index[k] for k in keys)
        self.task_vectors = nn.ModuleList(
            _Tensors([self._cast(v.get(n), targets[n]) for n in self.param_names]) for v in task_vectors
        )
        shape = (len(task_vectors), len(self.group_names))
        if isinstance(init, Tensor):
            if tuple(init.shape) != shape:
                raise MergeError(f"init: tensor of shape {tuple(init.shape)}; valid: shape {shape} (tasks × groups) or a number")
            start = init.detach().to(torch.float32).clone()
        else:
            start = torch.full(shape, float(init), dtype=torch.float32)
        self.coefficients = nn.Parameter(start)

    @staticmethod
    def _cast(tau: Tensor | None, like: Tensor) -> Tensor | None:
        if tau is None:
            return None
        return tau.detach().to(dtype=like.dtype, device=like.device).clone()

    @property
    def num_tasks(self) -> int:
        return self.coefficients.shape[0]

    @property
    def num_groups(self) -> int:
        return self.coefficients.shape[1]

    def merged_params(self) -> dict[str, Tensor]:
        """name → θ_base + Σ_t λ[t, g]·τ_t, left to right; differentiable in λ. Forward uses this."""
        params = dict(self.base.named_parameters())
        buffers = dict(self.base.named_buffers())
        # Buffers (BatchNorm running statistics) follow λ but carry no gradient: ops reject grads on them.
        lam_for = {True: self.coefficients, False: self.coefficients.detach()}
        merged = {}
        for i, name in enumerate(self.param_names):
            g = self.param_group[i]
            value = params[name] if name in params else buffers[name]
            lam = lam_for[name in params]
            for t, vectors in enumerate(self.task_vectors):
                tau = vectors.get(i)
                if tau is not None:
                    scale = lam[t, g] if tau.dtype == lam.dtype else lam[t, g].to(tau.dtype)
                    value = value + scale * tau
            merged[name] = value
        return merged

    def forward(self, *args, **kwargs):
        return functional_call(self.base, self.merged_params(), args, kwargs)

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, Tensor]:
        """The base state dict with every merged tensor replaced by its eager merge under the current λ.

        Same ATen ops in the same order as `forward`, so the values equal the folded graph's constants.
        """
        state = {k: v.detach().clone() for k, v in self.base.state_dict().items()}
        for name, value in self.merged_params().items():
            state[name] = value.detach().clone()
        return state

    def merged_module(self) -> nn.Module:
        """A plain copy of the base architecture holding the merged weights (no λ, no τ)."""
        module = copy.deepcopy(self.base)
        module.load_state_dict(self.merged_state_dict())
        return module

    def coefficient_table(self) -> dict[str, Tensor]:
        """Group name → λ of that group for every task (a detached tensor of shape (T,))."""
        lam = self.coefficients.detach()
        return {name: lam[:, g].clone() for g, name in enumerate(self.group_names)}

    @torch.no_grad()
    def clamp_coefficients_(self, low: float = 0.0, high: float = 1.0) -> "FunctionalMerge":
        """Project λ onto [low, high] in place."""
        if not low <= high:
            raise MergeError(f"clamp_coefficients_: low={low} > high={high}; valid: low <= high")
        self.coefficients.clamp_(low, high)
        return self

    def extra_repr(self) -> str:
        return (
            f"tasks={self.num_tasks}, granularity={self.granularity!r}, groups={self.num_groups}, "
            f"merged_tensors={len(self.param_names)}"
        )

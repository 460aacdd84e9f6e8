"""Helpers for method tests: build `TensorInputs` from plain tensors, call methods with defaults."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pytest
import torch

from torchmerge.merge.base import Experts, ExpertTensor, MergeMethod, TensorInputs


def make_inputs(
    tensors: Sequence[torch.Tensor],
    params: Sequence[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    *,
    base: torch.Tensor | None = None,
    base_params: Mapping[str, Any] | None = None,
    name: str = "model.layers.0.mlp.weight",
    seed: int = 0,
    layer_index: int | None = None,
    num_layers: int | None = None,
    indices: Sequence[int] | None = None,
    aux: Sequence[Mapping[str, torch.Tensor]] | None = None,
    loads: list[int] | None = None,
) -> TensorInputs:
    """Experts from ``tensors`` (float32 copies), in order.

    ``params``: one mapping per expert, or one mapping shared by all. ``indices``: config positions
    (default 0..n-1, or 0..n-1 skipping nothing with the base last). ``aux``: per-expert auxiliary
    tensors by key. ``loads``: if given, each expert load appends its position (to count passes).
    """
    tensors = [t.to(torch.float32) for t in tensors]
    n = len(tensors)
    if params is None:
        per = [{} for _ in range(n)]
    elif isinstance(params, Mapping):
        per = [dict(params) for _ in range(n)]
    else:
        per = [dict(p) for p in params]
    idx = list(indices) if indices is not None else list(range(n))
    auxes = list(aux) if aux is not None else [{} for _ in range(n)]

    def load(i: int) -> ExpertTensor:
        if loads is not None:
            loads.append(i)
        return ExpertTensor(
            model=f"expert{i}", index=idx[i], tensor=tensors[i].clone(), params=per[i],
            aux=lambda key, _a=auxes[i]: _a.get(key),
        )

    return TensorInputs(
        name=name,
        base=None if base is None else base.to(torch.float32).clone(),
        experts=Experts(n, load),
        seed=seed,
        base_params=dict(base_params or {}),
        layer_index=layer_index,
        num_layers=num_layers,
    )


def with_defaults(method: MergeMethod, **given: Any) -> dict[str, Any]:
    """Global params of ``method``: defaults filled, ``given`` validated as the engine would."""
    out = {}
    for spec in method.param_specs():
        if spec.scope != "global":
            continue
        value = given.pop(spec.name, spec.default)
        out[spec.name] = spec.validate(value, f"test {method.name}")
    if given:
        raise KeyError(f"unknown params for {method.name}: {sorted(given)}")
    return out


def run_method(method: MergeMethod, tensors, params=None, *, base=None, global_params=None, **kw) -> torch.Tensor:
    """Merge plain tensors with ``method``; model-scope params default from the method's specs."""
    specs = {s.name: s for s in method.param_specs() if s.scope == "model"}
    n = len(tensors)
    if params is None or isinstance(params, Mapping):
        per = [dict(params or {}) for _ in range(n)]
    else:
        per = [dict(p) for p in params]
    from torchmerge.merge.base import REQUIRED

    for p in per:
        for name, spec in specs.items():
            if name not in p and spec.default is not REQUIRED:
                p[name] = spec.default
    inputs = make_inputs(tensors, per, base=base, **kw)
    return method.merge(inputs, with_defaults(method, **(global_params or {})))


@pytest.fixture
def rng() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(1234)
    return g

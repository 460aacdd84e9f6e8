"""The one registry of merge methods. Registration is explicit here, never a side effect of an import."""

from __future__ import annotations

from .base import MergeError, MergeMethod

_METHODS: dict[str, MergeMethod] = {}
_BUILTINS_REGISTERED = False


def register(method: MergeMethod) -> MergeMethod:
    """Add a method (the built-ins are registered first, so a clashing name is caught here)."""
    _ensure_registered()
    if not method.name:
        raise ValueError(f"{method!r} has no name")
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def get(name: str) -> MergeMethod:
    _ensure_registered()
    try:
        return _METHODS[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}; valid: {', '.join(sorted(_METHODS))}") from None


def names() -> list[str]:
    _ensure_registered()
    return sorted(_METHODS)


def _ensure_registered() -> None:
    global _BUILTINS_REGISTERED
    if _BUILTINS_REGISTERED:
        return
    _BUILTINS_REGISTERED = True
    # --- generalized task arithmetic family and interpolation methods ---
    from . import interpolation, model_stock, task_arithmetic

    for method in (task_arithmetic.Linear(), *task_arithmetic.generalized_task_arithmetic_methods(),
                   *interpolation.interpolation_methods(), model_stock.ModelStock()):
        register(method)
    # --- mask / balancing / layer / calibration methods ---
    from .passthrough import Passthrough

    register(Passthrough())
    from . import fisher_regmean, layer_swap, masks, pcb

    for method in (*masks.make_methods(), pcb.PCBMerge(), layer_swap.LayerSwap(),
                   fisher_regmean.FisherMerge(), fisher_regmean.RegMeanMerge()):
        register(method)

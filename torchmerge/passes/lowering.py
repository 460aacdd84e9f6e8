"""The lowering registry: precision kind → the pass that lowers plan entries of that kind.

Registration is explicit here (not a side effect of importing a pass). `fp32` needs no lowering.
"""

from __future__ import annotations

from typing import Callable

from ..graph.pass_base import GraphPass
from ..precision.plan import PlanError, PrecisionPlan
from .lower_bf16 import LowerBF16
from .lower_int8 import LowerInt8
from .lower_lmul import LowerLMul
from .lower_lut import LowerLUT

LOWERINGS: dict[str, Callable[[PrecisionPlan], GraphPass]] = {
    "bf16": LowerBF16,
    "lmul": LowerLMul,
    "lut": LowerLUT,
    "int8": LowerInt8,  # reads activation ranges recorded by passes.calibrate.Calibrate
}


def lowering_passes(plan: PrecisionPlan | None) -> list[GraphPass]:
    """The lowering passes a plan needs, in a fixed order; one-line error for a kind with no lowering."""
    if plan is None:
        return []
    kinds = {p.kind for p in plan.entries.values()} - {"fp32"}
    missing = sorted(k for k in kinds if k not in LOWERINGS)
    if missing:
        raise PlanError(f"precision '{missing[0]}' has no lowering registered; available: "
                        f"{', '.join(['fp32', *LOWERINGS])}")
    return [LOWERINGS[k](plan) for k in LOWERINGS if k in kinds]

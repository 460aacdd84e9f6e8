"""torchmerge: merge fine-tuned experts, lower them to integer / L-Mul / LUT arithmetic, emit for deployment.

The public API is deliberately thin; each function forwards to the subpackage that owns the work.
"""

from __future__ import annotations

__version__ = "0.1.0"

# `torchmerge.merge` is both the subpackage and the merge function: the subpackage is callable
# (see torchmerge/merge/__init__.py), so `torchmerge.merge(spec)` and `torchmerge.merge.engine` both work.
from . import merge  # noqa: E402

__all__ = ["__version__", "merge", "compile"]


def compile(model, plan=None, merge=None, *, calibration=None, inner="inductor", dynamic=None, fullgraph=False,
            dump_dir=None):
    """torch.compile `model` with the torchmerge backend (fold merges/adapters/BN, lower per `plan`).

    `merge`: a MergeSpec, YAML path or dict; its merged state_dict is loaded into a copy of `model`
    first (the caller's model is left untouched). `calibration`: batches of the model's tensor inputs (a list
    of tuples, or a `torchmerge.passes.calibrate.CalibrationData`) for the int8 activation ranges (default:
    the first call's inputs) and LUT calibration. `inner`: "inductor" or "eager". See
    `torchmerge.backends.compile.torchmerge_backend`.
    """
    import copy

    import torch

    from .backends.compile import CompileOptions, torchmerge_backend
    from .passes.calibrate import CalibrationData

    if merge is not None:
        from .merge.engine import run_merge

        model = copy.deepcopy(model)
        model.load_state_dict(run_merge(merge, out=None), strict=True)
    if calibration is not None:  # compared by identity in torch.compile's options (tensors cannot be compared)
        calibration = CalibrationData(calibration)
    CompileOptions.from_any(plan=plan, inner=inner, dump_dir=dump_dir, calibration=calibration)  # validate here
    options = {"plan": plan, "inner": inner, "dump_dir": dump_dir, "calibration": calibration}
    return torch.compile(model, backend=torchmerge_backend, options=options, dynamic=dynamic, fullgraph=fullgraph)


"""torchmerge: merge fine-tuned experts, lower them to integer / L-Mul / LUT arithmetic, emit for deployment.

The public API is deliberately thin; each function forwards to the subpackage that owns the work.
"""

from __future__ import annotations

__version__ = "0.1.0"

# `torchmerge.merge` is both the subpackage and the merge function: the subpackage is callable
# (see torchmerge/merge/__init__.py), so `torchmerge.merge(spec)` and `torchmerge.merge.engine` both work.
from . import merge  # noqa: E402

__all__ = ["__version__", "merge", "compile"]


def compile(model, plan=None, merge=None, *, inner="inductor", dynamic=None, fullgraph=False, dump_dir=None):
    """torch.compile `model` with the torchmerge backend (fold merges/adapters/BN, lower per `plan`).

    `merge`: a MergeSpec, YAML path or dict; its merged state_dict is loaded into a copy of `model`
    first (the caller's model is left untouched). `inner`: "inductor" or "eager". See
    `torchmerge.backends.compile.torchmerge_backend`.
    """
    import copy

    import torch

    from .backends.compile import CompileOptions, torchmerge_backend

    if merge is not None:
        from .merge.engine import run_merge

        model = copy.deepcopy(model)
        model.load_state_dict(run_merge(merge, out=None), strict=True)
    CompileOptions(plan=plan, inner=inner, dump_dir=dump_dir)  # validate here, where the caller can see it
    options = {"plan": plan, "inner": inner, "dump_dir": dump_dir}
    return torch.compile(model, backend=torchmerge_backend, options=options, dynamic=dynamic, fullgraph=fullgraph)


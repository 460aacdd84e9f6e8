"""torchmerge: merge fine-tuned experts, lower them to integer / L-Mul / LUT arithmetic, emit for deployment.

The public API is deliberately thin; each function forwards to the subpackage that owns the work.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "merge"]


def merge(spec_or_path, out=None, **options):
    """Merge experts described by a MergeSpec, a mergekit-style YAML path or a dict.

    Returns the merged state_dict when `out` is None, else writes a sharded safetensors
    directory to `out` atomically and returns its path. See `torchmerge.merge.engine.run_merge`.
    """
    from .merge.engine import run_merge

    return run_merge(spec_or_path, out=out, **options)

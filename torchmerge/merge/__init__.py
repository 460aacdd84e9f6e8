"""Merging experts: MergeSpec, the MergeMethod registry, streaming I/O and the merge engine.

The package is callable: `torchmerge.merge(spec_or_path, out=None, **options)` runs a merge.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, spec_or_path, out=None, **options):
        """Merge experts described by a MergeSpec, a mergekit-style YAML path or a dict.

        Returns the merged state_dict when `out` is None, else writes a sharded safetensors
        directory to `out` atomically and returns its path. Options are `MergeOptions` fields
        (dtype, out_dtype, seed, shard_size, force, quiet, allow_pickle).
        """
        from .engine import run_merge

        return run_merge(spec_or_path, out=out, **options)


sys.modules[__name__].__class__ = _CallableModule

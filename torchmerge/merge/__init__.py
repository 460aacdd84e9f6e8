"""Merging experts: MergeSpec, the MergeMethod registry, streaming I/O and the merge engine."""

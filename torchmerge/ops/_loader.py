"""Registry of torchmerge native ops and the loader of their C++ kernels (torchmerge/_C.so).

Contract for an op family module (intlinear, intnonlinear, lmul, lut ...):

    from ._loader import define_op
    define_op("my_op", "(Tensor x, int k) -> Tensor", reference=my_op_reference, fake=_my_op_fake)

* The schema is defined here in Python, in namespace ``torchmerge``; ``fake`` is its register_fake
  (meta) implementation; ``reference`` is pure PyTorch and *defines* the op's semantics bit for bit.
* The C++ kernel in ``csrc/<family>.cpp`` registers with ``TORCH_LIBRARY_IMPL(torchmerge, CPU, m)``.
* ``torchmerge/ops/__init__.py`` imports the family modules, then calls :func:`load_kernels` once:
  it loads ``_C.so`` and registers the reference as the CPU kernel of every op that has no native
  kernel (library not built, or a family whose .cpp is not written yet). Without the library,
  exactly one warning is emitted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

NAMESPACE = "torchmerge"
LIBRARY_PATH = Path(__file__).resolve().parent.parent / "_C.so"


@dataclass(frozen=True)
class OpEntry:
    name: str
    schema: str
    reference: Callable
    fake: Callable


_OPS: dict[str, OpEntry] = {}
_STATE = {"loaded": None}  # None: load_kernels not run yet; True/False: whether _C.so was loaded


def define_op(name: str, schema: str, *, reference: Callable, fake: Callable) -> None:
    """Define ``torchmerge::<name><schema>`` with its fake impl and record its reference."""
    if name in _OPS:
        raise ValueError(f"op torchmerge::{name} is already defined; op names must be unique")
    torch.library.define(f"{NAMESPACE}::{name}", schema)
    torch.library.register_fake(f"{NAMESPACE}::{name}")(fake)
    _OPS[name] = OpEntry(name, schema, reference, fake)


def _has_cpu_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", "CPU")


def load_kernels() -> bool:
    """Load _C.so (once); give every op without a native CPU kernel its reference. Returns whether loaded."""
    if _STATE["loaded"] is not None:
        return _STATE["loaded"]
    loaded = LIBRARY_PATH.exists()
    if loaded:
        torch.ops.load_library(str(LIBRARY_PATH))
    else:
        warnings.warn(
            f"torchmerge: native kernels not built ({LIBRARY_PATH} missing); using the pure-PyTorch "
            "reference kernels (slower). Build them with: pip install --no-build-isolation -e .",
            RuntimeWarning,
            stacklevel=3,
        )
        torch.library.impl(f"{NAMESPACE}::_set_cpu_isa", "CompositeExplicitAutograd")(_set_cpu_isa_reference)
    for entry in _OPS.values():
        if not _has_cpu_kernel(entry.name):
            torch.library.impl(f"{NAMESPACE}::{entry.name}", "CPU")(entry.reference)
    _STATE["loaded"] = loaded
    return loaded


def native_available() -> bool:
    """Whether torchmerge/_C.so was found and loaded."""
    return bool(_STATE["loaded"])


def reference(name: str) -> Callable:
    """The pure-PyTorch reference implementation of ``torchmerge::<name>``."""
    if name not in _OPS:
        raise ValueError(f"unknown op {name!r}; defined ops: {sorted(_OPS)}")
    return _OPS[name].reference


def op_names() -> list[str]:
    return sorted(_OPS)


class References:
    """Attribute access to references: ``torchmerge.ops.reference.int8_linear(...)``."""

    def __getattr__(self, name: str) -> Callable:
        if name.startswith("__"):
            raise AttributeError(name)
        return reference(name)

    def __dir__(self) -> list[str]:
        return op_names()


# Control op: which kernel path the C++ dispatch uses (tests force "scalar"). Implemented in
# csrc/cpu_features.cpp; without the library only the reference exists, so only "auto"/"scalar" are valid.
torch.library.define(f"{NAMESPACE}::_set_cpu_isa", "(str isa) -> str")
_ISA_CHOICES = ("auto", "avx512vbmi", "avx512vnni", "avx512", "avx2", "scalar")
_REFERENCE_ISA = {"value": "auto"}


def _set_cpu_isa_reference(isa: str) -> str:
    if isa not in _ISA_CHOICES:
        raise ValueError(f"_set_cpu_isa: isa must be one of {_ISA_CHOICES}; got {isa!r}")
    if isa not in ("auto", "scalar"):
        raise ValueError(f"_set_cpu_isa: {isa!r} needs the native library (torchmerge/_C.so), which is not built")
    previous, _REFERENCE_ISA["value"] = _REFERENCE_ISA["value"], isa
    return previous


def set_cpu_isa(isa: str) -> str:
    """Force the CPU kernel path; returns the previous setting.

    Tiers, each including the ones below: "avx512vbmi" (AVX-512 with VNNI and VBMI: Ice Lake, Zen 4 and
    later), "avx512vnni" (Cascade Lake), "avx512" (F+BW+VL), "avx2" (with FMA), "scalar"; "auto" picks
    the best this CPU has. A tier above the CPU's raises ValueError."""
    return torch.ops.torchmerge._set_cpu_isa(isa)

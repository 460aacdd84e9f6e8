"""Shared fixtures for the native-op tests."""

from __future__ import annotations

import pytest

from torchmerge import ops


def _isas() -> list[str]:
    """The kernel paths this CPU can run ("auto" alone when the library is not built)."""
    if not ops.native_available():
        return ["auto"]
    out = []
    for isa in ("avx512vbmi", "avx512vnni", "avx512", "avx2", "scalar"):
        try:
            ops.set_cpu_isa(isa)
            out.append(isa)
        except (ValueError, RuntimeError):
            pass
        finally:
            ops.set_cpu_isa("auto")
    return out


@pytest.fixture(params=_isas())
def isa(request):
    """Run the test once per kernel path, forcing it with torchmerge.ops.set_cpu_isa."""
    previous = ops.set_cpu_isa(request.param)
    yield request.param
    ops.set_cpu_isa(previous)

"""C++ kernels with the portable paths forced (scalar, AVX2) are bit-exact against the references;
the ISA switch itself; and the reference fallback when _C.so is absent."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchmerge.ops as ops
from torchmerge.ops import intlinear, intnonlinear as nl, quant

pytestmark = pytest.mark.skipif(not ops.native_available(), reason="torchmerge/_C.so not built")


@pytest.fixture(params=["scalar", "avx2"])
def forced_isa(request):
    try:
        previous = ops.set_cpu_isa(request.param)
    except ValueError:
        pytest.skip(f"CPU lacks {request.param}")
    yield request.param
    ops.set_cpu_isa(previous)


def test_set_cpu_isa_contract():
    previous = ops.set_cpu_isa("scalar")
    try:
        assert ops.set_cpu_isa("scalar") == "scalar"
        with pytest.raises(ValueError, match="isa must be one of 'auto', 'avx512vbmi', 'avx512vnni', 'avx512', 'avx2', 'scalar'"):
            ops.set_cpu_isa("sse2")
    finally:
        assert ops.set_cpu_isa(previous) == "scalar"


@pytest.mark.parametrize("m, k, n", [(1, 8, 3), (7, 130, 9), (40, 256, 24)])
def test_int8_linear(forced_isa, m, k, n):
    g = torch.Generator().manual_seed(m + k + n)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    bias = torch.randint(-1000, 1000, (n,), dtype=torch.int32, generator=g)
    mult, shift = quant.dyadic_multiplier(torch.rand(n, dtype=torch.float64, generator=g) * 1e-3)
    for out_dtype in (torch.int8, torch.int16):
        got = intlinear.int8_linear(x, w, bias, mult, shift, out_dtype)
        assert torch.equal(got, intlinear.int8_linear_reference(x, w, bias, mult, shift, out_dtype))
    v = torch.randint(-(2**31), 2**31 - 1, (m, n), dtype=torch.int32, generator=g)
    assert torch.equal(intlinear.requantize(v, mult, shift), intlinear.requantize_reference(v, mult, shift, torch.int8))


def test_nonlinear(forced_isa):
    g = torch.Generator().manual_seed(7)
    x8 = torch.randint(-128, 128, (64, 50), dtype=torch.int8, generator=g)
    x16 = torch.randint(-20000, 20000, (32, 77), dtype=torch.int16, generator=g)
    mult, shift = quant.dyadic_multiplier(torch.randn(77, dtype=torch.float64, generator=g) * 1e-3)
    cases = [
        ("isqrt", (torch.randint(0, 2**62, (5000,), dtype=torch.int64, generator=g),)),
        ("i_exp", (x8, 0.05, "shift")), ("i_exp", (x16, 5e-4, "poly")),
        ("shiftmax", (x8, 0.05, 8, "shift")), ("shiftmax", (x16, 1e-3, 16, "poly")), ("shiftmax", (x16, 2e-6, 8, "shift")),
        ("shift_gelu", (x8, 0.05, 8, False)), ("shift_gelu", (x16, 1e-3, 12, True)), ("shift_gelu", (x16, 1e-3, 16, False)),
        ("i_gelu", (x16.int() * 50, 2e-4)), ("i_gelu", (x8, 0.05)),
        ("i_layernorm", (x16, mult, shift, torch.arange(77, dtype=torch.int32), torch.int8)),
        ("i_layernorm", (torch.zeros(3, 77, dtype=torch.int16), mult, shift, torch.arange(77, dtype=torch.int32), torch.int16)),
    ]
    for name, args in cases:
        got = getattr(torch.ops.torchmerge, name)(*args)
        assert torch.equal(got, getattr(nl, f"{name}_reference")(*args)), name


def test_reference_fallback_without_library(tmp_path):
    """Without _C.so every op runs its reference and import warns exactly once."""
    package = Path(ops.__file__).resolve().parents[1]
    shutil.copytree(package, tmp_path / "torchmerge", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    script = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import torchmerge.ops as ops\n"
        "assert len(w) == 1 and 'native kernels not built' in str(w[0].message), [str(x.message) for x in w]\n"
        "assert not ops.native_available()\n"
        "x = torch.randint(-128, 128, (3, 16), dtype=torch.int8)\n"
        "assert torch.equal(torch.ops.torchmerge.shiftmax(x, 0.1, 8, 'shift'), ops.reference.shiftmax(x, 0.1, 8, 'shift'))\n"
        "assert ops.set_cpu_isa('scalar') == 'auto'\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("d", [1, 7, 8, 9, 15, 17, 33, 130])
def test_vector_tails_and_extremes(isa, d):
    """Vectorised bodies (8/16 lanes) with row lengths off the lane count, int16/int8 extremes and saturation."""
    g = torch.Generator().manual_seed(d)
    x16 = torch.randint(-(2**15), 2**15, (5, d), dtype=torch.int16, generator=g)
    x16[0, :] = -(2**15)
    x16[1, ::2] = 2**15 - 1
    x8 = torch.randint(-128, 128, (5, d), dtype=torch.int8, generator=g)
    x8[2, :] = 127
    x32 = x16.int() * 65536 + 32767
    mult, shift = quant.dyadic_multiplier(torch.rand(d, dtype=torch.float64, generator=g) * 10)
    shift[0] = 0
    bias = torch.randint(-(2**31), 2**31 - 1, (d,), dtype=torch.int32, generator=g)
    cases = [("i_exp", (x16, 0.05, "shift")), ("i_exp", (x8, 0.5, "poly")), ("i_exp", (x32, 1e-3, "poly")),
             ("shiftmax", (x16, 1e-3, 8, "shift")), ("shiftmax", (x8, 2e-6, 16, "shift")),
             ("shiftmax", (x32, 1e-4, 12, "poly")), ("shiftmax", (x16, 0.3, 2, "shift")),
             ("shiftmax", (x16, 16 / 65535, 16, "shift")), ("shiftmax", (x8, 16 / 65536.5, 8, "shift")),
             ("shift_gelu", (x16, 2.0**-13, 16, False)), ("shift_gelu", (x8, 0.5, 2, False)),
             ("shift_gelu", (x16, 1e-3, 8, True)), ("shift_gelu", (x8, 0.05, 16, True)),
             ("i_gelu", (x32, 1e-5)), ("i_gelu", (x16, 0.05)), ("i_gelu", (x8, 3.0)),
             ("i_layernorm", (x16, mult, shift, bias, torch.int16)), ("i_layernorm", (x8, mult, shift, bias, torch.int8))]
    for name, args in cases:
        got = getattr(torch.ops.torchmerge, name)(*args)
        assert torch.equal(got, getattr(nl, f"{name}_reference")(*args)), (name, args[1:2])
    v = torch.randint(-(2**31), 2**31 - 1, (5, d), dtype=torch.int32, generator=g)
    v[0, 0], v[1, 0] = -(2**31), 2**31 - 1
    for out_dtype in (torch.int8, torch.int16):
        for m, s in ((mult, shift), (mult[:1], shift[:1])):
            assert torch.equal(intlinear.requantize(v, m, s, out_dtype), intlinear.requantize_reference(v, m, s, out_dtype))

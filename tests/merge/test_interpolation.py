"""slerp, nuslerp, multislerp, karcher: plain references and mergekit 0.1.5."""

import math

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from tests.merge.conftest import make_inputs, run_method
from torchmerge.merge import registry
from torchmerge.merge.base import MergeError


def _models(shape=(48, 32), n=3, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + scale * torch.randn(shape, generator=g) for _ in range(n)]


def test_slerp_reference_and_mergekit():
    base, (other, *_) = _models()
    t = 0.3
    got = run_method(registry.get("slerp"), [other], base=base, global_params={"t": t})
    a, b = base.flatten().double(), other.flatten().double()
    omega = math.acos(float(a @ b / (a.norm() * b.norm())))
    ref = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    torch.testing.assert_close(got, ref.float().reshape(base.shape), rtol=1e-5, atol=1e-5)
    for t, shape in [(0.3, base.shape), (1 / 3, base.shape), (0.7, (1100, 1000))]:  # last: > 2^20, chunked
        g = torch.Generator().manual_seed(9)
        a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        got = run_method(registry.get("slerp"), [b], base=a, global_params={"t": t})
        assert torch.equal(got, merge_tensors([a, b], "slerp", base_index=0, parameters={"t": t}))


def test_slerp_endpoints_and_colinear_fallback():
    base, (other, *_) = _models()
    slerp = registry.get("slerp")
    torch.testing.assert_close(run_method(slerp, [other], base=base, global_params={"t": 0.0}), base)
    torch.testing.assert_close(run_method(slerp, [other], base=base, global_params={"t": 1.0}), other)
    got = run_method(slerp, [2 * base], base=base, global_params={"t": 0.25})  # colinear: plain lerp
    assert torch.equal(got, 0.75 * base + 0.25 * (2 * base))


def test_slerp_errors():
    base, ex = _models()
    with pytest.raises(MergeError, match="exactly one other model"):
        run_method(registry.get("slerp"), ex, base=base, global_params={"t": 0.5})
    spec = {s.name: s for s in registry.get("slerp").param_specs()}["t"]
    with pytest.raises(MergeError, match=r"\[0, 1\]"):
        spec.validate(1.5, "parameters")


@pytest.mark.parametrize("opts", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_matches_mergekit(opts, with_base):
    base, ex = _models(n=2)
    w = [0.3, 0.9]
    got = run_method(registry.get("nuslerp"), ex, [{"weight": x} for x in w], base=base if with_base else None,
                     global_params=opts)
    tensors, idx = ([base] + ex, 0) if with_base else (ex, None)
    mk = merge_tensors(tensors, "nuslerp", base_index=idx, parameters={"weight": w, **opts})
    torch.testing.assert_close(got, mk, rtol=1e-6, atol=1e-6)


def test_nuslerp_reference_t_from_weights():
    _, ex = _models(n=2)
    got = run_method(registry.get("nuslerp"), ex, [{"weight": 1.0}, {"weight": 3.0}])
    a, b = ex[0].flatten().double(), ex[1].flatten().double()
    omega = math.acos(float(a @ b / (a.norm() * b.norm())))
    ref = (math.sin(0.25 * omega) * a + math.sin(0.75 * omega) * b) / math.sin(omega)  # t = 3/4
    torch.testing.assert_close(got, ref.float().reshape(ex[0].shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_base", [True, False])
def test_multislerp_matches_mergekit(with_base):
    base, ex = _models(n=3)
    w = [0.2, 0.3, 0.5]
    got = run_method(registry.get("multislerp"), ex, [{"weight": x} for x in w], base=base if with_base else None)
    tensors, idx = ([base] + ex, 0) if with_base else (ex, None)
    mk = merge_tensors(tensors, "multislerp", base_index=idx, parameters={"weight": w})
    torch.testing.assert_close(got, mk, rtol=1e-5, atol=1e-6)


def test_multislerp_of_two_unit_vectors_is_their_slerp_midpoint():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    got = run_method(registry.get("multislerp"), [a, b], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(got, torch.tensor([1.0, 1.0]) / math.sqrt(2), rtol=1e-6, atol=1e-6)


def test_multislerp_antipodal():
    a = torch.tensor([1.0, 2.0])
    got = run_method(registry.get("multislerp"), [a, -a], [{"weight": 1.0}, {"weight": 1.0}])
    torch.testing.assert_close(got, torch.zeros(2))
    with pytest.raises(MergeError, match="antipodal"):
        run_method(registry.get("multislerp"), [a, -a, a, -a], {"weight": 1.0})


@pytest.mark.parametrize("with_base", [True, False])
def test_karcher_matches_mergekit(with_base):
    base, ex = _models(n=3, scale=1.0)
    got = run_method(registry.get("karcher"), ex, base=base if with_base else None)
    mk = merge_tensors(ex + [base] if with_base else ex, "karcher")
    torch.testing.assert_close(got, mk, rtol=1e-6, atol=1e-6)


def test_karcher_reference_on_the_circle():
    """Equal-weight Karcher mean of unit vectors at angles 0, 0.5, 1.3 rad is at their mean angle."""
    angles = [0.0, 0.5, 1.3]
    pts = [torch.tensor([math.cos(a), math.sin(a)]) * r for a, r in zip(angles, [1.0, 2.0, 3.0])]
    got = run_method(registry.get("karcher"), pts, global_params={"max_iter": 100, "tol": 1e-7})
    mean_angle = sum(angles) / 3
    torch.testing.assert_close(got, 2.0 * torch.tensor([math.cos(mean_angle), math.sin(mean_angle)]), rtol=1e-5, atol=1e-5)


def test_karcher_streams_a_fixed_number_of_passes():
    _, ex = _models(n=4, scale=1.0)
    loads = []
    registry.get("karcher").merge(make_inputs(ex, loads=loads), {"max_iter": 3, "tol": 1e-5})
    assert len(loads) <= 4 * (3 + 3)  # norms, start, ≤3 iterations; never all at once

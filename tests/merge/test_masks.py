import numpy as np
import pytest
import torch

from torchmerge.merge import registry
from tests.merge.conftest import make_inputs
from torchmerge.merge.base import MergeError
from torchmerge.merge.masks import tall_masks


def _case(n=4, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def reference_consensus(base, experts, weights, lambdas, k, scale, mtl=None):
    taus = [e.numpy() - base.numpy() for e in experts]
    if mtl is None:
        mtl = sum(w * t for w, t in zip(weights, taus))
    count = np.zeros_like(mtl)
    for t, lam in zip(taus, lambdas):
        count += np.abs(t) >= lam * np.abs(mtl - t)
    return base.numpy() + scale * np.where(count >= k, mtl, 0.0)


def reference_ties(base, experts, densities, weights):
    trimmed = []
    for e, d, w in zip(experts, densities, weights):
        t = (e.numpy() - base.numpy()).ravel()
        keep = int(round(d * t.size))
        out = np.zeros_like(t)
        order = np.argsort(-np.abs(t))[:keep]
        out[order] = t[order]
        trimmed.append(w * out.reshape(e.shape))
    sign = np.sign(sum(trimmed))
    agree = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
    total = sum(np.where(a, t, 0.0) for a, t in zip(agree, trimmed))
    return total / np.maximum(sum(a.astype(np.float32) for a in agree), 1.0)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_consensus_matches_loop_over_tasks(k):
    base, experts = _case()
    weights, lambdas = [1.0, 0.5, 2.0, 1.0], [0.4, 0.2, 0.6, 1.0]
    params = [{"weight": w, "tall_lambda": lam} for w, lam in zip(weights, lambdas)]
    loads = []
    got = registry.get("consensus").merge(make_inputs(experts, params, base=base, loads=loads), {"k": k, "lambda": 0.7})
    want = reference_consensus(base, experts, weights, lambdas, k, 0.7)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)
    assert len(loads) == 2 * len(experts)  # two streaming passes


def test_k0_is_task_arithmetic_and_k_above_n_is_base():
    base, experts = _case(n=3)
    method = registry.get("consensus")
    ta = base + sum(e - base for e in experts)
    torch.testing.assert_close(method.merge(make_inputs(experts, base=base), {"k": 0, "lambda": 1.0}), ta)
    torch.testing.assert_close(method.merge(make_inputs(experts, base=base), {"k": 4, "lambda": 1.0}), base)


def test_consensus_ties_matches_reference():
    base, experts = _case(n=3, shape=(8, 4), seed=1)
    dens = [0.5, 0.3, 0.8]
    params = [{"density": d, "tall_lambda": 0.4} for d in dens]
    got = registry.get("consensus_ties").merge(make_inputs(experts, params, base=base), {"k": 2, "lambda": 1.0})
    mtl = reference_ties(base, experts, dens, [1.0] * 3)
    want = reference_consensus(base, experts, [1.0] * 3, [0.4] * 3, 2, 1.0, mtl=mtl)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-6)


def test_tall_masks_helper_and_compression_roundtrip():
    base, experts = _case(n=3, seed=2)
    params = [{"tall_lambda": 0.3}] * 3
    mtl, masks = tall_masks(make_inputs(experts, params, base=base))
    taus = [e - base for e in experts]
    want_mtl = sum(taus)
    torch.testing.assert_close(mtl, want_mtl)
    for t, m in zip(taus, masks):
        assert m.dtype == torch.bool
        assert torch.equal(m, t.abs() >= 0.3 * (want_mtl - t).abs())
        recon = base + torch.where(m, mtl, torch.zeros_like(mtl))  # θ_t ≈ θ₀ + m_t ⊙ τ_MTL
        assert recon.shape == base.shape


def test_errors_and_params():
    base, experts = _case(n=2)
    method = registry.get("consensus")
    with pytest.raises(MergeError, match="needs a base model"):
        method.merge(make_inputs(experts), {})
    with pytest.raises(MergeError, match="shape"):
        method.merge(make_inputs([experts[0], torch.zeros(3)], base=base), {})
    k_spec = next(p for p in method.param_specs() if p.name == "k")
    with pytest.raises(MergeError, match="'k'"):
        k_spec.validate(-1, "consensus")
    assert {p.name for p in registry.get("consensus_ties").param_specs()} >= {"k", "lambda", "density", "tall_lambda"}
    assert method.reference_url.startswith("https://arxiv.org/abs/2405.07813")

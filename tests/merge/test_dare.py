"""DARE: deterministic per (seed, tensor name), statistically right, mergekit-identical without drops."""

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from tests.merge.conftest import run_method
from torchmerge.merge import registry
from torchmerge.merge.sparsify import random_drop


def _models(shape=(200, 100), n=2):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def _dare(method, ex, base, density=0.3, **kw):
    return run_method(registry.get(method), ex, [{"weight": 1.0, "density": density} for _ in ex], base=base, **kw)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_deterministic_per_seed_and_tensor_name(name):
    base, ex = _models()
    a = _dare(name, ex, base, seed=7)
    assert torch.equal(a, _dare(name, ex, base, seed=7))
    assert not torch.equal(a, _dare(name, ex, base, seed=8))
    assert not torch.equal(a, _dare(name, ex, base, seed=7, name="model.layers.1.mlp.weight"))


def test_keep_fraction_and_inverse_density_rescale_are_unbiased():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(400, 500, generator=g)
    kept = random_drop(delta, 0.3, torch.Generator().manual_seed(2), "inverse_density")
    frac = (kept != 0).float().mean().item()
    assert abs(frac - 0.3) < 4 * (0.3 * 0.7 / delta.numel()) ** 0.5
    torch.testing.assert_close(kept[kept != 0], delta[kept != 0] / 0.3)
    # E[kept] = δ: the mean of kept/δ over many elements is 1 within a few standard errors
    ratio = (kept / delta).mean().item()
    assert abs(ratio - 1) < 4 * ((0.7 / 0.3) / delta.numel()) ** 0.5


def test_l1_rescale_matches_the_l1_norm():
    g = torch.Generator().manual_seed(1)
    delta = torch.randn(100, 50, generator=g)
    kept = random_drop(delta, 0.4, torch.Generator().manual_seed(2), "l1")
    torch.testing.assert_close(kept.abs().sum(), delta.abs().sum())
    plain = random_drop(delta, 0.4, torch.Generator().manual_seed(2), None)
    assert torch.equal(plain != 0, kept != 0)


def test_dare_linear_reference():
    """θ = θ₀ + Σ wᵢ·(mᵢ ⊙ δᵢ)·‖δᵢ‖₁/‖mᵢ ⊙ δᵢ‖₁, mᵢ the drawn keep masks (recovered from the output of one expert)."""
    base, ex = _models(n=1)
    got = _dare("dare_linear", ex, base, density=0.5)
    delta = ex[0] - base
    mask = (got - base) != 0
    ref = base + delta * mask * (delta.abs().sum() / (delta * mask).abs().sum())
    torch.testing.assert_close(got, ref)
    assert abs(mask.float().mean().item() - 0.5) < 0.02


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_density_one_is_mergekit_identical(name):
    base, ex = _models(n=3)
    w = [0.3, 0.5, -0.2]
    got = run_method(registry.get(name), ex, [{"weight": x, "density": 1.0} for x in w], base=base)
    mk = merge_tensors([base] + ex, name, base_index=0, parameters={"weight": w, "density": 1.0})
    assert torch.equal(got, mk)


def test_dare_ties_with_fixed_masks_matches_mergekit_consensus(monkeypatch):
    """Feed mergekit the same keep masks: consensus, divisor and rescale then agree bit for bit."""
    import mergekit.sparsify as mks

    base, ex = _models(n=3)
    w, dens = [0.6, 0.3, 0.9], [0.4, 0.5, 0.6]
    got = run_method(registry.get("dare_ties"), ex, [{"weight": a, "density": b} for a, b in zip(w, dens)], base=base)
    from tests.merge.conftest import make_inputs

    inputs = make_inputs(ex, base=base)
    masks = iter([torch.rand(base.shape, generator=inputs.generator(f"sparsify:{i}")) < d for i, d in enumerate(dens)])
    monkeypatch.setattr(mks.torch, "bernoulli", lambda p: next(masks).to(p.dtype))
    mk = merge_tensors([base] + ex, "dare_ties", base_index=0, parameters={"weight": w, "density": dens})
    assert torch.equal(got, mk)

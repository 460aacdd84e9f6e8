"""Breadcrumbs and DELLA: plain references, mergekit 0.1.5, parameter errors."""

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from tests.merge.conftest import make_inputs, run_method
from torchmerge.merge import registry
from torchmerge.merge.base import MergeError
from torchmerge.merge.sparsify import della_probabilities, magnitude_outliers


def _models(shape=(80, 60), n=3, bf16=False):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g) * 0.02
    ex = [base + 0.002 * torch.randn(shape, generator=g) for _ in range(n)]
    if bf16:
        base, ex = base.bfloat16().float(), [e.bfloat16().float() for e in ex]
    return base, ex


def test_breadcrumbs_window_reference():
    g = torch.Generator().manual_seed(2)
    delta = torch.randn(50, 40, generator=g)
    density, gamma = 0.6, 0.05
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    order = torch.argsort(delta.abs().flatten(), stable=True)
    keep = torch.zeros(n)
    keep[order[n - target - top : n - top]] = 1  # drop the γ largest, then the smallest
    torch.testing.assert_close(magnitude_outliers(delta, density, gamma, None, "index"), delta * keep.reshape(delta.shape))


@pytest.mark.parametrize("name", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("bf16", [False, True])
def test_breadcrumbs_bit_identical_to_mergekit(name, bf16):
    base, ex = _models(bf16=bf16)
    w, d, gam = [0.5, 0.8, -0.3], [0.7, 0.5, 0.9], [0.01, 0.1, 0.0]
    params = [{"weight": a, "density": b, "gamma": c} for a, b, c in zip(w, d, gam)]
    for opts in ({}, {"rescale": True, "normalize": True}):
        got = run_method(registry.get(name), ex, params, base=base, global_params=opts)
        mk = merge_tensors([base] + ex, name, base_index=0, parameters={"weight": w, "density": d, "gamma": gam, **opts})
        assert torch.equal(got, mk)


def test_della_probabilities_reference():
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(5, 9, generator=g)
    probs = della_probabilities(delta, 0.5, 0.2)
    for r in range(5):
        ranks = torch.argsort(torch.argsort(delta[r].abs(), stable=True), stable=True).float()
        torch.testing.assert_close(probs[r], 0.3 + 0.4 * ranks / 8)
    flat = della_probabilities(torch.arange(5.0), 0.5, 0.2)  # 1-D: one row
    torch.testing.assert_close(flat, torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7]))
    torch.testing.assert_close(della_probabilities(torch.ones(4, 1), 0.5, 0.2), torch.full((4, 1), 0.5))


def test_della_keep_rate_follows_magnitude_rank():
    base = torch.zeros(400, 200)
    row = torch.linspace(0.01, 1, 200)
    ex = [row.expand(400, 200).clone()]
    got = run_method(registry.get("della_linear"), ex, {"weight": 1.0, "density": 0.5, "epsilon": 0.3}, base=base,
                     global_params={"rescale": False})
    kept = (got != 0).float().mean(0)  # per column: expected 0.2 + 0.6·rank/199
    expected = 0.2 + 0.6 * torch.arange(200) / 199
    assert (kept - expected).abs().mean() < 0.03
    assert abs(kept.mean().item() - 0.5) < 0.01


def test_della_inverse_density_divides_by_each_keep_probability():
    base, ex = _models(n=1)
    got = run_method(registry.get("della_linear"), ex, {"weight": 1.0, "density": 0.5, "epsilon": 0.2}, base=base,
                     global_params={"rescale_mode": "inverse_density"})
    delta, kept = ex[0] - base, got - base
    probs = della_probabilities(delta, 0.5, 0.2)
    m = kept != 0
    torch.testing.assert_close(kept[m], delta[m] / probs[m])


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_della_density_one_is_mergekit_identical(name):
    base, ex = _models()
    w = [0.2, 0.9, 0.4]
    got = run_method(registry.get(name), ex, [{"weight": x, "density": 1.0} for x in w], base=base)
    mk = merge_tensors([base] + ex, name, base_index=0, parameters={"weight": w, "density": 1.0})
    assert torch.equal(got, mk)


def test_della_with_shared_masks_matches_mergekit(monkeypatch):
    import mergekit.sparsify as mks

    base, ex = _models()
    w, d, eps = [0.6, 0.3, 0.9], [0.4, 0.5, 0.6], [0.1, 0.2, 0.3]
    got = run_method(registry.get("della"), ex, [{"weight": a, "density": b, "epsilon": c} for a, b, c in zip(w, d, eps)],
                     base=base)
    inputs = make_inputs(ex, base=base)
    masks = iter([torch.rand(base.shape, generator=inputs.generator(f"sparsify:{i}")) < della_probabilities(x - base, di, e)
                  for i, (x, di, e) in enumerate(zip(ex, d, eps))])
    monkeypatch.setattr(mks.torch, "bernoulli", lambda p: next(masks).to(p.dtype))
    mk = merge_tensors([base] + ex, "della", base_index=0, parameters={"weight": w, "density": d, "epsilon": eps})
    assert torch.equal(got, mk)


def test_della_bad_epsilon_names_the_tensor():
    base, ex = _models(n=1)
    with pytest.raises(MergeError, match=r"model.layers.0.mlp.weight.*density ± epsilon inside \(0, 1\)"):
        run_method(registry.get("della"), ex, {"weight": 1.0, "density": 0.9, "epsilon": 0.2}, base=base)

import numpy as np
import pytest
import torch

from torchmerge.merge import registry
from tests.merge.conftest import make_inputs
from torchmerge.merge.base import MergeError


def test_fisher_matches_formula():
    g = torch.Generator().manual_seed(0)
    thetas = [torch.randn(4, 3, generator=g) for _ in range(3)]
    fishers = [torch.rand(4, 3, generator=g) for _ in range(3)]
    fishers[1][0, 0] = 0.0
    weights = [1.0, 2.0, 0.5]
    loads = []
    got = registry.get("fisher").merge(
        make_inputs(thetas, [{"weight": w} for w in weights], aux=[{"fisher": f} for f in fishers], loads=loads),
        {"fisher_floor": 1e-6},
    )
    num = sum(w * (f.double().numpy() + 1e-6) * t.double().numpy() for w, f, t in zip(weights, fishers, thetas))
    den = sum(w * (f.double().numpy() + 1e-6) for w, f in zip(weights, fishers))
    np.testing.assert_allclose(got.numpy(), num / den, rtol=1e-5)
    assert len(loads) == 3  # one streaming pass


def test_fisher_without_statistics_is_weighted_average_and_partial_is_error():
    thetas = [torch.ones(2), 3 * torch.ones(2)]
    got = registry.get("fisher").merge(make_inputs(thetas, [{"weight": 1.0}, {"weight": 3.0}]), {})
    torch.testing.assert_close(got, torch.full((2,), 2.5))
    with pytest.raises(MergeError, match="'expert1' lacks a 'fisher' tensor"):
        registry.get("fisher").merge(make_inputs(thetas, aux=[{"fisher": torch.ones(2)}, {}]), {})
    with pytest.raises(MergeError, match="fisher tensor of model 'expert0' has shape"):
        registry.get("fisher").merge(make_inputs(thetas, aux=[{"fisher": torch.ones(3)}, {"fisher": torch.ones(2)}]), {})


def _regmean_case(seed=0, n=3, out=4, n_in=5):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(out, n_in, generator=g) for _ in range(n)]
    xs = [torch.randn(20, n_in, generator=g) for _ in range(n)]
    return weights, xs, [x.T @ x for x in xs]


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.0])
def test_regmean_matches_full_matrix_formula(alpha):
    weights, _, grams = _regmean_case()
    got = registry.get("regmean").merge(make_inputs(weights, aux=[{"gram": gr} for gr in grams]), {"alpha": alpha})
    reduced = [alpha * gr.double().numpy() + (1 - alpha) * np.diag(np.diag(gr.double().numpy())) for gr in grams]
    want = sum(w.double().numpy() @ r for w, r in zip(weights, reduced)) @ np.linalg.inv(sum(reduced))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_regmean_alpha1_minimises_the_regression_objective():
    # y = x Wᵀ: the merged W must zero the gradient of Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², i.e. Σ_i X_iᵀX_i (W − W_i)ᵀ = 0
    weights, xs, grams = _regmean_case(seed=1)
    merged = registry.get("regmean").merge(make_inputs(weights, aux=[{"gram": gr} for gr in grams]), {"alpha": 1.0})
    grad = sum(x.double().T @ x.double() @ (merged.double() - w.double()).T for x, w in zip(xs, weights))
    assert grad.abs().max() < 1e-4
    # and merged outputs beat any expert's on the pooled inputs (sanity)
    assert torch.isfinite(merged).all()


def test_regmean_non_linear_tensors_are_averaged_and_errors():
    biases = [torch.ones(3), torch.zeros(3), 2 * torch.ones(3)]
    torch.testing.assert_close(registry.get("regmean").merge(make_inputs(biases), {}), torch.ones(3))
    weights, _, grams = _regmean_case()
    with pytest.raises(MergeError, match="gram matrix of model 'expert1' has shape"):
        registry.get("regmean").merge(make_inputs(weights, aux=[{"gram": grams[0]}, {"gram": torch.eye(4)}, {"gram": grams[2]}]), {})
    with pytest.raises(MergeError, match="'expert2' lacks a 'gram' tensor"):
        registry.get("regmean").merge(make_inputs(weights, aux=[{"gram": grams[0]}, {"gram": grams[1]}, {}]), {})
    spec = next(p for p in registry.get("regmean").param_specs() if p.name == "alpha")
    assert spec.default == 0.9
    with pytest.raises(MergeError, match="alpha"):
        spec.validate(1.5, "regmean")


def test_regmean_singular_gram_falls_back_to_least_squares():
    w = [torch.ones(2, 3), 3 * torch.ones(2, 3)]
    gram = torch.zeros(3, 3)
    gram[0, 0] = 1.0  # rank one: only input feature 0 is ever seen
    got = registry.get("regmean").merge(make_inputs(w, aux=[{"gram": gram}, {"gram": gram}]), {"alpha": 1.0})
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[:, 0], torch.full((2,), 2.0))


def test_engine_reads_in_memory_fisher_and_gram():
    from torchmerge.merge.engine import run_merge

    g = torch.Generator().manual_seed(2)
    name = "model.layers.0.mlp.up_proj.weight"
    sds = [{name: torch.randn(4, 3, generator=g), "model.norm.weight": torch.randn(3, generator=g)} for _ in range(2)]
    fis = [{name: torch.rand(4, 3, generator=g)} for _ in range(2)]
    spec = {"merge_method": "fisher", "dtype": "float32",
            "models": [{"model": sd, "parameters": {"fisher": f}} for sd, f in zip(sds, fis)]}
    out = run_merge(spec)
    want = sum((f[name] + 1e-6) * sd[name] for f, sd in zip(fis, sds)) / sum(f[name] + 1e-6 for f in fis)
    torch.testing.assert_close(out[name], want)
    torch.testing.assert_close(out["model.norm.weight"], (sds[0]["model.norm.weight"] + sds[1]["model.norm.weight"]) / 2)
    grams = [{name: torch.eye(3) * (i + 1)} for i in range(2)]
    spec = {"merge_method": "regmean", "dtype": "float32", "parameters": {"alpha": 1.0},
            "models": [{"model": sd, "parameters": {"gram": gr}} for sd, gr in zip(sds, grams)]}
    torch.testing.assert_close(run_merge(spec)[name], (sds[0][name] + 2 * sds[1][name]) / 3)

import numpy as np
import pytest
import torch

from torchmerge.merge import registry
from tests.merge.conftest import make_inputs
from torchmerge.merge.base import MergeError


def norm(x):
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else np.zeros_like(x)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def paper_pcb(base, experts, drop, lam, temp=1.0):
    """Equations 2-6 of arXiv 2410.02396, transcribed in float64."""
    b = base.double().numpy().ravel()
    deltas = [e.double().numpy().ravel() - b for e in experts]
    n, d = len(deltas), b.size
    betas = []
    for di in deltas:
        intra = softmax(n * norm(di * di) / temp)
        inter = sum(softmax(norm(di * dj)) for dj in deltas)
        beta = intra * inter
        cut = np.sort(beta)[int(drop * d)]
        betas.append(np.where(beta >= cut, beta, 0.0))
    num = sum(bh * di for bh, di in zip(betas, deltas))
    den = sum(betas)
    tau = np.where(den > 0, num / np.where(den > 0, den, 1), 0)
    return (b + lam * tau).reshape(base.shape)


def official_pcb(base, experts, drop, lam):
    b = base.double().numpy().ravel()
    deltas = np.stack([e.double().numpy().ravel() - b for e in experts])
    n, d = deltas.shape
    mag = np.abs(deltas)
    srt = np.sort(mag, axis=1)
    mag = np.clip(mag, srt[:, [int(d * 1e-4)]], srt[:, [int(d * (1 - 1e-4) - 1)]])
    intra = np.exp(n * np.stack([norm(m) for m in mag]) ** 2)
    beta = intra * np.tanh(deltas * deltas.sum(0))
    cut = np.sort(beta, axis=1)[:, [int(d * drop)]]
    score = np.stack([norm(r) for r in np.maximum(beta, cut)])
    tau = (score * np.sign(deltas) * mag).sum(0) / np.maximum(score.sum(0), 1e-12)
    return (b + lam * tau).reshape(base.shape)


def _case(n=3, shape=(7, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.05 * torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("drop", [0.0, 0.5, 0.9])
def test_paper_variant_matches_equations(drop):
    base, experts = _case()
    loads = []
    got = registry.get("pcb").merge(make_inputs(experts, base=base, loads=loads), {"drop_ratio": drop, "lambda": 0.8})
    np.testing.assert_allclose(got.numpy(), paper_pcb(base, experts, drop, 0.8), rtol=1e-4, atol=1e-6)
    assert len(loads) == 3 + 3 * 3  # outer pass + one inner pass per expert: memory stays O(1) in #experts


def test_temperature_changes_intra_balancing():
    base, experts = _case(seed=3)
    got = registry.get("pcb").merge(make_inputs(experts, base=base), {"drop_ratio": 0.5, "temperature": 0.5})
    np.testing.assert_allclose(got.numpy(), paper_pcb(base, experts, 0.5, 1.0, temp=0.5), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("drop", [0.0, 0.8])
def test_official_variant_matches_released_code_equations(drop):
    base, experts = _case(n=4, seed=1)
    loads = []
    got = registry.get("pcb").merge(make_inputs(experts, base=base, loads=loads), {"drop_ratio": drop, "variant": "official"})
    np.testing.assert_allclose(got.numpy(), official_pcb(base, experts, drop, 1.0), rtol=1e-4, atol=1e-6)
    assert len(loads) == 2 * 4


def test_identical_experts_give_the_expert_without_drop():
    base, experts = _case(n=1)
    got = registry.get("pcb").merge(make_inputs(experts * 3, base=base), {"drop_ratio": 0.0})
    torch.testing.assert_close(got, experts[0])


def test_params_and_errors():
    method = registry.get("pcb")
    specs = {p.name: p for p in method.param_specs()}
    assert specs["drop_ratio"].default == 0.9 and specs["variant"].default == "paper"
    with pytest.raises(MergeError, match="drop_ratio"):
        specs["drop_ratio"].validate(1.0, "pcb")
    with pytest.raises(MergeError, match="variant"):
        specs["variant"].validate("nope", "pcb")
    base, experts = _case()
    with pytest.raises(MergeError, match="needs a base model"):
        method.merge(make_inputs(experts), {})

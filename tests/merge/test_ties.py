"""TIES: a plain sort-based reference, mergekit 0.1.5 (also on tie-heavy bf16 data), every option."""

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from tests.merge.conftest import make_inputs, run_method, with_defaults
from torchmerge.merge import registry
from torchmerge.merge.base import MergeError
from torchmerge.merge.sparsify import top_k_mask

W, D = [0.7, -0.4, 1.1], [0.5, 0.3, 0.8]


def _models(shape=(64, 40), bf16=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    ex = [base + 0.002 * torch.randn(shape, generator=g) for _ in range(3)]
    if bf16:  # bf16-sourced values: many equal |δ| straddle the trim threshold
        base, ex = base.bfloat16().float(), [e.bfloat16().float() for e in ex]
    return base, ex


def reference_ties(base, ex, w, d, *, vote="weighted", divisor="weights", consensus="sum", normalize=True, lam=1.0):
    """TIES written out plainly: stable top-k trim, elect, disjoint mean."""
    taus = []
    for x, density in zip(ex, d):
        delta = (x - base).flatten()
        k = max(1, int(density * delta.numel()))
        keep = torch.zeros_like(delta)
        keep[torch.argsort(delta.abs(), descending=True, stable=True)[:k]] = 1
        taus.append(delta * keep)
    taus, wt = torch.stack(taus), torch.tensor(w)[:, None]
    v = taus * wt if vote == "weighted" else taus
    score = v.sign().sum(0) if consensus == "count" else v.sum(0)
    elected = torch.where(score >= 0, 1.0, -1.0)
    agree = (v.sign() == elected).float()
    mixed = (agree * taus * wt).sum(0)
    if normalize:
        div = (agree * (wt if divisor == "weights" else 1.0)).sum(0)
        mixed = mixed / torch.where(div == 0, 1.0, div)
    return base + lam * mixed.reshape(base.shape)


def _ties(ex, base, **glob):
    return run_method(registry.get("ties"), ex, [{"weight": a, "density": b} for a, b in zip(W, D)], base=base,
                      global_params=glob)


@pytest.mark.parametrize("opts", [{}, {"sign_vote": "unweighted"}, {"divisor": "count"}, {"consensus": "count"},
                                  {"normalize": False, "lambda": 0.6}])
def test_ties_matches_plain_reference(opts):
    base, ex = _models()
    ref_opts = {"vote": opts.get("sign_vote", "weighted"), "divisor": opts.get("divisor", "weights"),
                "consensus": opts.get("consensus", "sum"), "normalize": opts.get("normalize", True),
                "lam": opts.get("lambda", 1.0)}
    torch.testing.assert_close(_ties(ex, base, **opts), reference_ties(base, ex, W, D, **ref_opts))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("opts", [{}, {"rescale": True}, {"normalize": False, "lambda": 0.6, "int8_mask": True}])
def test_ties_bit_identical_to_mergekit(bf16, opts):
    base, ex = _models(shape=(96, 80), bf16=bf16)
    got = _ties(ex, base, **opts)
    mk = merge_tensors([base] + ex, "ties", base_index=0, parameters={"weight": W, "density": D, **opts})
    assert torch.equal(got, mk)


def test_top_k_mask_is_the_argsort_set_under_ties():
    g = torch.Generator().manual_seed(3)
    for n, levels in [(17, 3), (1000, 5), (20000, 40)]:
        a = torch.randint(0, levels, (n,), generator=g).float()
        for k in (1, n // 3, n - 1):
            ref = torch.zeros(n, dtype=torch.bool)
            ref[torch.argsort(a, descending=True)[:k]] = True
            assert torch.equal(top_k_mask(a, k, "sort"), ref)
            stable = torch.zeros(n, dtype=torch.bool)
            stable[torch.argsort(a, descending=True, stable=True)[:k]] = True
            assert torch.equal(top_k_mask(a, k, "index"), stable)


def test_tie_break_index_keeps_exactly_k():
    base, ex = _models(bf16=True)
    got = _ties(ex[:1], base, tie_break="index") - base
    n = base.numel()
    assert int((got != 0).sum()) <= max(1, int(D[0] * n))


def test_trim_scope_model_uses_one_threshold_per_expert_over_all_tensors():
    g = torch.Generator().manual_seed(5)
    shapes = {"a.weight": (30, 20), "b.bias": (50,)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    ex = {k: [base[k] + torch.randn(s, generator=g) * (0.1 if k == "a.weight" else 0.01) for _ in range(2)]
          for k, s in shapes.items()}
    params = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}]

    def load_all(name):
        return make_inputs(ex[name], params, base=base[name], name=name)

    method = registry.get("ties")
    glob = with_defaults(method, trim_scope="model")
    method.prepare(list(shapes), load_all, glob)
    for i, p in enumerate(params):  # TIES reference code: kthvalue(N - int(N·density)) over the whole model
        flat = torch.cat([(ex[k][i] - base[k]).abs().flatten() for k in shapes])
        thr = flat.kthvalue(flat.numel() - int(p["density"] * flat.numel())).values
        assert method._thresholds[(f"expert{i}", i)] == float(thr)
    for name in shapes:
        got = method.merge(load_all(name), glob)
        taus = []
        for i, p in enumerate(params):
            flat = torch.cat([(ex[k][i] - base[k]).abs().flatten() for k in shapes])
            thr = flat.kthvalue(flat.numel() - int(p["density"] * flat.numel())).values
            d = ex[name][i] - base[name]
            taus.append(d * (d.abs() >= thr))
        w = torch.tensor([p["weight"] for p in params]).reshape(-1, *[1] * base[name].dim())
        wt = torch.stack(taus) * w
        agree = wt.sign() == torch.where(wt.sum(0) >= 0, 1.0, -1.0)
        div = (agree * w).sum(0)
        ref = base[name] + (wt * agree).sum(0) / torch.where(div == 0, 1.0, div)
        torch.testing.assert_close(got, ref)


def test_trim_scope_model_without_prepare_is_an_error():
    base, ex = _models()
    method = registry.get("ties")
    method.prepare([], lambda n: None, with_defaults(method))
    with pytest.raises(MergeError, match="prepare"):
        _ties(ex, base, trim_scope="model")


def test_trim_scope_model_rejects_density_varying_by_tensor():
    base, ex = _models()
    dens = {"a": 0.3, "b": 0.5}

    def load_all(name):
        return make_inputs(ex, {"weight": 1.0, "density": dens[name]}, base=base, name=name)

    method = registry.get("ties")
    with pytest.raises(MergeError, match="one density per model"):
        method.prepare(["a", "b"], load_all, with_defaults(method, trim_scope="model"))

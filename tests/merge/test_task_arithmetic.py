"""linear and task_arithmetic: plain references, mergekit 0.1.5, streaming, errors."""

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from tests.merge.conftest import make_inputs, run_method
from torchmerge.merge import registry
from torchmerge.merge.base import MergeError


def _models(n=3, shape=(64, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(n)]


def test_linear_matches_plain_average_and_mergekit():
    _, ex = _models()
    w = [0.2, 0.5, 1.3]
    got = run_method(registry.get("linear"), ex, [{"weight": x} for x in w])
    torch.testing.assert_close(got, sum(a * t for a, t in zip(w, ex)) / sum(w))
    assert torch.equal(got, merge_tensors(ex, "linear", parameters={"weight": w}))
    raw = run_method(registry.get("linear"), ex, [{"weight": x} for x in w], global_params={"normalize": False})
    assert torch.equal(raw, merge_tensors(ex, "linear", parameters={"weight": w, "normalize": False}))


def test_linear_includes_listed_base_at_its_config_position():
    base, ex = _models()
    w = [0.2, 0.5, 1.3, 0.7]  # config order: ex0, base, ex1, ex2
    inputs = make_inputs(ex, [{"weight": x} for x in (w[0], w[2], w[3])], base=base,
                         base_params={"weight": w[1]}, indices=[0, 2, 3])
    got = registry.get("linear").merge(inputs, {"normalize": True})
    ref = merge_tensors([ex[0], base, ex[1], ex[2]], "linear", parameters={"weight": w})
    assert torch.equal(got, ref)


def test_linear_zero_weight_sum_is_an_error_naming_the_tensor():
    _, ex = _models(2)
    with pytest.raises(MergeError, match="model.layers.0.mlp.weight.*sum to 0"):
        run_method(registry.get("linear"), ex, [{"weight": 1.0}, {"weight": -1.0}])


def test_task_arithmetic_reference_and_mergekit():
    base, ex = _models()
    w = [0.5, -0.3, 1.0]  # a negative weight subtracts a task
    for lam, normalize in [(1.0, False), (0.7, False), (1.0, True)]:
        got = run_method(registry.get("task_arithmetic"), ex, [{"weight": x} for x in w], base=base,
                         global_params={"lambda": lam, "normalize": normalize})
        mixed = sum(a * (t - base) for a, t in zip(w, ex))
        ref = base + lam * (mixed / sum(w) if normalize else mixed)
        torch.testing.assert_close(got, ref)
        mk = merge_tensors([base] + ex, "task_arithmetic", base_index=0,
                           parameters={"weight": w, "lambda": lam, "normalize": normalize})
        assert torch.equal(got, mk)


def test_task_arithmetic_negation_removes_a_task():
    base, (ex,) = _models(1)
    got = run_method(registry.get("task_arithmetic"), [ex], {"weight": -1.0}, base=base)
    torch.testing.assert_close(got, 2 * base - ex)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                                  "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"])
def test_streaming_loads_each_expert_once(name):
    base, ex = _models(4, shape=(16, 16))
    loads = []
    method = registry.get(name)
    params = [{"weight": 0.25, "density": 0.5, "gamma": 0.01, "epsilon": 0.1} for _ in ex]
    specs = {s.name for s in method.param_specs() if s.scope == "model"}
    params = [{k: v for k, v in p.items() if k in specs} for p in params]
    from tests.merge.conftest import with_defaults

    method.merge(make_inputs(ex, params, base=base, loads=loads), with_defaults(method))
    assert sorted(loads) == [0, 1, 2, 3]
    assert method.streaming


def test_methods_need_a_base():
    _, ex = _models(2)
    with pytest.raises(MergeError, match="needs a base_model"):
        run_method(registry.get("ties"), ex, {"weight": 1.0})


def test_no_experts_returns_base():
    base, _ = _models(0)
    assert torch.equal(run_method(registry.get("ties"), [], base=base), base)


def test_param_specs_validate_ranges():
    specs = {s.name: s for s in registry.get("ties").param_specs()}
    with pytest.raises(MergeError, match=r"density.*\(0, 1\]"):
        specs["density"].validate(0.0, "models[0]")
    with pytest.raises(MergeError, match="'sum', 'count'"):
        specs["consensus"].validate("max", "merge")
    assert registry.get("ties").reference_url == "https://arxiv.org/abs/2306.01708"

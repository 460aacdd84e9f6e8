"""FunctionalMerge: θ = θ_base + Σ_t λ_t ⊙ τ_t computed in forward, eager merge, export, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchmerge.merge.base import MergeError
from torchmerge.merge.functional import FunctionalMerge, task_vectors

NUM_TASKS = 3


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    base = _net().eval()
    experts = []
    for _ in range(NUM_TASKS):
        expert = copy.deepcopy(base)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.1 * torch.randn_like(p))
        experts.append(expert)
    return base, experts


def _random_lambdas(fm: FunctionalMerge, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        fm.coefficients.copy_(torch.rand(fm.coefficients.shape, generator=g))


def test_task_vectors_are_differences_and_skip_integer_buffers(models):
    base, experts = models
    tv = task_vectors(base, experts)
    assert len(tv) == NUM_TASKS
    assert "1.num_batches_tracked" not in tv[0]
    for vector, expert in zip(tv, experts):
        assert torch.equal(vector["0.weight"], expert[0].weight.detach() - base[0].weight.detach())
        assert not vector["3.bias"].requires_grad
    # state dicts work the same as modules
    sd = task_vectors(base.state_dict(), [e.state_dict() for e in experts])
    assert torch.equal(sd[1]["3.weight"], tv[1]["3.weight"])


@pytest.mark.parametrize(
    "granularity, groups, num_groups",
    [("task", None, 1), ("layer", None, 8), ("block", ["0.", "1.", "3."], 3), ("block", lambda n: n.split(".")[1], 4)],
)
def test_coefficient_shapes(models, granularity, groups, num_groups):
    base, experts = models
    fm = FunctionalMerge(base, task_vectors(base, experts), granularity, groups=groups)
    # 8 merged tensors: the 6 parameters, then the BatchNorm running statistics (floating buffers)
    assert fm.param_names == (
        "0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias", "1.running_mean", "1.running_var"
    )
    assert fm.coefficients.shape == (NUM_TASKS, num_groups)
    assert fm.coefficients.numel() == NUM_TASKS * num_groups
    assert torch.all(fm.coefficients == 0.3)
    assert len(fm.coefficient_table()) == num_groups


def test_block_prefixes_longest_match_wins(models):
    base, experts = models
    fm = FunctionalMerge(base, task_vectors(base, experts), "block", groups=["", "3."])
    assert fm.group_names == ("", "3.")
    assert [fm.group_names[g] for g in fm.param_group] == ["", "", "", "", "3.", "3.", "", ""]


@pytest.mark.parametrize("granularity, groups", [("task", None), ("layer", None), ("block", ["0.", "1.", "3."])])
def test_forward_equals_module_loaded_with_merged_state_dict(models, granularity, groups):
    base, experts = models
    fm = FunctionalMerge(base, task_vectors(base, experts), granularity, groups=groups).eval()
    _random_lambdas(fm)
    loaded = copy.deepcopy(base)
    loaded.load_state_dict(fm.merged_state_dict())
    x = torch.randn(5, 6)
    assert torch.equal(fm(x), loaded(x))
    assert torch.equal(fm(x), fm.merged_module()(x))


def test_merged_state_dict_is_left_to_right_sum(models):
    base, experts = models
    tv = task_vectors(base, experts)
    fm = FunctionalMerge(base, tv, "layer")
    _random_lambdas(fm)
    merged = fm.merged_state_dict()
    lam = fm.coefficients.detach()
    i = fm.param_names.index("3.weight")
    expected = base[3].weight.detach()
    for t in range(NUM_TASKS):
        expected = expected + lam[t, i] * tv[t]["3.weight"]
    assert torch.equal(merged["3.weight"], expected)
    assert torch.equal(merged["1.running_mean"], base[1].running_mean)  # untouched buffer comes from the base


def test_missing_tensor_in_one_task_contributes_no_term(models):
    base, experts = models
    tv = task_vectors(base, experts)
    tv[1] = {k: v for k, v in tv[1].items() if k != "0.bias"}
    fm = FunctionalMerge(base, tv, "task", init=1.0)
    expected = base[0].bias.detach() + tv[0]["0.bias"] + tv[2]["0.bias"]
    assert torch.equal(fm.merged_state_dict()["0.bias"], expected)


def test_only_coefficients_receive_gradients_and_callers_base_is_untouched(models):
    base, experts = models
    before = {k: v.clone() for k, v in base.state_dict().items()}
    fm = FunctionalMerge(base, task_vectors(base, experts), "layer").eval()
    fm(torch.randn(4, 6)).square().sum().backward()
    assert fm.coefficients.grad is not None and fm.coefficients.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())
    assert all(p.grad is None for p in fm.base.parameters())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_export_keeps_the_merge_visible_and_matches_eager(models):
    base, experts = models
    fm = FunctionalMerge(base, task_vectors(base, experts), "layer").eval()
    _random_lambdas(fm)
    x = torch.randn(5, 6)
    ep = torch.export.export(fm, (x,))
    targets = {spec.target for spec in ep.graph_signature.input_specs if spec.target}
    assert "coefficients" in targets and "task_vectors.0.p0" in targets
    ops = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.mul.Tensor in ops and torch.ops.aten.add.Tensor in ops
    assert torch.equal(ep.module()(x), fm(x))


def test_init_tensor_and_clamp(models):
    base, experts = models
    init = torch.tensor([[-0.5], [0.5], [1.5]])
    fm = FunctionalMerge(base, task_vectors(base, experts), "task", init=init)
    assert torch.equal(fm.coefficients.detach(), init)
    fm.clamp_coefficients_(0.0, 1.0)
    assert fm.coefficients.detach().flatten().tolist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(coefficients="global"), "coefficients: got 'global'; valid: one of 'task', 'layer', 'block'"),
        (dict(coefficients="block"), "groups: coefficients='block' needs"),
        (dict(coefficients="block", groups=["3."]), "groups: tensor '0.weight' matches none of the prefixes"),
        (dict(coefficients="task", groups=["3."]), "groups: only used with coefficients='block'"),
        (dict(init=torch.zeros(2, 2)), r"init: tensor of shape \(2, 2\); valid: shape \(3, 1\)"),
    ],
)
def test_errors_name_the_argument(models, kwargs, match):
    base, experts = models
    with pytest.raises(MergeError, match=match):
        FunctionalMerge(base, task_vectors(base, experts), **kwargs)


def test_errors_on_unknown_or_misshaped_task_vector(models):
    base, _ = models
    with pytest.raises(MergeError, match=r"task_vectors\[0\]: 'head.weight' is not a floating parameter or buffer"):
        FunctionalMerge(base, [{"head.weight": torch.zeros(1)}])
    with pytest.raises(MergeError, match=r"task_vectors\[0\]: '0.bias' has shape \(3,\); valid: \(8,\)"):
        FunctionalMerge(base, [{"0.bias": torch.zeros(3)}])
    with pytest.raises(MergeError, match="task_vectors: expected a non-empty list"):
        FunctionalMerge(base, [])
    with pytest.raises(MergeError, match=r"expert_states\[0\]: tensor '0.bias' has shape"):
        task_vectors(base, [{"0.bias": torch.zeros(3)}])

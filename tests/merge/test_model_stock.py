"""Model Stock: plain reference (paper eq. 2) and mergekit 0.1.5."""

import pytest
import torch
from mergekit.merge_methods.api import merge_tensors

from tests.merge.conftest import run_method
from torchmerge.merge import registry
from torchmerge.merge.base import MergeError


def _models(n=3, shape=(40, 30)):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) + 0.05 for _ in range(n)]


def test_reference_two_experts():
    base, ex = _models(2)
    got = run_method(registry.get("model_stock"), ex, base=base)
    d0, d1 = (ex[0] - base).flatten(), (ex[1] - base).flatten()
    cos = float(d0 @ d1 / (d0.norm() * d1.norm()))
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(got, t * (ex[0] + ex[1]) / 2 + (1 - t) * base)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(40, 30), (70,)])
def test_matches_mergekit(filter_wise, shape):
    base, ex = _models(3, shape)
    got = run_method(registry.get("model_stock"), ex, base=base, global_params={"filter_wise": filter_wise})
    mk = merge_tensors([base] + ex, "model_stock", base_index=0, parameters={"filter_wise": filter_wise})
    assert torch.equal(got, mk)


def test_opposite_updates_keep_the_base():
    base = torch.zeros(4)
    d = torch.tensor([1.0, 2.0, 3.0, 4.0])
    got = run_method(registry.get("model_stock"), [base + d, base - d], base=base)
    assert torch.equal(got, base)


def test_needs_two_experts_and_a_base():
    base, ex = _models(1)
    with pytest.raises(MergeError, match="at least two other models"):
        run_method(registry.get("model_stock"), ex, base=base)

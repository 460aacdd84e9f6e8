"""Algebraic properties (hypothesis).

* Identical experts merge to themselves: linear, task_arithmetic (normalize), ties (density 1), breadcrumbs
  (density 1), nuslerp, multislerp, karcher, model_stock.
* Scaling every weight of a normalised linear merge by c ≠ 0 changes nothing.
* Expert order does not matter (up to float rounding) where the math is a symmetric sum:
  linear, task_arithmetic, ties (every consensus/sign_vote/divisor option), breadcrumbs, nuslerp,
  multislerp, karcher, model_stock. DARE/DELLA are order-invariant only in distribution: the drop
  mask follows the expert's config index.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.merge.conftest import run_method
from torchmerge.merge import registry

SETTINGS = settings(max_examples=20, deadline=None)
shapes = st.sampled_from([(5,), (4, 3), (2, 3, 2)])
weights = st.floats(0.1, 3.0)


def _tensor(seed, shape, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@SETTINGS
@given(seed=st.integers(0, 10_000), shape=shapes, w=st.lists(weights, min_size=2, max_size=4))
def test_identical_experts_return_themselves(seed, shape, w):
    base, x = _tensor(seed, shape), _tensor(seed + 1, shape)
    per = [{"weight": a} for a in w]
    close = lambda got: torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)  # noqa: E731
    close(run_method(registry.get("linear"), [x] * len(w), per))
    close(run_method(registry.get("task_arithmetic"), [x] * len(w), per, base=base, global_params={"normalize": True}))
    close(run_method(registry.get("ties"), [x] * len(w), [{**p, "density": 1.0} for p in per], base=base))
    close(run_method(registry.get("breadcrumbs"), [x] * len(w), per, base=base, global_params={"normalize": True}))
    close(run_method(registry.get("nuslerp"), [x] * 2, per[:2], base=base))
    close(run_method(registry.get("multislerp"), [x] * len(w), per, base=base))
    close(run_method(registry.get("karcher"), [x] * len(w)))
    close(run_method(registry.get("model_stock"), [x] * len(w), base=base))


@SETTINGS
@given(seed=st.integers(0, 10_000), shape=shapes, w=st.lists(weights, min_size=1, max_size=4), c=st.floats(0.01, 100))
def test_scaling_weights_of_normalised_linear_changes_nothing(seed, shape, w, c):
    ex = [_tensor(seed + i, shape) for i in range(len(w))]
    a = run_method(registry.get("linear"), ex, [{"weight": x} for x in w])
    b = run_method(registry.get("linear"), ex, [{"weight": x * c} for x in w])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


ORDER_FREE = [
    ("linear", {}, False), ("task_arithmetic", {}, True),
    ("ties", {}, True), ("ties", {"sign_vote": "unweighted", "divisor": "count"}, True),
    ("ties", {"consensus": "count"}, True), ("breadcrumbs", {}, True), ("karcher", {}, False),
    ("multislerp", {}, True), ("model_stock", {}, True),
]


@SETTINGS
@given(seed=st.integers(0, 10_000), shape=shapes, w=st.lists(weights, min_size=3, max_size=3),
       perm=st.permutations([0, 1, 2]), case=st.sampled_from(ORDER_FREE))
def test_expert_order_does_not_matter(seed, shape, w, perm, case):
    name, opts, needs_base = case
    method = registry.get(name)
    base = _tensor(seed, shape) if needs_base else None
    ex = [_tensor(seed + 1 + i, shape) for i in range(3)]
    specs = {s.name for s in method.param_specs() if s.scope == "model"}
    per = [{k: v for k, v in {"weight": a, "density": 0.6, "gamma": 0.1}.items() if k in specs} for a in w]
    a = run_method(method, ex, per, base=base, global_params=opts)
    b = run_method(method, [ex[i] for i in perm], [per[i] for i in perm], base=base, global_params=opts)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

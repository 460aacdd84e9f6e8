import pytest
import torch

from torchmerge.merge import registry
from tests.merge.conftest import make_inputs
from torchmerge.merge.base import MergeError
from torchmerge.merge.layer_swap import parse_layer_range


def reference(layer_index, num_layers, ranges, non_layer):
    """Which source (-1 = base) supplies a tensor, written out plainly."""
    if layer_index is None:
        return non_layer.index(True) if True in non_layer else -1
    for i, r in enumerate(ranges):
        if layer_index in r:
            return i
    return -1


def test_layers_come_from_their_experts_and_the_rest_from_base():
    base = torch.zeros(3, 2)
    experts = [torch.full((3, 2), 1.0), torch.full((3, 2), 2.0)]
    params = [{"layer_range": "0:1, -1:", "non_layer": False}, {"layer_range": "2", "non_layer": True}]
    ranges = [{0, 3}, {2}]
    method = registry.get("layer_swap")
    for layer in [None, 0, 1, 2, 3]:
        name = "model.embed_tokens.weight" if layer is None else f"model.layers.{layer}.mlp.up_proj.weight"
        got = method.merge(make_inputs(experts, params, base=base, name=name, layer_index=layer, num_layers=4), {})
        source = reference(layer, 4, ranges, [False, True])
        want = base if source < 0 else experts[source]
        assert torch.equal(got, want), (layer, got)


def test_parse_layer_range():
    assert parse_layer_range("0:4, 28:32", 32) == {0, 1, 2, 3, 28, 29, 30, 31}
    assert parse_layer_range("-2:", 32) == {30, 31}
    assert parse_layer_range("-1", 32) == {31}
    assert parse_layer_range("", 32) == set()
    with pytest.raises(MergeError, match="number of layers is unknown"):
        parse_layer_range("-2:", None)


def test_overlap_and_invalid_ranges_are_errors():
    base = torch.zeros(2)
    experts = [torch.ones(2), torch.ones(2)]
    params = [{"layer_range": "0:2"}, {"layer_range": "1:3"}]
    with pytest.raises(MergeError, match="layer 1 claimed by both 'expert0' and 'expert1'"):
        registry.get("layer_swap").merge(make_inputs(experts, params, base=base, name="model.layers.1.x.weight", layer_index=1), {})
    spec = next(p for p in registry.get("layer_swap").param_specs() if p.name == "layer_range")
    with pytest.raises(MergeError, match="layer_range"):
        spec.validate("0-4", "m0")
    assert spec.validate("0:4,-2:", "m0") == "0:4,-2:"


def test_engine_swaps_layers_counted_from_the_end():
    from torchmerge.merge.engine import run_merge

    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.full((2,), float(i)) for i in range(4)}
    base["model.embed_tokens.weight"] = torch.zeros(2)
    expert = {k: v + 10 for k, v in base.items()}
    spec = {"merge_method": "layer_swap", "dtype": "float32", "base_model": base,
            "models": [{"model": base}, {"model": expert, "parameters": {"layer_range": "0:1,-1:"}}]}
    out = run_merge(spec)
    assert [out[f"model.layers.{i}.mlp.up_proj.weight"][0].item() for i in range(4)] == [10.0, 1.0, 2.0, 13.0]
    assert out["model.embed_tokens.weight"][0].item() == 0.0

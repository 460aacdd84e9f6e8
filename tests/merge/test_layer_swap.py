import pytest
import torch

from torchmerge.merge import registry
from torchmerge.merge.base import Experts, ExpertTensor, MergeError, TensorInputs
from torchmerge.merge.layer_swap import parse_layer_range


def make_inputs(base, tensors, params, name, layer_index, num_layers=4):
    def load(i):
        return ExpertTensor(model=f"m{i}", index=i, tensor=tensors[i].clone(), params=params[i])

    return TensorInputs(name=name, base=base.clone(), experts=Experts(len(tensors), load),
                        layer_index=layer_index, num_layers=num_layers)


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
        got = method.merge(make_inputs(base, experts, params, name, layer), {})
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
    with pytest.raises(MergeError, match="layer 1 claimed by both 'm0' and 'm1'"):
        registry.get("layer_swap").merge(make_inputs(base, experts, params, "model.layers.1.x.weight", 1), {})
    spec = next(p for p in registry.get("layer_swap").param_specs() if p.name == "layer_range")
    with pytest.raises(MergeError, match="layer_range"):
        spec.validate("0-4", "m0")
    assert spec.validate("0:4,-2:", "m0") == "0:4,-2:"

"""capture(): ATen graph with meta["val"], parameters as constants, dynamic shapes, one-line errors."""

import pytest
import torch
import torch.nn as nn

from torchmerge.graph import CaptureError, capture

from .models import mlp


def test_capture_matches_eager_and_keeps_meta():
    model, x = mlp(), torch.randn(5, 16)
    gm = capture(model, (x,))
    torch.testing.assert_close(gm(x)[0], model(x), rtol=0, atol=0)
    for node in gm.graph.nodes:
        if node.op != "output":
            assert isinstance(node.meta.get("val"), torch.Tensor), node.name
    assert len(gm.graph.find_nodes(op="placeholder")) == 1  # only the user input; state is constant
    assert {n.meta["state_name"] for n in gm.graph.nodes if n.op == "get_attr"} == set(model.state_dict())
    assert all(str(n.target).startswith("aten.") for n in gm.graph.nodes if n.op == "call_function")


def test_capture_params_as_inputs_when_asked():
    gm = capture(mlp(), (torch.randn(2, 16),), params_as_constants=False)
    assert not [n for n in gm.graph.nodes if n.op == "get_attr"]


def test_capture_dynamic_batch():
    model = mlp()
    batch = torch.export.Dim("batch", min=2, max=64)
    gm = capture(model, (torch.randn(4, 16),), dynamic_shapes=({0: batch},))
    x = torch.randn(9, 16)
    torch.testing.assert_close(gm(x)[0], model(x))
    assert isinstance(next(iter(gm.graph.find_nodes(op="placeholder"))).meta["val"].shape[0], torch.SymInt)


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow: not exportable
            return x * 2
        return x


def test_untraceable_model_is_one_line_with_reason():
    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(3),))
    message = str(info.value)
    assert "\n" not in message and "DataDependent" in message
    reason = message.split("DataDependent: ", 1)[1]
    assert "data-dependent" in reason  # torch.export's own explanation, not a generic one

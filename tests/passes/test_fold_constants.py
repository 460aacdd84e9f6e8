"""FoldConstants folds weight-only subgraphs (transposes, dequantisation) and nothing else."""

import torch
import torch.nn as nn

from torchmerge.graph import capture
from torchmerge.graph.constants import is_constant
from torchmerge.passes import DeadCodeElimination, FoldConstants

from ..graph.models import mlp


def _ops_on_constants_only(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.all_input_nodes
            and all(is_constant(a) for a in n.all_input_nodes)]


def test_transposes_are_folded_exactly():
    model, x = mlp(), torch.randn(3, 16)
    gm = capture(model, (x,))
    assert len(_ops_on_constants_only(gm)) == 3  # one weight transpose per linear layer
    assert FoldConstants().call(gm).modified
    assert _ops_on_constants_only(gm) == []
    torch.testing.assert_close(gm(x)[0], model(x), rtol=0, atol=0)
    assert not FoldConstants().call(gm).modified


class Int8Weight(nn.Module):
    """A weight stored as int8 + per-row scale and dequantised in forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("q", torch.randint(-127, 128, (6, 5), dtype=torch.int8))
        self.register_buffer("scale", torch.rand(6, 1) / 100)

    def forward(self, x):
        return x @ (self.q.float() * self.scale).t() + torch.randn_like(x[:, :1]) * 0


def test_dequantisation_folds_and_random_ops_stay():
    model, x = Int8Weight(), torch.randn(4, 5)
    gm = capture(model, (x,))
    FoldConstants().call(gm)
    DeadCodeElimination().call(gm)
    consts = [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert [c.dtype for c in consts] == [torch.float32]  # int8 weight and scale are gone
    torch.testing.assert_close(consts[0], (model.q.float() * model.scale).t(), rtol=0, atol=0)
    assert any("randn" in str(n.target) or "normal" in str(n.target) for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x)[0], model(x), rtol=0, atol=0)

"""DeadCodeElimination removes unused nodes and the constants only they read."""

import torch
import torch.nn as nn

from torchmerge.graph import capture
from torchmerge.passes import DeadCodeElimination


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x):
        self.unused(x)
        return self.used(x)


def test_dead_nodes_and_attributes_go():
    model, x = Unused().eval(), torch.randn(2, 3)
    gm = capture(model, (x,))
    attrs_before = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    result = DeadCodeElimination().call(gm)
    attrs_after = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    # export may already drop the unused branch; either way only the used layer's state remains
    assert attrs_after == {a for a in attrs_before if "unused" not in a}
    assert not [name for name in gm._buffers if "unused" in name]
    torch.testing.assert_close(gm(x)[0], model(x), rtol=0, atol=0)
    assert not DeadCodeElimination().call(gm).modified
    assert isinstance(result.modified, bool)

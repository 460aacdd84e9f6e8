"""Helpers for constants held by a GraphModule as `get_attr` nodes.

Folding passes read real tensors out of `get_attr` nodes, evaluate weight-only subgraphs with them and
write the result back as a fresh `get_attr` node whose meta["val"] is a fake tensor of the graph's
fake mode, so that later passes and the pipeline's checks see a consistent graph.
"""

from __future__ import annotations

import itertools

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode

_counter = itertools.count()


def is_constant(node) -> bool:
    """True for a `get_attr` node that names a tensor (not a submodule)."""
    return isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(get_constant(node), torch.Tensor)


def get_constant(node: fx.Node):
    """The object a `get_attr` node refers to (follows dotted targets)."""
    obj = node.graph.owning_module
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def graph_fake_mode(gm: fx.GraphModule):
    """The FakeTensorMode the graph's meta["val"] tensors belong to (None when the graph has none)."""
    vals = [n.meta.get("val") for n in gm.graph.nodes if "val" in n.meta]
    flat = [v for v in vals if isinstance(v, torch.Tensor)]
    return detect_fake_mode(flat) if flat else None


def fake_of(gm: fx.GraphModule, tensor: torch.Tensor):
    """A fake version of a real constant in the graph's fake mode (the tensor itself if there is none)."""
    mode = graph_fake_mode(gm)
    if mode is None:
        return tensor
    return mode.from_tensor(tensor, static_shapes=True)


def add_constant(gm: fx.GraphModule, tensor: torch.Tensor, hint: str, before: fx.Node) -> fx.Node:
    """Register `tensor` on `gm` under a fresh name and insert a `get_attr` node for it before `before`."""
    base = "_tm_" + "".join(c if c.isalnum() or c == "_" else "_" for c in hint)
    name = f"{base}_{next(_counter)}"
    while hasattr(gm, name):
        name = f"{base}_{next(_counter)}"
    gm.register_buffer(name, tensor.detach(), persistent=False)
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(name)
    node.meta["val"] = fake_of(gm, tensor)
    return node


def remove_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete tensor attributes of `gm` that no `get_attr` node refers to anymore; returns the count."""
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    removed = 0
    for name in list(gm._buffers) + list(gm._parameters):
        if name not in used:
            gm._buffers.pop(name, None)
            gm._parameters.pop(name, None)
            removed += 1
    for name in list(vars(gm)):
        if name.startswith("_tm_") and name not in used and isinstance(getattr(gm, name), torch.Tensor):
            delattr(gm, name)
            removed += 1
    return removed

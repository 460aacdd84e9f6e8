"""Small matching helpers shared by the passes (ATen targets, seeing through views, constant access)."""

from __future__ import annotations

import torch
import torch.fx as fx

from ..graph.constants import get_constant, is_constant

aten = torch.ops.aten

VIEW_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default, aten.alias.default}
TRANSPOSE_OPS = {aten.t.default, aten.permute.default, aten.transpose.int}


def is_op(node, *targets) -> bool:
    """True when `node` is a call_function of one of `targets` (OpOverload or OpOverloadPacket)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    return any(node.target is t or getattr(node.target, "overloadpacket", None) is t for t in targets)


def strip_views(node):
    """The node under a chain of value-preserving view/reshape/clone ops."""
    while is_op(node, *VIEW_OPS):
        node = node.args[0]
    return node


def is_2d_transpose(node) -> bool:
    if is_op(node, aten.t.default):
        return True
    if is_op(node, aten.permute.default):
        return list(node.args[1]) == [1, 0]
    if is_op(node, aten.transpose.int):
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return False


def const_value(node):
    """Real tensor behind a constant node, seeing through a 2-D transpose (returned transposed)."""
    if is_constant(node):
        return get_constant(node)
    if is_2d_transpose(node) and is_constant(node.args[0]):
        return get_constant(node.args[0]).t()
    return None


def linear_parts(node):
    """(x, weight_t, bias) for mm(x, Wt) / addmm(b, x, Wt) with a constant [in, out] weight, else None.

    weight_t is the real tensor (transposed view where the graph transposes a constant [out, in] weight).
    """
    if is_op(node, aten.mm.default):
        x, w, b = node.args[0], node.args[1], None
    elif is_op(node, aten.addmm.default) and not node.kwargs:
        b, x, w = node.args[:3]
        if len(node.args) > 3:
            return None
        b = const_value(b)
        if b is None:
            return None
    else:
        return None
    wt = const_value(w)
    return None if wt is None else (x, wt, b)


def scalar_value(node):
    """A Python number for a literal or a 0-d/1-element constant, else None."""
    if isinstance(node, (int, float)):
        return node
    value = get_constant(node) if is_constant(node) else None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return None

"""FoldConstants: evaluate weight-only subgraphs once and replace them by one constant each.

A node is foldable when every tensor it reads is a `get_attr` constant (or another foldable node) and the
op is pure. Values are computed node by node with the graph's own ATen ops in graph order, so the folded
constant is bit-identical to what the unfolded graph would compute (transposes, dequantisation of int8
constants, base + Σ λ·τ merges alike). Creation ops without tensor inputs (zeros, arange) are not folded:
turning them into stored constants would only cost memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from ..graph.constants import add_constant, get_constant, is_constant
from ..graph.pass_base import GraphPass, PassResult

aten = torch.ops.aten

IMPURE = {aten.rand, aten.randn, aten.randint, aten.rand_like, aten.randn_like, aten.bernoulli, aten.dropout,
          aten.native_dropout, aten.normal, aten.uniform, aten.empty, aten.empty_like, aten.empty_strided,
          aten.multinomial, aten.randperm, aten.copy_}
# Metadata assertions on constants hold or fail at compile time; once checked they only pin dead constants.
CONSTANT_ASSERTS = {aten._assert_tensor_metadata}


def _pure(node: fx.Node, ops) -> bool:
    if node.op != "call_function":
        return False
    packet = getattr(node.target, "overloadpacket", None)
    if packet in IMPURE:
        return False
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return False
    if ops is not None:
        return node.target in ops or packet in ops
    return schema is not None or node.target.__module__ == "_operator"


@dataclass(frozen=True)
class FoldConstants(GraphPass):
    """Fold every pure subgraph whose inputs are all constants. `ops`: restrict folding to these targets."""

    ops: frozenset | None = None
    name = "fold_constants"

    def call(self, gm: fx.GraphModule) -> PassResult:
        env: dict[fx.Node, object] = {}
        checked = 0
        for node in list(gm.graph.nodes):
            if getattr(node.target, "overloadpacket", None) in CONSTANT_ASSERTS and not node.users \
                    and node.all_input_nodes and all(is_constant(a) for a in node.all_input_nodes):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), get_constant)
                node.target(*args, **kwargs)
                gm.graph.erase_node(node)
                checked += 1
            elif is_constant(node):
                env[node] = get_constant(node)
            elif _pure(node, self.ops) and node.all_input_nodes and all(a in env for a in node.all_input_nodes):
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
                env[node] = node.target(*args, **kwargs)
        folded = 0
        for node, value in env.items():
            if node.op != "call_function" or not isinstance(value, torch.Tensor):
                continue
            outside = [u for u in node.users if u not in env]
            if not outside:
                continue
            const = add_constant(gm, value, node.name, before=node)
            const.meta["folded_from"] = node.name
            const.meta["nn_module_stack"] = node.meta.get("nn_module_stack")
            for user in outside:
                user.replace_input_with(node, const)
            folded += 1
        if folded or checked:
            gm.graph.eliminate_dead_code()
            gm.recompile()
        return PassResult(gm, folded + checked > 0)

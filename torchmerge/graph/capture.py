"""Capture an nn.Module as an ATen-level torch.fx GraphModule through torch.export.

The result is what every torchmerge pass consumes: core-ATen nodes that carry meta["val"] (fake tensors,
symbolic where `dynamic_shapes` asked for it). Parameters, buffers and lifted constants become `get_attr`
constants (unless `params_as_constants=False`) so weight-only subgraphs can be folded. The module takes the
flattened tensor inputs and returns a tuple of flattened outputs; `gm.meta["in_spec"]`/`["out_spec"]` keep
the pytree structure for callers that need it.
"""

from __future__ import annotations

import torch
import torch.fx as fx


class CaptureError(RuntimeError):
    """The model could not be captured; the message carries torch.export's own reason."""


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def capture(model: torch.nn.Module, example_inputs, dynamic_shapes=None, *, params_as_constants: bool = True,
            decompose: bool = True) -> fx.GraphModule:
    """Export `model(*example_inputs)` to an ATen GraphModule with node.meta["val"] kept.

    `dynamic_shapes` is passed to torch.export.export unchanged. `decompose=True` lowers to the core ATen
    opset (the same opset AOTAutograd hands the compile backend), so passes see one vocabulary.
    Raises CaptureError (one line, with the export failure's reason) for untraceable models.
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    try:
        ep = torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)
        if decompose:
            ep = ep.run_decompositions()
    except Exception as exc:  # torch.export raises many types; the user needs its reason, once
        raise CaptureError(f"capture: cannot export {type(model).__name__}: {_one_line(exc)}") from exc
    gm = ep.graph_module
    gm.meta["in_spec"], gm.meta["out_spec"] = ep.call_spec.in_spec, ep.call_spec.out_spec
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        raise CaptureError(f"capture: {type(model).__name__} mutates state in forward "
                           f"({', '.join(sorted(sig.buffers_to_mutate.values()))}); call model.eval() first")
    if params_as_constants:
        _lift_state_to_constants(gm, ep)
    gm.graph.lint()
    gm.recompile()
    return gm


def _lift_state_to_constants(gm: fx.GraphModule, ep) -> None:
    """Replace parameter/buffer/constant placeholders by get_attr nodes holding detached tensors."""
    sig = ep.graph_signature
    sources = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
    state = {**ep.state_dict, **ep.constants}
    first_user_input = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name not in sources), None)
    anchor = first_user_input or next(n for n in gm.graph.nodes if n.op != "placeholder")
    for node in list(gm.graph.find_nodes(op="placeholder")):
        if node.name not in sources:
            continue
        fqn = sources[node.name]
        attr = "_c_" + fqn.replace(".", "_")
        tensor = state[fqn]
        gm.register_buffer(attr, tensor.detach() if isinstance(tensor, torch.Tensor) else tensor, persistent=False)
        with gm.graph.inserting_after(anchor) if anchor.op == "placeholder" else gm.graph.inserting_before(anchor):
            const = gm.graph.get_attr(attr)
        const.meta.update(node.meta)
        const.meta["state_name"] = fqn
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)

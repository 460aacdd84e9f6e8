"""PassPipeline: run GraphPasses in order, verify the graph after each, optionally dump every stage.

After each pass the pipeline lints the graph, recompiles it, fills meta["val"] for nodes that lack it by
fake-tensor propagation (in the graph's own fake mode, so symbolic shapes survive) and checks that every
value-producing node has one. Any failure becomes one PassError line naming the pass and the node.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from .constants import get_constant, graph_fake_mode
from .pass_base import GraphPass, NodeError, PassResult


class PassError(RuntimeError):
    """A pass failed or left an invalid graph; `.pass_name` and `.node` say where."""

    def __init__(self, pass_name: str, node: str, reason: str):
        super().__init__(f"pass '{pass_name}' failed at node '{node}': {reason}")
        self.pass_name, self.node = pass_name, node


@dataclass(frozen=True)
class PipelineOptions:
    """How a PassPipeline runs. `dump_dir`: write each stage's readable code there (00_input.py, 01_<pass>.py...)."""

    dump_dir: str | Path | None = None
    verify: bool = True


class PassPipeline:
    """Runs `passes` in order; `uuid()` combines the passes' uuids for compile caches."""

    def __init__(self, passes: Sequence[GraphPass], options: PipelineOptions | None = None):
        self.passes = list(passes)
        self.options = options or PipelineOptions()

    def uuid(self) -> str:
        return hashlib.sha256("|".join(p.uuid() for p in self.passes).encode()).hexdigest()

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        dump = Path(self.options.dump_dir) if self.options.dump_dir is not None else None
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            _write_stage(dump / "00_input.py", gm, "input", None)
        modified = False
        for i, gpass in enumerate(self.passes, start=1):
            gm, changed = self._run_one(gpass, gm)
            modified |= changed
            if dump is not None:
                _write_stage(dump / f"{i:02d}_{_slug(gpass.name)}.py", gm, gpass.name, changed)
        return PassResult(gm, modified)

    def _run_one(self, gpass: GraphPass, gm: fx.GraphModule) -> tuple[fx.GraphModule, bool]:
        current = None
        try:
            result = gpass.call(gm)
        except PassError:
            raise
        except NodeError as exc:
            raise PassError(gpass.name, getattr(exc.node, "name", str(exc.node)), str(exc).splitlines()[0]) from exc
        except Exception as exc:
            raise PassError(gpass.name, "<unknown>", f"{type(exc).__name__}: {_first_line(exc)}") from exc
        if not isinstance(result, PassResult):
            raise PassError(gpass.name, "<none>", f"call() returned {type(result).__name__}, expected PassResult")
        gm = result.gm
        if not self.options.verify:
            return gm, result.modified
        try:
            seen: set = set()
            for current in gm.graph.nodes:  # lint reports problems without naming nodes; find them first
                _check_args_in_graph(current, seen)
                seen.add(current)
            current = None
            gm.graph.lint()
            gm.recompile()
            for current in gm.graph.nodes:
                propagate_val(gm, current)
        except Exception as exc:
            raise PassError(gpass.name, current.name if current is not None else "<graph>",
                            f"{type(exc).__name__}: {_first_line(exc)}") from exc
        return gm, result.modified


def _check_args_in_graph(node: fx.Node, seen: set) -> None:
    for arg in node.all_input_nodes:
        if arg.graph is not node.graph:
            raise RuntimeError(f"argument '{arg.name}' belongs to another graph")
        if arg not in seen:
            raise RuntimeError(f"argument '{arg.name}' is used before it is defined (or was erased)")


def propagate_val(gm: fx.GraphModule, node: fx.Node) -> None:
    """Fill node.meta["val"] when missing by running the node on fake inputs; raise if it cannot be set."""
    if node.op == "output" or "val" in node.meta:
        return
    if node.op == "get_attr":
        value = get_constant(node)
        if isinstance(value, torch.Tensor):
            mode = graph_fake_mode(gm)
            node.meta["val"] = mode.from_tensor(value, static_shapes=True) if mode is not None else value
        return
    if node.op != "call_function":
        raise RuntimeError(f"{node.op} node has no meta['val']")

    def val(a):
        if not isinstance(a, fx.Node):
            return a
        if "val" not in a.meta:
            raise RuntimeError(f"input '{a.name}' has no meta['val']")
        return a.meta["val"]

    args, kwargs = tree_map(val, (node.args, node.kwargs))
    mode = graph_fake_mode(gm)
    if mode is None:
        node.meta["val"] = node.target(*args, **kwargs)
        return
    with mode:
        node.meta["val"] = node.target(*args, **kwargs)


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", name)


def _write_stage(path: Path, gm: fx.GraphModule, name: str, changed) -> None:
    header = f"# stage: {name}" + ("" if changed is None else f" (modified={changed})") + "\n"
    path.write_text(header + gm.print_readable(print_output=False, include_stride=False, include_device=False))

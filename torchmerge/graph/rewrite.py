"""RewriteRule and a small rule-table driver.

A rule is three functions (onnxscript-rewriter style):
  pattern(node) -> dict | None          bindings when `node` is the anchor of the pattern, else None
  check(gm, node, match) -> str | None  a reason when the rewrite must not happen (None: go ahead)
  replacement(gm, node, match) -> Node | None
                                        builds the new subgraph before `node` and returns the node that
                                        replaces it (None: the replacement already rewired the graph)
`apply_rules` walks the graph in order, tries each rule on each node and records why rules were skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch.fx as fx

from .pass_base import GraphPass, NodeError, PassResult


def _no_reason(gm, node, match):
    return None


@dataclass(frozen=True)
class RewriteRule:
    """pattern / check / replacement; see the module docstring."""

    name: str
    pattern: Callable[[fx.Node], dict | None]
    replacement: Callable[[fx.GraphModule, fx.Node, dict], fx.Node | None]
    check: Callable[[fx.GraphModule, fx.Node, dict], str | None] = _no_reason


@dataclass
class RuleReport:
    """Which rules fired on which nodes, and why the others were refused."""

    applied: list[tuple[str, str]] = field(default_factory=list)  # (rule, node)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (rule, node, reason)


def apply_rules(gm: fx.GraphModule, rules: Sequence[RewriteRule], max_rounds: int = 8) -> RuleReport:
    """Apply `rules` until none fires (at most `max_rounds` sweeps); dead nodes are left to DCE."""
    report = RuleReport()
    for _ in range(max_rounds):
        fired = False
        for node in list(gm.graph.nodes):
            if node.graph is not gm.graph or node.op in ("placeholder", "output") or not _alive(node):
                continue
            for rule in rules:
                match = rule.pattern(node)
                if match is None:
                    continue
                reason = rule.check(gm, node, match)
                if reason:
                    report.skipped.append((rule.name, node.name, reason))
                    continue
                try:
                    new = rule.replacement(gm, node, match)
                except NodeError:
                    raise
                except Exception as exc:
                    raise NodeError(node, f"rule '{rule.name}': {type(exc).__name__}: {exc}") from exc
                if new is not None and new is not node:
                    new.meta.setdefault("nn_module_stack", node.meta.get("nn_module_stack"))
                    node.replace_all_uses_with(new)
                    gm.graph.erase_node(node)
                report.applied.append((rule.name, node.name))
                fired = True
                break
        if not fired:
            break
    if report.applied:
        gm.recompile()
    return report


def _alive(node: fx.Node) -> bool:
    return node.prev is not None and node.next is not None


class RuleTablePass(GraphPass):
    """A GraphPass that applies a fixed table of RewriteRules; subclasses set `name` and `rules()`."""

    def rules(self) -> Sequence[RewriteRule]:
        raise NotImplementedError

    def call(self, gm: fx.GraphModule) -> PassResult:
        report = apply_rules(gm, self.rules())
        object.__setattr__(self, "last_report", report)  # passes may be frozen dataclasses
        return PassResult(gm, bool(report.applied))

"""RewriteRule + apply_rules: pattern, check reasons, replacement, and a rule-table pass."""

from dataclasses import dataclass

import torch
import torch.nn as nn

from torchmerge.graph import RewriteRule, RuleTablePass, apply_rules, capture

aten = torch.ops.aten


class ReluTwice(nn.Module):
    def forward(self, x, y):
        return torch.relu(torch.relu(x)), torch.relu(torch.relu(y) + 1)


def _relu_of_relu(node):
    if node.target is aten.relu.default and getattr(node.args[0], "target", None) is aten.relu.default:
        return {"inner": node.args[0]}
    return None


def _only_single_use(gm, node, match):
    return None if len(match["inner"].users) == 1 else "inner relu has other users"


RULE = RewriteRule("relu_idempotent", _relu_of_relu, lambda gm, node, m: m["inner"], _only_single_use)


def test_rule_replaces_pattern_and_keeps_values():
    gm = capture(ReluTwice(), (torch.randn(5), torch.randn(5)))
    x, y = torch.randn(5), torch.randn(5)
    expected = gm(x, y)
    report = apply_rules(gm, [RULE])
    assert report.applied == [("relu_idempotent", "relu_1")]
    relus = list(gm.graph.find_nodes(op="call_function", target=aten.relu.default))
    assert len(relus) == 3  # relu(relu(y) + 1) is not the pattern
    for got, want in zip(gm(x, y), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_check_reason_is_recorded_and_rule_skipped():
    class Shared(nn.Module):
        def forward(self, x):
            inner = torch.relu(x)
            return torch.relu(inner), inner * 2

    gm = capture(Shared(), (torch.randn(4),))
    report = apply_rules(gm, [RULE])
    assert not report.applied
    assert report.skipped == [("relu_idempotent", "relu_1", "inner relu has other users")]


@dataclass(frozen=True)
class ReluPass(RuleTablePass):
    name = "relu_idempotent"

    def rules(self):
        return [RULE]


def test_rule_table_pass_reports_modified():
    gm = capture(ReluTwice(), (torch.randn(5), torch.randn(5)))
    assert ReluPass().call(gm).modified
    assert not ReluPass().call(gm).modified

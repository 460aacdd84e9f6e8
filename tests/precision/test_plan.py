"""PrecisionPlan / LayerPrecision: parsing, lookup precedence, JSON, table, validation errors."""

import pytest
import torch

from torchmerge.graph import capture
from torchmerge.precision.plan import LayerPrecision, PlanError, PrecisionPlan, module_paths, op_kind

from ..graph.models import mlp


@pytest.fixture(scope="module")
def gm():
    return capture(mlp(), (torch.randn(2, 16),))


@pytest.mark.parametrize("text,expected", [
    ("fp32", LayerPrecision("fp32")), ("BF16", LayerPrecision("bf16")), ("int8", LayerPrecision("int8")),
    ("lmul(4)", LayerPrecision("lmul", m=4, l=3)), ("lmul(m=2, l=5)", LayerPrecision("lmul", m=2, l=5)),
    ("lmul(8)", LayerPrecision("lmul", m=8, l=4)), ("lut(4)", LayerPrecision("lut", bits=4, group=32)),
    ("lut(bits=2,group=64)", LayerPrecision("lut", bits=2, group=64)),
])
def test_parse_and_str_round_trip(text, expected):
    prec = LayerPrecision.parse(text)
    assert prec == expected and LayerPrecision.parse(str(prec)) == prec


@pytest.mark.parametrize("text,needle", [
    ("int4", "valid: fp32, bf16, int8, lmul(m,l), lut(bits,group)"), ("lmul(m=40)", "0..23"),
    ("lut(5)", "one of 1, 2, 3, 4"), ("lut(4, 6)", "multiple of 4"), ("lmul(q=1)", "valid for lmul: m, l"),
])
def test_bad_precision_strings(text, needle):
    with pytest.raises(PlanError) as info:
        LayerPrecision.parse(text)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_uniform_covers_supported_nodes_only(gm):
    plan = PrecisionPlan.uniform(gm, "int8")
    resolved = plan.resolve(gm)
    assert set(resolved) == {"addmm", "addmm_1", "addmm_2", "gelu"}  # relu has no int8 form
    assert set(PrecisionPlan.uniform(gm, "lut(4,32)").resolve(gm)) == {"addmm", "addmm_1", "addmm_2"}
    assert PrecisionPlan.uniform(gm, "lmul(4)", kinds=["matmul"]).resolve(gm) == {}


def test_precedence_node_over_module_over_kind_over_star(gm):
    plan = PrecisionPlan({"*": "bf16", "@linear": "int8", "2": "lut(4)", "addmm_2": "fp32"})
    resolved = {k: str(v) for k, v in plan.resolve(gm).items()}
    assert resolved == {"addmm": "int8", "gelu": "bf16", "addmm_1": "lut(bits=4,group=32)", "addmm_2": "fp32"}
    assert module_paths(gm.graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default)[1]) == ["2"]


def test_json_round_trip_and_immutability(gm):
    plan = PrecisionPlan({"0": "int8", "addmm_2": "lmul(m=3,l=3)", "@gelu": "bf16"})
    again = PrecisionPlan.from_json(plan.to_json())
    assert again == plan and hash(again) == hash(plan)
    with pytest.raises(TypeError):
        plan.entries["x"] = LayerPrecision("fp32")
    assert plan.updated({"0": "fp32"}).entries["0"].kind == "fp32" and plan.entries["0"].kind == "int8"


def test_table_is_printable(gm):
    text = PrecisionPlan.uniform(gm, "int8").table(gm)
    lines = text.splitlines()
    assert lines[0].split() == ["node", "kind", "precision"] and len(lines) == 2 + 4
    assert "addmm_1  linear  int8" in text
    assert "*" in str(PrecisionPlan({"*": "fp32"}))


def test_missing_node_lists_valid_choices(gm):
    with pytest.raises(PlanError) as info:
        PrecisionPlan({"encoder.layer.9": "int8"}).validate(gm)
    message = str(info.value)
    assert "'encoder.layer.9'" in message and "valid:" in message and "addmm_1" in message and "\n" not in message


def test_unsupported_pair_names_node_and_valid_precisions(gm):
    with pytest.raises(PlanError) as info:
        PrecisionPlan({"relu": "int8"}).validate(gm)
    assert str(info.value) == "plan key 'relu': node 'relu' (relu.default) cannot run in int8; valid precisions: fp32"
    with pytest.raises(PlanError, match=r"plan key 'gelu'.*cannot run in lut\(bits=4,group=32\); valid precisions: fp32, bf16, int8$"):
        PrecisionPlan({"gelu": "lut(4)"}).validate(gm)
    with pytest.raises(PlanError, match=r"plan key '@conv': conv cannot run in lmul"):
        PrecisionPlan({"@conv": "lmul(4)"}).validate(gm)
    with pytest.raises(PlanError, match=r"unknown op kind; valid: @linear, @matmul"):
        PrecisionPlan({"@attention": "int8"}).validate(gm)
    with pytest.raises(PlanError, match=r"^plan key 'addmm': precision 'int3' is unknown"):
        PrecisionPlan({"addmm": "int3"})


def test_op_kinds(gm):
    kinds = {n.name: op_kind(n) for n in gm.graph.nodes if op_kind(n)}
    assert kinds == {"addmm": "linear", "addmm_1": "linear", "addmm_2": "linear", "gelu": "gelu"}

"""PassPipeline: meta repair, failure messages naming pass and node, stage dumps, uuid behaviour."""

import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch

from torchmerge.graph import GraphPass, NodeError, PassError, PassPipeline, PassResult, PipelineOptions, capture
from torchmerge.passes import FoldConstants

from .models import mlp

aten = torch.ops.aten


@dataclass(frozen=True)
class DoubleRelu(GraphPass):
    """Inserts relu after every relu, without meta (the pipeline must fill it)."""

    name = "double_relu"

    def call(self, gm):
        for node in list(gm.graph.find_nodes(op="call_function", target=aten.relu.default)):
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(aten.relu.default, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
        return PassResult(gm, True)


@dataclass(frozen=True)
class BadMatmul(GraphPass):
    """Multiplies the relu output by a wrongly shaped matrix: fake propagation must fail on that node."""

    name = "bad_matmul"

    def call(self, gm):
        relu = next(iter(gm.graph.find_nodes(op="call_function", target=aten.relu.default)))
        gm.register_buffer("junk", torch.randn(3, 3))
        with gm.graph.inserting_after(relu):
            junk = gm.graph.get_attr("junk")
        with gm.graph.inserting_after(junk):
            bad = gm.graph.call_function(aten.mm.default, (relu, junk))
        relu.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
        return PassResult(gm, True)


@dataclass(frozen=True)
class Refuses(GraphPass):
    name = "refuses"

    def call(self, gm):
        raise NodeError(next(iter(gm.graph.find_nodes(op="placeholder"))), "cannot handle this input")


def _gm():
    return capture(mlp(), (torch.randn(4, 16),))


def test_pipeline_fills_meta_of_new_nodes_and_reports_modified():
    gm = _gm()
    x = torch.randn(4, 16)
    expected = gm(x)[0]
    result = PassPipeline([DoubleRelu()])(gm)
    assert result.modified
    relus = list(result.gm.graph.find_nodes(op="call_function", target=aten.relu.default))
    assert len(relus) == 2 and all(isinstance(n.meta["val"], torch.Tensor) for n in relus)
    torch.testing.assert_close(result.gm(x)[0], expected, rtol=0, atol=0)


def test_failure_names_pass_and_node():
    with pytest.raises(PassError) as info:
        PassPipeline([FoldConstants(), BadMatmul()])(_gm())
    message = str(info.value)
    assert "\n" not in message
    assert info.value.pass_name == "bad_matmul" and info.value.node.startswith("mm")
    assert "pass 'bad_matmul'" in message and f"node '{info.value.node}'" in message and "[3, 3]" in message


def test_node_error_from_pass_names_node():
    with pytest.raises(PassError, match=r"pass 'refuses' failed at node 'input': cannot handle this input"):
        PassPipeline([Refuses()])(_gm())


def test_stage_dumping(tmp_path):
    PassPipeline([FoldConstants(), DoubleRelu()], PipelineOptions(dump_dir=tmp_path))(_gm())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["00_input.py", "01_fold_constants.py", "02_double_relu.py"]
    text = (tmp_path / "01_fold_constants.py").read_text()
    assert text.startswith("# stage: fold_constants (modified=True)") and "def forward" in text
    assert "aten.permute" in (tmp_path / "00_input.py").read_text() and "aten.permute" not in text


def test_uuid_stable_across_processes_and_sensitive_to_options():
    code = "from torchmerge.passes import FoldConstants; print(FoldConstants().uuid())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == FoldConstants().uuid()
    assert FoldConstants(ops=frozenset({aten.add})).uuid() != FoldConstants().uuid()
    assert PassPipeline([FoldConstants()]).uuid() != PassPipeline([FoldConstants(), DoubleRelu()]).uuid()


@dataclass(frozen=True)
class UseBeforeDef(GraphPass):
    """Moves the output's producer after the output: the pipeline must name the node that breaks order."""

    name = "use_before_def"

    def call(self, gm):
        relu = next(iter(gm.graph.find_nodes(op="call_function", target=aten.relu.default)))
        gm.graph.output_node().append(relu)  # relu now comes after its users
        return PassResult(gm, True)


def test_topological_violation_names_the_user_node():
    with pytest.raises(PassError) as info:
        PassPipeline([UseBeforeDef()])(_gm())
    assert info.value.pass_name == "use_before_def" and info.value.node != "<unknown>"
    assert "used before it is defined" in str(info.value)

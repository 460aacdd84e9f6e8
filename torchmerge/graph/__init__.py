"""torchmerge.graph: capture a model as an ATen GraphModule and run verified pass pipelines over it."""

from .capture import CaptureError, capture
from .pass_base import GraphPass, NodeError, PassResult
from .pipeline import PassError, PassPipeline, PipelineOptions
from .rewrite import RewriteRule, RuleReport, RuleTablePass, apply_rules

__all__ = ["capture", "CaptureError", "GraphPass", "PassResult", "NodeError", "PassPipeline", "PipelineOptions",
           "PassError", "RewriteRule", "RuleReport", "RuleTablePass", "apply_rules"]

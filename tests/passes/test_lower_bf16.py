"""LowerBF16: planned nodes compute in bfloat16, the graph's interface stays fp32."""

import torch

from torchmerge.graph import PassPipeline, capture
from torchmerge.passes import DeadCodeElimination, FoldConstants
from torchmerge.passes.lower_bf16 import LowerBF16
from torchmerge.precision.plan import PrecisionPlan

from ..graph.models import mlp


def test_bf16_on_linear_layers_only():
    model, x = mlp(), torch.randn(4, 16)
    gm = capture(model, (x,))
    plan = PrecisionPlan.uniform(gm, "bf16", kinds=["linear"])
    PassPipeline([FoldConstants(), LowerBF16(plan), FoldConstants(), DeadCodeElimination()])(gm)
    addmms = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default)
    assert len(addmms) == 3 and all(n.meta["val"].dtype == torch.bfloat16 for n in addmms)
    assert all(getattr(gm, n.args[2].target).dtype == torch.bfloat16 for n in addmms)  # weight casts folded
    gelu = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.gelu.default)[0]
    assert gelu.meta["val"].dtype == torch.float32
    out = gm(x)[0]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x), rtol=0.05, atol=0.05)

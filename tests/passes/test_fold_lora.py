"""FoldLoRA: several run-time LoRA adapters fold into the base weight (W + Σ s·B·A)."""

import torch

from torchmerge.graph import PassPipeline, capture
from torchmerge.passes import DeadCodeElimination, FoldConstants, FoldLoRA

from ..graph.models import lora_model

aten = torch.ops.aten


def _matmuls(gm):
    return [n for n in gm.graph.nodes if n.target in (aten.mm.default, aten.addmm.default)]


def test_lora_adapters_fold_into_one_matmul_per_layer():
    model, x = lora_model(), torch.randn(2, 5, 8)  # 3-D input: views around the matmuls
    gm = capture(model, (x,))
    assert len(_matmuls(gm)) == 2 + 2 * 3
    result = PassPipeline([FoldLoRA(), FoldConstants(), DeadCodeElimination()])(gm)
    assert result.modified and len(_matmuls(gm)) == 2
    weights = sorted((getattr(gm, n.args[-1].target) for n in _matmuls(gm)), key=lambda w: w.shape)
    expected = sorted((model[0].merged_weight().t(), model[2].merged_weight().t()), key=lambda w: w.shape)
    for got, want in zip(weights, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], model(x), rtol=1e-5, atol=1e-5)


def test_no_lora_no_change():
    gm = capture(torch.nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    assert not FoldLoRA().call(gm).modified

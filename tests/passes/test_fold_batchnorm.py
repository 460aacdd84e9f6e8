"""FoldBatchNorm against torch's own conv/linear-BN fusion, and on a CNN end to end."""

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from torchmerge.graph import PassPipeline, capture
from torchmerge.passes import DeadCodeElimination, FoldBatchNorm, FoldConstants

from ..graph.models import cnn

BN = torch.ops.aten._native_batch_norm_legit_no_training.default


def test_cnn_batchnorms_fold_and_match_torch_fusion():
    model, x = cnn(), torch.randn(2, 3, 8, 8)
    gm = capture(model, (x,))
    assert len(gm.graph.find_nodes(op="call_function", target=BN)) == 3
    result = PassPipeline([FoldBatchNorm(), FoldConstants(), DeadCodeElimination()])(gm)
    assert result.modified and not gm.graph.find_nodes(op="call_function", target=BN)
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0], model(x), rtol=1e-5, atol=1e-5)
    fused = fuse_conv_bn_eval(model.conv1, model.bn1)
    convs = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.convolution.default)
    first = getattr(gm, convs[0].args[1].target)
    torch.testing.assert_close(first, fused.weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(getattr(gm, convs[0].args[2].target), fused.bias, rtol=1e-6, atol=1e-6)
    fused_head = fuse_linear_bn_eval(model.head, model.bn3)
    addmm = gm.graph.find_nodes(op="call_function", target=torch.ops.aten.addmm.default)[0]
    torch.testing.assert_close(getattr(gm, addmm.args[2].target), fused_head.weight.t(), rtol=1e-6, atol=1e-6)


def test_batchnorm_after_relu_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    gm = capture(model, (torch.randn(1, 3, 4, 4),))
    assert not FoldBatchNorm().call(gm).modified
    assert len(gm.graph.find_nodes(op="call_function", target=BN)) == 1

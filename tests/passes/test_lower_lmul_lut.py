"""LowerLMul / LowerLUT on tiny graphs, checked against the ops' pure-PyTorch references."""

import inspect

import pytest
import torch
import torch.nn as nn

from torchmerge.graph import NodeError, PassError, PassPipeline, capture
from torchmerge.passes import DeadCodeElimination, FoldConstants
from torchmerge.passes.lower_lmul import LowerLMul
from torchmerge.passes.lower_lut import LowerLUT
from torchmerge.precision.plan import PrecisionPlan

ops = pytest.importorskip("torchmerge.ops")


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 8)

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2))
        return self.proj(torch.matmul(scores.softmax(-1), v))


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_lmul_linear_and_bmm_match_reference():
    model = Attention().eval()
    q, k, v = (torch.randn(2, 5, 8) for _ in range(3))
    gm = capture(model, (q, k, v))
    plan = PrecisionPlan({"@matmul": "lmul(4)", "@linear": "lmul(m=3,l=3)"})
    PassPipeline([FoldConstants(), LowerLMul(plan), DeadCodeElimination()])(gm)
    targets = _targets(gm)
    assert "aten.bmm.default" not in targets and "aten.addmm.default" not in targets
    assert targets.count("torchmerge.lmul.default") == 2 and targets.count("torchmerge.lmul_matmul.default") == 1
    ref = ops.reference
    scores = (ref.lmul(q.unsqueeze(-1), k.transpose(-1, -2).unsqueeze(-3), 4, 3)).sum(-2)
    context = ref.lmul(scores.softmax(-1).unsqueeze(-1), v.unsqueeze(-3), 4, 3).sum(-2)
    expected = ref.lmul_matmul(context.reshape(-1, 8), model.proj.weight.t().contiguous(), 3, 3) + model.proj.bias
    torch.testing.assert_close(gm(q, k, v)[0], expected.reshape(2, 5, 8), rtol=1e-5, atol=1e-5)


def test_lut_packs_once_and_matches_dequantised_matmul():
    from torchmerge.ops.lut_pack import dequantize_lut_weights

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8)).eval(), torch.randn(3, 64)
    gm = capture(model, (x,))
    plan = PrecisionPlan({"0": "lut(4,32)"})  # 16 inputs of the second layer don't divide 32: left alone
    PassPipeline([FoldConstants(), LowerLUT(plan), DeadCodeElimination()])(gm)
    lut = gm.graph.find_nodes(op="call_function", target=torch.ops.torchmerge.lut_linear.default)
    assert len(lut) == 1 and "aten.addmm.default" in _targets(gm)
    qweight, scales, zeros = (getattr(gm, a.target) for a in lut[0].args[1:4])
    assert qweight.dtype == torch.uint8  # packed at compile time, a constant
    n_arg = [16] if "out_features" in inspect.signature(dequantize_lut_weights).parameters else []
    w = dequantize_lut_weights(qweight, scales, zeros, *n_arg, 4, 32)
    assert (w - model[0].weight).abs().max() < 0.15 * model[0].weight.abs().max()  # 4 bits: ~1/15 of a range
    hidden = torch.relu(x @ w.t() + model[0].bias)
    torch.testing.assert_close(gm(x)[0], model[2](hidden), rtol=1e-4, atol=1e-4)


def test_lut_group_that_does_not_divide_is_a_named_error():
    model = nn.Sequential(nn.Linear(40, 4)).eval()
    gm = capture(model, (torch.randn(2, 40),))
    with pytest.raises(PassError, match=r"pass 'lower_lut' failed at node 'addmm': lut\(bits=4,group=32\) needs "
                                        r"in_features divisible by group 32, got 40"):
        PassPipeline([FoldConstants(), LowerLUT(PrecisionPlan({"addmm": "lut(4)"}))])(gm)
    assert issubclass(NodeError, RuntimeError)


class SharedInput(nn.Module):
    """Three linears reading one input (like Q, K, V) and one reading their sum."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.k, self.v, self.out = nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(64, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.out(self.q(x) + self.k(x) * self.v(x))


def _outlier_batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 16, 64, generator=g) * (1 + 20 * (torch.arange(64) % 16 == 3))  # salient channels


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_lut_calibration_lowers_output_error_and_shares_one_scale(method):
    """Calibrated on one batch (AWQ scales + output-error grids, GPTQ codes), measured on another."""
    model, cal, held_out = SharedInput().eval(), _outlier_batch(1), _outlier_batch(2)
    plan = PrecisionPlan({"@linear": "lut(4,32)"})
    errors = {}
    for calibration in ((), ((cal,),)):
        gm = capture(model, (cal,))
        lut = LowerLUT(plan, calibration=calibration, method=method)
        PassPipeline([FoldConstants(), lut, DeadCodeElimination()])(gm)
        targets = _targets(gm)
        assert targets.count("torchmerge.lut_linear.default") == 4
        assert targets.count("aten.mul.Tensor") == 1 + (2 if calibration else 0)  # k*v, one x/s per input
        with torch.no_grad():
            errors[bool(calibration)] = (gm(held_out)[0] - model(held_out)).pow(2).mean().item()
    assert errors[True] < 0.7 * errors[False], errors
    assert LowerLUT(plan, calibration=((cal,),)).uuid() != LowerLUT(plan, calibration=((held_out,),)).uuid()
    assert LowerLUT(plan, calibration=((cal,),)).uuid() == LowerLUT(plan, calibration=((cal.clone(),),)).uuid()


def test_lut_calibration_method_is_checked():
    with pytest.raises(ValueError, match=r"lower_lut: method='fast'; valid: gptq, awq"):
        LowerLUT(PrecisionPlan({"@linear": "lut(4)"}), method="fast")

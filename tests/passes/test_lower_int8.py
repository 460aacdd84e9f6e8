"""LowerInt8 (integer-only, I-ViT) on tiny graphs against hand formulas; compiled vs eager; all-MiniLM-L6-v2."""

import copy
import math

import pytest
import torch
import torch.nn as nn

from torchmerge.graph import PassError, PassPipeline, capture
from torchmerge.passes import DeadCodeElimination, FoldConstants
from torchmerge.passes.calibrate import Calibrate, CalibrationData
from torchmerge.passes.lower_int8 import LowerInt8
from torchmerge.precision.plan import PrecisionPlan

from ..backends.test_minilm_accuracy import SENTENCES, _pool, load_minilm
from ..graph.models import BertHidden, mlp, tiny_bert

ops = pytest.importorskip("torchmerge.ops")
INT8 = PrecisionPlan({"*": "int8"})
M8, M16 = LowerInt8.int8_margin, LowerInt8.int16_margin  # scales cover margin × the calibrated range


def _lower(model, inputs, plan=INT8, calibration=None, **kw):
    gm = capture(model, inputs)
    PassPipeline([FoldConstants(), Calibrate((calibration or inputs,)), LowerInt8(plan, **kw), FoldConstants(),
                  DeadCodeElimination()])(gm)
    return gm


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


class Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def _q(x, amax, qmax):
    """Boundary quantisation as the graph does it: float32 x times 1/scale, rounded half to even, clamped."""
    return torch.round(x * (1.0 / (amax / qmax))).clamp(-qmax - 1, qmax).double()


def test_linear_is_int8_per_channel_weights_per_tensor_activations():
    torch.manual_seed(0)
    lin, x = nn.Linear(24, 8).eval(), torch.randn(5, 24)
    gm = _lower(lin, (x,), smooth_alpha=None)
    assert "torchmerge.int8_linear.default" in _targets(gm) and "aten.addmm.default" not in _targets(gm)
    y = lin(x).detach()
    # formula: x int8 per tensor, W int8 per output channel, int32 acc + bias, one int16 output scale
    xs = M8 * x.abs().max().item() / 127
    ws = lin.weight.detach().abs().amax(1).double() / 127
    wq = torch.round(lin.weight.detach().double() / ws[:, None])
    acc = _q(x, M8 * x.abs().max().item(), 127) @ wq.t() + torch.round(lin.bias.detach().double() / (xs * ws))
    out_scale = M16 * y.abs().max().item() / 32767
    expected = torch.round(acc * xs * ws / out_scale).clamp(-32768, 32767) * out_scale
    torch.testing.assert_close(gm(x)[0].double(), expected, rtol=0, atol=1.01 * out_scale)


def test_smoothing_tames_an_outlier_channel():
    torch.manual_seed(0)
    lin, x = nn.Linear(32, 16).eval(), torch.randn(64, 32)
    x[:, 3] *= 60  # one outlier channel, as in BERT's hidden states
    y = lin(x).detach()
    errors = {a: (_lower(lin, (x,), smooth_alpha=a)(x)[0] - y).abs().mean().item() for a in (None, 0.8)}
    assert errors[0.8] < 0.5 * errors[None]


def test_bmm_products_are_exact_integer_accumulations():
    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 16), torch.randn(3, 16, 5)
    gm = _lower(Fn(torch.bmm), (a, b))
    sa, sb = M8 * a.abs().max().item(), M8 * b.abs().max().item()
    expected = (_q(a, sa, 127) @ _q(b, sb, 127)) * (sa / 127) * (sb / 127)
    torch.testing.assert_close(gm(a, b)[0].double(), expected, rtol=1e-6, atol=1e-9)


def test_softmax_is_shiftmax_on_int16_logits():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 9) * 3
    gm = _lower(Fn(lambda t: torch.softmax(t, -1)), (x,))
    assert "torchmerge.shiftmax.default" in _targets(gm)
    out = gm(x)[0]
    assert set((out * 128).round().unique().tolist()) <= set(range(128))  # int8 probabilities, scale 2^-7
    assert (out - torch.softmax(x, -1)).abs().max() < 0.025  # shiftmax's documented max error ≈ 0.02


@pytest.mark.parametrize("gelu", ["poly", "shift"])
def test_gelu_integer_forms_track_erf_gelu(gelu):
    x = torch.linspace(-6, 6, 1201).reshape(1, -1)
    gm = _lower(Fn(nn.functional.gelu), (x,), gelu=gelu)
    assert f"torchmerge.{'i_gelu' if gelu == 'poly' else 'shift_gelu'}.default" in _targets(gm)
    err = (gm(x)[0] - nn.functional.gelu(x)).abs().max().item()
    assert err < (0.03 if gelu == "poly" else 0.03)  # I-BERT erf polynomial; x·σ(1.702x) differs by ≤ 0.02


def test_layernorm_is_i_layernorm():
    torch.manual_seed(0)
    ln, x = nn.LayerNorm(64).eval(), torch.randn(6, 64) * 2 + 0.5
    ln.weight.data.uniform_(0.5, 1.5), ln.bias.data.uniform_(-0.5, 0.5)
    gm = _lower(ln, (x,))
    assert "torchmerge.i_layernorm.default" in _targets(gm) and "aten.native_layer_norm.default" not in _targets(gm)
    y = ln(x).detach()
    out_step = M16 * y.abs().max().item() / 32767  # int16 output (a float consumer reads it)
    assert (gm(x)[0] - y).abs().max().item() < 2e-3 + 2 * out_step


def test_residual_stream_stays_integer_between_integer_ops():
    model = BertHidden(tiny_bert())
    ids, mask = torch.randint(0, 64, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    gm = _lower(model, (ids, mask))
    targets = _targets(gm)
    assert not {"aten.addmm.default", "aten._softmax.default", "aten.gelu.default",
                "aten.native_layer_norm.default"} & set(targets)
    float_adds = [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor and n.meta["val"].is_floating_point()]
    assert len(float_adds) == 2  # the embedding sums before the first LayerNorm; residual adds are integer
    assert targets.count("aten.where.ScalarOther") == 2  # additive attention mask → where(mask == 0, x, qmin)


def test_missing_calibration_is_a_named_error():
    gm = capture(nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    with pytest.raises(PassError, match="pass 'lower_int8' failed at node 'addmm': int8 needs activation ranges"):
        PassPipeline([LowerInt8(INT8)])(gm)


# -- through the torchmerge backend ---------------------------------------------------------------------

@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model, inner, **options):
    return torch.compile(model, backend="torchmerge", options={"plan": INT8, "inner": inner, **options})


def test_attention_stays_integer_including_the_fully_masked_row_guard():
    """SDPA's guard `(scores + mask) == -inf` must not keep a float copy of the scores: both attention
    products are int8_bmm, and no float tensor of the scores' [batch, heads, q, k] shape is left."""
    model = BertHidden(tiny_bert())
    ids, mask = torch.randint(0, 64, (3, 10)), torch.ones(3, 10, dtype=torch.long)
    mask[1, 7:] = 0
    gm = _lower(model, (ids, mask))
    targets = _targets(gm)
    layers = targets.count("torchmerge.int8_bmm.default") // 2
    assert layers >= 1 and targets.count("torchmerge.int8_bmm.default") == 2 * layers
    assert "aten.bmm.default" not in targets
    scores_shaped_floats = [n for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)
                            and n.meta["val"].is_floating_point() and n.meta["val"].dim() == 4 and n.meta["val"].shape[1] > 1]
    assert not scores_shaped_floats, [n.name for n in scores_shaped_floats]


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_fully_padded_sequence_matches_eager(fresh_dynamo, inner):
    """A sequence whose attention mask is all zero: SDPA zeroes its attention rows; so must the integer graph."""
    model = BertHidden(tiny_bert())
    ids, mask = torch.randint(0, 64, (4, 12)), torch.ones(4, 12, dtype=torch.long)
    mask[2] = 0
    with torch.no_grad():
        out, ref = _compiled(model, inner)(ids, mask), model(ids, mask)
    assert _cos_min(out, ref) > 0.999
    assert _cos_min(out[2:3], ref[2:3]) > 0.999


def test_tiny_bert_int8_dynamic_shapes(fresh_dynamo):
    model = BertHidden(tiny_bert())
    compiled = torch.compile(model, backend="torchmerge", options={"plan": INT8, "inner": "inductor"}, dynamic=True)
    with torch.no_grad():
        for batch, length in ((4, 12), (3, 9)):
            ids, mask = torch.randint(0, 64, (batch, length)), torch.ones(batch, length, dtype=torch.long)
            mask[0, length - 2:] = 0
            assert _cos_min(compiled(ids, mask), model(ids, mask)) > 0.999


def _cos_min(a, b):
    return nn.functional.cosine_similarity(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), dim=-1).min().item()


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_mlp_compiled_int8_vs_eager(fresh_dynamo, inner):
    model, x = mlp(), torch.randn(64, 16)
    with torch.no_grad():
        out, ref = _compiled(model, inner)(x), model(x)
    assert (out - ref).abs().max() <= 0.03 * ref.abs().max()
    assert _cos_min(out, ref) > 0.999


@pytest.mark.parametrize("inner", ["eager", "inductor"])
def test_tiny_bert_compiled_int8_vs_eager(fresh_dynamo, inner):
    model = BertHidden(tiny_bert())
    ids, mask = torch.randint(0, 64, (4, 12)), torch.ones(4, 12, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        out, ref = _compiled(model, inner)(ids, mask), model(ids, mask)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
    assert _cos_min(out, ref) > 0.999


def test_backend_calibration_option_is_used(fresh_dynamo):
    """CalibrationData compares by identity, so two live compiles with tensors in their options coexist."""
    model, x = mlp(), torch.randn(8, 16)
    with torch.no_grad():
        narrow = _compiled(model, "eager", calibration=CalibrationData([(x * 0.01,)]))(x)
        wide = _compiled(model, "eager", calibration=CalibrationData([(x,)]))(x)  # no dynamo reset in between
        ref = model(x)
    assert (wide - ref).abs().max() < (narrow - ref).abs().max()  # ranges from 1% inputs clip the real ones


def test_torchmerge_compile_takes_calibration(fresh_dynamo):
    import torchmerge

    model, x = mlp(), torch.randn(8, 16)
    with torch.no_grad():
        narrow = torchmerge.compile(model, plan=INT8, calibration=[(x * 0.01,)], inner="eager")(x)
        wide = torchmerge.compile(model, plan=INT8, calibration=[(x,)], inner="eager")(x)
        again = torchmerge.compile(model, plan=INT8, calibration=CalibrationData([x]), inner="eager")(x)
        ref = model(x)
    assert (wide - ref).abs().max() < (narrow - ref).abs().max()
    torch.testing.assert_close(again, wide, rtol=0, atol=0)  # one tensor is a one-input batch


def test_calibration_data_is_compared_by_identity():
    x = torch.randn(4, 3)
    a, b = CalibrationData([(x,)]), CalibrationData([(x,)])
    assert a == a and a != b and {a: 1}[a] == 1 and hash(a) != hash(b)
    assert {"calibration": a} != {"calibration": b}  # what dynamo does with options dicts; tensors would raise
    assert list(a) == [(x,)] and len(a) == 1 and CalibrationData(a).batches is a.batches
    assert "(4, 3)" in repr(a) and a.digest() == CalibrationData([[x]]).digest()
    with pytest.raises(ValueError, match="no batches"):
        CalibrationData([])
    with pytest.raises(TypeError, match="not one tensor"):
        CalibrationData(x)


def test_margins_widen_int16_and_int8_scales():
    lin, x = nn.Linear(24, 8).eval(), torch.randn(5, 24)
    with torch.no_grad():
        y = lin(x)
        big = x * 1.2  # 20% beyond the calibrated range
        exact = _lower(lin, (x,), smooth_alpha=None, int8_margin=1.0, int16_margin=1.0)
        wide = _lower(lin, (x,), smooth_alpha=None)
        assert (wide(big)[0] - lin(big)).abs().max() < 0.5 * (exact(big)[0] - lin(big)).abs().max()
        assert (wide(x)[0] - y).abs().max() < 0.05 * y.abs().max()
    with pytest.raises(PassError, match="margins must be ≥ 1"):
        _lower(lin, (x,), int8_margin=0.5)


# -- all-MiniLM-L6-v2 -----------------------------------------------------------------------------------

# Calibration sentences for the held-out case: varied, disjoint from the evaluated SENTENCES[:32].
HELD_OUT = [
    "The river flooded the valley after weeks of heavy rain.", "Our quarterly revenue beat every analyst forecast.",
    "He has played the cello in a string quartet for years.", "Preheat the oven to 200 degrees before baking.",
    "The weather satellite transmits fresh data every hour.", "She adopted a shy rescue dog from the local shelter.",
    "Unit tests caught the regression two days before release.", "The glacier has retreated several kilometres.",
    "Tickets for the cup final sold out within minutes.", "Neurons communicate through electrical and chemical signals.",
    "The mayor announced a network of protected bike lanes.", "A gentle breeze rustled the yellow autumn leaves.",
    "Why did the database query time out under load?", "Medieval castles were built to withstand long sieges.",
    "Can you recommend a quiet Italian restaurant downtown?", "The startup raised seed funding from angel investors.",
    "Coral reefs are bleaching as the oceans warm.", "The poet read aloud from her latest collection.",
    "Remember to back up your photos before the update.", "The hikers reached the summit just after dawn.",
    "Inflation slowed for the third consecutive month.", "The grandmaster sacrificed her queen on move twenty.",
    "Bees pollinate a large share of the crops we eat.", "Today's lecture covered the basics of thermodynamics.",
    "A power outage left the whole town in darkness.", "The chef garnished the soup with fresh basil.",
    "How long does it take to become fluent in Japanese?", "The archive holds letters written during the civil war.",
    "Self-driving cars rely on lidar, radar and cameras.", "The toddler giggled all through the puppet show.",
    "Sea levels are projected to rise throughout this century.", "The merger still needs approval from regulators.",
    "My neighbour restores vintage motorcycles in his garage.", "Lightning struck the old oak tree behind the barn.",
]


@pytest.fixture(scope="module")
def minilm_model():
    tokenizer, model = load_minilm()

    class Pooled(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return _pool(self.inner(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask)

    return Pooled(model), tokenizer


def _batch(tokenizer, sentences, length=32):
    b = tokenizer(sentences, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


@pytest.mark.slow
@pytest.mark.parametrize("calibrate_on, evaluate_on", [("SENTENCES", "SENTENCES"), ("HELD_OUT", "SENTENCES"),
                                                       ("SENTENCES", "HELD_OUT")])
def test_minilm_integer_only_min_cosine(fresh_dynamo, minilm_model, calibrate_on, evaluate_on):
    """Issue target: min cosine ≥ 0.99 of mean-pooled embeddings to fp32 under the integer-only plan, also when
    the activation ranges come from 32 other sentences (held out: the calibration never saw the evaluated ones).
    Measured (inductor): same batch 0.994, held out 0.992 either way (eager figures within ±0.001)."""
    model, tokenizer = minilm_model
    sentences = {"SENTENCES": SENTENCES[:32], "HELD_OUT": HELD_OUT[:32]}
    assert len(set(sentences[calibrate_on])) == len(set(sentences[evaluate_on])) == 32
    assert calibrate_on == evaluate_on or not set(sentences[calibrate_on]) & set(sentences[evaluate_on])
    inputs = _batch(tokenizer, sentences[evaluate_on])
    calibration = CalibrationData([_batch(tokenizer, sentences[calibrate_on])])
    with torch.no_grad():
        ref = model(*inputs)
        out = _compiled(copy.deepcopy(model), "inductor", calibration=calibration)(*inputs)
    cos = nn.functional.cosine_similarity(out, ref, dim=-1).min().item()
    print(f"MiniLM int8 integer-only, calibrated on {calibrate_on}, evaluated on {evaluate_on}: min cosine {cos:.4f}")
    assert math.isfinite(cos) and cos >= 0.99, f"min cosine {cos:.4f}"

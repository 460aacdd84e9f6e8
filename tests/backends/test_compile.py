"""torchmerge torch.compile backend: compiled vs eager, dynamic shapes, no graph breaks, options, cache key."""

import pytest
import torch

import torchmerge
from torchmerge.backends.compile import BackendOptionError, CompileOptions, build_pipeline, torchmerge_backend
from torchmerge.precision.plan import PrecisionPlan

from ..graph.models import BertHidden, cnn, lora_model, mlp, tiny_bert


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model, **options):
    return torch.compile(model, backend=torchmerge_backend, options=options, dynamic=True)


def test_mlp_inductor_dynamic_matches_eager():
    model = mlp()
    compiled = _compiled(model, inner="inductor")
    with torch.no_grad():
        for batch in (3, 8):
            x = torch.randn(batch, 16)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_cnn_with_batchnorm_eager_and_stages(tmp_path):
    model, x = cnn(), torch.randn(2, 3, 8, 8)
    compiled = _compiled(model, inner="eager", dump_dir=str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled(torch.randn(5, 3, 8, 8)).shape, torch.Size([5, 6]))
    final = sorted(tmp_path.iterdir())[-1].read_text()
    assert "batch_norm" not in final and "convolution" in final


def test_bert_encoder_fp32_plan_within_1e6():
    model = BertHidden(tiny_bert())
    ids = torch.randint(0, 64, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0
    compiled = _compiled(model, inner="eager", plan=PrecisionPlan({"*": "fp32"}))
    with torch.no_grad():
        diff = (compiled(ids, mask) - model(ids, mask)).abs().max().item()
    assert diff <= 1e-6


def test_lora_folds_inside_compile(tmp_path):
    model, x = lora_model(), torch.randn(3, 8)
    compiled = _compiled(model, inner="eager", dump_dir=str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    final = sorted(tmp_path.iterdir())[-1].read_text()
    assert final.count("aten.addmm") + final.count("aten.mm") == 2  # adapters folded away


def test_no_graph_breaks_and_one_backend_call():
    calls = []

    def counting(gm, example_inputs, **kw):
        calls.append(gm)
        return torchmerge_backend(gm, example_inputs, inner="eager", **kw)

    model, x = mlp(), torch.randn(4, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counting, dynamic=True, fullgraph=True)
    with torch.no_grad():
        compiled(x), compiled(torch.randn(7, 16))
    assert len(calls) == 1


def test_torchmerge_compile_convenience_with_plan():
    model, x = mlp(), torch.randn(4, 16)
    compiled = torchmerge.compile(model, plan=PrecisionPlan({"@linear": "bf16"}), inner="eager", dynamic=True)
    with torch.no_grad():
        out = compiled(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x), rtol=0.05, atol=0.05)
    assert (out - model(x)).abs().max() > 0  # bf16 really ran


def test_backend_name_resolves_when_installed():
    from importlib.metadata import entry_points

    if not [e for e in entry_points(group="torch_dynamo_backends") if e.name == "torchmerge"]:
        pytest.skip("torchmerge is not pip-installed (entry point not registered)")
    model, x = mlp(), torch.randn(2, 16)
    compiled = torch.compile(model, backend="torchmerge", options={"inner": "eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)


def test_bad_options_are_one_line():
    with pytest.raises(BackendOptionError) as err:
        CompileOptions.from_any({"plna": None})
    message = str(err.value)
    assert "\n" not in message and "unknown option 'plna'; valid: " in message
    assert {"plan", "passes", "inner", "dump_dir"} <= set(message.split("valid: ")[1].split(", "))
    with pytest.raises(BackendOptionError, match=r"inner='tvm'; valid: inductor, eager"):
        CompileOptions(inner="tvm")
    with pytest.raises(BackendOptionError, match=r"plan is a dict; valid: a torchmerge.precision.plan.PrecisionPlan"):
        CompileOptions(plan={"*": "int8"})


def test_pipeline_uuid_feeds_cache_key_and_tracks_plan():
    a = build_pipeline(CompileOptions()).uuid()
    assert a == build_pipeline(CompileOptions()).uuid()
    assert a != build_pipeline(CompileOptions(plan=PrecisionPlan({"*": "bf16"}))).uuid()
    assert build_pipeline(CompileOptions(plan=PrecisionPlan({"*": "bf16"}))).uuid() != \
        build_pipeline(CompileOptions(plan=PrecisionPlan({"@linear": "bf16"}))).uuid()

    from torch._inductor import config
    from torch._inductor.codecache import FxGraphHashDetails  # noqa: F401  (the key reads this config slot)

    from torchmerge.backends.compile import _PipelineIdentity

    with config.patch(post_grad_custom_post_pass=_PipelineIdentity(a)):
        assert config.post_grad_custom_post_pass.uuid() == ("torchmerge", a, None)


def test_native_ops_under_inductor_dynamic_without_graph_breaks():
    pytest.importorskip("torchmerge.ops")
    calls = []

    def counting(gm, example_inputs, **kw):
        calls.append(gm)
        return torchmerge_backend(gm, example_inputs, **kw)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).eval()
    plan = PrecisionPlan({"0": "lut(4,32)", "2": "lmul(4)"})
    compiled = torch.compile(model, backend=counting, options={"plan": plan, "inner": "inductor"}, dynamic=True,
                             fullgraph=True)
    with torch.no_grad():
        for batch in (3, 6):
            x = torch.randn(batch, 64)
            cosine = torch.nn.functional.cosine_similarity(compiled(x), model(x)).min().item()
            assert 0.98 < cosine < 1.0  # the lowered arithmetic ran (not fp32), and stayed accurate
    assert len(calls) == 1


def test_plan_errors_surface_through_compile_as_one_line():
    from torchmerge.precision.plan import PlanError

    model, x = mlp(), torch.randn(2, 16)
    compiled = torchmerge.compile(model, plan=PrecisionPlan({"decoder.9": "bf16"}), inner="eager")
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(x)
    cause = info.value
    while not isinstance(cause, PlanError) and (getattr(cause, "inner_exception", None) or cause.__cause__):
        cause = getattr(cause, "inner_exception", None) or cause.__cause__  # dynamo wraps backend errors
    assert isinstance(cause, PlanError) and "\n" not in str(cause)
    assert str(cause).startswith("plan key 'decoder.9' names no node or module of the graph; valid: ")


def test_precision_without_lowering_is_named(monkeypatch):
    from torchmerge.passes import lowering
    from torchmerge.precision.plan import PlanError

    monkeypatch.delitem(lowering.LOWERINGS, "lmul")  # as if no L-Mul lowering were registered
    with pytest.raises(PlanError, match=r"precision 'lmul' has no lowering registered; available: fp32"):
        lowering.lowering_passes(PrecisionPlan({"*": "lmul(4)"}))

"""MergeSpec: mergekit's YAML schema, validation messages, and parameter settings (gradients over
layers, substring filters) resolved exactly as mergekit 0.1.5 resolves them."""

from __future__ import annotations

import pytest
import torch
import yaml

from torchmerge.merge.base import MergeError
from torchmerge.merge.engine import run_merge
from torchmerge.merge.spec import Conditional, MergeSpec, evaluate_setting

from ._checkpoints import merge_methods, tiny_model, write_yaml  # noqa: F401

MODELS = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}


# ---- schema and messages ---------------------------------------------------------------------
@pytest.mark.parametrize("data,fragments", [
    ({"merge_method": "linear"}, ("exactly one of 'models' or 'slices'",)),
    ({**MODELS, "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}, ("exactly one of",)),
    ({**MODELS, "dtype": "int4"}, ("dtype", "'int4'", "valid: float32, float16, bfloat16")),
    ({**MODELS, "out_dtype": "fp8"}, ("out_dtype", "'fp8'", "valid:")),
    ({**MODELS, "tokenizer_source": "union"}, ("tokenizer_source", "'union'", "valid: 'base'")),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [4, 2]}]}]},
     ("slices.0.sources.0.layer_range", "[4, 2]", "0 <= start < end")),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "a", "layer_range": [0, 2]},
                                                             {"model": "b", "layer_range": [0, 3]}]}]},
     ("slices.0", "same number of layers")),
    ({**MODELS, "modules": {"m": {}}}, ("'modules'", "not supported")),
    ({**MODELS, "merge_methd": "ties"}, ("merge_methd",)),
    ({"models": [{"model": "a"}]}, ("merge_method",)),
    (["not", "a", "mapping"], ("expected a mapping",)),
])
def test_spec_errors_are_one_line(data, fragments):
    with pytest.raises(MergeError) as info:
        MergeSpec.from_dict(data, where="cfg.yaml")
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("cfg.yaml")
    for frag in fragments:
        assert frag in msg, msg


def test_invalid_yaml_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: a\n  - model: [b\n")
    with pytest.raises(MergeError, match=r"bad\.yaml: line \d+ is not valid YAML"):
        MergeSpec.from_yaml(cfg)


def test_dtype_aliases_and_frozen():
    spec = MergeSpec.from_dict({**MODELS, "dtype": "bf16", "out_dtype": "fp16"})
    assert (spec.dtype, spec.out_dtype) == ("bfloat16", "float16")
    with pytest.raises(Exception):
        spec.seed = 3  # type: ignore[misc]


def test_relative_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "cfg").mkdir()
    a = tiny_model(tmp_path / "cfg" / "a")
    cfg = write_yaml(tmp_path / "cfg" / "m.yaml", {"merge_method": "linear", "base_model": "a", "models": [
        {"model": "a"}, {"model": "a+lora"}, {"model": "org/remote-name"}]})
    spec = MergeSpec.from_yaml(cfg)
    assert spec.base_model == str(a)
    assert [m.model for m in spec.models] == [str(a), f"{a}+lora", "org/remote-name"]


def test_yaml_round_trip():
    data = {"merge_method": "ties", "base_model": "base", "models": [
        {"model": "a", "parameters": {"weight": [0.1, 0.9], "density": [{"filter": "mlp", "value": 0.5}, {"value": 0.7}]}},
        {"model": "b", "parameters": {"weight": 1}}], "parameters": {"normalize": True}, "dtype": "bfloat16", "seed": 4}
    spec = MergeSpec.from_dict(data)
    again = MergeSpec.from_dict(yaml.safe_load(spec.to_yaml()))
    assert again == spec
    assert isinstance(spec.models[0].parameters["density"][0], Conditional)
    assert spec.referenced_models() == ["base", "a", "b"]


# ---- settings resolution ---------------------------------------------------------------------
@pytest.mark.parametrize("setting,t,expected", [
    (0.3, 0.7, 0.3),
    ([0.0, 1.0], 0.25, 0.25),
    ([0.0, 1.0, 3.0], 1 / 3, 2 / 3),        # scaled 2/3 -> between points 0 and 1
    ([0.0, 1.0, 3.0], 2 / 3, 1 + 2 * (1 / 3)),  # scaled 4/3 -> one third from 1 to 3
    ([0.0, 1.0, 3.0], 1.0, 3.0),
    ([0.5], 0.6, 0.5),
    ([1, 0, 1, 0], 0.5, 0.5),
    (["a", "b", "c"], 0.9, "b"),               # non-numeric: floor(t·(n−1))
    ([], 0.5, None),
])
def test_gradient_interpolation(setting, t, expected):
    got = evaluate_setting(setting, "model.layers.1.mlp.up_proj.weight", t)
    assert got == pytest.approx(expected) if isinstance(expected, float) else got == expected


def test_gradient_matches_installed_mergekit():
    mk = pytest.importorskip("mergekit.config")
    for setting in ([0.0, 1.0, 3.0], [0.2, 0.9], [1, 5, 2, 8], [0.5]):
        for t in (0.0, 0.1, 1 / 3, 0.5, 2 / 3, 0.99, 1.0):
            theirs = mk.evaluate_setting("x", setting, t, validate=float)
            assert evaluate_setting(setting, "x", t) == pytest.approx(theirs)


def test_filters_first_substring_match():
    s = [Conditional(filter="layers.1.", value=9.0), Conditional(filter="mlp", value=[0.0, 2.0]),
         Conditional(filter="*", value=0.5)]
    assert evaluate_setting(s, "model.layers.1.mlp.up_proj.weight", 0.5) == 9.0  # first match wins
    assert evaluate_setting(s, "model.layers.0.mlp.up_proj.weight", 0.5) == pytest.approx(1.0)
    assert evaluate_setting(s, "model.norm.weight", 0.5) == 0.5
    assert evaluate_setting([Conditional(filter="mlp", value=1.0)], "model.norm.weight", 0.5) is None  # no match


# ---- end to end: what a method sees for each tensor ------------------------------------------
def probe(tmp_path, a_params, b_params=None, global_params=None, num_layers=4, yaml_text=None):
    """Merge with `_probe` (fills each output with the first expert's resolved weight); returns
    {tensor name: resolved weight}."""
    a = tiny_model(tmp_path / "a", seed=1, num_layers=num_layers)
    b = tiny_model(tmp_path / "b", seed=2, num_layers=num_layers)
    if yaml_text is not None:
        cfg = tmp_path / "m.yaml"
        cfg.write_text(yaml_text.format(a=a, b=b))
        merged = run_merge(cfg, quiet=True)
    else:
        data = {"merge_method": "_probe", "models": [{"model": str(a), "parameters": a_params},
                                                     {"model": str(b), "parameters": b_params or {"weight": 1.0}}]}
        if global_params:
            data["parameters"] = global_params
        merged = run_merge(data, quiet=True)
    out = {}
    for k, v in merged.items():
        assert torch.all(v == v.flatten()[0])
        out[k] = float(v.flatten()[0])
    return out


def test_gradient_over_layers_end_to_end(tmp_path):
    w = probe(tmp_path, {"weight": [0.0, 1.0, 3.0]})
    # t = layer / (num_layers − 1) = 0, 1/3, 2/3, 1 -> 0, 2/3, 5/3, 3 ; non-layer tensors t = 0
    expected_by_layer = [0.0, 2 / 3, 5 / 3, 3.0]
    for name, value in w.items():
        if ".layers." in name:
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert value == pytest.approx(expected_by_layer[layer], abs=1e-6), name
        else:
            assert value == 0.0, name
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(w)


def test_filters_end_to_end(tmp_path):
    setting = [{"filter": "self_attn", "value": [1.0, 4.0]}, {"filter": "mlp", "value": 2.0},
               {"filter": "layers.3", "value": 7.0}, {"value": 0.25}]
    w = probe(tmp_path, {"weight": setting})
    for name, value in w.items():
        layer = int(name.split(".layers.")[1].split(".")[0]) if ".layers." in name else None
        t = layer / 3 if layer is not None else 0.0
        if "self_attn" in name:
            expected = 1.0 + 3.0 * t
        elif "mlp" in name:
            expected = 2.0
        elif layer == 3:
            expected = 7.0  # layernorms of layer 3: the third filter, after self_attn/mlp missed
        else:
            expected = 0.25
        assert value == pytest.approx(expected, abs=1e-6), name


def test_per_model_overrides_global(tmp_path):
    w = probe(tmp_path, {"density": 0.5}, global_params={"weight": [{"filter": "mlp", "value": 0.75}, {"value": 0.125}]})
    assert w["model.layers.0.mlp.up_proj.weight"] == 0.75 and w["model.norm.weight"] == 0.125
    w = probe(tmp_path / "2", {"weight": 3.0}, global_params={"weight": 0.125})
    assert set(w.values()) == {3.0}


def test_model_filter_miss_falls_back_to_global(tmp_path):
    # mergekit: a setting whose conditionals match nothing resolves to None and the next scope is used
    w = probe(tmp_path, {"weight": [{"filter": "mlp", "value": 5.0}]}, global_params={"weight": 0.5})
    assert w["model.layers.0.mlp.up_proj.weight"] == 5.0 and w["model.layers.0.self_attn.q_proj.weight"] == 0.5


def test_scientific_notation_strings_from_yaml(tmp_path):
    # PyYAML reads 1e-1 (no dot) as the string "1e-1"; mergekit validates it into a number first
    text = ("merge_method: _probe\nmodels:\n  - model: {a}\n    parameters:\n      weight: [1e-1, 5e-1]\n"
            "  - model: {b}\n    parameters:\n      weight: 1\n      density: 5e-1\n")
    w = probe(tmp_path, None, yaml_text=text, num_layers=2)
    assert w["model.layers.0.mlp.up_proj.weight"] == pytest.approx(0.1)
    assert w["model.layers.1.mlp.up_proj.weight"] == pytest.approx(0.5)


def test_slice_parameters_and_t_per_slice(tmp_path):
    a = tiny_model(tmp_path / "a", seed=1, num_layers=4)
    b = tiny_model(tmp_path / "b", seed=2, num_layers=4)
    # mergekit: inside a slice of n layers t = offset / (n − 1); slice parameters below source parameters
    data = {"merge_method": "_probe", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3], "parameters": {"weight": [0.0, 2.0]}},
                     {"model": str(b), "layer_range": [1, 4]}], "parameters": {"weight": 9.0}},
        {"sources": [{"model": str(a), "layer_range": [3, 4]}, {"model": str(b), "layer_range": [3, 4]}],
         "parameters": {"weight": [0.0, 4.0]}},
    ]}
    merged = run_merge(data, quiet=True)
    value = {k: float(v.flatten()[0]) for k, v in merged.items()}
    assert [value[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(4)] == pytest.approx([0.0, 1.0, 2.0, 4.0])
    assert value["model.embed_tokens.weight"] == 0.0  # pre-layer tensors: first slice, t = 0

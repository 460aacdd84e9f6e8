"""Positive I/O paths of the merge engine: every input form, sharded output with a correct index,
files loadable by safetensors and transformers, the manifest, copied configs, layer stacking."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from torchmerge import __version__
from torchmerge.cli import main
from torchmerge.merge.engine import run_merge

from ._checkpoints import llama_config, llama_tensors, merge_methods, tiny_model, write_hf, write_yaml  # noqa: F401


def read_dir(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an output directory, through its index when sharded."""
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(str(out / f)))
    return tensors


def mean(*sds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}


def module_from_state_dict(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """An nn.Module whose state_dict() has exactly these (dotted) names."""
    root = torch.nn.Module()
    for name, t in sd.items():
        *path, leaf = name.split(".")
        mod = root
        for p in path:
            if not hasattr(mod, p):
                mod.add_module(p, torch.nn.Module())
            mod = getattr(mod, p)
        mod.register_parameter(leaf, torch.nn.Parameter(t.clone()))
    return root


def linear_spec(models: list, weights: list[float] | None = None) -> dict:
    weights = weights or [1.0] * len(models)
    return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, weights)]}


# ---- input forms -----------------------------------------------------------------------------
FORMS = ["hf dir", "sharded hf dir", "bare safetensors", "nn.Module", "state_dict"]


@pytest.mark.parametrize("form", FORMS)
def test_input_forms(tmp_path, form):
    cfg = llama_config()
    sd_a, sd_b = llama_tensors(cfg, 1), llama_tensors(cfg, 2)
    a = write_hf(tmp_path / "a", sd_a, cfg)
    b = {
        "hf dir": lambda: str(write_hf(tmp_path / "b", sd_b, cfg)),
        "sharded hf dir": lambda: str(write_hf(tmp_path / "b", sd_b, cfg, shards=3)),
        "bare safetensors": lambda: str(write_hf(tmp_path / "b", sd_b, None) / "model.safetensors"),
        "nn.Module": lambda: module_from_state_dict(sd_b),
        "state_dict": lambda: dict(sd_b),
    }[form]()
    merged = run_merge(linear_spec([str(a), b]), quiet=True)
    expected = mean(sd_a, sd_b)
    assert list(merged) == list(load_file(str(a / "model.safetensors")))  # order of the first model's file
    for k in expected:
        torch.testing.assert_close(merged[k], expected[k])


def test_in_memory_inputs_only(tmp_path):
    cfg = llama_config()
    sd_a, sd_b = llama_tensors(cfg, 1), llama_tensors(cfg, 2)
    out = run_merge(linear_spec([module_from_state_dict(sd_a), sd_b], [3.0, 1.0]), out=tmp_path / "out", quiet=True)
    merged = read_dir(out)
    for k in sd_a:
        torch.testing.assert_close(merged[k], (3 * sd_a[k] + sd_b[k]) / 4)
    assert json.loads((out / "merge_manifest.json").read_text())["inputs"] == {}  # nothing on disk to hash


def test_bf16_inputs_and_out_dtype(tmp_path):
    cfg = llama_config()
    sd_a, sd_b = llama_tensors(cfg, 1, torch.bfloat16), llama_tensors(cfg, 2, torch.bfloat16)
    a, b = write_hf(tmp_path / "a", sd_a, cfg), write_hf(tmp_path / "b", sd_b, cfg)
    out = run_merge(linear_spec([str(a), str(b)]), out=tmp_path / "o1", quiet=True)
    assert all(t.dtype == torch.bfloat16 for t in read_dir(out).values())  # default: as the inputs
    out = run_merge(linear_spec([str(a), str(b)]), out=tmp_path / "o2", quiet=True, out_dtype="float32")
    merged = read_dir(out)
    k = "model.layers.0.mlp.up_proj.weight"
    assert merged[k].dtype == torch.float32
    torch.testing.assert_close(merged[k], (sd_a[k].float() + sd_b[k].float()) / 2)  # computed in float32
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"


# ---- output ----------------------------------------------------------------------------------
def test_sharded_output_index(tmp_path):
    a, b = tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2)
    out = tmp_path / "out"
    assert main(["merge", str(write_yaml(tmp_path / "m.yaml", linear_spec([str(a), str(b)]))), str(out),
                 "--shard-size", "1KB", "--quiet"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    expected = mean(load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors")))
    assert set(index["weight_map"]) == set(expected)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 3 and set(index["weight_map"].values()) == set(shards)
    assert all(name == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, name in enumerate(shards))
    assert not (out / "model.safetensors").exists()
    total = 0
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            sizes = []
            for k in f.keys():
                t = f.get_tensor(k)
                assert index["weight_map"][k] == shard
                torch.testing.assert_close(t, expected[k])
                sizes.append(t.numel() * t.element_size())
        assert sum(sizes) <= 1000 or len(sizes) == 1  # a shard exceeds --shard-size only for one big tensor
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total


def test_single_output_file_without_index(tmp_path):
    a, b = tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2, shards=2)
    out = run_merge(linear_spec([str(a), str(b)]), out=tmp_path / "out", quiet=True)
    assert (out / "model.safetensors").exists() and not (out / "model.safetensors.index.json").exists()


def test_output_loads_with_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    a, b = tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2)
    out = run_merge(linear_spec([str(a), str(b)]), out=tmp_path / "out", quiet=True, shard_size="2KB")
    assert (out / "model.safetensors.index.json").exists()
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    merged = read_dir(out)
    state = model.state_dict()
    for k, v in merged.items():
        torch.testing.assert_close(state[k], v)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 16) and torch.isfinite(logits).all()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_manifest(tmp_path):
    a, b = tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2, shards=2)
    spec = {**linear_spec([str(a), str(b)], [1.0, 2.0]), "seed": 7}
    out = run_merge(spec, out=tmp_path / "out", quiet=True, shard_size="3KB")
    m = json.loads((out / "merge_manifest.json").read_text())
    assert m["method"] == "linear" and m["seed"] == 7 and m["torchmerge_version"] == __version__
    assert m["parameters"] == {"normalize": True}
    assert m["spec"]["models"][1]["parameters"] == {"weight": 2.0}
    inputs = [a / "model.safetensors", b / "model-00001-of-00002.safetensors", b / "model-00002-of-00002.safetensors"]
    assert m["inputs"] == {str(p): _sha(p) for p in inputs}
    on_disk = {p.name for p in out.iterdir()} - {"merge_manifest.json"}
    assert "model.safetensors.index.json" in on_disk and "mergekit_config.yml" in on_disk
    assert m["outputs"] == {name: _sha(out / name) for name in on_disk}  # every other output file, hashed
    # mergekit_config.yml is the spec again, loadable by torchmerge
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "linear"


def test_base_config_files_copied(tmp_path):
    extras = {"generation_config.json": '{"max_new_tokens": 3}', "tokenizer.json": '{"version": "1.0"}',
              "tokenizer_config.json": '{"model_max_length": 32}', "special_tokens_map.json": "{}"}
    cfg = llama_config()
    base = write_hf(tmp_path / "base", llama_tensors(cfg, 0), cfg, extra_files=extras)
    a = write_hf(tmp_path / "a", llama_tensors(cfg, 1), {**cfg, "_name_or_path": "a"},
                 extra_files={"tokenizer.json": '{"version": "other"}'})
    spec = {"merge_method": "_probe", "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(a), "parameters": {"weight": 0.5}}]}
    out = run_merge(spec, out=tmp_path / "out", quiet=True)
    for name, text in extras.items():
        assert (out / name).read_text() == text
    assert json.loads((out / "config.json").read_text()) == cfg  # the base's, not the expert's


# ---- slices / passthrough --------------------------------------------------------------------
def test_passthrough_layer_stacking(tmp_path):
    a, b = tiny_model(tmp_path / "a", seed=1, num_layers=4), tiny_model(tmp_path / "b", seed=2, num_layers=4)
    spec = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
        {"sources": [{"model": str(a), "layer_range": [3, 4]}]},
    ]}
    out = run_merge(spec, out=tmp_path / "out", quiet=True)
    merged, ta, tb = read_dir(out), load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    source_of = {0: (ta, 0), 1: (ta, 1), 2: (ta, 2), 3: (tb, 1), 4: (tb, 2), 5: (tb, 3), 6: (ta, 3)}
    for out_layer, (src, in_layer) in source_of.items():
        for leaf in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(merged[f"model.layers.{out_layer}.{leaf}"], src[f"model.layers.{in_layer}.{leaf}"])
    assert not any(k.startswith("model.layers.7.") for k in merged)
    assert len(merged) == 7 * 9 + 3
    assert torch.equal(merged["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])  # first slice
    assert torch.equal(merged["lm_head.weight"], ta["lm_head.weight"])  # last slice
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 7
    assert config["vocab_size"] == 16


def test_passthrough_output_loads_with_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    a = tiny_model(tmp_path / "a", seed=1, num_layers=2)
    spec = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(a), "layer_range": [0, 2]}]},
                                                      {"sources": [{"model": str(a), "layer_range": [1, 2]}]}]}
    out = run_merge(spec, out=tmp_path / "out", quiet=True)
    model = transformers.LlamaForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    torch.testing.assert_close(model.model.layers[2].mlp.up_proj.weight, model.model.layers[1].mlp.up_proj.weight)


def test_public_api_torchmerge_merge_is_callable(tmp_path):
    """`torchmerge.merge(spec, out=None)` stays the function even after the subpackage
    `torchmerge.merge` is imported (importing a submodule rebinds the package attribute)."""
    import torchmerge
    import torchmerge.merge.engine  # noqa: F401 - what every user of the engine triggers

    assert callable(torchmerge.merge)
    a, b = tiny_model(tmp_path / "a", seed=1), tiny_model(tmp_path / "b", seed=2)
    merged = torchmerge.merge(linear_spec([str(a), str(b)]), quiet=True)
    assert set(merged) == set(load_file(str(a / "model.safetensors")))
    out = torchmerge.merge(linear_spec([str(a), str(b)]), tmp_path / "out", quiet=True, shard_size="2KB")
    assert out == tmp_path / "out" and (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("method, params, invariant", [
    ("task_arithmetic", {}, True),
    ("ties", {"density": 0.4}, True),
    ("dare_linear", {"density": 0.5}, False),  # rescale: l1 norms are torch reductions
])
def test_thread_invariant_methods_give_the_same_bytes_on_any_thread_count(tmp_path, method, params, invariant):
    """The engine gives a core to input hashing (fewer torch threads) only for methods that declare
    their results independent of the thread count; check that declaration on the written bytes."""
    from torchmerge.merge import registry
    from torchmerge.merge.engine import prepare

    cfg = llama_config(hidden=64, intermediate=256, vocab=4096)  # tensors past torch's parallel grain
    base = write_hf(tmp_path / "base", llama_tensors(cfg, 0, torch.bfloat16), cfg)
    experts = [write_hf(tmp_path / f"e{i}", llama_tensors(cfg, i + 1, torch.bfloat16), cfg) for i in range(2)]
    spec = {"merge_method": method, "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16", "seed": 3,
            "models": [{"model": str(e), "parameters": {"weight": w, **params}} for e, w in zip(experts, (0.3, 0.9))]}
    assert registry.get(method).thread_invariant(prepare(spec).global_params) is invariant
    if not invariant:
        return
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(read_dir(run_merge(spec, out=tmp_path / f"out{n}", quiet=True)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert json.loads((tmp_path / "out1" / "merge_manifest.json").read_text())["outputs"]["model.safetensors"] == \
        _sha(tmp_path / "out1" / "model.safetensors")

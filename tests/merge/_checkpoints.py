"""Helpers that write tiny HF-format checkpoints (config.json + safetensors) for merge tests.

Tensor names follow LlamaForCausalLM, so a written directory loads with transformers'
`from_pretrained` when its config comes from `llama_config`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
import yaml
from safetensors.torch import save_file

from torchmerge.merge import registry
from torchmerge.merge.base import MergeMethod, Param, in_range

REPO = Path(__file__).resolve().parents[2]


def llama_config(num_layers: int = 2, hidden: int = 8, vocab: int = 16, intermediate: int = 16, **extra: Any) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": num_layers, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 32, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    cfg.update(extra)
    return cfg


def llama_tensors(cfg: Mapping[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state_dict for `cfg`, filled from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for proj in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{proj}_proj.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return {k: (torch.randn(s, generator=g) * 0.1).to(dtype) for k, s in shapes.items()}


def write_hf(path: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
             shards: int = 1, extra_files: Mapping[str, str] | None = None) -> Path:
    """Write an HF checkpoint directory: config.json and model.safetensors, or `shards` files
    named model-0000k-of-0000n.safetensors with model.safetensors.index.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2))
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(tensors)
    weight_map, total = {}, 0
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        for n, t in part.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def tiny_model(path: Path, seed: int = 0, num_layers: int = 2, shards: int = 1, **cfg_extra: Any) -> Path:
    """A tiny Llama checkpoint directory with random weights."""
    cfg = llama_config(num_layers=num_layers, **cfg_extra)
    return write_hf(path, llama_tensors(cfg, seed), cfg, shards=shards)


def write_yaml(path: Path, data: Mapping[str, Any]) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False))
    return path


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m torchmerge.cli ARGS` in a subprocess (exit code, stdout and stderr as a user sees them)."""
    import os

    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    # the test methods are registered in the child too (the real ones win once they exist)
    code = ("import sys; from tests.merge._checkpoints import ensure_methods; ensure_methods(); "
            "from torchmerge.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=str(REPO), timeout=120)


# ---- merge methods for tests -----------------------------------------------------------------
class ProbeMethod(MergeMethod):
    """Test method: every output element is the first expert's resolved `weight` (so a test reads
    back exactly what the engine resolved for that tensor); `density`/`t` only carry ranges."""

    name = "_probe"
    reference_url = "https://example.invalid/probe"
    params = (
        Param("weight", scope="model"),
        Param("density", default=1.0, scope="model", check=in_range(0, 1, lo_open=True)),
        Param("t", default=0.5, check=in_range(0, 1)),
    )

    def merge(self, inputs, params):
        first = next(iter(inputs.experts))
        return torch.full_like(first.tensor, float(first.params["weight"]))


class MeanLinear(MergeMethod):
    """Test stand-in for mergekit's `linear`: Σ w_i x_i / Σ w_i (normalize=True)."""

    name = "linear"
    reference_url = "https://arxiv.org/abs/2203.05482"
    params = (Param("weight", scope="model"), Param("normalize", default=True, kind=bool))

    def merge(self, inputs, params):
        total, wsum = None, 0.0
        for e in inputs.experts:
            w = e.params["weight"]
            total = e.tensor * w if total is None else total + e.tensor * w
            wsum += w
        return total / wsum if params["normalize"] and wsum else total


class Passthrough(MergeMethod):
    name = "passthrough"
    reference_url = "https://github.com/arcee-ai/mergekit"

    def merge(self, inputs, params):
        return next(iter(inputs.experts)).tensor


def ensure_methods() -> list[str]:
    """Register the test methods that are missing (real `linear` / `passthrough` win when registered);
    returns the names registered here, for `remove_methods`."""
    registry.names()  # let the registry fill itself first: it skips filling once it is non-empty
    added = []
    for m in (ProbeMethod(), MeanLinear(), Passthrough()):
        if m.name not in registry._METHODS:
            registry.register(m)
            added.append(m.name)
    return added


def remove_methods(names: list[str]) -> None:
    for n in names:
        registry._METHODS.pop(n, None)


@pytest.fixture(autouse=True)
def merge_methods():
    """Import into a test module to have `_probe`, `linear` and `passthrough` registered."""
    added = ensure_methods()
    yield
    remove_methods(added)

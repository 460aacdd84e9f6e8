"""A small synthetic expert family, so a fresh install can run a real merge with no downloads.

The family is Llama-shaped (HF config + safetensors): a base and experts that each add a sparse,
task-specific delta to a different block of layers, so the merged model visibly differs from a
plain average. Used by `torchmerge demo` and by tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 256,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def write_family(root: str | Path, experts: int = 3, seed: int = 0, config: dict | None = None,
                 dtype: torch.dtype = torch.float32) -> list[Path]:
    """Write base + `experts` HF checkpoints under `root`; returns their directories (base first)."""
    cfg = dict(config or LLAMA_CONFIG)
    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(cfg)
    base = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02) for n, s in shapes.items()}
    dirs = []
    for k in range(experts + 1):
        d = root / ("base" if k == 0 else f"expert{k}")
        d.mkdir(parents=True, exist_ok=True)
        sd = {}
        for n, w in base.items():
            if k == 0:
                sd[n] = w
                continue
            delta = torch.randn(w.shape, generator=g) * 0.002  # small dense fine-tuning noise
            keep = torch.rand(w.shape, generator=g) < 0.1  # plus a sparse task-specific update
            delta += keep * torch.randn(w.shape, generator=g) * 0.02
            sd[n] = w + delta
        save_file({n: t.to(dtype).contiguous() for n, t in sd.items()}, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({**cfg, "torch_dtype": str(dtype).removeprefix("torch.")}, indent=2))
        dirs.append(d)
    return dirs


def write_demo_config(root: str | Path, dirs: list[Path], method: str = "ties") -> Path:
    cfg = {
        "merge_method": method,
        "base_model": str(dirs[0]),
        "models": [{"model": str(d), "parameters": {"weight": 1.0, "density": 0.3}} for d in dirs[1:]],
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    path = Path(root) / f"{method}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path

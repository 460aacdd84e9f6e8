"""End-to-end equality with mergekit 0.1.5: the same YAML through `mergekit-yaml` and `torchmerge`
gives the same tensors (design.md: defaults equal mergekit 0.1.5, so its users get the same bytes).

Every mergekit merge runs once per session, all in one subprocess that invokes mergekit-yaml's own
click command per config (one ~8 s import of mergekit instead of one per config, and mergekit's
process-global state — loader cache, seeds, logging — stays out of the pytest process).
Every case is bit-identical (torch.equal); a case may carry a relative tolerance only when the two
differ by summation order alone, with a comment saying so. DARE/DELLA are left out: torchmerge seeds
per (seed, tensor name) by design, mergekit draws from one global RNG, so their masks differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

try:
    import mergekit  # noqa: F401  (pinned test dependency: mergekit==0.1.5)
except ImportError:
    pytest.skip("mergekit is not importable (pip install -e '.[test]' installs the pinned mergekit==0.1.5)",
                allow_module_level=True)

from torchmerge.merge.engine import run_merge

# 33024 x 32 embeddings exceed 2^20 elements: mergekit's slerp reduces such tensors in chunks
VOCAB = 33024
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "float32",
}
MODELS = ("base", "e0", "e1", "e2")


def _llama_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                   p + "post_attention_layernorm.weight": (h,)}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


# Each case: (YAML with {base} {e0} {e1} {e2} placeholders, relative tolerance or 0 for torch.equal).
CASES = {
    "linear": ("""
merge_method: linear
models:
  - {{model: {e0}, parameters: {{weight: 0.5}}}}
  - {{model: {e1}, parameters: {{weight: [0.2, 0.8]}}}}
  - {{model: {e2}, parameters: {{weight: [{{filter: mlp, value: 2.0}}, {{value: 1.0}}]}}}}
dtype: float32
""", 0),
    "linear_unnormalized": ("""
merge_method: linear
models:
  - {{model: {e0}, parameters: {{weight: 0.7}}}}
  - {{model: {e1}, parameters: {{weight: 0.6}}}}
parameters: {{normalize: false}}
dtype: float32
""", 0),
    "task_arithmetic": ("""
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {e0}, parameters: {{weight: 0.5}}}}
  - {{model: {e1}, parameters: {{weight: [0.2, 0.8]}}}}
  - {{model: {e2}, parameters: {{weight: [{{filter: self_attn, value: -0.3}}, {{value: 0.9}}]}}}}
parameters: {{lambda: [0.6, 1.0]}}
dtype: float32
""", 0),
    "ties": ("""
merge_method: ties
base_model: {base}
models:
  - {{model: {e0}, parameters: {{weight: 0.5, density: 0.7}}}}
  - {{model: {e1}, parameters: {{weight: [0.2, 0.8], density: [{{filter: mlp, value: 0.5}}, {{value: 0.9}}]}}}}
  - {{model: {e2}, parameters: {{weight: 0.3, density: [0.3, 0.6]}}}}
dtype: float32
""", 0),
    "ties_global_settings": ("""
merge_method: ties
base_model: {base}
models:
  - {{model: {e0}, parameters: {{weight: 1.0}}}}
  - {{model: {e1}, parameters: {{weight: 0.6, density: 0.3}}}}
  - {{model: {e2}, parameters: {{weight: 0.8}}}}
parameters: {{normalize: false, lambda: 1.3, density: [{{filter: mlp, value: 0.5}}, {{value: 0.9}}]}}
dtype: float32
""", 0),
    "breadcrumbs": ("""
merge_method: breadcrumbs
base_model: {base}
models:
  - {{model: {e0}, parameters: {{weight: 0.5, density: 0.8, gamma: 0.05}}}}
  - {{model: {e1}, parameters: {{weight: [0.2, 0.8], density: [{{filter: mlp, value: 0.6}}, {{value: 0.9}}], gamma: 0.1}}}}
  - {{model: {e2}, parameters: {{weight: 0.3, density: 0.7}}}}
dtype: float32
""", 0),
    "slerp": ("""
merge_method: slerp
base_model: {base}
models:
  - {{model: {base}}}
  - {{model: {e0}}}
parameters:
  t:
    - {{filter: self_attn, value: [0.0, 0.5, 0.3, 0.7, 1.0]}}
    - {{filter: mlp, value: [1.0, 0.5, 0.7, 0.3, 0.0]}}
    - {{value: 0.5}}
dtype: float32
""", 0),
    "slerp_slices": ("""
merge_method: slerp
base_model: {e0}
slices:
  - sources:
      - {{model: {e0}, layer_range: [0, 2]}}
      - {{model: {e1}, layer_range: [0, 2]}}
parameters:
  t: [{{filter: mlp, value: [0.9, 0.1]}}, {{value: 0.3}}]
dtype: float32
""", 0),
    "model_stock": ("""
merge_method: model_stock
base_model: {base}
models:
  - {{model: {e0}}}
  - {{model: {e1}}}
  - {{model: {e2}}}
dtype: float32
""", 0),
    "model_stock_filter_wise": ("""
merge_method: model_stock
base_model: {base}
models:
  - {{model: {e0}}}
  - {{model: {e1}}}
  - {{model: {e2}}}
parameters: {{filter_wise: true}}
dtype: float32
""", 0),
    "passthrough_slices": ("""
merge_method: passthrough
slices:
  - sources: [{{model: {e0}, layer_range: [0, 2]}}]
  - sources: [{{model: {e1}, layer_range: [1, 2]}}]
  - sources: [{{model: {base}, layer_range: [0, 1]}}]
dtype: float32
""", 0),
}

DRIVER = r"""
import json, sys, traceback
from mergekit.scripts.run_yaml import main
flags = ["--no-write-model-card", "--no-cuda", "--no-copy-tokenizer", "--quiet"]
errors = {}
for name, cfg, out in json.loads(sys.argv[1]):
    try:
        main([cfg, out, *flags], standalone_mode=False)
    except BaseException:
        errors[name] = traceback.format_exc()[-2000:]
print(json.dumps(errors))
"""


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """base + 3 experts (base + random deltas, some large enough to flip signs), float32 safetensors."""
    root = tmp_path_factory.mktemp("mergekit_family")
    g = torch.Generator().manual_seed(1234)
    base = {k: torch.randn(s, generator=g) * 0.1 for k, s in _llama_shapes(CONFIG).items()}
    dirs = {}
    for name in MODELS:
        sd = base if name == "base" else {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(CONFIG, indent=2))
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        dirs[name] = d
    return dirs


@pytest.fixture(scope="session")
def configs(family, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mergekit_configs")
    paths = {}
    for case, (text, _) in CASES.items():
        paths[case] = root / f"{case}.yml"
        paths[case].write_text(text.format(**{k: str(v) for k, v in family.items()}))
    return paths


@pytest.fixture(scope="session")
def mergekit_outputs(configs, tmp_path_factory) -> dict[str, Path | str]:
    """Every case merged by mergekit 0.1.5: an output directory, or the traceback when it failed."""
    root = tmp_path_factory.mktemp("mergekit_out")
    jobs = [(case, str(cfg), str(root / case)) for case, cfg in configs.items()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(jobs)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"mergekit driver failed:\n{proc.stderr[-3000:]}"
    errors = json.loads(proc.stdout.strip().splitlines()[-1])
    return {case: errors.get(case) or root / case for case in configs}


def _assert_same(case: str, ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], rtol: float) -> None:
    assert sorted(ours) == sorted(theirs), f"{case}: tensor names differ: {sorted(set(ours) ^ set(theirs))}"
    bad = []
    for name in sorted(theirs):
        a, b = ours[name], theirs[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            bad.append(f"{name}: {a.dtype}{list(a.shape)} vs mergekit {b.dtype}{list(b.shape)}")
        elif rtol == 0 and not torch.equal(a, b):
            diff = (a - b).abs()
            bad.append(f"{name}: max abs diff {diff.max().item():.3g} ({int((diff > 0).sum())}/{a.numel()} differ)")
        elif rtol and not torch.allclose(a, b, rtol=rtol, atol=rtol * b.abs().max().item()):
            bad.append(f"{name}: max abs diff {(a - b).abs().max().item():.3g} beyond rtol {rtol}")
    assert not bad, f"{case}: {len(bad)}/{len(theirs)} tensors differ from mergekit 0.1.5:\n  " + "\n  ".join(bad[:12])


@pytest.mark.parametrize("case", list(CASES))
def test_same_tensors_as_mergekit(case, configs, mergekit_outputs, tmp_path):
    expected = mergekit_outputs[case]
    assert isinstance(expected, Path), f"mergekit 0.1.5 itself failed on {case}:\n{expected}"
    out = run_merge(configs[case], tmp_path / "out", quiet=True)
    _assert_same(case, _load_dir(Path(out)), _load_dir(expected), CASES[case][1])
    ours_cfg = json.loads((Path(out) / "config.json").read_text())
    theirs_cfg = json.loads((expected / "config.json").read_text())
    assert ours_cfg["num_hidden_layers"] == theirs_cfg["num_hidden_layers"]

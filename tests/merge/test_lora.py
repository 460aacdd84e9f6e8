import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from torchmerge.merge.base import MergeError  # noqa: E402
from torchmerge.merge.lora import FoldedLora, fold_lora_tensor, load_lora_adapter  # noqa: E402


def _save_adapter(model, config, directory, tweak=None):
    peft_model = peft.get_peft_model(copy.deepcopy(model), config)
    if tweak is not None:
        tweak(peft_model)
    peft_model.save_pretrained(str(directory))


def _reference_merge(model, directory):
    """PEFT's own fold: load the saved adapter onto a fresh copy and merge_and_unload."""
    merged = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(directory)).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def _assert_fold_matches(model, directory):
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    want = _reference_merge(model, directory)
    adapter = load_lora_adapter(directory)
    assert adapter.tensor_names() <= set(base)
    changed = 0
    for name, tensor in base.items():
        got = fold_lora_tensor(adapter, name, tensor)
        assert torch.allclose(got, want[name].float(), atol=1e-6, rtol=0), name
        changed += not torch.equal(got, tensor)
    view = FoldedLora(adapter, base)
    assert set(view) == set(base)
    return adapter, changed


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_llama_fold_matches_merge_and_unload(tiny_llama, tmp_path):
    config = peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
        rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
        modules_to_save=["lm_head"],
    )

    def tweak(pm):  # make the saved lm_head differ from the base so replacement is visible
        with torch.no_grad():
            pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)

    _save_adapter(tiny_llama, config, tmp_path, tweak)
    adapter, changed = _assert_fold_matches(tiny_llama, tmp_path)
    v = adapter.targets["model.layers.0.self_attn.v_proj.weight"]
    q1 = adapter.targets["model.layers.1.self_attn.q_proj.weight"]
    assert (v.rank, v.scaling) == (2, 4.0) and (q1.rank, q1.scaling) == (4, 0.75)
    assert adapter.targets["model.embed_tokens.weight"].embedding
    assert "lm_head.weight" in adapter.replacements
    assert changed == 2 * 3 + 1 + 1  # q, v, up per layer + embeddings + lm_head


def test_gpt2_fan_in_fan_out_rslora_and_lora_bias(tmp_path):
    torch.manual_seed(1)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    config = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=["c_attn"],
                             fan_in_fan_out=True, use_rslora=True, lora_bias=True)

    def tweak(pm):  # lora_B.bias starts at zero; make it count
        for name, p in pm.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                with torch.no_grad():
                    p.normal_()

    _save_adapter(model, config, tmp_path, tweak)
    adapter, changed = _assert_fold_matches(model, tmp_path)
    target = adapter.targets["transformer.h.0.attn.c_attn.weight"]
    assert target.fan_in_fan_out and target.scaling == pytest.approx(6 / 2)
    assert changed == 2 * 2  # weight and bias of c_attn in both layers



def _randomise_magnitudes(pm):
    """DoRA starts with m = ‖W‖_c; move it so that a fold ignoring m (or using the wrong norm axis) fails."""
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)


def test_dora_llama_linear_and_embedding_match_merge_and_unload(tiny_llama, tmp_path):
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                             target_modules=["q_proj", "o_proj", "down_proj", "embed_tokens"])
    _save_adapter(tiny_llama, config, tmp_path, _randomise_magnitudes)
    adapter, changed = _assert_fold_matches(tiny_llama, tmp_path)
    assert changed == 2 * 3 + 1
    # the formula by hand for one Linear (rows) and the Embedding (columns: the stored layout is vocab×dim)
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    base = tiny_llama.state_dict()
    key = "base_model.model.model.layers.0.self_attn.o_proj"
    v = base["model.layers.0.self_attn.o_proj.weight"] + 2.0 * t[f"{key}.lora_B.weight"] @ t[f"{key}.lora_A.weight"]
    want = t[f"{key}.lora_magnitude_vector"][:, None] * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(adapter.fold("model.layers.0.self_attn.o_proj.weight",
                                            base["model.layers.0.self_attn.o_proj.weight"]), want)
    key = "base_model.model.model.embed_tokens"
    e = base["model.embed_tokens.weight"] + 2.0 * (t[f"{key}.lora_embedding_B"] @ t[f"{key}.lora_embedding_A"]).T
    want = t[f"{key}.lora_magnitude_vector"][None, :] * e / e.norm(dim=0, keepdim=True)
    torch.testing.assert_close(adapter.fold("model.embed_tokens.weight", base["model.embed_tokens.weight"]), want)


def test_dora_gpt2_fan_in_fan_out(tmp_path):
    torch.manual_seed(2)
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    config = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=["c_attn", "c_proj"],
                             fan_in_fan_out=True, use_dora=True)
    _save_adapter(model, config, tmp_path, _randomise_magnitudes)
    adapter, changed = _assert_fold_matches(model, tmp_path)
    assert adapter.targets["transformer.h.0.attn.c_attn.weight"].transposed
    assert changed == 2 * 3  # c_attn, attn.c_proj and mlp.c_proj weights in both layers
    cfg_path = tmp_path / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "lora_bias": True}))
    with pytest.raises(MergeError, match="use_dora and lora_bias"):
        load_lora_adapter(tmp_path)



class _ConvNet(torch.nn.Module):
    """Conv1d, a 3×3 and a 1×1 Conv2d, a Conv3d and a grouped Conv2d: the layouts a conv LoRA folds into."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(3, 6, 5)
        self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.pw = torch.nn.Conv2d(8, 8, 1)
        self.c3 = torch.nn.Conv3d(2, 4, (2, 3, 3))
        self.grouped = torch.nn.Conv2d(8, 8, 3, groups=2)


@pytest.mark.parametrize("use_dora", [False, True])
def test_conv_lora_and_dora_match_merge_and_unload(tmp_path, use_dora):
    torch.manual_seed(3)
    model = _ConvNet().eval()
    config = peft.LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, use_dora=use_dora,
                             target_modules=["c1", "c2", "pw", "c3"])
    _save_adapter(model, config, tmp_path, _randomise_magnitudes)
    adapter, changed = _assert_fold_matches(model, tmp_path)
    assert changed == 4
    # ΔW by hand for the 3×3 kernel: Σ_r B[o, r] A[r, i, h, w], the same sum PEFT gets from conv2d
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "adapter_model.safetensors"))
    a, b = t["base_model.model.c2.lora_A.weight"], t["base_model.model.c2.lora_B.weight"]
    v = model.c2.weight.detach() + 2.5 * torch.einsum("or,rihw->oihw", b[:, :, 0, 0], a)
    if use_dora:
        v = t["base_model.model.c2.lora_magnitude_vector"].reshape(-1, 1, 1, 1) * v / v.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(adapter.fold("c2.weight", model.c2.weight.detach()), v)


def test_grouped_conv_lora_is_refused(tmp_path):
    model = _ConvNet().eval()
    _save_adapter(model, peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["grouped"]),
                  tmp_path)
    adapter = load_lora_adapter(tmp_path)
    with pytest.raises(MergeError, match="grouped convolution"):
        adapter.fold("grouped.weight", model.grouped.weight.detach())

def test_dora_inconsistent_adapters_are_refused(tiny_llama, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, use_dora=True, target_modules=["q_proj"])
    _save_adapter(tiny_llama, config, tmp_path)
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(MergeError, match="lora_magnitude_vector but use_dora is not set"):
        load_lora_adapter(tmp_path)
    cfg_path.write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("lora_magnitude_vector"))
    save_file({**tensors, key: tensors[key][:-1].contiguous()}, str(tmp_path / "adapter_model.safetensors"))
    adapter = load_lora_adapter(tmp_path)
    name = key.removeprefix("base_model.model.").removesuffix(".lora_magnitude_vector") + ".weight"
    with pytest.raises(MergeError, match="output features"):
        adapter.fold(name, tiny_llama.state_dict()[name])
    save_file({k: v for k, v in tensors.items() if k != key}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match="has no lora_magnitude_vector"):
        load_lora_adapter(tmp_path)

def test_pickled_adapter_needs_allow_pickle(tiny_llama, tmp_path):
    config = peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=["q_proj"])
    _save_adapter(tiny_llama, config, tmp_path)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_model.safetensors").unlink()
    torch.save(tensors, tmp_path / "adapter_model.bin")
    with pytest.raises(MergeError, match="pickled weights are refused"):
        load_lora_adapter(tmp_path)
    adapter = load_lora_adapter(tmp_path, allow_pickle=True)
    name = "model.layers.0.self_attn.q_proj.weight"
    base = tiny_llama.state_dict()[name]
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    want = base + 2.0 * tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
    torch.testing.assert_close(adapter.fold(name, base), want)


def test_unsupported_and_missing(tmp_path):
    with pytest.raises(MergeError, match="no adapter_config.json"):
        load_lora_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "layer_replication": [[0, 2]]}))
    with pytest.raises(MergeError, match="layer_replication"):
        load_lora_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(MergeError, match="peft_type"):
        load_lora_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(MergeError, match="no adapter_model.safetensors"):
        load_lora_adapter(tmp_path)


def test_engine_entry_point_checks_names(tiny_llama, tmp_path):
    from torchmerge.merge.lora import LoraAdapter

    _save_adapter(tiny_llama, peft.LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["q_proj"]),
                  tmp_path)
    names = set(tiny_llama.state_dict())
    adapter = LoraAdapter.load(tmp_path, base_names=names)
    assert adapter.files[-1].name == "adapter_model.safetensors"
    with pytest.raises(MergeError, match="which the base model does not have"):
        LoraAdapter.load(tmp_path, base_names={n for n in names if "q_proj" not in n})


def test_engine_treats_base_plus_adapter_as_an_expert(tiny_llama, tmp_path):
    from safetensors.torch import save_file

    from torchmerge.merge.engine import run_merge

    base_file = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_llama.state_dict().items()}, str(base_file))
    adapter_dir = tmp_path / "adapter"
    _save_adapter(tiny_llama, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                              target_modules=["q_proj", "up_proj"]), adapter_dir)
    want = _reference_merge(tiny_llama, adapter_dir)
    spec = {"merge_method": "layer_swap", "dtype": "float32", "base_model": str(base_file),
            "models": [{"model": str(base_file)},
                       {"model": f"{base_file}+{adapter_dir}", "parameters": {"layer_range": "0:2", "non_layer": True}}]}
    out = run_merge(spec)
    assert set(out) == set(want)
    for name in out:
        assert torch.allclose(out[name], want[name], atol=1e-6, rtol=0), name

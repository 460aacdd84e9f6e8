"""Fold a PEFT LoRA adapter into base weights, lazily, one tensor name at a time.

LoRA (Hu et al., https://arxiv.org/abs/2106.09685) adds ΔW = s · B A to a weight W, with
A (r×in), B (out×r) and s = α/r, or s = α/√r with rsLoRA (Kalajdzievski, https://arxiv.org/abs/2312.03732).
Folding gives the weights of PEFT's `merge_and_unload()`:

    Linear:            W' = W + s · (B A)         (out×in)
    Linear, fan_in_fan_out (GPT-2 Conv1D, W is in×out):  W' = W + s · (B A)ᵀ
    Conv1d/2d/3d:      W'[o, i, k…] = W + s · Σ_r B[o, r] A[r, i, k…]   (lora_B is PEFT's 1×1 convolution)
    Embedding:         E' = E + s · (B A)ᵀ        (lora_embedding_A is r×vocab, lora_embedding_B dim×r)
    lora_bias:         b' = b + s · b_B
    DoRA (Liu et al., https://arxiv.org/abs/2402.09353; `use_dora`): with the magnitude vector m saved as
    lora_magnitude_vector, V = W + ΔW (ΔW as above) is rescaled per output feature,
        W' = (m / ‖V‖_c) ⊙ V,
    ‖V‖_c the L2 norm over the input dimension: over rows of V (Linear, out×in), over its columns where the
    stored layout is transposed (fan_in_fan_out, Embedding), over (in, k…) per output channel
    (convolution). The norm is computed on the unmerged base, as PEFT does (which allows no lora_bias
    with DoRA, nor do we).
    modules_to_save / saved base layers: the adapter's tensor replaces the base tensor.

r and α per module follow the adapter's `rank_pattern` / `alpha_pattern` exactly as PEFT matches them
(the first pattern p with re.match(rf"(.*\\.)?({p})$", module) wins), else `r` / `lora_alpha`.

PEFT saves keys as "base_model.model.<module path>.lora_A.weight"; the folded tensor's name is
"<module path>.weight", the name in the base model's own checkpoint. Adapter tensors are read on demand
from adapter_model.safetensors; a pickled adapter_model.bin is refused unless allow_pickle=True, and
then read with torch.load(weights_only=True). Not supported (MergeError): grouped convolutions,
trainable-token adapters, layer_replication, non-LoRA PEFT types.

API for the engine:
    adapter = load_lora_adapter(path, allow_pickle=False)   # -> LoraAdapter
    adapter = LoraAdapter.load(path, base_names=names, allow_pickle=False)  # the same, checked against the base
    adapter.tensor_names()                                 # names the adapter changes
    adapter.fold(name, base_tensor)                        # folded tensor (base_tensor if untouched)
    fold_lora_tensor(adapter, name, base_tensor)           # the same, as a function
    FoldedLora(adapter, base_mapping)                      # lazy Mapping name -> folded tensor
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from .base import MergeError

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B|magnitude_vector)(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?"
                       r"(?:\.(?P<param>weight|bias))?$")
_UNSUPPORTED = ("trainable_tokens", "token_adapter")


@dataclass(frozen=True)
class LoraTarget:
    """One adapted module: where its factors are stored and how they fold."""

    module: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    embedding: bool
    a_key: str
    b_key: str
    bias_key: str | None
    rank: int
    scaling: float
    fan_in_fan_out: bool
    magnitude_key: str | None = None  # DoRA's lora_magnitude_vector

    @property
    def transposed(self) -> bool:
        """Whether the stored weight is in×out (fan_in_fan_out Conv1D, Embedding's vocab×dim)."""
        return self.embedding or self.fan_in_fan_out


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():  # PEFT: first matching pattern in the dict's order wins
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


class LoraAdapter:
    """A PEFT LoRA adapter directory, read lazily. Use `load_lora_adapter` to build one."""

    def __init__(self, directory: Path, config: Mapping[str, Any], weights: Path, keys: list[str],
                 tensors: Mapping[str, torch.Tensor] | None):
        self.directory = directory
        self.config = dict(config)
        self.weights = weights
        self._tensors = tensors  # in memory for a .bin adapter, else None (read from safetensors)
        self.targets: dict[str, LoraTarget] = {}  # folded tensor name -> target
        self.replacements: dict[str, str] = {}  # base tensor name -> adapter key
        self.files = [directory / "adapter_config.json", weights]
        self._index(keys)

    @classmethod
    def load(cls, path: str | Path, *, base_names: Any = None, allow_pickle: bool = False) -> "LoraAdapter":
        """`load_lora_adapter(path)`, then, when `base_names` is given, `check_names(base_names)`."""
        adapter = load_lora_adapter(path, allow_pickle=allow_pickle)
        if base_names is not None:
            adapter.check_names(set(base_names))
        return adapter

    # --- reading -----------------------------------------------------------------------------
    def _read(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        from safetensors import safe_open

        with safe_open(str(self.weights), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def _index(self, keys: list[str]) -> None:
        cfg = self.config
        factors: dict[str, dict[str, str]] = {}
        for key in keys:
            short = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            if any(tag in short for tag in _UNSUPPORTED):
                raise MergeError(f"{self.weights}: key {key!r} belongs to trainable tokens; "
                                 "valid: LoRA or DoRA adapters (no trainable_token_indices)")
            m = _LORA_KEY.match(short)
            if m is None:  # a full tensor saved with the adapter (modules_to_save, a resized embedding)
                name = short.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
                self.replacements[name.replace(".base_layer.", ".")] = key
                continue
            slot = m["part"] if m["param"] != "bias" else "bias"
            factors.setdefault(m["module"], {})[slot] = key
        for module, parts in factors.items():
            embedding = "embedding_A" in parts or "embedding_B" in parts
            a, b = (parts.get("embedding_A"), parts.get("embedding_B")) if embedding else (parts.get("A"), parts.get("B"))
            if "magnitude_vector" in parts and not cfg.get("use_dora", False):
                raise MergeError(f"{self.weights}: module {module!r} has a lora_magnitude_vector but use_dora is not set; "
                                 "valid: use_dora: true in adapter_config.json for a DoRA adapter")
            if cfg.get("use_dora", False) and "magnitude_vector" not in parts:
                raise MergeError(f"{self.weights}: use_dora is set but module {module!r} has no lora_magnitude_vector; "
                                 "valid: a DoRA adapter saved by PEFT")
            if a is None or b is None:
                raise MergeError(f"{self.weights}: module {module!r} has only one of lora_A / lora_B; "
                                 "valid: both factors for every adapted module")
            rank = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
            alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
            scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora", False) else alpha / rank
            target = LoraTarget(module, embedding, a, b, parts.get("bias"), rank, scaling,
                                bool(cfg.get("fan_in_fan_out", False)) and not embedding, parts.get("magnitude_vector"))
            self.targets[f"{module}.weight"] = target
            if target.bias_key is not None:
                self.targets[f"{module}.bias"] = target

    # --- folding -----------------------------------------------------------------------------
    def tensor_names(self) -> set[str]:
        """Names (in the base model's checkpoint) whose tensors the adapter changes or replaces."""
        return set(self.targets) | set(self.replacements)

    def check_names(self, base_names: set[str] | Mapping[str, Any]) -> None:
        """MergeError naming the first adapter target that the base model does not have."""
        for name in sorted(self.tensor_names()):
            if name not in base_names:
                raise MergeError(f"{self.weights}: adapter changes {name!r}, which the base model does not have; "
                                 "valid: an adapter trained on this base model")

    def delta(self, name: str) -> torch.Tensor | None:
        """s·BA (transposed where the layout needs it) for a weight, s·b_B for a bias, None otherwise."""
        target = self.targets.get(name)
        if target is None:
            return None
        if name.endswith(".bias") and target.bias_key is not None and name == f"{target.module}.bias":
            return self._read(target.bias_key).float() * target.scaling
        a, b = self._read(target.a_key).float(), self._read(target.b_key).float()
        if a.dim() != b.dim() or a.dim() not in (2, 3, 4, 5) or b.shape[2:] != (1,) * (b.dim() - 2):
            raise MergeError(f"{self.weights}: module {target.module!r} has LoRA factors of shapes {tuple(a.shape)} and "
                             f"{tuple(b.shape)}; valid: LoRA on Linear, Conv1D, Embedding or Conv1d/2d/3d layers "
                             "(lora_B a 1x1 convolution, as PEFT saves it)")
        if a.shape[0] != target.rank:
            raise MergeError(f"{self.weights}: {target.a_key!r} has rank {a.shape[0]} but the config gives r={target.rank}; "
                             "valid: a rank_pattern matching the saved factors")
        if b.shape[1] != a.shape[0]:
            raise MergeError(f"{self.weights}: {target.b_key!r} takes {b.shape[1]} of the {a.shape[0]} rank channels (a "
                             "grouped convolution; PEFT's update for groups > 1 is not folded); valid: groups=1 layers")
        # convolution: ΔW[o, i, k…] = Σ_r B[o, r] · A[r, i, k…] (lora_B is 1×1), a matmul over the flattened kernel
        product = (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])
        if target.transposed:
            product = product.T
        return product * target.scaling

    def fold(self, name: str, base_tensor: torch.Tensor) -> torch.Tensor:
        """The tensor `name` after merging the adapter into `base_tensor` (float32); unchanged if untouched."""
        if name in self.replacements:
            base_tensor = self._read(self.replacements[name]).float()
        d = self.delta(name)
        if d is None:
            return base_tensor
        if d.shape != base_tensor.shape:
            raise MergeError(f"{self.weights}: LoRA update for {name!r} has shape {tuple(d.shape)}, the base tensor "
                             f"{tuple(base_tensor.shape)}; valid: an adapter trained on this base model")
        merged = base_tensor.float() + d
        target = self.targets[name]
        if target.magnitude_key is None or name != f"{target.module}.weight":
            return merged
        return self._dora_rescale(target, merged)

    def _dora_rescale(self, target: LoraTarget, merged: torch.Tensor) -> torch.Tensor:
        """(m / ‖W + ΔW‖_c) ⊙ (W + ΔW), the norm over the input dimension (module docstring)."""
        magnitude = self._read(target.magnitude_key).float().reshape(-1)
        oriented = merged.T if target.transposed else merged.flatten(1)  # out×in (a convolution: out×(in·k…))
        if magnitude.numel() != oriented.shape[0]:
            raise MergeError(f"{self.weights}: {target.magnitude_key!r} has {magnitude.numel()} entries, module "
                             f"{target.module!r} has {oriented.shape[0]} output features; valid: a DoRA adapter "
                             "trained on this base model")
        factor = magnitude / torch.linalg.norm(oriented, dim=1)
        return merged * (factor[None, :] if target.transposed else factor.reshape(-1, *[1] * (merged.dim() - 1)))


def fold_lora_tensor(adapter: LoraAdapter, name: str, base_tensor: torch.Tensor) -> torch.Tensor:
    """`adapter.fold(name, base_tensor)`: W + s·BA for an adapted weight, else the (replaced) base tensor."""
    return adapter.fold(name, base_tensor)


class FoldedLora(Mapping[str, torch.Tensor]):
    """Lazy view "base + adapter": `view[name]` folds one tensor on access, nothing is cached."""

    def __init__(self, adapter: LoraAdapter, base: Mapping[str, torch.Tensor]):
        self.adapter = adapter
        self.base = base
        adapter.check_names(set(base) | set(adapter.replacements))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.adapter.replacements and name not in self.base:
            return self.adapter.fold(name, self.adapter._read(self.adapter.replacements[name]))
        return self.adapter.fold(name, self.base[name])

    def __iter__(self) -> Iterator[str]:
        yield from self.base
        yield from (n for n in self.adapter.replacements if n not in self.base)

    def __len__(self) -> int:
        return len(set(self.base) | set(self.adapter.replacements))


def load_lora_adapter(path: str | Path, *, allow_pickle: bool = False) -> LoraAdapter:
    """Open a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors)."""
    directory = Path(path)
    config_path = directory / "adapter_config.json"
    if not config_path.is_file():
        raise MergeError(f"{directory}: no adapter_config.json; valid: a directory written by PEFT save_pretrained")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise MergeError(f"{config_path}: not valid JSON ({exc.msg}); valid: PEFT's adapter_config.json") from None
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise MergeError(f"{config_path}: peft_type {config.get('peft_type')!r}; valid: 'LORA'")
    for option, problem in (("layer_replication", "layer replication"),
                            ("trainable_token_indices", "trainable tokens")):
        if config.get(option):
            raise MergeError(f"{config_path}: {option} is set ({problem} cannot be folded); valid: {option} unset")
    if config.get("use_dora") and config.get("lora_bias"):
        raise MergeError(f"{config_path}: use_dora and lora_bias are both set (PEFT defines no merge for that); "
                         "valid: one of them")
    safetensors_path, bin_path = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    if safetensors_path.is_file():
        from safetensors import safe_open

        with safe_open(str(safetensors_path), framework="pt", device="cpu") as f:
            keys = list(f.keys())
        return LoraAdapter(directory, config, safetensors_path, keys, None)
    if bin_path.is_file():
        if not allow_pickle:
            raise MergeError(f"{bin_path}: pickled weights are refused; valid: adapter_model.safetensors, "
                             "or allow_pickle=True to read it with torch.load(weights_only=True)")
        tensors = torch.load(bin_path, map_location="cpu", weights_only=True)
        if not isinstance(tensors, Mapping):
            raise MergeError(f"{bin_path}: holds a {type(tensors).__name__}; valid: a state dict of tensors")
        return LoraAdapter(directory, config, bin_path, list(tensors), dict(tensors))
    raise MergeError(f"{directory}: no adapter_model.safetensors or adapter_model.bin; valid: a PEFT adapter directory")

"""Reading experts lazily and checking them before any heavy work.

A `TensorSource` is one model: a name → (shape, dtype) index read from file headers only, and
`load(name)` that reads one tensor through a memory map. Sources: a safetensors file, a HF
checkpoint directory (single file or sharded with `model.safetensors.index.json`), an in-memory
state_dict / nn.Module, a PEFT LoRA adapter folded onto a base (`base+adapter`), and pickle `.bin`
checkpoints only when explicitly allowed (then loaded with `weights_only=True`).
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from .base import MergeError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
CONFIG_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
    "added_tokens.json", "chat_template.jinja",
)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype


def read_safetensors_header(path: Path, with_offsets: bool = False):
    """Parse and check a safetensors header without reading tensor data.

    Detects truncation and corruption: header length beyond the file, invalid JSON, unknown
    dtypes, offsets that disagree with shape × itemsize or run past the end of the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MergeError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise MergeError(f"{path}: corrupted or truncated safetensors header (says {n} bytes, file has {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MergeError(f"{path}: corrupted safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise MergeError(f"{path}: corrupted safetensors header (not a JSON object)")
    data_len = size - 8 - n
    out: dict[str, TensorMeta] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise MergeError(f"{path}: tensor {name!r} has a malformed header entry") from None
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * dtype.itemsize or start < 0:
            raise MergeError(f"{path}: tensor {name!r} header offsets disagree with shape {list(shape)} {info['dtype']}")
        if end > data_len:
            raise MergeError(f"{path}: truncated: tensor {name!r} needs bytes up to {end}, file holds {data_len}")
        out[name] = (TensorMeta(shape, dtype), start, end) if with_offsets else TensorMeta(shape, dtype)
    return (8 + n, out) if with_offsets else out


class TensorSource:
    """One model's tensors: `index` from headers, `load(name)` reads one tensor lazily."""

    ref: str
    index: dict[str, TensorMeta]
    files: list[Path]  # files whose sha256 goes into the manifest
    config_dir: Path | None = None

    def load(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def where(self, name: str) -> str:
        return self.ref

    def release(self) -> None:
        """Drop memory held for tensors loaded so far (sources backed by files)."""

    def config(self) -> dict:
        if self.config_dir and (self.config_dir / "config.json").exists():
            try:
                return json.loads((self.config_dir / "config.json").read_text())
            except json.JSONDecodeError:
                raise MergeError(f"{self.config_dir / 'config.json'}: not valid JSON") from None
        return {}


class SafetensorsSource(TensorSource):
    """Zero-copy tensors over a private memory map of each file.

    `release()` drops the pages read so far from this process (MADV_DONTNEED; they stay in the page
    cache and re-read from the file if touched again), so resident memory follows the tensors of
    the current output name, not the number of experts or their size."""

    def __init__(self, ref: str, files: list[Path], config_dir: Path | None):
        self.ref, self.files, self.config_dir = ref, files, config_dir
        self.index, self._where = {}, {}
        self._maps: dict[Path, mmap.mmap] = {}
        self._touched: list[tuple[mmap.mmap, int, int]] = []
        for f in files:
            header_end, entries = read_safetensors_header(f, with_offsets=True)
            for name, (meta, start, end) in entries.items():
                self.index[name] = meta
                self._where[name] = (f, header_end + start, end - start)

    def where(self, name: str) -> str:
        return str(self._where[name][0]) if name in self._where else self.ref

    def load(self, name: str) -> torch.Tensor:
        f, offset, nbytes = self._where[name]
        meta = self.index[name]
        mm = self._maps.get(f)
        if mm is None:
            with open(f, "rb") as fh:
                mm = self._maps[f] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        if nbytes == 0:
            return torch.empty(meta.shape, dtype=meta.dtype)
        self._touched.append((mm, offset, nbytes))
        if offset % meta.dtype.itemsize:  # unaligned data cannot be viewed in place
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset).clone()
            return raw.view(meta.dtype).reshape(meta.shape)
        return torch.frombuffer(mm, dtype=meta.dtype, count=nbytes // meta.dtype.itemsize, offset=offset).reshape(meta.shape)

    def release(self) -> None:
        for mm, offset, nbytes in self._touched:
            start = offset - offset % mmap.PAGESIZE
            mm.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)
        self._touched.clear()


class MemorySource(TensorSource):
    """A state_dict or nn.Module given through the Python API."""

    def __init__(self, ref: str, tensors: Mapping[str, torch.Tensor]):
        self.ref, self.files, self.config_dir = ref, [], None
        self._t = {k: v.detach() for k, v in tensors.items() if isinstance(v, torch.Tensor)}
        self.index = {k: TensorMeta(tuple(v.shape), v.dtype) for k, v in self._t.items()}

    def load(self, name: str) -> torch.Tensor:
        return self._t[name]


class FoldedLoraSource(TensorSource):
    """base + PEFT LoRA adapter, folded tensor by tensor: W + scale·B·A (see merge/lora.py)."""

    def __init__(self, base: TensorSource, adapter_dir: Path, allow_pickle: bool):
        from .lora import LoraAdapter

        self.base = base
        self.adapter = LoraAdapter.load(adapter_dir, base_names=list(base.index), allow_pickle=allow_pickle)
        self.ref = f"{base.ref}+{adapter_dir}"
        self.files = list(base.files) + list(self.adapter.files)
        self.config_dir = base.config_dir
        self.index = dict(base.index)
        if self.adapter.replacements:  # tensors saved whole (a resized embedding): their own shapes
            header = read_safetensors_header(self.adapter.weights) if self.adapter.weights.suffix == ".safetensors" else {}
            for name, key in self.adapter.replacements.items():
                if key in header:
                    self.index[name] = header[key]

    def where(self, name: str) -> str:
        return self.ref

    def load(self, name: str) -> torch.Tensor:
        return self.adapter.fold(name, self.base.load(name))

    def release(self) -> None:
        self.base.release()


def _pickle_source(ref: str, files: list[Path], config_dir: Path | None) -> TensorSource:
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with warnings.catch_warnings():  # torch's protocol warnings would break the one-line error
                warnings.simplefilter("ignore")
                # mmap needs the zip format; legacy (pre-1.6) pickle checkpoints are read whole
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(f))
        except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
            raise MergeError(f"{f}: refused by torch.load(weights_only=True): it holds objects other than "
                             f"tensors and plain containers ({type(e).__name__}); only plain state_dicts load") from None
        if not isinstance(sd, dict):
            raise MergeError(f"{f}: expected a state_dict (a dict of tensors), got {type(sd).__name__}")
        tensors.update(sd)
    src = MemorySource(ref, tensors)
    src.files, src.config_dir = files, config_dir
    return src


def _refuse_pickle(path: Path, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise MergeError(
            f"{path}: pickle checkpoints can run code when loaded and are refused; convert to safetensors, "
            "or pass --allow-pickle (allow_pickle=True) to load it with torch.load(weights_only=True)"
        )


def open_model(ref: str, *, allow_pickle: bool = False, memory: Mapping[str, object] | None = None,
               lora_base: TensorSource | None = None) -> TensorSource:
    """Open one model reference: a label of an in-memory model, `base+adapter`, a file or a directory."""
    memory = memory or {}
    if ref in memory:
        obj = memory[ref]
        tensors = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
        if not isinstance(tensors, Mapping):
            raise MergeError(f"model {ref!r}: expected an nn.Module or a state_dict, got {type(obj).__name__}")
        return MemorySource(ref, tensors)
    if "+" in ref and not Path(ref).exists():
        base_ref, adapter = ref.split("+", 1)
        base = open_model(base_ref, allow_pickle=allow_pickle, memory=memory)
        if not Path(adapter).is_dir():
            raise MergeError(f"{adapter}: LoRA adapter directory not found (in {ref!r}); valid: 'BASE+ADAPTER_DIR' "
                             "with a PEFT adapter folder")
        return FoldedLoraSource(base, Path(adapter), allow_pickle)
    path = Path(ref)
    if not path.exists():
        raise MergeError(f"{ref}: no such file or directory (models are local paths; torchmerge never downloads)")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsSource(ref, [path], None)
        if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            _refuse_pickle(path, allow_pickle)
            return _pickle_source(ref, [path], None)
        raise MergeError(f"{ref}: unknown checkpoint format; valid: .safetensors file, HF directory, PEFT adapter directory")
    if (path / "adapter_config.json").exists():
        if lora_base is None:
            raise MergeError(f"{ref}: is a PEFT LoRA adapter; give it with its base as 'BASE+{ref}' or set base_model")
        return FoldedLoraSource(lora_base, path, allow_pickle)
    return SafetensorsSource(ref, _hf_files(path), path) if _has_safetensors(path) else _hf_pickle(path, ref, allow_pickle)


def _has_safetensors(path: Path) -> bool:
    return (path / "model.safetensors.index.json").exists() or any(path.glob("*.safetensors"))


def _hf_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise MergeError(f"{index}: not a valid index (needs a 'weight_map' object)") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f for f in files if not f.exists()]
        if missing:
            raise MergeError(f"{index}: lists shard {missing[0].name} which does not exist")
        return files
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors"))


def _hf_pickle(path: Path, ref: str, allow_pickle: bool) -> TensorSource:
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise MergeError(f"{ref}: directory has no model.safetensors, sharded index, or pytorch_model.bin")
    _refuse_pickle(bins[0], allow_pickle)
    return _pickle_source(ref, bins, path)


def copy_config_files(src_dir: Path | None, dst: Path) -> list[str]:
    if src_dir is None:
        return []
    copied = []
    for name in CONFIG_FILES:
        if (src_dir / name).exists():
            (dst / name).write_bytes((src_dir / name).read_bytes())
            copied.append(name)
    return copied

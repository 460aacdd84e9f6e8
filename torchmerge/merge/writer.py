"""Atomic, streaming, sharded safetensors output.

The merge plan knows every output tensor's name, shape and dtype before any data is computed, so
each shard's safetensors header is written first and tensors are appended as they are produced:
memory stays at one tensor whatever the shard size. Everything goes to a temporary sibling
directory that is renamed into place only when complete; on any failure it is removed.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from .base import MergeError
from .io import DTYPE_CODES


@dataclass(frozen=True)
class OutTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '750K', a byte count, or mergekit's '5B' (five billion bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(B?)\s*", str(text).upper())
    if not m or float(m.group(1)) <= 0:
        raise MergeError(f"--shard-size {text!r} is not a size; valid: a positive size such as 5GB, 500MB, 1000000")
    number, unit, b = m.groups()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 10**9 if b else 1}[unit]
    return int(float(number) * scale)


def plan_shards(tensors: list[OutTensor], shard_size: int) -> list[list[OutTensor]]:
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header_bytes(tensors: list[OutTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Write tensors in plan order into pre-laid-out shards inside a temporary directory."""

    def __init__(self, out_dir: Path, tensors: list[OutTensor], shard_size: int, force: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not force:
            raise MergeError(f"{self.out_dir}: output directory exists; choose another or pass --force to replace it")
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir()
        self.shards = plan_shards(tensors, shard_size)
        self.names = shard_file_names(len(self.shards))
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._fh: BinaryIO | None = None
        self._shard = -1
        # progress shared with `hash_as_written` (another thread): bytes of each shard on file, closed shards
        self._cond = threading.Condition()
        self._written = [0] * len(self.shards)
        self._closed = [False] * len(self.shards)
        self._aborted = False

    def write(self, name: str, tensor: torch.Tensor) -> None:
        si, expected = self._order[self._pos]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise RuntimeError(f"writer expected {expected} next, got {name} {tuple(tensor.shape)} {tensor.dtype}")
        if si != self._shard:
            self._open(si)
        assert self._fh is not None
        data = tensor.contiguous().view(torch.uint8).numpy() if tensor.numel() else b""
        self._fh.write(memoryview(data) if len(data) else b"")
        self._pos += 1
        self._publish()

    def _publish(self, closed: int | None = None) -> None:
        """Tell `hash_as_written` how far the current shard is on file (and which shard is complete)."""
        if self._fh is not None:
            self._fh.flush()
        with self._cond:
            if self._fh is not None:
                self._written[self._shard] = self._fh.tell()
            if closed is not None:
                self._closed[closed] = True
            self._cond.notify_all()

    def _open(self, si: int) -> None:
        previous = self._shard
        if self._fh:
            self._fh.close()
            self._fh = None
            self._publish(closed=previous)
        self._shard = si
        self._fh = open(self.tmp / self.names[si], "wb")
        self._fh.write(_header_bytes(self.shards[si], {"format": "pt"}))

    def hash_as_written(self) -> dict[str, str]:
        """sha256 of every shard file, read while the shards are being written (from the page cache,
        right behind the writer). Runs in a helper thread; returns {} when the write is aborted."""
        hashes: dict[str, str] = {}
        for si, name in enumerate(self.names):
            h, pos, fd = hashlib.sha256(), 0, None
            try:
                while True:
                    with self._cond:
                        while not (self._aborted or self._closed[si] or self._written[si] > pos):
                            self._cond.wait()
                        if self._aborted:
                            return {}
                        end, closed = self._written[si], self._closed[si]
                    if pos < end and fd is None:
                        fd = os.open(self.tmp / name, os.O_RDONLY)
                    while pos < end:
                        block = os.pread(fd, min(end - pos, 1 << 24), pos)
                        h.update(block)
                        pos += len(block)
                    if closed:
                        break
            finally:
                if fd is not None:
                    os.close(fd)
            if pos:
                hashes[name] = h.hexdigest()
        return hashes

    def add_file(self, name: str, data: bytes) -> None:
        (self.tmp / name).write_bytes(data)

    def close_shards(self) -> None:
        """Close the last shard and write the index (idempotent); called before hashing the outputs."""
        if self._pos != len(self._order):
            raise RuntimeError(f"writer got {self._pos} of {len(self._order)} tensors")
        if self._fh:
            self._publish()
            self._fh.close()
            self._fh = None
        with self._cond:
            self._closed = [True] * len(self.shards)
            self._cond.notify_all()
        if len(self.shards) > 1:
            weight_map = {t.name: self.names[si] for si, t in self._order}
            total = sum(t.nbytes for _, t in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    def finish(self) -> Path:
        """Close the last shard, write the index, rename the directory into place."""
        self.close_shards()
        for f in self.tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if self.out_dir.exists():  # --force: keep the old one until the new one is in place
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.rename(self.out_dir, old)
            os.rename(self.tmp, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        """Remove everything written (idempotent); a running `hash_as_written` returns."""
        with self._cond:
            self._aborted = True
            self._cond.notify_all()
        if self._fh:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self.tmp, ignore_errors=True)


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, hashed straight from its mapped pages (no copy into a read buffer); each
    hashed chunk is unmapped again (MADV_DONTNEED) so the process's RSS stays at one chunk."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                for start in range(0, size, chunk):
                    h.update(view[start:start + chunk])
                    m.madvise(mmap.MADV_DONTNEED, start, min(chunk, size - start))
            finally:
                view.release()
    return h.hexdigest()

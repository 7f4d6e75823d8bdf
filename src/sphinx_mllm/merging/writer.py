"""A streaming writer of sharded safetensors checkpoints.

Every output tensor's name, dtype and shape are known before any data is read, so the shards are planned up
front and each shard's header is written first; tensors are then appended one at a time as they are computed.
Nothing but the tensor being written is held in memory, whatever the shard size. The files are the standard
format (8-byte header length, JSON header padded with spaces to 8 bytes, raw little-endian data in header
order), named as Hugging Face names them: one `model.safetensors`, or `model-0000x-of-0000y.safetensors` plus
`model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from sphinx_mllm.merging.sources import INDEX_NAME, SINGLE_NAME, TORCH_TO_ST
from sphinx_mllm.utils import SphinxError, atomic_write_text

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes from `"5GB"`, `"500MB"`, `"25MiB"` or a plain number (KB/MB/GB are powers of 10, as in
    Hugging Face's `max_shard_size`)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _SIZE_UNITS:
            raise SphinxError(f"bad size {text!r}: expected e.g. 5GB, 500MB, 25MiB or a number of bytes")
        value = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if value <= 0:
        raise SphinxError(f"bad size {text!r}: must be positive")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor: name, dtype and shape."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in the given order: a shard takes tensors until the next one would pass the limit (a
    tensor larger than the limit gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        if not shards or (size + spec.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE_NAME] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _header_bytes(shard: Sequence[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        if spec.dtype not in TORCH_TO_ST:
            raise SphinxError(f"tensor {spec.key!r}: dtype {spec.dtype} cannot be written as safetensors")
        header[spec.key] = {"dtype": TORCH_TO_ST[spec.dtype], "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardedWriter:
    """Writes the planned tensors into `folder`; `write` must be called once per spec, in spec order."""

    def __init__(self, folder: str | os.PathLike, specs: Sequence[TensorSpec], max_shard_bytes: int) -> None:
        self.folder = Path(folder)
        self.shards = plan_shards(specs, max_shard_bytes)
        self.names = shard_names(len(self.shards))
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self.bytes_written = 0
        self.written: list[str] = []  # names in the order they reached the files

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise RuntimeError(f"writer: tensor {key!r} is one more than planned")
        shard_idx, spec = self._queue[self._next]
        if key != spec.key or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
            raise RuntimeError(f"writer: got {key!r} {tensor.dtype} {tuple(tensor.shape)}, planned {spec}")
        if self._file is None:
            self._file = (self.folder / self.names[shard_idx]).open("wb")
            self._file.write(_header_bytes(self.shards[shard_idx]))
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self.bytes_written += spec.nbytes
        self.written.append(key)
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard_idx:
            self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Check that every planned tensor was written, then write the index (when there are several shards)."""
        if self._next != len(self._queue):
            raise RuntimeError(f"writer: {len(self._queue) - self._next} planned tensors were never written")
        if len(self.shards) > 1:
            weight_map = {spec.key: self.names[i] for i, spec in self._queue}
            total_params = sum(int(torch.Size(spec.shape).numel()) for _, spec in self._queue)
            index = {"metadata": {"total_size": self.bytes_written, "total_parameters": total_params},
                     "weight_map": weight_map}
            atomic_write_text(self.folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close an open shard after an error (the caller's atomic folder removes the files)."""
        if self._file is not None:
            self._file.close()
            self._file = None

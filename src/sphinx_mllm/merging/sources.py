"""Where the mixer reads tensors from: one small protocol (`TensorSource`) and its two implementations.

- `SafetensorsSource`: our Hugging Face save format (`model-0000x-of-0000y.safetensors` +
  `model.safetensors.index.json`, or one `model.safetensors`), or a single `.safetensors` file. Headers are
  read once; each `get` opens the shard, copies one tensor out and closes it again, so the memory map never
  accumulates the pages of a whole shard in the process's resident memory.
- `ReleaseSource`: a release folder (`consolidated.NN-of-MM.model.pth`), read through
  `sphinx_mllm.formats.release.ReleaseCheckpoint` (tensor-parallel shards merged one tensor at a time).

`open_source(path)` picks the right one from what the folder holds.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from sphinx_mllm.utils import SphinxError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
RELEASE_GLOB = "consolidated.*.pth"

# safetensors dtype names (the header's "dtype" field) <-> torch dtypes.
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}


@runtime_checkable
class TensorSource(Protocol):
    """A checkpoint read one tensor at a time. `metadata_files()` are the non-weight files to carry over."""

    path: Path
    kind: str  # "safetensors" or "release"

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str) -> torch.Tensor: ...
    def metadata_files(self) -> list[Path]: ...
    def close(self) -> None: ...
    def __enter__(self) -> TensorSource: ...
    def __exit__(self, *exc: object) -> None: ...


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), `__metadata__` dropped."""
    try:
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise SphinxError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000:
                raise SphinxError(f"{path}: not a safetensors file (header length {n})")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SphinxError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise SphinxError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    return header


def _header_entries(shard: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, entry) pairs of a shard in file order; a malformed entry is a SphinxError naming it."""
    entries = read_safetensors_header(shard)
    for key, entry in entries.items():
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
            raise SphinxError(f"{shard}: malformed header entry for tensor {key!r}")
    return sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0])


def _is_weight_file(path: Path) -> bool:
    name = path.name
    return (name.endswith((".safetensors", ".pth", ".bin", ".pt")) or name == INDEX_NAME
            or name == "pytorch_model.bin.index.json")


def _folder_metadata_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and not _is_weight_file(p))


class SafetensorsSource:
    """A safetensors checkpoint (folder with an index or one `model.safetensors`, or one file)."""

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._shard: dict[str, Path] = {}
        self._info: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        order: list[tuple[int, int, str]] = []
        for n, shard in enumerate(self._shards()):
            for key, entry in _header_entries(shard):
                if key in self._shard:
                    raise SphinxError(f"{self.path}: tensor {key!r} is in two shards ({self._shard[key].name}, "
                                      f"{shard.name})")
                if entry["dtype"] not in ST_DTYPES:
                    raise SphinxError(f"{shard}: tensor {key!r} has unsupported dtype {entry['dtype']}")
                self._shard[key] = shard
                self._info[key] = (ST_DTYPES[entry["dtype"]], tuple(entry["shape"]))
                order.append((n, entry["data_offsets"][0], key))
        self._keys = [k for _, _, k in order]

    def _shards(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        if not self.path.is_dir():
            raise SphinxError(f"checkpoint not found: {self.path}")
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise SphinxError(f"{index}: not a safetensors index (no 'weight_map')") from None
            shards = [self.path / name for name in dict.fromkeys(weight_map.values())]
            missing = [p.name for p in shards if not p.is_file()]
            if missing:
                raise SphinxError(f"{self.path}: shards named in {INDEX_NAME} are missing: {missing}")
            return shards
        if (self.path / SINGLE_NAME).is_file():
            return [self.path / SINGLE_NAME]
        raise SphinxError(f"{self.path}: no {INDEX_NAME} or {SINGLE_NAME} (expected a safetensors checkpoint)")

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._info[key][1]

    def dtype(self, key: str) -> torch.dtype:
        return self._info[key][0]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        # Open per tensor: a handle kept open would leave every touched page of its memory map resident.
        with safe_open(str(self._shard[key]), framework="pt") as f:
            return f.get_tensor(key)

    def metadata_files(self) -> list[Path]:
        return [] if self.path.is_file() else _folder_metadata_files(self.path)

    def close(self) -> None:
        """Nothing stays open between calls."""

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReleaseSource:
    """A release folder of `consolidated.NN-of-MM.model.pth` shards, through `formats.release.ReleaseCheckpoint`
    (keys keep their release names, `llma.*`)."""

    kind = "release"

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            from sphinx_mllm.formats.release import ReleaseCheckpoint
        except ImportError:
            raise SphinxError(f"{path}: release (.pth) checkpoints need sphinx_mllm.formats.release, which "
                              "this installation lacks") from None
        self.path = Path(path)
        self._ckpt = ReleaseCheckpoint(self.path)
        self._ckpt.__enter__()

    def keys(self) -> list[str]:
        return list(self._ckpt.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._ckpt.shape(key))

    def dtype(self, key: str) -> torch.dtype:
        return self._ckpt.dtype(key)

    def get(self, key: str) -> torch.Tensor:
        return self._ckpt.get(key)

    def metadata_files(self) -> list[Path]:
        return _folder_metadata_files(self.path)

    def close(self) -> None:
        self._ckpt.__exit__(None, None, None)

    def __enter__(self) -> ReleaseSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str | os.PathLike) -> TensorSource:
    """A safetensors source, or a release source for a folder of `consolidated.*.pth` shards."""
    path = Path(path)
    if not path.exists():
        raise SphinxError(f"checkpoint not found: {path}")
    if path.is_dir() and any(path.glob(RELEASE_GLOB)) and not any(path.glob("*.safetensors")):
        return ReleaseSource(path)  # ReleaseCheckpoint names what is wrong with an incomplete folder
    return SafetensorsSource(path)

"""The release's checkpoint folders (Alpha-VLLM/LLaMA2-Accessory), read one tensor at a time.

A release folder holds `consolidated.NN-of-MM.model.pth` (one torch pickle per tensor-parallel rank,
`{"model": state_dict}` or a bare state dict), `config.json` (the LLM's ModelArgs), `meta.json`
(`{"llama_type": ...}`) and `tokenizer.model` (SPHINX.md section 7).

`ReleaseCheckpoint` shows the merged view: `keys()` are the release names (`llma.` ...), `get(key)`
concatenates the tensor-parallel pieces by the release's rules. Shards are opened with
`weights_only=True` (a pickle that needs code is refused) and memory-mapped, so holding every shard open
costs page cache, not memory: peak memory is the tensor being merged.

Split rules (the manifests' `tp_split` column): column-parallel weights (wq, wk, wv, w1, w3, output) on
dim 0; row-parallel (wo, w2) on dim 1; the token embedding on dim 1; Mixtral's fused experts
`feed_forward.w1|w2|w3` ([E * H, D]) viewed as [E, H, D] and split on dim 1; everything else replicated.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import torch

from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

logger = get_logger(__name__)

SplitKind = Literal["column", "row", "embedding", "moe_expert", "replicated"]

SHARD_RE = re.compile(r"^consolidated\.(\d{2})-of-(\d{2})\.model\.pth$")
PREFIX = "llma."
META_FILE = "meta.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"

_COLUMN_RE = re.compile(r"^llma\.(layers\.\d+\.(attention\.w[qkv]|feed_forward\.w[13])\.weight|output\.weight)$")
_ROW_RE = re.compile(r"^llma\.layers\.\d+\.(attention\.wo|feed_forward\.w2)\.weight$")
_MOE_RE = re.compile(r"^llma\.layers\.\d+\.feed_forward\.w[123]$")
_EMBEDDING_KEY = "llma.tok_embeddings.weight"


def shard_name(rank: int, num_shards: int) -> str:
    """`consolidated.{rank:02d}-of-{num_shards:02d}.model.pth`"""
    return f"consolidated.{rank:02d}-of-{num_shards:02d}.model.pth"


def split_kind(key: str) -> SplitKind:
    """How the release splits `key` across tensor-parallel ranks (agrees with the manifests' `tp_split`)."""
    if key == _EMBEDDING_KEY:
        return "embedding"
    if _COLUMN_RE.match(key):
        return "column"
    if _ROW_RE.match(key):
        return "row"
    if _MOE_RE.match(key):
        return "moe_expert"
    return "replicated"


def find_shards(folder: str | Path) -> list[Path]:
    """The folder's shard files in rank order; a gap, a mixed `-of-MM` or no shard at all is an error."""
    folder = Path(folder)
    found: dict[int, tuple[int, Path]] = {}
    for path in folder.iterdir():
        m = SHARD_RE.match(path.name)
        if m:
            found[int(m.group(1))] = (int(m.group(2)), path)
    if not found:
        raise SphinxError(f"{folder}: no checkpoint shards (expected consolidated.NN-of-MM.model.pth files)")
    totals = {total for total, _ in found.values()}
    if len(totals) != 1:
        raise SphinxError(f"{folder}: shards disagree on their count: {sorted(p.name for _, p in found.values())}")
    total = totals.pop()
    missing = [shard_name(r, total) for r in range(total) if r not in found]
    extra = [p.name for r, (_, p) in sorted(found.items()) if r >= total]
    if missing or extra:
        raise SphinxError(f"{folder}: incomplete shard set of {total}: missing {missing}, unexpected {extra}")
    return [found[r][1] for r in range(total)]


def is_release_folder(folder: str | Path) -> bool:
    """True for a folder with `meta.json` naming a `llama_type` and at least one consolidated shard."""
    folder = Path(folder)
    if not (folder / META_FILE).is_file():
        return False
    try:
        meta = json.loads((folder / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict) or "llama_type" not in meta:
        return False
    return any(SHARD_RE.match(p.name) for p in folder.iterdir())


def load_shard(path: str | Path) -> dict[str, torch.Tensor]:
    """Open one shard safely: `weights_only=True`, memory-mapped when the file is a zip checkpoint.

    Accepts `{"model": state_dict}` (other top-level entries are ignored) or a bare state dict.
    """
    path = Path(path)
    mmap = zipfile.is_zipfile(path)  # legacy (pre-1.6) pickles cannot be memory-mapped
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise SphinxError(f"{path}: refused to load: the pickle needs code to run, not just tensors "
                          f"(weights_only=True). {reason}") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SphinxError(f"{path}: cannot read this checkpoint shard (truncated or not a torch file?): "
                          f"{first}") from None
    if not mmap:
        logger.warning("%s is a legacy torch pickle: read into memory, not memory-mapped", path.name)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise SphinxError(f"{path}: expected a state dict or {{'model': state_dict}}, got {type(obj).__name__}")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor))
    if bad:
        raise SphinxError(f"{path}: entries that are not tensors: {bad[:20]}{' ...' if len(bad) > 20 else ''}")
    return obj


def _split_dim(kind: SplitKind) -> int | None:
    return {"column": 0, "row": 1, "embedding": 1, "moe_expert": 1}.get(kind)


def merge_pieces(key: str, pieces: Sequence[torch.Tensor], num_experts: int | None = None) -> torch.Tensor:
    """Concatenate one tensor's per-rank pieces by its split kind (replicated: the first piece)."""
    kind = split_kind(key)
    if kind == "replicated" or len(pieces) == 1:
        return pieces[0]
    if kind == "moe_expert":
        if not num_experts:
            raise SphinxError(f"{key}: the number of experts is needed to merge fused expert weights")
        views = [p.reshape(num_experts, -1, p.shape[-1]) for p in pieces]  # [E, H / n, D] each
        return torch.cat(views, dim=1).reshape(-1, pieces[0].shape[-1])  # [E * H, D]
    dim = _split_dim(kind)
    assert dim is not None
    return torch.cat(list(pieces), dim=dim)


def split_tensor(key: str, tensor: torch.Tensor, num_shards: int, num_experts: int | None = None) -> list[torch.Tensor]:
    """The inverse of `merge_pieces`: one contiguous piece per rank (replicated: the same tensor each)."""
    kind = split_kind(key)
    if kind == "replicated" or num_shards == 1:
        return [tensor] * num_shards
    if kind == "moe_expert":
        if not num_experts:
            raise SphinxError(f"{key}: the number of experts is needed to split fused expert weights")
        view = tensor.reshape(num_experts, -1, tensor.shape[-1])
        if view.shape[1] % num_shards:
            raise SphinxError(f"{key}: expert hidden size {view.shape[1]} does not split into {num_shards} shards")
        return [p.reshape(-1, tensor.shape[-1]).contiguous() for p in torch.chunk(view, num_shards, dim=1)]
    dim = _split_dim(kind)
    assert dim is not None
    if tensor.shape[dim] % num_shards:
        raise SphinxError(f"{key}: dim {dim} of size {tensor.shape[dim]} does not split into {num_shards} shards")
    return [p.contiguous() for p in torch.chunk(tensor, num_shards, dim=dim)]


class ReleaseCheckpoint:
    """A release folder seen as one merged state dict, read one tensor at a time.

    >>> with ReleaseCheckpoint("SPHINX-v2-1k") as ckpt:
    ...     ckpt.llama_type, ckpt.shape("llma.tok_embeddings.weight")
    ('llama_ens5', (32000, 5120))

    `check_replicas`: `get` compares a replicated tensor across all shards and names it if they differ.
    """

    def __init__(self, folder: str | Path, check_replicas: bool = True) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SphinxError(f"{self.folder}: not a folder")
        self.check_replicas = check_replicas
        self.meta = self._read_json(META_FILE, required=True)
        llama_type = self.meta.get("llama_type")
        if not isinstance(llama_type, str) or not llama_type:
            raise SphinxError(f"{self.folder / META_FILE}: no 'llama_type' string")
        self.llama_type: str = llama_type
        self.llm_args: dict[str, Any] = self._read_json(CONFIG_FILE, required=False)
        self.shard_paths = find_shards(self.folder)
        self._shards: list[dict[str, torch.Tensor]] | None = [load_shard(p) for p in self.shard_paths]
        self._keys = self._check_key_sets()
        self._shapes = {k: self._merged_shape(k) for k in self._keys}

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.shard_paths)

    @property
    def tokenizer_path(self) -> Path | None:
        path = self.folder / TOKENIZER_FILE
        return path if path.is_file() else None

    def keys(self) -> list[str]:
        """Release names of every tensor, in the first shard's order."""
        return list(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        """Merged shape of `key`, without reading its data."""
        self._require(key)
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        self._require(key)
        return self._pieces(key)[0].dtype

    def num_experts(self, key: str) -> int | None:
        """Experts of a fused MoE tensor: `config.json`'s `moe.num_experts`, else its layer's gate rows."""
        moe = self.llm_args.get("moe")
        if isinstance(moe, dict) and moe.get("num_experts"):
            return int(moe["num_experts"])
        gate = re.sub(r"\.w[123]$", ".gate.weight", key)
        if gate in self._shapes:
            return int(self._pieces(gate)[0].shape[0])
        return None

    # -- data -------------------------------------------------------------------------------------
    def get(self, key: str) -> torch.Tensor:
        """The merged tensor (a fresh tensor for split keys; the memory-mapped one for replicated keys)."""
        self._require(key)
        pieces = self._pieces(key)
        kind = split_kind(key)
        if kind == "replicated" and self.check_replicas:
            for rank, other in enumerate(pieces[1:], start=1):
                same = other.dtype == pieces[0].dtype and torch.equal(other, pieces[0])
                if not same:
                    raise SphinxError(f"replicated tensor {key!r} differs between {self.shard_paths[0].name} and "
                                      f"{self.shard_paths[rank].name}")
        return merge_pieces(key, pieces, self.num_experts(key) if kind == "moe_expert" else None)

    def close(self) -> None:
        """Drop the memory maps (tensors already returned stay valid)."""
        self._shards = None

    def __enter__(self) -> ReleaseCheckpoint:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _read_json(self, name: str, required: bool) -> dict[str, Any]:
        path = self.folder / name
        if not path.is_file():
            if required:
                raise SphinxError(f"{self.folder}: no {name}; is this a release checkpoint folder?")
            logger.warning("%s: no %s; LLM sizes are taken from the tensors and the preset", self.folder, name)
            return {}
        try:
            data = json.loads(path.read_text())
        except ValueError as exc:
            raise SphinxError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise SphinxError(f"{path}: expected a JSON object")
        return data

    def _require(self, key: str) -> None:
        if self._shards is None:
            raise SphinxError(f"{self.folder}: checkpoint is closed")
        if key not in self._shapes:
            raise KeyError(key)

    def _pieces(self, key: str) -> list[torch.Tensor]:
        assert self._shards is not None
        return [shard[key] for shard in self._shards]

    def _check_key_sets(self) -> list[str]:
        assert self._shards is not None
        first = list(self._shards[0])
        reference = set(first)
        problems = []
        for path, shard in zip(self.shard_paths[1:], self._shards[1:]):
            lacking, extra = sorted(reference - set(shard)), sorted(set(shard) - reference)
            if lacking or extra:
                problems.append(f"{path.name}: lacks {lacking[:10]}, has extra {extra[:10]}")
        if problems:
            raise SphinxError(f"shards of {self.folder} hold different tensors: " + "; ".join(problems))
        return first

    def _merged_shape(self, key: str) -> tuple[int, ...]:
        shapes = [tuple(p.shape) for p in self._pieces(key)]
        kind = split_kind(key)
        dim = _split_dim(kind)
        if kind == "replicated" or len(shapes) == 1:
            if len(set(shapes)) != 1:
                raise SphinxError(f"replicated tensor {key!r} has different shapes across shards: {shapes}")
            return shapes[0]
        assert dim is not None
        if any(len(s) <= dim for s in shapes):
            raise SphinxError(f"tensor {key!r} ({kind}-parallel) has too few dims to split: {shapes}")
        rest = {s[:dim] + s[dim + 1:] for s in shapes}
        if kind == "moe_expert":
            rest = {s[1:] for s in shapes}
            dim = 0
        if len(rest) != 1:
            raise SphinxError(f"tensor {key!r} ({kind}-parallel) pieces disagree off the split dim: {shapes}")
        merged = list(shapes[0])
        merged[dim] = sum(s[dim] for s in shapes)
        return tuple(merged)


__all__ = [
    "CONFIG_FILE", "META_FILE", "PREFIX", "SHARD_RE", "TOKENIZER_FILE", "ReleaseCheckpoint", "SplitKind",
    "find_shards", "is_release_folder", "load_shard", "merge_pieces", "shard_name", "split_kind", "split_tensor",
]

"""A cache of the frozen encoders' outputs, so tuning does not run four vision towers on every step.

Layout of a cache folder:

    index.json                 {"format", "version", "fingerprint", "preset", "num_views", "dtype",
                                "encoders": {name: [T, C]}, "shards": [{"file", "images": [sha256, ...]}]}
    shard-00000.safetensors    tensors "<sha256>/<encoder>" of shape [V, T, C] (all views of one image)

Images are keyed by the sha256 of their file bytes, so a picture used by many records (or moved to
another folder) is computed once. The `fingerprint` hashes the encoder part of the config (specs, image
size, views) and every encoder weight; a training run refuses a cache whose fingerprint differs from its
model's, naming both. Shards are written atomically and the index is rewritten (atomically) after each
shard, so an interrupted run keeps every finished shard and a rerun computes only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import BadImageError, ImagePreprocessor
from sphinx_mllm.utils import SphinxError, atomic_write_bytes, atomic_write_text, get_logger

logger = get_logger(__name__)

CACHE_FORMAT = "sphinx-mllm-feature-cache"
CACHE_VERSION = 1
INDEX_FILE = "index.json"


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def encoder_fingerprint(model: SphinxForConditionalGeneration) -> str:
    """sha256 of the encoder config (specs, image size, view grid) and of every encoder weight's bytes."""
    if model.vision is None:
        raise SphinxError("this model has no vision encoders; there is nothing to cache")
    cfg = model.config
    digest = hashlib.sha256(json.dumps({"encoders": cfg.encoders, "image_size": cfg.image_size,
                                        "view_grid": cfg.view_grid}, sort_keys=True).encode())
    for name, tensor in sorted(model.vision.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _describe(fingerprint: str, preset: str | None) -> str:
    return f"preset {preset!r}, encoder fingerprint {fingerprint[:16]}"


class FeatureCache:
    """Read side: `cache.features_for_image(path) -> {encoder: [V, T, C]}` (safe to pickle to workers)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index_file = self.folder / INDEX_FILE
        if not index_file.is_file():
            raise SphinxError(f"{self.folder} is not a feature cache (no {INDEX_FILE}); "
                              "create it with `sphinx-mllm cache-features`")
        index = json.loads(index_file.read_text())
        if index.get("format") != CACHE_FORMAT or index.get("version") != CACHE_VERSION:
            raise SphinxError(f"{index_file}: not a version-{CACHE_VERSION} {CACHE_FORMAT} index")
        self.index: dict[str, Any] = index
        self.fingerprint: str = index["fingerprint"]
        self.preset: str | None = index.get("preset")
        self._where = {h: shard["file"] for shard in index["shards"] for h in shard["images"]}
        self._handles: dict[str, Any] = {}
        self._hash_of_path: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, image_hash: str) -> bool:
        return image_hash in self._where

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open shards do not cross process boundaries
        return state

    def check(self, model: SphinxForConditionalGeneration) -> None:
        """Refuse the cache unless it was made by exactly this model's encoders."""
        fingerprint = encoder_fingerprint(model)
        if fingerprint != self.fingerprint:
            raise SphinxError(
                f"feature cache {self.folder} was made by other encoders ({_describe(self.fingerprint, self.preset)}) "
                f"than this model's ({_describe(fingerprint, model.config.preset)}); rebuild it with "
                "`sphinx-mllm cache-features` for this model")

    def get(self, image_hash: str) -> dict[str, torch.Tensor]:
        """{encoder: [V, T, C]} of one image hash."""
        if image_hash not in self._where:
            raise KeyError(image_hash)
        file = self._where[image_hash]
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(self.folder / file), framework="pt")
        return {name: handle.get_tensor(f"{image_hash}/{name}") for name in self.index["encoders"]}

    def features_for_image(self, path: str) -> dict[str, torch.Tensor]:
        image_hash = self._hash_of_path.get(path)
        if image_hash is None:
            image_hash = self._hash_of_path[path] = file_sha256(path)
        try:
            return self.get(image_hash)
        except KeyError:
            raise SphinxError(f"image {path} (sha256 {image_hash[:16]}) is not in the feature cache {self.folder}; "
                              "run `sphinx-mllm cache-features` on this mixture again (it adds what is missing)"
                              ) from None


@dataclass
class CacheReport:
    images: int = 0  # distinct images (by content) in the input
    already_cached: int = 0
    computed: int = 0
    bad_images: int = 0
    shards_written: int = 0


class _Writer:
    """Accumulates image features and flushes them as shards, updating the index after each."""

    def __init__(self, folder: Path, index: dict[str, Any], shard_bytes: int) -> None:
        self.folder, self.index, self.shard_bytes = folder, index, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_images: list[str] = []
        self.pending_bytes = 0
        self.shards_written = 0

    def add(self, image_hash: str, feats: dict[str, torch.Tensor]) -> None:
        for name, tensor in feats.items():
            self.pending[f"{image_hash}/{name}"] = tensor.contiguous().clone()
            self.pending_bytes += tensor.numel() * tensor.element_size()
        self.pending_images.append(image_hash)
        if self.pending_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self.pending_images:
            return
        file = f"shard-{len(self.index['shards']):05d}.safetensors"
        atomic_write_bytes(self.folder / file, save_safetensors(self.pending))
        self.index["shards"].append({"file": file, "images": self.pending_images})
        atomic_write_text(self.folder / INDEX_FILE, json.dumps(self.index) + "\n")
        logger.info("wrote %s (%d images)", file, len(self.pending_images))
        self.pending, self.pending_images, self.pending_bytes = {}, [], 0
        self.shards_written += 1


def write_feature_cache(output: str | os.PathLike, index: dict[str, Any],
                        items: Iterable[tuple[str, dict[str, torch.Tensor]]], shard_bytes: int = 1 << 30) -> int:
    """Write features that did not come from running encoders (e.g. `world.oracle`'s label features) as a cache
    folder: `index` is a complete index (format, version, fingerprint, preset, num_views, dtype, encoders) without
    shards; `items` yields (image sha256, {encoder: [V, T, C]}). Returns the number of shards written."""
    folder = Path(output)
    if (folder / INDEX_FILE).exists():
        raise SphinxError(f"{folder} already holds a feature cache; use another folder")
    missing = sorted({"format", "version", "fingerprint", "num_views", "dtype", "encoders"} - set(index))
    if missing:
        raise SphinxError(f"feature cache index lacks {missing}")
    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, index["dtype"])
    writer = _Writer(folder, {**index, "shards": []}, shard_bytes)
    for image_hash, feats in items:
        writer.add(image_hash, {n: t.to(dtype) for n, t in feats.items()})
    writer.flush()
    return writer.shards_written


def _open_index(folder: Path, model: SphinxForConditionalGeneration, fingerprint: str,
                dtype: torch.dtype) -> dict[str, Any]:
    index_file = folder / INDEX_FILE
    if index_file.is_file():
        cache = FeatureCache(folder)
        if cache.fingerprint != fingerprint:
            raise SphinxError(f"{folder} already caches other encoders ({_describe(cache.fingerprint, cache.preset)}; "
                              f"this model: {_describe(fingerprint, model.config.preset)}); use another folder")
        if cache.index["dtype"] != str(dtype).removeprefix("torch."):
            raise SphinxError(f"{folder} stores {cache.index['dtype']} features; asked for {dtype}")
        return cache.index
    cfg = model.config
    specs = {s.name: [s.num_tokens, s.width] for s in cfg.encoder_specs}
    return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "fingerprint": fingerprint, "preset": cfg.preset,
            "num_views": cfg.num_views, "dtype": str(dtype).removeprefix("torch."), "encoders": specs, "shards": []}


def build_feature_cache(model: SphinxForConditionalGeneration, images: Iterable[str], output: str | os.PathLike,
                        batch_size: int = 8, dtype: torch.dtype = torch.float32,
                        shard_bytes: int = 1 << 30) -> CacheReport:
    """Run the model's frozen encoders over `images` (paths; all views) and store the outputs in `output`.

    Resumable: images already in the cache are skipped; unreadable images are counted and skipped.
    """
    if model.vision is None:
        raise SphinxError("this model has no vision encoders; there is nothing to cache")
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = encoder_fingerprint(model)
    index = _open_index(folder, model, fingerprint, dtype)
    done = {h for shard in index["shards"] for h in shard["images"]}
    writer = _Writer(folder, index, shard_bytes)
    report = CacheReport()
    device = next(model.vision.parameters()).device
    preprocess = ImagePreprocessor(image_size=model.config.image_size)
    seen: set[str] = set()
    batch: list[tuple[str, torch.Tensor]] = []

    def run_batch() -> None:
        pixels = torch.stack([px for _, px in batch]).to(device)  # [B, 3, S, S]
        with torch.no_grad():
            feats = model.vision(pixels)  # {encoder: [B * V, T, C]}
        views = model.config.num_views
        for i, (image_hash, _) in enumerate(batch):
            writer.add(image_hash, {n: f[i * views:(i + 1) * views].to("cpu", dtype) for n, f in feats.items()})
        report.computed += len(batch)
        batch.clear()

    for path in images:
        image_hash = file_sha256(path)
        if image_hash in seen:
            continue
        seen.add(image_hash)
        report.images += 1
        if image_hash in done:
            report.already_cached += 1
            continue
        try:
            pixels, _ = preprocess([path])
        except BadImageError as exc:
            logger.warning("skipping %s: %s", path, exc)
            report.bad_images += 1
            continue
        batch.append((image_hash, pixels[0]))
        if len(batch) == batch_size:
            run_batch()
    if batch:
        run_batch()
    writer.flush()
    report.shards_written = writer.shards_written
    return report


__all__ = [
    "CacheReport", "FeatureCache", "build_feature_cache", "encoder_fingerprint", "file_sha256", "write_feature_cache",
]

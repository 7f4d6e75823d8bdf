"""Oracle visual features: a "perfect encoder" for the world, to tell an encoder problem from an LLM problem.

For every world image and view, each cell of the token grid gets the generator's own labels of what covers it
(`dense.cell_targets(cover=True)`: category, colour, size and pose of the thing, category, colour and word of
the written word) as one-hots, plus one-hots of its row and column. They are written as a feature cache in the
run's own format and fingerprint (`training.feature_cache`), in the channels of one encoder, with zeros in the
others, so every training config of the run takes it in place of the real cache (`data.feature_cache`) and
`world.measure` reads it. If the LLM stages do not learn to answer from these features, better encoders
cannot help them (docs/world_report.md, fifth round).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from sphinx_mllm.config import EncoderSpec, SphinxConfig
from sphinx_mllm.training.feature_cache import INDEX_FILE, FeatureCache, file_sha256, write_feature_cache
from sphinx_mllm.utils import SphinxError, get_logger
from sphinx_mllm.world.dense import CATEGORIES, WORD_VOCAB, DenseObject, cell_targets, dense_objects, view_windows
from sphinx_mllm.world.encoders import sample_split, shared_grid, world_config_of
from sphinx_mllm.world.vocab import COLOURS, POSES

log = get_logger(__name__)

ORACLE_FIELDS: tuple[tuple[str, str, int], ...] = (
    ("thing", "category", len(CATEGORIES) + 1), ("thing", "colour", len(COLOURS) + 1), ("thing", "size", 4),
    ("thing", "pose", len(POSES) + 1), ("word", "category", len(CATEGORIES) + 1),
    ("word", "colour", len(COLOURS) + 1), ("word", "word", len(WORD_VOCAB) + 1),
)
"""(slot, field, classes incl. 0 = none) one-hot blocks of a cell, in channel order; row and column follow."""
ORACLE_SCALE = 4.0
"""Value of a set one-hot channel (row and column: half of it): the cached encoders' outputs are layer-normed
(rms ~1 over their channels); about six set channels out of ~190 give a similar rms."""
ORACLE_DIR = "features-oracle"


def oracle_width(grid: int) -> int:
    """Channels the oracle needs per cell on a `grid` x `grid` map."""
    return sum(n for _, _, n in ORACLE_FIELDS) + 2 * grid


def oracle_features(objects: Sequence[DenseObject], view_grid: int, grid: int, width: int,
                    scale: float = ORACLE_SCALE) -> torch.Tensor:
    """Label features of one image: [V, grid * grid, width] (views in the model's order: global, then raster)."""
    need = oracle_width(grid)
    if width < need:
        raise SphinxError(f"oracle features need {need} channels per cell on a {grid}x{grid} grid, the encoder has "
                          f"{width}")
    windows = view_windows(view_grid)
    out = np.zeros((len(windows), grid * grid, width), np.float32)
    cells = np.arange(grid * grid)
    for v, window in enumerate(windows):
        targets = cell_targets(objects, window, grid, cover=True)
        offset = 0
        for slot, name, n in ORACLE_FIELDS:
            value = targets[f"{slot}/{name}"][:, 0].astype(np.int64)  # [g*g], 0: none
            hit = value > 0
            out[v, cells[hit], offset + value[hit]] = scale
            offset += n
        out[v, cells, offset + cells // grid] = scale / 2  # row
        out[v, cells, offset + grid + cells % grid] = scale / 2  # column
    return torch.from_numpy(out)


def _oracle_encoder(specs: Sequence[EncoderSpec], grid: int, name: str | None) -> EncoderSpec:
    fits = [s for s in specs if s.grid == grid and s.width >= oracle_width(grid)]
    if name is not None:
        fits = [s for s in fits if s.name == name]
    if not fits:
        raise SphinxError(f"no encoder{' ' + repr(name) if name else ''} with a {grid}x{grid} grid and at least "
                          f"{oracle_width(grid)} channels to hold the oracle features")
    return fits[0]


def write_oracle_cache(run: str | Path, out: str | Path | None = None, *, encoder: str | None = None,
                       overwrite: bool = False) -> Path:
    """Oracle features of every train and eval image of a `world run` folder, as a feature cache beside its real
    one (default RUN/features-oracle) that the run's models accept. Written beside `out` and renamed into place."""
    run = Path(run)
    real = run / "features"
    if not (real / INDEX_FILE).is_file() or not (run / "world" / "manifest.json").is_file():
        raise SphinxError(f"{run} is not a `world run` folder with a world and a feature cache (run it first)")
    target = Path(out) if out is not None else run / ORACLE_DIR
    if target.exists() and not overwrite:
        raise SphinxError(f"{target} exists; pass overwrite=True (--overwrite) to replace it")
    index = FeatureCache(real).index
    config = SphinxConfig.from_pretrained(run / "init")
    grid = shared_grid(config.encoder_specs)
    chosen = _oracle_encoder(config.encoder_specs, grid, encoder)
    shapes = {name: (index["num_views"], *tokens_width) for name, tokens_width in index["encoders"].items()}
    world = run / "world"
    wconfig = world_config_of(world)

    def items() -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for split in ("train", "eval"):
            for image in sample_split(wconfig, split):
                path = world / "images" / split / f"{image.name}.png"
                if not path.is_file():
                    raise SphinxError(f"world image {path} is missing")
                feats = {n: torch.zeros(shape) for n, shape in shapes.items()}
                labels = oracle_features(dense_objects(image), config.view_grid, grid, chosen.width)
                feats[chosen.name][:, 1 if chosen.has_cls else 0:] = labels
                yield file_sha256(path), feats

    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    header = {k: index[k] for k in ("format", "version", "fingerprint", "preset", "num_views", "dtype", "encoders")}
    write_feature_cache(tmp, {**header, "oracle": {"encoder": chosen.name, "fields": [f"{s}/{f}" for s, f, _ in
                                                                                      ORACLE_FIELDS] + ["row", "col"]}},
                        items())
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    log.info("oracle features of %s in %s (encoder %s)", run, target, chosen.name)
    return target


def oracle_summary(folder: str | Path) -> dict[str, object]:
    """What an oracle cache holds (its index's `oracle` entry and image count)."""
    cache = FeatureCache(folder)
    return {**cache.index.get("oracle", {}), "images": len(cache)}


__all__ = ["ORACLE_DIR", "ORACLE_FIELDS", "oracle_features", "oracle_summary", "oracle_width", "write_oracle_cache"]

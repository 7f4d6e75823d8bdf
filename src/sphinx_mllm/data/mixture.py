"""A data mixture: a YAML file naming record files, read into one indexable dataset.

The release's format is accepted as it is:

    META:
      - path: data/llava_instruct.json     # .json (a list) or .jsonl records
        type: image_text                    # batch group: every global batch holds one type
        root: /data/coco                    # optional: folder that `image` paths are relative to
        ratio: 0.5                          # optional: the fraction of the file kept

with the meaning the release gives these keys (LLaMA2-Accessory, `FinetuneDialogDataset`): `ratio` keeps
`int(n * ratio)` records of the file, chosen once with `random.Random(seed).sample` (the release seeds
with 0, our default), the same subset in every epoch and on every rank; `type` is a free name, and
items of one type are batched together (see `sampler.py`); `root` is joined before each `image`.
Our additions, per source: `weight` (sampling weight relative to the source's size, redrawn each epoch
by the sampler, default 1) and `task` (the task name of its records; otherwise each record's own
`task`); top level: `seed` (int, default 0), `batch_by_type` (default true) and `check_images` (default
true). Relative `path` and `root` are resolved against the YAML file's folder (the release used the
working directory); without `root`, image paths are relative to the record file's folder.
Unknown keys, missing files and bad values are errors that name the key and the source.
"""

from __future__ import annotations

import bisect
import os
import random
from array import array
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sphinx_mllm.data.records import RecordFile, SkipReport
from sphinx_mllm.data.sampler import LastBatch, MixtureBatchSampler, SourceLayout
from sphinx_mllm.utils import SphinxError, get_logger, read_yaml

logger = get_logger(__name__)

SOURCE_KEYS: tuple[str, ...] = ("path", "type", "root", "ratio", "weight", "task")
TOP_KEYS: tuple[str, ...] = ("META", "seed", "batch_by_type", "check_images")


@dataclass(frozen=True)
class SourceSpec:
    """One entry of `META`, paths resolved."""

    path: Path
    type: str
    root: Path | None = None
    ratio: float = 1.0  # fraction of the file kept, in (0, 1]
    weight: float = 1.0  # sampling weight relative to the source's size, > 0
    task: str | None = None  # task of every record; None: each record's own "task"


@dataclass(frozen=True)
class MixtureConfig:
    """A validated mixture config (`from_yaml` / `from_dict`)."""

    sources: tuple[SourceSpec, ...]
    seed: int = 0
    batch_by_type: bool = True
    check_images: bool = True

    def __post_init__(self) -> None:
        if not self.sources:
            raise SphinxError("mixture config: META lists no source")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MixtureConfig:
        path = Path(path)
        data = read_yaml(path, "mixture config")
        return cls.from_dict(data, base_dir=path.parent, origin=str(path))

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | os.PathLike = ".", origin: str = "mixture config",
                  ) -> MixtureConfig:
        """Validate a parsed config; relative paths are taken from `base_dir`; `origin` names it in errors."""
        if not isinstance(data, Mapping):
            raise SphinxError(f"{origin}: expected a mapping with a 'META' list at the top")
        _no_unknown_keys(data, TOP_KEYS, origin)
        meta = data.get("META")
        if not isinstance(meta, list) or not meta:
            raise SphinxError(f"{origin}: 'META' must be a non-empty list of sources")
        sources = tuple(_source(entry, Path(base_dir), f"{origin}: META[{k}]") for k, entry in enumerate(meta))
        return cls(
            sources=sources,
            seed=_typed(data, "seed", int, 0, origin),
            batch_by_type=_typed(data, "batch_by_type", bool, True, origin),
            check_images=_typed(data, "check_images", bool, True, origin),
        )


def _no_unknown_keys(data: Mapping, allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            raise SphinxError(f"{where}: unknown key {key!r} (allowed: {', '.join(allowed)})")


def _typed(data: Mapping, key: str, kind: type, default: Any, where: str) -> Any:
    value = data.get(key, default)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise SphinxError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}")
    return float(value) if kind is float else value


def _source(entry: Any, base_dir: Path, where: str) -> SourceSpec:
    if not isinstance(entry, Mapping):
        raise SphinxError(f"{where}: expected a mapping with 'path' and 'type', got {entry!r}")
    _no_unknown_keys(entry, SOURCE_KEYS, where)
    for key in ("path", "type"):
        if key not in entry:
            raise SphinxError(f"{where}: missing required key {key!r}")
    path = base_dir / _typed(entry, "path", str, None, where)
    if not path.is_file():
        raise SphinxError(f"{where}: data file not found: {path}")
    if path.suffix not in (".json", ".jsonl"):
        raise SphinxError(f"{where}: {path} is neither .json nor .jsonl")
    kind = _typed(entry, "type", str, None, where)
    if not kind:
        raise SphinxError(f"{where}: 'type' must not be empty")
    root = None
    if entry.get("root") is not None:
        root = base_dir / _typed(entry, "root", str, None, where)
        if not root.is_dir():
            raise SphinxError(f"{where}: image root folder not found: {root}")
    ratio = _typed(entry, "ratio", float, 1.0, where)
    if not 0.0 < ratio <= 1.0:
        raise SphinxError(f"{where}: 'ratio' must be in (0, 1], got {ratio}")
    weight = _typed(entry, "weight", float, 1.0, where)
    if not weight > 0.0:
        raise SphinxError(f"{where}: 'weight' must be > 0, got {weight}")
    task = _typed(entry, "task", str, None, where) if entry.get("task") is not None else None
    return SourceSpec(path=path, type=kind, root=root, ratio=ratio, weight=weight, task=task)


@dataclass
class _LoadedSource:
    spec: SourceSpec
    records: RecordFile
    kept: array | None  # record indices kept by `ratio` (None: all)

    def __len__(self) -> int:
        return len(self.records) if self.kept is None else len(self.kept)

    def record_index(self, j: int) -> int:
        return j if self.kept is None else self.kept[j]


class MixtureDataset:
    """All sources of a config as one sequence of record dicts (no torch needed).

    Item `i` is the record with `image` made an absolute path (or None), `task` resolved, and
    `source_index` / `source_type` added. `skip_reports` holds what each file skipped.
    """

    def __init__(self, config: MixtureConfig) -> None:
        self.config = config
        self.sources: list[_LoadedSource] = []
        self._ends: list[int] = []
        for spec in config.sources:
            records = RecordFile(spec.path, spec.root, check_images=config.check_images)
            kept = None
            if spec.ratio < 1.0:
                picked = random.Random(config.seed).sample(range(len(records)), int(len(records) * spec.ratio))
                kept = array("q", sorted(picked))
            src = _LoadedSource(spec, records, kept)
            self.sources.append(src)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(src))
            logger.info("%s, type %s: %d records kept of %d valid (ratio %g, weight %g)",
                        spec.path, spec.type, len(src), len(records), spec.ratio, spec.weight)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> MixtureDataset:
        return cls(MixtureConfig.from_yaml(path))

    @property
    def skip_reports(self) -> list[SkipReport]:
        return [src.records.report for src in self.sources]

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def locate(self, index: int) -> tuple[int, int]:
        """(source index, record index in its file) of dataset item `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} out of range ({len(self)} items)")
        s = bisect.bisect_right(self._ends, index)
        start = self._ends[s - 1] if s else 0
        return s, self.sources[s].record_index(index - start)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s, r = self.locate(index)
        src = self.sources[s]
        rec = src.records[r]
        if rec.get("image") is not None:
            rec["image"] = os.path.abspath(src.records.image_root / rec["image"])
        else:
            rec["image"] = None
        rec["task"] = src.spec.task if src.spec.task is not None else rec.get("task")
        rec["source_index"] = s
        rec["source_type"] = src.spec.type
        return rec

    def layouts(self, length_fn: Callable[[dict[str, Any]], int] | None = None,
                *, with_lengths: bool = True) -> list[SourceLayout]:
        """The sources as the sampler sees them. Lengths are the records' characters, or `length_fn(item)`
        for every item (e.g. a token count; this reads the whole mixture once), or none."""
        out = []
        for s, src in enumerate(self.sources):
            offset = self._ends[s] - len(src)
            if not with_lengths:
                lengths = None
            elif length_fn is None:
                lengths = [src.records.lengths[src.record_index(j)] for j in range(len(src))]
            else:
                lengths = [int(length_fn(self[offset + j])) for j in range(len(src))]
            out.append(SourceLayout(offset, len(src), src.spec.type, src.spec.weight, lengths))
        return out

    def batch_sampler(
        self,
        global_batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        length_fn: Callable[[dict[str, Any]], int] | None = None,
        group_by_length: bool = True,
        length_window: int = 64,
        last_batch: LastBatch = "drop",
        accumulation_steps: int = 1,
    ) -> MixtureBatchSampler:
        """The mixture's sampler with the config's `seed` and `batch_by_type`."""
        return MixtureBatchSampler(
            self.layouts(length_fn, with_lengths=group_by_length),
            global_batch_size,
            world_size=world_size,
            rank=rank,
            seed=self.config.seed,
            batch_by_type=self.config.batch_by_type,
            group_by_length=group_by_length,
            length_window=length_window,
            last_batch=last_batch,
            accumulation_steps=accumulation_steps,
        )


"""Writing a world to disk: images, task files, caption corpora, mixtures and the manifest.

Layout of a world folder:

    manifest.json                      written last: its presence means the world is complete
    images/{train,eval}/{kind}_NNNNNN.png
    train/{task}.jsonl                 every task of `sphinx_mllm.tasks.TASKS` (conversation records)
    train/caption_{real,synthetic}.jsonl   caption pre-training corpora (`caption_pretrain`, `domain`)
    eval/...                           the same for the held-out images (no image is shared with train)
    mixtures/pretrain_real.yaml, pretrain_synthetic.yaml, finetune.yaml, eval.yaml,
             eval_caption_real.yaml, eval_caption_synthetic.yaml, eval_{task}.yaml

Image paths in records are relative to the world folder (the mixtures set `root: ..`). The whole folder
is built beside its final place and renamed into it (`atomic_dir`), and the manifest is its last file, so
an interrupted run leaves no folder that looks complete. Everything is a function of (seed, size,
image_size, generator version): the same inputs give byte-identical files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import random
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL
import yaml

from sphinx_mllm.data.converters.common import Record
from sphinx_mllm.tasks import TASKS
from sphinx_mllm.utils import SphinxError, atomic_dir, atomic_write_text, get_logger
from sphinx_mllm.world.canvas import derive_seed
from sphinx_mllm.world.records import CAPTION_DOMAINS, Annotator
from sphinx_mllm.world.scene import KINDS, WorldImage, render, sample_image

log = get_logger(__name__)

GENERATOR_VERSION = "1"
"""Bumped whenever the same config would give different files (so `ensure_world` regenerates)."""
SPLITS: tuple[str, ...] = ("train", "eval")
MANIFEST = "manifest.json"

SIZES: Mapping[str, Mapping[str, Mapping[str, int]]] = {
    "small": {
        "train": {"shapes": 24, "people": 10, "signs": 8, "document": 6},
        "eval": {"shapes": 8, "people": 4, "signs": 3, "document": 3},
    },
    "default": {
        "train": {"shapes": 1600, "people": 500, "signs": 300, "document": 300},
        "eval": {"shapes": 120, "people": 50, "signs": 30, "document": 30},
    },
}
"""Images per kind and split of each size preset."""

MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 64, 2048


@dataclass(frozen=True)
class WorldConfig:
    """What a world is made of: seed, size preset (or explicit `counts`), long side of the images, and the
    most words an OCR record may list (pages with more words get no OCR record)."""

    seed: int = 0
    size: str = "default"
    image_size: int = 448
    ocr_max_words: int = 40
    counts: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.counts:
            if self.size not in SIZES:
                raise SphinxError(f"unknown world size {self.size!r}; known: {', '.join(SIZES)}")
            object.__setattr__(self, "counts", SIZES[self.size])
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise SphinxError(f"image size must be in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] px, got {self.image_size}")
        if self.ocr_max_words < 1:
            raise SphinxError(f"ocr_max_words must be >= 1, got {self.ocr_max_words}")
        for split in SPLITS:
            per_kind = self.counts.get(split)
            if not isinstance(per_kind, Mapping) or set(per_kind) - set(KINDS):
                raise SphinxError(f"world counts of split {split!r} must map kinds ({', '.join(KINDS)}) to numbers")
            if any(not isinstance(n, int) or n < 0 for n in per_kind.values()) or not sum(per_kind.values()):
                raise SphinxError(f"world counts of split {split!r} must be non-negative and not all zero")

    def as_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "size": self.size, "image_size": self.image_size,
                "ocr_max_words": self.ocr_max_words,
                "counts": {s: {k: int(self.counts[s].get(k, 0)) for k in KINDS} for s in SPLITS}}


# ----------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class _Job:
    """One image to draw: everything its pixels and labels depend on."""

    seed: int
    split: str
    kind: str
    index: int
    image_size: int
    image_id: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.index:06d}"


def _draw(job: _Job) -> tuple[WorldImage, bytes]:
    """Sample and render one image (in a worker process or not); the PNG bytes are deterministic."""
    rng = random.Random(derive_seed(job.seed, job.split, job.kind, job.index))
    image = sample_image(job.kind, rng, job.image_size, job.name, job.image_id)
    buf = io.BytesIO()
    render(image).save(buf, format="PNG", compress_level=3)
    return image, buf.getvalue()


Drawer = Callable[[list[_Job]], Iterator[tuple[WorldImage, bytes]]]


@contextlib.contextmanager
def _drawer(workers: int) -> Iterator[Drawer]:
    """`map` of `_draw` over jobs, in order: in this process, or in `workers` spawned processes (never
    forked: the caller may hold threads, e.g. torch's)."""
    if workers <= 1:
        yield lambda jobs: map(_draw, jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda jobs: pool.map(_draw, jobs, chunksize=16)


def _jobs(config: WorldConfig, split: str) -> list[_Job]:
    """The images of a split in order; image ids run over the splits in `SPLITS` order from 1."""
    first_id = 1 + sum(sum(config.counts[s].values()) for s in SPLITS[: SPLITS.index(split)])
    jobs = []
    for kind in KINDS:
        for i in range(config.counts[split].get(kind, 0)):
            jobs.append(_Job(config.seed, split, kind, i, config.image_size, first_id + len(jobs)))
    return jobs


def world_image(config: WorldConfig, split: str, kind: str, index: int) -> WorldImage:
    """Image `index` of `kind` in `split` of the world of `config`, with all its labels, rebuilt alone
    (its pixels: `render(world_image(...))`)."""
    if split not in SPLITS:
        raise SphinxError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if not 0 <= index < config.counts[split].get(kind, 0):
        raise SphinxError(f"{split} has {config.counts[split].get(kind, 0)} {kind} images; no index {index}")
    job = next(j for j in _jobs(config, split) if j.kind == kind and j.index == index)
    return _draw(job)[0]


def _split(root: Path, config: WorldConfig, split: str, draw: Drawer) -> tuple[dict[str, list[Record]], dict[str, Any]]:
    """Render and annotate the images of one split under `root`; records by file stem, and facts for the
    manifest (image count, a hash of all image bytes, answer shares). Annotation runs here, in order,
    because the answer balancers of a split see its images one after another."""
    annotator = Annotator(config.seed, split, config.ocr_max_words, held_out=split == "eval")
    jobs = _jobs(config, split)
    files: dict[str, list[Record]] = {}
    digest = hashlib.sha256()
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    for image, data in draw(jobs):
        rel = f"images/{split}/{image.name}.png"
        (root / rel).write_bytes(data)
        digest.update(rel.encode() + b"\0" + data)
        for stem, records in annotator.annotate(image, rel).items():
            files.setdefault(stem, []).extend(records)
    log.info("world %s: %d images (%s)", split, len(jobs),
             ", ".join(f"{config.counts[split].get(k, 0)} {k}" for k in KINDS))
    if annotator.skipped:
        log.warning("world %s: records left out (task:reason): %s", split, dict(sorted(annotator.skipped.items())))
    facts = {
        "images": len(jobs), "images_sha256": digest.hexdigest(), "skipped": dict(sorted(annotator.skipped.items())),
        "vqa_answer_shares": annotator.vqa.answer_shares(), "gqa_answer_shares": annotator.gqa.answer_shares(),
    }
    return files, facts


def _write_jsonl(path: Path, records: list[Record]) -> str:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _mixture(sources: list[tuple[str, str]], comment: str) -> str:
    """A mixture YAML (`sphinx_mllm.data.mixture` format) over record files relative to the world root."""
    meta = [{"path": f"../{path}", "type": kind, "root": ".."} for path, kind in sources]
    return f"# {comment}\n" + yaml.safe_dump({"META": meta, "seed": 0}, sort_keys=False)


def _mixtures(present: Mapping[str, set[str]]) -> dict[str, str]:
    """Mixture files by name: caption pre-training per domain, the multi-task fine-tune, held-out sets."""
    tasks = [t for t in TASKS if t in present["train"]]
    held = [t for t in TASKS if t in present["eval"]]
    out = {
        f"pretrain_{d}": _mixture([(f"train/caption_{d}.jsonl", "caption")],
                                  f"caption pre-training on the {d!r} caption domain of the training images")
        for d in CAPTION_DOMAINS
    }
    out["finetune"] = _mixture([(f"train/{t}.jsonl", "image_text") for t in tasks],
                               "multi-task fine-tuning: every task of the training images")
    out["eval"] = _mixture([(f"eval/{t}.jsonl", "image_text") for t in held], "every held-out task file")
    for d in CAPTION_DOMAINS:
        out[f"eval_caption_{d}"] = _mixture([(f"eval/caption_{d}.jsonl", "caption")],
                                            f"held-out captions of the {d!r} domain")
    for t in held:
        out[f"eval_{t}"] = _mixture([(f"eval/{t}.jsonl", "image_text")], f"held-out {t} records")
    return out


def _write_world(root: Path, config: WorldConfig, workers: int) -> dict[str, Any]:
    manifest: dict[str, Any] = {
        "generator": "sphinx_mllm.world", "version": GENERATOR_VERSION, **config.as_dict(),
        "pillow": PIL.__version__,  # pixels and PNG bytes are identical for one Pillow (FreeType, zlib) build
    }
    hashes: dict[str, str] = {}
    records: dict[str, dict[str, int]] = {}
    present: dict[str, set[str]] = {}
    with _drawer(workers) as draw:
        splits = {split: _split(root, config, split, draw) for split in SPLITS}
    for split, (files, facts) in splits.items():
        for stem in sorted(files):
            hashes[f"{split}/{stem}.jsonl"] = _write_jsonl(root / split / f"{stem}.jsonl", files[stem])
        records[split] = {stem: len(files[stem]) for stem in sorted(files)}
        present[split] = set(files)
        manifest[split] = facts
    missing = sorted(set(TASKS) - present["train"])
    if missing:
        log.warning("the world's training split has no record of task(s) %s (too few images?)", ", ".join(missing))
    for name, text in _mixtures(present).items():
        rel = f"mixtures/{name}.yaml"
        (root / "mixtures").mkdir(exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
        hashes[rel] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    manifest["records"] = records
    manifest["files"] = hashes
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def generate_world(
    out: str | os.PathLike, config: WorldConfig, *, overwrite: bool = False, workers: int = 1
) -> dict[str, Any]:
    """Generate the world of `config` into the folder `out` and return its manifest.

    The folder appears complete or not at all; an existing one is replaced only with `overwrite`.
    With `workers` > 1, that many spawned processes draw the images (the files do not depend on it); a
    script calling this must then guard its entry point with `if __name__ == "__main__":`, as
    `multiprocessing` requires (the `sphinx-mllm` command does)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise SphinxError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it")
    log.info("generating world %s (seed %d, %d px) into %s", config.size, config.seed, config.image_size, out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        manifest = _write_world(tmp, config, workers)
    return manifest


# ----------------------------------------------------------------------------- reading a world back


def load_manifest(root: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a complete world; `SphinxError` when the folder is not one (or half-written)."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise SphinxError(f"{root} is not a complete world: it has no {MANIFEST} (interrupted generation?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SphinxError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("generator") != "sphinx_mllm.world":
        raise SphinxError(f"{path} is not a world manifest")
    return manifest


def verify_world(root: str | os.PathLike, *, images: bool = True) -> dict[str, Any]:
    """The manifest, after checking that every file it lists is there with the same SHA-256 (and, with
    `images`, that the images of each split hash to the manifest's digest)."""
    root = Path(root)
    manifest = load_manifest(root)
    for rel, expected in manifest["files"].items():
        path = root / rel
        if not path.is_file():
            raise SphinxError(f"world {root}: file {rel} is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != expected:
            raise SphinxError(f"world {root}: file {rel} was changed after generation")
    if images:
        config = _config_of(manifest)
        for split in SPLITS:
            digest = hashlib.sha256()
            for job in _jobs(config, split):
                rel = f"images/{split}/{job.name}.png"
                if not (root / rel).is_file():
                    raise SphinxError(f"world {root}: image {rel} is missing")
                digest.update(rel.encode() + b"\0" + (root / rel).read_bytes())
            if digest.hexdigest() != manifest[split]["images_sha256"]:
                raise SphinxError(f"world {root}: the {split} images differ from those generated")
    return manifest


def _config_of(manifest: Mapping[str, Any]) -> WorldConfig:
    try:
        return WorldConfig(seed=manifest["seed"], size=manifest["size"], image_size=manifest["image_size"],
                           ocr_max_words=manifest["ocr_max_words"], counts=manifest["counts"])
    except (KeyError, TypeError) as exc:
        raise SphinxError(f"world manifest lacks its configuration ({exc})") from None


def ensure_world(out: str | os.PathLike, config: WorldConfig) -> dict[str, Any]:
    """The world of `config` at `out`: reused when its manifest says it was made from the same config by
    this generator version, generated (replacing the folder) otherwise."""
    try:
        manifest = load_manifest(out)
    except SphinxError:
        manifest = None
    if manifest is not None and manifest.get("version") == GENERATOR_VERSION and \
            {k: manifest.get(k) for k in config.as_dict()} == config.as_dict():
        return manifest
    return generate_world(out, config, overwrite=True)

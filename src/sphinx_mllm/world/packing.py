"""Multi-turn packing of a multi-task mixture: the records of one image become a few long dialogs.

Every record of SPHINX puts the image's tokens (hundreds of them) before its text, so on a CPU most of a
fine-tuning step would be spent re-reading the same image for one short answer. Packing joins the
records of one image, shuffled, into dialogs of at most `max_tokens` tokens (image tokens included), so
the image is paid once per few answers: the release's multi-turn records do the same with real data.
A later turn may see facts an earlier one stated; the first statement of each still has to come from the
image, so the learning signal stays visual (the blind twin of the recipe checks it).

Per-task `ratios` keep a seeded share of each task's records before packing. The output is a records
JSONL (task "multitask", `meta.tasks` lists the packed tasks in order) plus a mixture YAML over it.
"""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from sphinx_mllm.utils import SphinxError, atomic_write_jsonl, atomic_write_text, get_logger
from sphinx_mllm.world.canvas import derive_seed

log = get_logger(__name__)

PACKED_TASK = "multitask"
TURN_OVERHEAD = 6
"""Tokens the chat template adds around each turn (" Human: ", "\\n###", " Assistant:")."""


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def keep_share(records: list[dict[str, Any]], ratio: float, seed: int, task: str) -> list[dict[str, Any]]:
    """A seeded share `ratio` of a task's records (all of them from 1 up)."""
    if ratio >= 1.0:
        return records
    rng = random.Random(derive_seed(seed, "ratio", task))
    return rng.sample(records, k=int(len(records) * ratio))


def pack_records(
    records_by_task: Mapping[str, Sequence[dict[str, Any]]], count_tokens: Callable[[str], int], *,
    max_tokens: int, image_tokens: int | Callable[[str], int], prefix_tokens: int,
    ratios: Mapping[str, float] | None = None, seed: int = 0,
) -> list[dict[str, Any]]:
    """Dialogs of the kept records of each image; each fits in `max_tokens` (`image_tokens` + the BOS and
    system prompt's `prefix_tokens` + its turns). `image_tokens` may depend on the image (a callable of its
    path: what stands in for the image, e.g. a scene in words, `world.reading`). A record longer than that alone
    stays alone."""
    by_image: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for task, records in sorted(records_by_task.items()):
        for record in keep_share(list(records), (ratios or {}).get(task, 1.0), seed, task):
            if record.get("image") is None or "conversations" not in record:
                raise SphinxError(f"record {record.get('id')!r} of {task}: packing needs image conversation records")
            by_image[record["image"]].append((task, record))
    image_cost = image_tokens if callable(image_tokens) else lambda _: image_tokens
    out: list[dict[str, Any]] = []
    for image in sorted(by_image):
        budget = max_tokens - image_cost(image) - prefix_tokens
        items = by_image[image]
        random.Random(derive_seed(seed, "pack", image)).shuffle(items)
        packs: list[list[tuple[str, dict[str, Any]]]] = []
        used = budget  # forces a new pack for the first item
        for task, record in items:
            cost = sum(count_tokens(t["value"]) + TURN_OVERHEAD for t in record["conversations"])
            if used + cost > budget:
                packs.append([])
                used = 0
            packs[-1].append((task, record))
            used += cost
        for k, pack in enumerate(packs):
            first = pack[0][1]
            out.append({
                "id": f"{first['id']}+pack{k}", "image": image, "width": first["width"], "height": first["height"],
                "task": PACKED_TASK, "conversations": [t for _, r in pack for t in r["conversations"]],
                "meta": {"tasks": [task for task, _ in pack], "ids": [r["id"] for _, r in pack]},
            })
    return out


def pack_mixture_files(
    files: Mapping[str, str | os.PathLike], output_dir: str | os.PathLike, count_tokens: Callable[[str], int], *,
    max_tokens: int, image_tokens: int, prefix_tokens: int, images_root: str | os.PathLike,
    ratios: Mapping[str, float] | None = None, seed: int = 0,
) -> Path:
    """Pack the record files `{task: path}` into `output_dir/packed.jsonl` and write `output_dir/mixture.yaml`
    over it (image paths relative to `images_root`); returns the mixture's path."""
    records = {task: read_records(path) for task, path in files.items()}
    packed = pack_records(records, count_tokens, max_tokens=max_tokens, image_tokens=image_tokens,
                          prefix_tokens=prefix_tokens, ratios=ratios, seed=seed)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / "packed.jsonl", packed)
    kept = sum(len(r["meta"]["tasks"]) for r in packed)
    mixture = {"META": [{"path": "packed.jsonl", "type": "image_text", "root": os.path.abspath(images_root)}],
               "seed": seed}
    atomic_write_text(out / "mixture.yaml", f"# {kept} records packed into {len(packed)} dialogs\n"
                      + yaml.safe_dump(mixture, sort_keys=False))
    log.info("packed %d records into %d dialogs (%s)", kept, len(packed), out / "packed.jsonl")
    return out / "mixture.yaml"


__all__ = ["PACKED_TASK", "keep_share", "pack_mixture_files", "pack_records", "read_records"]

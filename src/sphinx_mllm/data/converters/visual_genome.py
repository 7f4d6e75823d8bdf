"""Visual Genome: region descriptions -> REG records, relationships -> relation records.

- `region_descriptions.json`: `[{"id": image_id, "regions": [{"region_id", "image_id", "phrase", "x", "y",
  "width", "height"}]}]`.
- `relationships.json`: `[{"image_id", "relationships": [{"relationship_id", "predicate", "subject": obj,
  "object": obj}]}]`, each obj `{"object_id", "x", "y", "w", "h", "name" | "names": [...]}`.
- Images and sizes: `image_data.json` (`[{"image_id", "width", "height", "url"}]`, the url's last two parts
  give the path, e.g. `VG_100K_2/1.jpg`) when given; otherwise the image is looked up under the images
  root as `VG_100K/<id>.jpg`, `VG_100K_2/<id>.jpg` or `<id>.jpg` and its header read.

VG repeats itself (the same phrase for several regions, the same triple several times): repeats within an
image are skipped and counted; `max_per_image` caps the records of one image (first ones kept).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from sphinx_mllm.data.converters.common import (
    MALFORMED,
    MISSING_IMAGE,
    UNKNOWN_IMAGE_SIZE,
    ConversionReport,
    ImageSizer,
    Record,
    load_json,
    make_record,
    typed_task,
    xywh_box,
)
from sphinx_mllm.tasks import REGTask, RelationTask
from sphinx_mllm.utils.errors import SphinxError

_FOLDERS = ("VG_100K", "VG_100K_2", "")


class VGImages:
    """Path and size of a VG image, from `image_data.json` and/or the images folder."""

    def __init__(self, image_data: str | os.PathLike | None, images_root: str | os.PathLike | None) -> None:
        self.sizer = ImageSizer(images_root)
        self.meta: dict[int, dict[str, Any]] = {}
        if image_data is not None:
            data = load_json(image_data, "VG image data")
            if not isinstance(data, list):
                raise SphinxError(f"VG image data {image_data}: expected a list of images")
            for im in data:
                if isinstance(im, dict) and isinstance(im.get("image_id", im.get("id")), int):
                    self.meta[im.get("image_id", im.get("id"))] = im

    def locate(self, image_id: int, report: ConversionReport) -> tuple[str, tuple[int, int]] | None:
        """(relative path, (W, H)) or None with the reason recorded."""
        im = self.meta.get(image_id)
        if im is not None:
            url = str(im.get("url", ""))
            parts = [p for p in url.split("/") if p]
            rel = "/".join(parts[-2:]) if len(parts) >= 2 and parts[-2].startswith("VG_100K") else f"{image_id}.jpg"
            size = self.sizer.size(rel, report, im.get("width"), im.get("height"))
            return None if size is None else (rel, size)
        if self.sizer.root is None:
            report.skip(UNKNOWN_IMAGE_SIZE, str(image_id))
            return None
        for folder in _FOLDERS:
            rel = f"{folder}/{image_id}.jpg" if folder else f"{image_id}.jpg"
            if self.sizer.exists(rel):
                size = self.sizer.size(rel, report)
                return None if size is None else (rel, size)
        report.skip(MISSING_IMAGE, str(image_id))
        return None


def _entries(path: str | os.PathLike, what: str, list_key: str) -> list[Any]:
    data = load_json(path, what)
    if not isinstance(data, list):
        raise SphinxError(f"{what} {path}: expected a list of images, each with {list_key!r}")
    return data


def vg_regions(
    regions: str | os.PathLike, report: ConversionReport, *, image_data: str | os.PathLike | None = None,
    images_root: str | os.PathLike | None = None, seed: int = 0, max_per_image: int | None = None,
    id_prefix: str = "vg_regions",
) -> Iterator[Record]:
    """One REG record per region: its box in the question, its phrase as the answer."""
    builder = typed_task("reg", REGTask)
    images = VGImages(image_data, images_root)
    for entry in _entries(regions, "VG region descriptions", "regions"):
        image_id = entry.get("id", entry.get("image_id")) if isinstance(entry, dict) else None
        if not isinstance(image_id, int) or not isinstance(entry.get("regions"), list):
            report.skip(MALFORMED, f"entry {str(entry)[:80]}")
            continue
        located = images.locate(image_id, report)
        if located is None:
            continue
        rel, size = located
        seen: set[str] = set()
        for region in entry["regions"]:
            if max_per_image is not None and len(seen) >= max_per_image:
                report.skip("over_max_per_image")
                continue
            rid = f"{id_prefix}-{region.get('region_id') if isinstance(region, dict) else '?'}"
            phrase = " ".join(str(region.get("phrase", "")).split()) if isinstance(region, dict) else ""
            if not phrase:
                report.skip("empty_phrase", rid)
                continue
            if phrase.lower() in seen:
                report.skip("duplicate_region", rid)
                continue
            xywh = [region.get(k) for k in ("x", "y", "width", "height")]
            box = xywh_box(xywh, size, report, rid)
            if box is None:
                continue
            seen.add(phrase.lower())
            turns = builder.build(box, phrase, seed=seed, key=rid)
            yield make_record(rid, rel, size, "reg", turns, {"image_id": image_id, "captions": [phrase]})


def _object_name(obj: dict[str, Any]) -> str:
    names = obj.get("names")
    name = names[0] if isinstance(names, list) and names else obj.get("name", "")
    return " ".join(str(name).split())


def vg_relations(
    relationships: str | os.PathLike, report: ConversionReport, *, image_data: str | os.PathLike | None = None,
    images_root: str | os.PathLike | None = None, seed: int = 0, max_per_image: int | None = None,
    id_prefix: str = "vg_relations",
) -> Iterator[Record]:
    """One relation record per (subject, predicate, object) with both boxes in the question."""
    builder = typed_task("relation", RelationTask)
    images = VGImages(image_data, images_root)
    for entry in _entries(relationships, "VG relationships", "relationships"):
        image_id = entry.get("image_id", entry.get("id")) if isinstance(entry, dict) else None
        if not isinstance(image_id, int) or not isinstance(entry.get("relationships"), list):
            report.skip(MALFORMED, f"entry {str(entry)[:80]}")
            continue
        located = images.locate(image_id, report)
        if located is None:
            continue
        rel_path, size = located
        seen: set[tuple[str, ...]] = set()
        for rel in entry["relationships"]:
            if max_per_image is not None and len(seen) >= max_per_image:
                report.skip("over_max_per_image")
                continue
            rid = f"{id_prefix}-{rel.get('relationship_id') if isinstance(rel, dict) else '?'}"
            record = _relation_record(rel, rid, rel_path, size, image_id, seen, builder, report, seed)
            if record is not None:
                yield record


def _relation_record(
    rel: Any, rid: str, path: str, size: tuple[int, int], image_id: int, seen: set[tuple[str, ...]],
    builder: RelationTask, report: ConversionReport, seed: int,
) -> Record | None:
    if not isinstance(rel, dict) or not isinstance(rel.get("subject"), dict) or not isinstance(rel.get("object"), dict):
        report.skip(MALFORMED, rid)
        return None
    subj, obj = rel["subject"], rel["object"]
    predicate = " ".join(str(rel.get("predicate", "")).split())
    names = (_object_name(subj), _object_name(obj))
    if not predicate or not all(names):
        report.skip("empty_predicate_or_name", rid)
        return None
    boxes = [xywh_box([o.get(k) for k in ("x", "y", "w", "h")], size, report, rid) for o in (subj, obj)]
    if boxes[0] is None or boxes[1] is None:
        return None
    triple = (names[0].lower(), predicate.lower(), names[1].lower(), str(boxes[0]), str(boxes[1]))
    if triple in seen:
        report.skip("duplicate_relation", rid)
        return None
    seen.add(triple)
    turns = builder.build(names[0], boxes[0], predicate, names[1], boxes[1], seed=seed, key=rid)
    return make_record(rid, path, size, "relation", turns, {"image_id": image_id, "answer": turns[1]["value"]})

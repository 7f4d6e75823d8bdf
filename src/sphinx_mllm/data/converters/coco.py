"""COCO-format annotation files: instances (detection), person keypoints, captions, and document layout
(PubLayNet and DocLayNet ship their layout in the same COCO instances format).

Files: `{"images": [{"id", "file_name", "width", "height"}], "annotations": [...], "categories":
[{"id", "name", ...}]}`; boxes are `[x, y, w, h]` in pixels. Image paths in the records are the images'
`file_name` (relative to the images folder, e.g. `train2017/`).

Detection and layout records: ONE RECORD PER IMAGE, one question/answer turn per category present
(categories in id order, boxes in reading order: top-to-bottom, then left-to-right), so an image is seen
once per epoch; `per_category=True` gives one record per (image, category) instead. Crowd annotations
(`iscrowd: 1`) are regions, not instances: they are not in the text, only in the ground truth of `meta`
(flagged `iscrowd`, as COCOeval wants them). `meta` uses the reference fields of
`sphinx_mllm.tasks.metrics` (pixel boxes `[x1, y1, x2, y2]`), so a record is its own evaluation reference.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sphinx_mllm.data.converters.common import (
    MALFORMED,
    ConversionReport,
    ImageSizer,
    Pixels,
    Record,
    load_json,
    make_record,
    reading_order,
    require_keys,
    typed_task,
    xywh_box,
    xywh_xyxy,
)
from sphinx_mllm.geometry import Box, Point, box_from_pixels, point_from_pixels
from sphinx_mllm.tasks import COCO_KEYPOINT_NAMES, CaptionTask, DetectionTask, KeypointsTask, LayoutTask
from sphinx_mllm.tasks.base import join_turns
from sphinx_mllm.utils.errors import SphinxError

CROWD = "crowd_annotation"
UNKNOWN_IMAGE_ID = "unknown_image_id"
UNKNOWN_CATEGORY = "unknown_category"
IMAGE_WITHOUT_BOXES = "image_without_valid_boxes"


@dataclass
class CocoIndex:
    """A COCO file indexed by image: image entries in file order, annotations grouped by image id."""

    images: list[dict[str, Any]]
    categories: dict[int, dict[str, Any]]
    by_image: dict[int, list[dict[str, Any]]] = field(default_factory=dict)


def load_coco(path: str | os.PathLike, what: str, report: ConversionReport) -> CocoIndex:
    """Read and index a COCO JSON file; annotations of unknown images are skipped and counted."""
    data = load_json(path, what)
    require_keys(data, ("images", "annotations"), f"{what} {path}")
    images = []
    for img in data["images"]:
        if isinstance(img, dict) and isinstance(img.get("id"), int) and isinstance(img.get("file_name"), str):
            images.append(img)
        else:
            report.skip(MALFORMED, f"image entry {img!r}")
    ids = {img["id"] for img in images}
    categories = {c["id"]: c for c in data.get("categories", []) if isinstance(c, dict) and "id" in c}
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for ann in data["annotations"]:
        if not isinstance(ann, dict):
            report.skip(MALFORMED, f"annotation {ann!r}")
        elif ann.get("image_id") not in ids:
            report.skip(UNKNOWN_IMAGE_ID, f"annotation {ann.get('id')}")
        else:
            by_image[ann["image_id"]].append(ann)
    return CocoIndex(images, categories, dict(by_image))


@dataclass
class _Query:
    """The boxes of one category in one image: frame boxes for the text, pixels (plus crowd regions, flagged)
    for the ground truth in `meta`."""

    boxes: list[Box] = field(default_factory=list)
    pixels: list[Pixels] = field(default_factory=list)
    crowd: list[Pixels] = field(default_factory=list)

    def meta(self, category_id: int, name: str) -> dict[str, Any]:
        boxes = [list(p) for p in (*self.pixels, *self.crowd)]
        return {"category_id": category_id, "category": name, "boxes": boxes,
                "iscrowd": [0] * len(self.pixels) + [1] * len(self.crowd)}


def _category_queries(
    index: CocoIndex, image: dict[str, Any], size: tuple[int, int], report: ConversionReport
) -> dict[int, _Query]:
    """Valid boxes of one image by category id (reading order), only categories with a non-crowd box."""
    found: dict[int, list[tuple[Box, Pixels]]] = defaultdict(list)
    crowd: dict[int, list[Pixels]] = defaultdict(list)
    for ann in index.by_image.get(image["id"], []):
        where = f"annotation {ann.get('id')}"
        if ann.get("category_id") not in index.categories:
            report.skip(UNKNOWN_CATEGORY, where)
            continue
        if ann.get("iscrowd"):
            report.skip(CROWD, where)
            pixels = xywh_xyxy(ann.get("bbox") or [], size, ConversionReport("crowd"), where)
            if pixels is not None:
                crowd[ann["category_id"]].append(pixels)
            continue
        pixels = xywh_xyxy(ann.get("bbox") or [], size, report, where)
        if pixels is not None:
            found[ann["category_id"]].append((box_from_pixels(pixels, *size), pixels))
    queries = {}
    for cat in sorted(found):
        ordered = reading_order(found[cat])
        queries[cat] = _Query([b for b, _ in ordered], [p for _, p in ordered], crowd.get(cat, []))
    return queries


def coco_boxes(
    annotations: str | os.PathLike, report: ConversionReport, *, images_root: str | os.PathLike | None = None,
    seed: int = 0, per_category: bool = False, task: str = "detection", id_prefix: str = "coco_instances",
) -> Iterator[Record]:
    """Detection (`task="detection"`) or layout (`task="layout"`) records from a COCO instances file.

    `meta` holds the ground truth in pixels: per (image, category) record `{"image_id", "category_id",
    "category", "boxes", "iscrowd"}`; per image record `{"image_id", "queries": [those, in turn order]}`.
    """
    if task not in ("detection", "layout"):
        raise SphinxError(f"COCO boxes convert to 'detection' or 'layout', not {task!r}")
    builder = typed_task(task, DetectionTask if task == "detection" else LayoutTask)
    index = load_coco(annotations, f"{task} annotations", report)
    sizer = ImageSizer(images_root)
    for image in index.images:
        size = sizer.size(image["file_name"], report, image.get("width"), image.get("height"))
        if size is None:
            continue
        queries = _category_queries(index, image, size, report)
        if not queries:
            report.skip(IMAGE_WITHOUT_BOXES, image["file_name"])
            continue
        units = [[cat] for cat in queries] if per_category else [list(queries)]
        for cats in units:
            rid = f"{id_prefix}-{image['id']}" + (f"-{cats[0]}" if per_category else "")
            names = [str(index.categories[c].get("name", c)) for c in cats]
            turns = join_turns([
                builder.build(name, queries[c].boxes, seed=seed, key=f"{rid}#{c}") for name, c in zip(names, cats)
            ])
            metas = [queries[c].meta(c, name) for name, c in zip(names, cats)]
            meta: dict[str, Any] = {"image_id": image["id"]}
            meta.update(metas[0] if per_category else {"queries": metas})
            yield make_record(rid, image["file_name"], size, task, turns, meta)


def _keypoint_names(index: CocoIndex) -> None:
    for cat in index.categories.values():
        names = cat.get("keypoints")
        if names is not None and tuple(names) != COCO_KEYPOINT_NAMES:
            raise SphinxError(f"category {cat.get('name')!r} has keypoints {names}; expected the 17 COCO names")


def coco_keypoints(
    annotations: str | os.PathLike, report: ConversionReport, *, images_root: str | os.PathLike | None = None,
    seed: int = 0, id_prefix: str = "coco_keypoints",
) -> Iterator[Record]:
    """One record per annotated person (`person_keypoints_*.json`): the person's box in the question, its
    labelled points (visibility > 0) in the answer. Points outside the image are dropped and counted."""
    builder = typed_task("keypoints", KeypointsTask)
    index = load_coco(annotations, "keypoint annotations", report)
    _keypoint_names(index)
    sizer = ImageSizer(images_root)
    for image in index.images:
        anns = index.by_image.get(image["id"], [])
        if not anns:
            continue
        size = sizer.size(image["file_name"], report, image.get("width"), image.get("height"))
        if size is None:
            continue
        for ann in anns:
            rid = f"{id_prefix}-{ann.get('id')}"
            if ann.get("iscrowd"):
                report.skip(CROWD, rid)
                continue
            points = _points(ann.get("keypoints"), size, report, rid)
            if points is None:
                continue
            box = xywh_box(ann.get("bbox") or [], size, report, rid)
            if box is None:
                continue
            turns = builder.build(box, points, seed=seed, key=rid)
            meta = {"image_id": image["id"], "ann_id": ann.get("id"), "keypoints": ann["keypoints"],
                    "bbox": ann["bbox"], "iscrowd": 0}
            if isinstance(ann.get("area"), int | float):
                meta["area"] = ann["area"]
            yield make_record(rid, image["file_name"], size, "keypoints", turns, meta)


def _points(flat: Any, size: tuple[int, int], report: ConversionReport, rid: str) -> dict[str, Point] | None:
    """Labelled COCO keypoints `[x, y, v] * 17` as name -> Point; None (skip recorded) when none."""
    numeric = isinstance(flat, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in flat)
    if not numeric or len(flat) != 3 * len(COCO_KEYPOINT_NAMES):
        report.skip(MALFORMED, f"{rid} keypoints")
        return None
    width, height = size
    points = {}
    for name, i in zip(COCO_KEYPOINT_NAMES, range(0, len(flat), 3)):
        x, y, v = flat[i : i + 3]
        if not v:
            continue
        if not (0 <= x <= width and 0 <= y <= height):
            report.skip("keypoint_outside_image", f"{rid} {name}")
            continue
        points[name] = point_from_pixels((x, y), width, height)
    if not points:
        report.skip("no_labelled_keypoints", rid)
        return None
    return points


def coco_captions(
    annotations: str | os.PathLike, report: ConversionReport, *, images_root: str | os.PathLike | None = None,
    seed: int = 0, id_prefix: str = "coco_captions",
) -> Iterator[Record]:
    """One short-caption record per caption of `captions_*.json`."""
    builder = typed_task("caption", CaptionTask)
    index = load_coco(annotations, "caption annotations", report)
    sizer = ImageSizer(images_root)
    for image in index.images:
        anns = index.by_image.get(image["id"], [])
        if not anns:
            continue
        size = sizer.size(image["file_name"], report, image.get("width"), image.get("height"))
        if size is None:
            continue
        captions = [" ".join(a["caption"].split()) for a in anns if isinstance(a.get("caption"), str)]
        meta = {"image_id": image["id"], "captions": [c for c in captions if c]}
        for ann in anns:
            rid = f"{id_prefix}-{ann.get('id')}"
            caption = ann.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                report.skip("empty_caption", rid)
                continue
            turns = builder.build(caption, seed=seed, key=rid)
            yield make_record(rid, image["file_name"], size, "caption", turns, meta)

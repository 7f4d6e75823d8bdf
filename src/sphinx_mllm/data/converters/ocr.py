"""Text detection with transcription from TextOCR (`TextOCR_0.1_<split>.json`), which also reads COCO-Text v2
(`cocotext.v2.json`): TextOCR follows COCO-Text v2, naming the polygon `points` instead of `mask`.

Layout: `{"imgs": {img_id: {"id", "file_name", "width", "height", "set"?}}, "anns": {ann_id: {"id",
"image_id", "bbox": [x, y, w, h], "utf8_string", "legibility"? (COCO-Text)}}, "imgToAnns": {img_id:
[ann_id, ...]}}`. Illegible words (TextOCR writes "." for them; COCO-Text marks `legibility:
"illegible"`) have no text to teach and are skipped, counted. One record per image, words in reading
order as `<p>word</p> [box]`; `max_words` caps very dense images (first words in reading order kept).
Image paths are the `file_name`s (TextOCR: `train/<id>.jpg` under the TextVQA/TextOCR image root).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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
    xywh_xyxy,
)
from sphinx_mllm.geometry import Box, box_from_pixels
from sphinx_mllm.tasks import OCRTask

ILLEGIBLE = "illegible_word"


def _word_text(ann: dict[str, Any]) -> str | None:
    """The transcription of a legible word, None for an illegible one."""
    if ann.get("legibility") == "illegible":
        return None
    text = ann.get("utf8_string")
    if not isinstance(text, str):
        return None
    text = " ".join(text.split())
    return None if text in ("", ".", "###") else text


def textocr(
    annotations: str | os.PathLike, report: ConversionReport, *, images_root: str | os.PathLike | None = None,
    seed: int = 0, split: str | None = None, max_words: int | None = None, id_prefix: str = "textocr",
) -> Iterator[Record]:
    """OCR records, one per image with at least one legible word. `split` keeps only images whose `set`
    equals it (COCO-Text keeps train and val in one file)."""
    builder = typed_task("ocr", OCRTask)
    data = load_json(annotations, "TextOCR annotations")
    require_keys(data, ("imgs", "anns", "imgToAnns"), f"TextOCR annotations {annotations}")
    sizer = ImageSizer(images_root)
    for img_id, img in data["imgs"].items():
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
            report.skip(MALFORMED, f"image {img_id}")
            continue
        if split is not None and img.get("set") != split:
            continue
        size = sizer.size(img["file_name"], report, img.get("width"), img.get("height"))
        if size is None:
            continue
        rid = f"{id_prefix}-{img_id}"
        words = _words(data, img_id, size, report, rid)
        if not words:
            report.skip("image_without_legible_words", rid)
            continue
        if max_words is not None and len(words) > max_words:
            report.skip("over_max_words", rid, count=len(words) - max_words)
            words = words[:max_words]
        turns = builder.build([(text, box) for text, box, _ in words], seed=seed, key=rid)
        meta = {"image_id": img_id, "words": [{"text": text, "box": list(px)} for text, _, px in words]}
        yield make_record(rid, img["file_name"], size, "ocr", turns, meta)


def _words(
    data: dict[str, Any], img_id: str, size: tuple[int, int], report: ConversionReport, rid: str
) -> list[tuple[str, Box, Pixels]]:
    """Legible words of one image in reading order: (text, frame box, pixel box)."""
    ann_ids = data["imgToAnns"].get(str(img_id), data["imgToAnns"].get(img_id, []))
    found: list[tuple[Box, tuple[str, Pixels]]] = []
    for ann_id in ann_ids:
        ann = data["anns"].get(str(ann_id))
        if not isinstance(ann, dict):
            report.skip(MALFORMED, f"{rid} annotation {ann_id}")
            continue
        text = _word_text(ann)
        if text is None:
            report.skip(ILLEGIBLE, f"{rid} annotation {ann_id}")
            continue
        pixels = xywh_xyxy(ann.get("bbox") or [], size, report, f"{rid} annotation {ann_id}")
        if pixels is not None:
            found.append((box_from_pixels(pixels, *size), (text, pixels)))
    return [(text, box, pixels) for box, (text, pixels) in reading_order(found)]

"""Flickr30k Entities -> grounded captions.

Layout of the release: `Sentences/<image_id>.txt` holds five captions, one a line, with entity markup
`[/EN#<entity_id>/<type>[/<type>...] phrase words]`; `Annotations/<image_id>.xml` is a VOC-style file with
`<size><width><height>` and `<object>`s, each naming one or more entity ids (`<name>`) and holding either
a `<bndbox>` (`xmin ymin xmax ymax`, 1-based inclusive pixel indices, converted to the continuous box
`(xmin - 1, ymin - 1, xmax, ymax)`) or `<nobndbox>`/`<scene>` flags. Entity id 0 / type `notvisual` never
has a box. Images are `<image_id>.jpg` (folder `flickr30k-images`). The split files (`train.txt`,
`val.txt`, `test.txt`) list image ids, one a line.

One record per sentence; phrases with boxes become `<p>phrase</p> [box;box]` (an entity's boxes in
reading order), the others stay plain text. A sentence with no boxed phrase is skipped.
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from sphinx_mllm.data.converters.common import (
    ConversionReport,
    ImageSizer,
    Record,
    make_record,
    pixel_xyxy,
    reading_order,
    typed_task,
    valid_size,
)
from sphinx_mllm.geometry import Box, Grounding, box_from_pixels
from sphinx_mllm.tasks import GroundedCaptionTask
from sphinx_mllm.utils.errors import SphinxError

_ENTITY = re.compile(r"\[/EN#(\d+)((?:/[^\s/\]]+)*)\s+([^\[\]]+)\]")


def parse_sentence(line: str) -> list[str | tuple[str, tuple[str, ...], str]] | None:
    """A caption line as plain-text pieces and `(entity_id, types, phrase)` tuples; None when the markup
    is broken (a bracket left over)."""
    spans: list[str | tuple[str, tuple[str, ...], str]] = []
    pos = 0
    for m in _ENTITY.finditer(line):
        spans.append(line[pos : m.start()])
        types = tuple(t for t in m.group(2).split("/") if t)
        spans.append((m.group(1), types, " ".join(m.group(3).split())))
        pos = m.end()
    spans.append(line[pos:])
    if any(isinstance(s, str) and ("[" in s or "]" in s) for s in spans):
        return None
    return [s for s in spans if not (isinstance(s, str) and not s.strip())]


def parse_annotation(path: Path) -> tuple[tuple[int, int] | None, dict[str, list[tuple[float, ...]]]]:
    """Image size (None when absent) and entity id -> continuous pixel boxes of one XML file."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise SphinxError(f"{path} is not valid XML: {exc}") from None
    size = None
    size_el = root.find("size")
    if size_el is not None:
        size = valid_size(_int(size_el.findtext("width")), _int(size_el.findtext("height")))
    boxes: dict[str, list[tuple[float, ...]]] = {}
    for obj in root.findall("object"):
        bnd = obj.find("bndbox")
        if bnd is None:
            continue
        vals = [_int(bnd.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        if any(v is None for v in vals):
            continue
        xmin, ymin, xmax, ymax = (float(v) for v in vals)  # type: ignore[arg-type]
        for name in obj.findall("name"):
            if name.text and name.text.strip():
                boxes.setdefault(name.text.strip(), []).append((xmin - 1, ymin - 1, xmax, ymax))
    return size, boxes


def _int(text: str | None) -> int | None:
    try:
        return int(str(text).strip())
    except ValueError:
        return None


def _image_ids(root: Path, split_file: str | os.PathLike | None) -> list[str]:
    if split_file is None:
        return sorted(p.stem for p in (root / "Sentences").glob("*.txt"))
    path = Path(split_file)
    if not path.is_file():
        raise SphinxError(f"split file not found: {path}")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def flickr30k_entities(
    root: str | os.PathLike, report: ConversionReport, *, split_file: str | os.PathLike | None = None,
    images_root: str | os.PathLike | None = None, seed: int = 0, id_prefix: str = "flickr30k",
) -> Iterator[Record]:
    """Grounded-caption records of the images listed in `split_file` (all sentence files when None)."""
    root = Path(root)
    for sub in ("Sentences", "Annotations"):
        if not (root / sub).is_dir():
            raise SphinxError(f"Flickr30k Entities folder {root} has no {sub}/ folder")
    builder = typed_task("grounded_caption", GroundedCaptionTask)
    sizer = ImageSizer(images_root)
    for image_id in _image_ids(root, split_file):
        sentence_file, xml_file = root / "Sentences" / f"{image_id}.txt", root / "Annotations" / f"{image_id}.xml"
        if not sentence_file.is_file() or not xml_file.is_file():
            report.skip("missing_annotation_file", image_id)
            continue
        try:
            xml_size, pixel_boxes = parse_annotation(xml_file)
        except SphinxError as exc:
            report.skip("malformed_annotation_file", str(exc))
            continue
        size = sizer.size(f"{image_id}.jpg", report, *(xml_size or (None, None)))
        if size is None:
            continue
        boxes, pixels = _entity_boxes(pixel_boxes, size, report, image_id)
        lines = sentence_file.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(x for x in lines if x.strip()):
            rid = f"{id_prefix}-{image_id}-{i}"
            spans = parse_sentence(line)
            if spans is None:
                report.skip("malformed_sentence", rid)
                continue
            grounded = [
                s if isinstance(s, str) else Grounding(s[2], boxes.get(s[0], ()) if s[0] != "0" else ())
                for s in spans
            ]
            if not any(isinstance(g, Grounding) and g.boxes for g in grounded):
                report.skip("no_boxed_phrase", rid)
                continue
            turns = builder.build(grounded, seed=seed, key=rid)
            phrases = [{"phrase": s[2], "boxes": pixels[s[0]]} for s in spans
                       if not isinstance(s, str) and s[0] != "0" and s[0] in pixels]
            meta = {"image_id": image_id, "phrases": phrases}
            yield make_record(rid, f"{image_id}.jpg", size, "grounded_caption", turns, meta)


def _entity_boxes(
    pixel_boxes: dict[str, list[tuple[float, ...]]], size: tuple[int, int], report: ConversionReport, where: str
) -> tuple[dict[str, tuple[Box, ...]], dict[str, list[list[float]]]]:
    """Per entity: its valid frame boxes in reading order, and the same boxes in (clipped) pixels."""
    boxes, pixels = {}, {}
    for entity, raw in pixel_boxes.items():
        checked = [p for p in (pixel_xyxy(r, size, report, detail=where) for r in raw) if p is not None]
        ordered = reading_order([(box_from_pixels(p, *size), p) for p in checked])
        if ordered:
            boxes[entity] = tuple(b for b, _ in ordered)
            pixels[entity] = [list(p) for _, p in ordered]
    return boxes, pixels

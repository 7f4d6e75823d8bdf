"""What every converter shares: the skip report, image sizes, pixel boxes, records and the JSONL writer.

Converters are generators of record dicts (the conversation JSONL of the project); they never drop an item
silently: each skip goes through `ConversionReport.skip(reason)`, which counts it by reason and logs the
first few examples of each reason at DEBUG level.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sphinx_mllm.geometry import Box, box_from_pixels
from sphinx_mllm.tasks import get_task
from sphinx_mllm.tasks.base import Task, Turn
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.io import atomic_open
from sphinx_mllm.utils.logging import get_logger

log = get_logger(__name__)

Record = dict[str, Any]
T = TypeVar("T", bound=Task)
V = TypeVar("V")

# Skip reasons shared by several converters (each converter may add its own).
MISSING_IMAGE = "missing_image"
UNREADABLE_IMAGE = "unreadable_image"
UNKNOWN_IMAGE_SIZE = "unknown_image_size"
DEGENERATE_BOX = "degenerate_box"
BOX_OUTSIDE_IMAGE = "box_outside_image"
MALFORMED = "malformed_item"

_LOGGED_PER_REASON = 3


@dataclass
class ConversionReport:
    """Counts of what a conversion wrote and skipped, by reason (a skip may be a record, a box, a word...:
    the reason's name says which)."""

    source: str
    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def skip(self, reason: str, detail: str = "", count: int = 1) -> None:
        self.skipped[reason] += count
        if self.skipped[reason] <= _LOGGED_PER_REASON:
            log.debug("%s: skipped (%s) %s", self.source, reason, detail)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "written": self.written, "skipped": dict(sorted(self.skipped.items()))}

    def summary(self) -> str:
        """One line per count, e.g. `written 120` then `skipped degenerate_box 3`."""
        lines = [f"{self.source}: written {self.written}"]
        lines += [f"  skipped {reason}: {n}" for reason, n in sorted(self.skipped.items())]
        return "\n".join(lines)


def typed_task(name: str, cls: type[T]) -> T:
    """The registered task `name`, checked to be a `cls` (so its `build` signature is known)."""
    task = get_task(name)
    if not isinstance(task, cls):
        raise TypeError(f"task {name!r} is a {type(task).__name__}, expected {cls.__name__}")
    return task


def make_record(
    record_id: str, image: str | None, size: tuple[int, int], task: str, conversations: list[Turn],
    meta: Mapping[str, Any] | None = None,
) -> Record:
    """A conversation record in the project's JSONL layout (`meta` only when given)."""
    record: Record = {
        "id": record_id, "image": image, "width": size[0], "height": size[1], "task": task,
        "conversations": conversations,
    }
    if meta:
        record["meta"] = dict(meta)
    return record


def valid_size(width: object, height: object) -> tuple[int, int] | None:
    """(W, H) when both are positive whole numbers (ints or integral floats), else None."""
    vals = []
    for v in (width, height):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            return None
        if v <= 0 or int(v) != v:
            return None
        vals.append(int(v))
    return vals[0], vals[1]


class ImageSizer:
    """Image sizes: from the annotation when it has them, else from the image header (Pillow opens lazily,
    reading only the header). With an images root, a missing file is a skip even when the annotation
    gives a size; without one, files are not checked and a size must come from the annotation."""

    def __init__(self, images_root: str | os.PathLike | None) -> None:
        self.root = None if images_root is None else Path(images_root)
        if self.root is not None and not self.root.is_dir():
            raise SphinxError(f"images root {self.root} is not a folder")
        self._cache: dict[str, tuple[tuple[int, int] | None, str]] = {}

    def size(
        self, relpath: str, report: ConversionReport, width: object = None, height: object = None
    ) -> tuple[int, int] | None:
        """(W, H) of the image at `relpath` or None after recording the skip reason in `report`."""
        known = valid_size(width, height)
        if relpath not in self._cache:
            self._cache[relpath] = self._lookup(relpath, known)
        size, reason = self._cache[relpath]
        if size is None:
            report.skip(reason, relpath)
        return size

    def exists(self, relpath: str) -> bool:
        return self.root is not None and (self.root / relpath).is_file()

    def _lookup(self, relpath: str, known: tuple[int, int] | None) -> tuple[tuple[int, int] | None, str]:
        if self.root is None:
            return (known, "") if known else (None, UNKNOWN_IMAGE_SIZE)
        path = self.root / relpath
        if not path.is_file():
            return None, MISSING_IMAGE
        if known:
            return known, ""
        return header_size(path)


def header_size(path: Path) -> tuple[tuple[int, int] | None, str]:
    """(W, H) from an image file's header, or (None, reason)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return (int(im.size[0]), int(im.size[1])), ""
    except (UnidentifiedImageError, OSError, ValueError):
        return None, UNREADABLE_IMAGE


Pixels = tuple[float, float, float, float]


def pixel_xyxy(
    xyxy: Sequence[object], size: tuple[int, int], report: ConversionReport, *, tolerance: float = 1.0,
    min_size: float = 1.0, detail: str = "",
) -> Pixels | None:
    """A checked pixel box (x1, y1, x2, y2) of an image of `size`, clipped to it, or None (skip recorded).

    Boxes reaching past the image by more than `tolerance` pixels are `box_outside_image`; the rest are
    clipped to the image. Boxes narrower or lower than `min_size` pixels after clipping (or with
    reversed or infinite corners) are `degenerate_box`; non-numeric ones are `malformed_item`.
    """
    width, height = size
    if len(xyxy) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in xyxy):
        report.skip(MALFORMED, f"box {list(xyxy)!r} {detail}")
        return None
    x1, y1, x2, y2 = (float(v) for v in xyxy)  # type: ignore[arg-type]
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 - x1 < min_size or y2 - y1 < min_size:
        report.skip(DEGENERATE_BOX, f"{(x1, y1, x2, y2)} {detail}")
        return None
    if x1 < -tolerance or y1 < -tolerance or x2 > width + tolerance or y2 > height + tolerance:
        report.skip(BOX_OUTSIDE_IMAGE, f"{(x1, y1, x2, y2)} in {width}x{height} {detail}")
        return None
    x1, x2 = max(0.0, x1), min(float(width), x2)
    y1, y2 = max(0.0, y1), min(float(height), y2)
    if x2 - x1 < min_size or y2 - y1 < min_size:
        report.skip(DEGENERATE_BOX, f"{(x1, y1, x2, y2)} after clipping {detail}")
        return None
    return (x1, y1, x2, y2)


def xywh_xyxy(
    xywh: Sequence[object], size: tuple[int, int], report: ConversionReport, detail: str = ""
) -> Pixels | None:
    """`pixel_xyxy` for a COCO-style [x, y, w, h] box."""
    if len(xywh) != 4 or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in xywh):
        report.skip(MALFORMED, f"box {list(xywh)!r} {detail}")
        return None
    x, y, w, h = (float(v) for v in xywh)  # type: ignore[arg-type]
    return pixel_xyxy((x, y, x + w, y + h), size, report, detail=detail)


def pixel_box(
    xyxy: Sequence[object], size: tuple[int, int], report: ConversionReport, detail: str = ""
) -> Box | None:
    """`pixel_xyxy` in the release's frame (a `geometry.Box`), or None (skip recorded)."""
    pixels = pixel_xyxy(xyxy, size, report, detail=detail)
    return None if pixels is None else box_from_pixels(pixels, *size)


def xywh_box(
    xywh: Sequence[object], size: tuple[int, int], report: ConversionReport, detail: str = ""
) -> Box | None:
    """`xywh_xyxy` in the release's frame, or None (skip recorded)."""
    pixels = xywh_xyxy(xywh, size, report, detail)
    return None if pixels is None else box_from_pixels(pixels, *size)


def reading_order(items: Iterable[tuple[Box, V]]) -> list[tuple[Box, V]]:
    """Items sorted top-to-bottom then left-to-right by their box's top-left corner (stable)."""
    return sorted(items, key=lambda it: (round(it[0].y1, 2), round(it[0].x1, 2)))


def load_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file; a missing or broken file is a `SphinxError` naming `what`."""
    path = Path(path)
    if not path.is_file():
        raise SphinxError(f"{what} file not found: {path}")
    try:
        with path.open("r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SphinxError(f"{what} file {path} is not valid JSON: {exc}") from None


def require_keys(obj: object, keys: Sequence[str], what: str) -> None:
    """Raise `SphinxError` when `obj` is not a dict holding every key (a wrong file, not a broken item)."""
    if not isinstance(obj, dict):
        raise SphinxError(f"{what}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise SphinxError(f"{what}: missing key(s) {missing}; is this the right file?")


def write_jsonl(
    records: Iterable[Record], output: str | os.PathLike, report: ConversionReport, limit: int | None = None
) -> ConversionReport:
    """Stream `records` to a temporary file beside `output`, then rename it: a failed or interrupted run
    leaves no partial output. Stops after `limit` records when given. Logs and returns `report`."""
    with atomic_open(output, "w", encoding="utf-8") as f:
        for record in _limited(records, limit):
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            report.written += 1
    log.info("%s", report.summary())
    return report


def _limited(records: Iterable[Record], limit: int | None) -> Iterator[Record]:
    if limit is None:
        return iter(records)
    if limit < 0:
        raise SphinxError(f"limit must be >= 0, got {limit}")
    return itertools.islice(records, limit)

"""Lazy, validated reading of conversation and caption record files (the formats of common.md).

Opening a file makes one streaming pass over it: every line is parsed and checked, and only two compact
arrays are kept for the good records (the byte offset of the line and the length of its text), so a file
of millions of records costs a few bytes per record and item `i` is read later with one seek.

Broken records are skipped, never fatal and never silent: each is counted under the first reason it
fails (`SKIP_REASONS`, checked in that order), the detail of each goes to the debug log, and one warning
per file sums them up. `.json` files (a JSON list, which the release also reads) are loaded whole and
checked the same way.

What is checked:
- the line is JSON (`bad_json`) and an object (`not_object`);
- a conversation has a non-empty `conversations` list of `{"from", "value": str}`, a caption record a
  string `caption` (`missing_field`); an `image` is a string or null;
- turns alternate `human`, `gpt`, `human`, ... and the last one is `gpt` (`bad_roles`): a dialog that
  ends on a question has nothing to learn;
- `width`/`height`, when present, are positive integers (`bad_size`);
- coordinates written in the text of a record with an image (text-only records are not checked: their
  brackets are prose): every bracketed group of 4 numbers must be a box inside [0, 1]
  (`box_out_of_range`) with x1 < x2 and y1 < y2 (`degenerate_box`); every group of 2 numbers written
  with a decimal point must be a point inside [0, 1] (`point_out_of_range`). The checks are exact (no
  slack): this is training data, written by our converters. The valid ones are exactly what
  `sphinx_mllm.geometry.parse_boxes` / `parse_points` read back;
- the image file exists under its root (`missing_image`), unless `check_images=False`.

The release strips an `<image>` placeholder from the text; `RecordFile` does the same when it returns
a record, so the text never holds one.
"""

from __future__ import annotations

import json
import os
import re
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from sphinx_mllm.geometry import Box
from sphinx_mllm.utils import SphinxError, get_logger

logger = get_logger(__name__)

# In the order they are checked; a record counts under the first one it fails.
SKIP_REASONS: tuple[str, ...] = (
    "bad_json",
    "not_object",
    "missing_field",
    "bad_roles",
    "bad_size",
    "box_out_of_range",
    "degenerate_box",
    "point_out_of_range",
    "missing_image",
)
ROLES: tuple[str, str] = ("human", "gpt")
IMAGE_TAG = "<image>"

_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class InvalidRecord(Exception):
    """Why one record is skipped: `reason` is one of SKIP_REASONS, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- one record


def strip_image_tag(text: str) -> str:
    """The text without `<image>` placeholders, outer whitespace stripped (as the release does)."""
    return text.replace(IMAGE_TAG, "").strip() if IMAGE_TAG in text else text


def record_texts(record: dict[str, Any]) -> list[str]:
    """The texts of a valid record: every turn's value, or the caption."""
    if "conversations" in record:
        return [turn["value"] for turn in record["conversations"]]
    return [record["caption"]]


def text_length(record: dict[str, Any]) -> int:
    """Characters of all texts of a valid record (the release's length for grouping), placeholders removed."""
    return sum(len(strip_image_tag(t)) for t in record_texts(record))


def _check_fields(rec: dict[str, Any]) -> None:
    image = rec.get("image")
    if image is not None and not (isinstance(image, str) and image):
        raise InvalidRecord("missing_field", f"'image' must be a path or null, got {image!r}")
    if "conversations" in rec:
        turns = rec["conversations"]
        if not isinstance(turns, list) or not turns:
            raise InvalidRecord("missing_field", "'conversations' must be a non-empty list")
        for k, turn in enumerate(turns):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise InvalidRecord("missing_field", f"turn {k} lacks 'from' or 'value'")
            if not isinstance(turn["value"], str):
                raise InvalidRecord("missing_field", f"turn {k}: 'value' is not a string")
    elif "caption" in rec:
        if not isinstance(rec["caption"], str):
            raise InvalidRecord("missing_field", "'caption' is not a string")
    else:
        raise InvalidRecord("missing_field", "neither 'conversations' nor 'caption'")


def _check_roles(rec: dict[str, Any]) -> None:
    turns = rec.get("conversations")
    if turns is None:
        return
    for k, turn in enumerate(turns):
        if turn["from"] != ROLES[k % 2]:
            raise InvalidRecord("bad_roles", f"turn {k} is from {turn['from']!r}, expected {ROLES[k % 2]!r}")
    if len(turns) % 2:
        raise InvalidRecord("bad_roles", "the last turn is not from 'gpt' (nothing to learn)")


def _check_size(rec: dict[str, Any]) -> None:
    for key in ("width", "height"):
        val = rec.get(key)
        if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val <= 0):
            raise InvalidRecord("bad_size", f"{key!r} must be a positive integer, got {val!r}")


def coordinate_groups(text: str) -> list[tuple[str, ...]]:
    """Every comma group of 2 or 4 numbers inside brackets (split by `;`), as the number strings."""
    groups = []
    for m in _BRACKET.finditer(text):
        for group in m.group(1).split(";"):
            parts = tuple(p.strip() for p in group.split(","))
            if len(parts) in (2, 4) and all(_NUMBER.fullmatch(p) for p in parts):
                groups.append(parts)
    return groups


def _check_geometry(rec: dict[str, Any]) -> None:
    if rec.get("image") is None:
        return
    for text in record_texts(rec):
        for parts in coordinate_groups(text):
            vals = [float(p) for p in parts]
            written = "[" + ",".join(parts) + "]"
            if len(vals) == 4:
                if not all(0.0 <= v <= 1.0 for v in vals):
                    raise InvalidRecord("box_out_of_range", f"box {written} is outside [0, 1]")
                if vals[2] < vals[0] or vals[3] < vals[1] or Box(*vals).is_degenerate():
                    raise InvalidRecord("degenerate_box", f"box {written} has no area or unordered corners")
            elif any("." in p for p in parts) and not all(0.0 <= v <= 1.0 for v in vals):
                raise InvalidRecord("point_out_of_range", f"point {written} is outside [0, 1]")


def _check_image(rec: dict[str, Any], image_root: Path) -> None:
    image = rec.get("image")
    if image is not None and not (image_root / image).is_file():
        raise InvalidRecord("missing_image", f"no file {image_root / image}")


def validate_record(rec: Any, image_root: Path | None) -> dict[str, Any]:
    """`rec` if it is a valid record, else raise InvalidRecord. Images are looked up under
    `image_root` unless it is None (no image check)."""
    if not isinstance(rec, dict):
        raise InvalidRecord("not_object", f"a JSON {type(rec).__name__}, not an object")
    _check_fields(rec)
    _check_roles(rec)
    _check_size(rec)
    _check_geometry(rec)
    if image_root is not None:
        _check_image(rec, image_root)
    return rec


# ----------------------------------------------------------------------------- one file


@dataclass
class SkipReport:
    """What reading one file kept and skipped (`skipped` maps a reason of SKIP_REASONS to a count)."""

    path: str
    total: int = 0  # records seen (blank lines are not records)
    kept: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{r}: {self.skipped[r]}" for r in SKIP_REASONS if self.skipped[r])
        return f"{self.path}: skipped {self.num_skipped} of {self.total} records ({reasons})"


class RecordFile(Sequence[dict[str, Any]]):
    """The valid records of one `.jsonl` (indexed, read lazily) or `.json` (loaded whole) file.

    `image_root` is the folder that `image` paths are relative to (default: the file's folder);
    `check_images=False` skips the existence check (for statistics, or data whose images live elsewhere).
    `lengths[i]` is the character length of record i's text. Picklable (for DataLoader workers): each
    process reopens the file on first read.
    """

    def __init__(self, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
                 *, check_images: bool = True) -> None:
        self._fh: BinaryIO | None = None
        self._fh_pid: int | None = None
        self.path = Path(path)
        if not self.path.is_file():
            raise SphinxError(f"record file not found: {self.path}")
        self.image_root = Path(image_root) if image_root is not None else self.path.parent
        self.report = SkipReport(str(self.path))
        self.lengths: array = array("q")
        self._offsets: array | None = None
        self._items: list[dict[str, Any]] | None = None
        root = self.image_root if check_images else None
        if self.path.suffix == ".json":
            self._load_json(root)
        else:
            self._index_jsonl(root)
        if self.report.num_skipped:
            logger.warning("%s", self.report.summary())

    def _skip(self, where: str, err: InvalidRecord) -> None:
        self.report.skipped[err.reason] += 1
        logger.debug("%s:%s: skipped, %s (%s)", self.path, where, err.reason, err.detail)

    def _index_jsonl(self, root: Path | None) -> None:
        self._offsets = array("q")
        offset = 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, start=1):
                start, offset = offset, offset + len(line)
                if not line.strip():
                    continue
                self.report.total += 1
                try:
                    rec = validate_record(_parse_json(line), root)
                except InvalidRecord as err:
                    self._skip(f"line {lineno}", err)
                    continue
                self._offsets.append(start)
                self.lengths.append(text_length(rec))
        self.report.kept = len(self._offsets)

    def _load_json(self, root: Path | None) -> None:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SphinxError(f"{self.path}: not a JSON file ({exc})") from None
        if not isinstance(data, list):
            raise SphinxError(f"{self.path}: a .json record file must hold a list of records")
        self._items = []
        for k, rec in enumerate(data):
            self.report.total += 1
            try:
                self._items.append(validate_record(rec, root))
            except InvalidRecord as err:
                self._skip(f"item {k}", err)
                continue
            self.lengths.append(text_length(rec))
        self.report.kept = len(self._items)

    def __len__(self) -> int:
        return self.report.kept

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        """Record `index` (a fresh dict each call, `<image>` removed from its text)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range ({len(self)} records in {self.path})")
        index %= len(self)
        if self._items is not None:
            rec = json.loads(json.dumps(self._items[index]))
        else:
            fh = self._handle()
            fh.seek(self._offsets[index])  # type: ignore[index]
            rec = json.loads(fh.readline())
        return _without_image_tags(rec)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def _handle(self) -> BinaryIO:
        pid = os.getpid()
        if self._fh is None or self._fh_pid != pid:
            self._fh = open(self.path, "rb")  # noqa: SIM115 - kept open for lazy reads, closed in close()
            self._fh_pid = pid
        return self._fh

    def close(self) -> None:
        if self._fh is not None and self._fh_pid == os.getpid():
            self._fh.close()
        self._fh = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fh"] = None
        state["_fh_pid"] = None
        return state

    def __del__(self) -> None:
        self.close()


def _parse_json(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRecord("bad_json", str(exc)) from None


def _without_image_tags(rec: dict[str, Any]) -> dict[str, Any]:
    if "conversations" in rec:
        for turn in rec["conversations"]:
            turn["value"] = strip_image_tag(turn["value"])
    else:
        rec["caption"] = strip_image_tag(rec["caption"])
    return rec

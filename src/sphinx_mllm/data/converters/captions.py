"""Image-caption pairs for caption pre-training, each tagged with its domain (`real` or `synthetic`: the
release pre-trains on real and synthetic captions separately, then mixes the weights).

Inputs, by file name:
- `*.csv`: a header with at least `image` and `caption` columns (optional `width`, `height`);
- `*.jsonl`: one `{"image", "caption", "width"?, "height"?}` object a line;
- `*.tar`: WebDataset shards: samples are consecutive members sharing a key (the member path up to the
  first dot of its name), `KEY.jpg|jpeg|png|webp` plus `KEY.txt` (the caption). Images are extracted to
  `extract_to/<shard name>/KEY.<ext>` (records point there, relative to `extract_to`).
Records: `{"id", "image", "width", "height", "task": "caption_pretrain", "caption", "domain"}`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from sphinx_mllm.data.converters.common import (
    UNREADABLE_IMAGE,
    ConversionReport,
    ImageSizer,
    Record,
)
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.io import atomic_write_bytes

DOMAINS = ("real", "synthetic")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
EMPTY_CAPTION = "empty_caption"


def pretrain_record(
    record_id: str, image: str, size: tuple[int, int], caption: str, domain: str
) -> Record:
    return {
        "id": record_id, "image": image, "width": size[0], "height": size[1], "task": "caption_pretrain",
        "caption": caption, "domain": domain,
    }


def caption_pairs(
    inputs: Sequence[str | os.PathLike], report: ConversionReport, *, domain: str,
    images_root: str | os.PathLike | None = None, extract_to: str | os.PathLike | None = None,
) -> Iterator[Record]:
    """Caption pre-training records from CSV, JSONL and WebDataset tar files, in the order given."""
    if domain not in DOMAINS:
        raise SphinxError(f"caption domain must be one of {', '.join(DOMAINS)}, not {domain!r}")
    if not inputs:
        raise SphinxError("no caption input file given")
    sizer = ImageSizer(images_root)
    for raw in inputs:
        path = Path(raw)
        if not path.is_file():
            raise SphinxError(f"caption file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".tar":
            if extract_to is None:
                raise SphinxError(f"{path}: tar shards need a folder to extract images to (extract_to)")
            yield from _tar_pairs(path, Path(extract_to), report, domain)
        elif suffix in (".csv", ".jsonl"):
            rows = _csv_rows(path) if suffix == ".csv" else _jsonl_rows(path, report)
            yield from _row_pairs(path, rows, sizer, report, domain)
        else:
            raise SphinxError(f"{path}: unknown caption file type {suffix!r} (use .csv, .jsonl or .tar)")


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("r", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
            raise SphinxError(f"{path}: a caption CSV needs a header with 'image' and 'caption' columns")
        yield from reader


def _jsonl_rows(path: Path, report: ConversionReport) -> Iterator[dict[str, Any]]:
    with path.open("r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                report.skip("malformed_line", f"{path}:{n}")
                continue
            if isinstance(row, dict):
                yield row
            else:
                report.skip("malformed_line", f"{path}:{n}")


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _row_pairs(
    path: Path, rows: Iterator[dict[str, Any]], sizer: ImageSizer, report: ConversionReport, domain: str
) -> Iterator[Record]:
    for n, row in enumerate(rows):
        rid = f"{domain}-{path.name}-{n}"
        image, caption = row.get("image"), row.get("caption")
        if not isinstance(image, str) or not image.strip():
            report.skip("missing_image_field", rid)
            continue
        if not isinstance(caption, str) or not caption.strip():
            report.skip(EMPTY_CAPTION, rid)
            continue
        width, height = _int_or_none(row.get("width")), _int_or_none(row.get("height"))
        size = sizer.size(image.strip(), report, width, height)
        if size is not None:
            yield pretrain_record(rid, image.strip(), size, " ".join(caption.split()), domain)


def _sample_key(name: str) -> tuple[str, str] | None:
    """(key, extension) of a WebDataset member: key = the path up to the first dot of the file name."""
    posix = PurePosixPath(name)
    if posix.is_absolute() or ".." in posix.parts or "." not in posix.name:
        return None
    stem, ext = posix.name.split(".", 1)
    key = str(posix.parent / stem) if str(posix.parent) != "." else stem
    return key, ext.lower()


def _tar_samples(path: Path, report: ConversionReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for consecutive members sharing a key, streamed."""
    key, parts = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parsed = _sample_key(member.name)
                if parsed is None:
                    report.skip("unsafe_or_unnamed_member", member.name)
                    continue
                if parsed[0] != key:
                    if key is not None:
                        yield key, parts
                    key, parts = parsed[0], {}
                f = tar.extractfile(member)
                parts[parsed[1]] = f.read() if f is not None else b""
    except tarfile.TarError as exc:
        raise SphinxError(f"{path} is not a readable tar file: {exc}") from None
    if key is not None:
        yield key, parts


def _tar_pairs(path: Path, extract_to: Path, report: ConversionReport, domain: str) -> Iterator[Record]:
    from PIL import Image, UnidentifiedImageError

    shard = path.name[: -len(".tar")]
    for key, parts in _tar_samples(path, report):
        rid = f"{domain}-{shard}-{key}"
        ext = next((e for e in IMAGE_EXTENSIONS if e in parts), None)
        if ext is None or "txt" not in parts:
            report.skip("incomplete_sample", rid)
            continue
        caption = " ".join(parts["txt"].decode("utf-8", errors="replace").split())
        if not caption:
            report.skip(EMPTY_CAPTION, rid)
            continue
        try:
            with Image.open(io.BytesIO(parts[ext])) as im:
                size = (int(im.size[0]), int(im.size[1]))
        except (UnidentifiedImageError, OSError, ValueError):
            report.skip(UNREADABLE_IMAGE, rid)
            continue
        rel = f"{shard}/{key}.{ext}"
        atomic_write_bytes(extract_to / rel, parts[ext])
        yield pretrain_record(rid, rel, size, caption, domain)

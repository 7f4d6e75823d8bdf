"""RefCOCO, RefCOCO+ and RefCOCOg (the `refer` release layout) -> REC records.

A data set folder holds `refs(unc).p` (or `refs(umd).p` / `refs(google).p` for RefCOCOg) and
`instances.json` (COCO format: images with sizes, annotations with `[x, y, w, h]` boxes). The refs file
is a pickled list of dicts `{"ref_id", "ann_id", "image_id", "category_id", "split", "file_name",
"sent_ids", "sentences": [{"sent_id", "sent", "raw", "tokens"}]}`. It is a PICKLE: it is read with an
unpickler that refuses every global (class or function), so only lists, dicts, strings and numbers can
come out of it; a file that tries to build anything else is rejected with a `SphinxError`.

Split selection follows `refer.py`: `train`, `val` match exactly; `test` matches every test split;
`testA` / `testB` / `testC` match the splits that contain that letter; `all` keeps every ref.
One record per sentence (the unit of RefCOCO evaluation); the image path is the `file_name` of
`instances.json` (e.g. `COCO_train2014_000000581857.jpg`, relative to the `train2014` folder).
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sphinx_mllm.data.converters.common import (
    MALFORMED,
    ConversionReport,
    ImageSizer,
    Record,
    load_json,
    make_record,
    require_keys,
    typed_task,
    xywh_xyxy,
)
from sphinx_mllm.geometry import box_from_pixels
from sphinx_mllm.tasks import RECTask
from sphinx_mllm.utils.errors import SphinxError

SPLITS = ("all", "train", "val", "test", "testA", "testB", "testC")
_SAFE_BUILTINS = frozenset({"list", "dict", "str", "int", "float", "tuple", "bool", "set", "frozenset"})


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a class or function that plain data never needs."""


class _DataOnlyUnpickler(pickle.Unpickler):
    """An unpickler for plain data: containers and scalars are built by opcodes and need no global; the
    only globals allowed are the builtin container/scalar types themselves."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return super().find_class("builtins", name)
        raise _ForbiddenGlobal(f"global '{module}.{name}' is not allowed")


def load_data_pickle(path: str | os.PathLike) -> Any:
    """Load a pickle that may only hold builtin data (lists, dicts, str, numbers); never runs its code.

    Python 2 byte strings are decoded as UTF-8 (bad bytes replaced).
    """
    path = Path(path)
    if not path.is_file():
        raise SphinxError(f"refs file not found: {path}")
    data = path.read_bytes()
    try:
        return _DataOnlyUnpickler(io.BytesIO(data), encoding="utf-8", errors="replace").load()
    except _ForbiddenGlobal as exc:
        raise SphinxError(
            f"refusing to load {path}: {exc}; a refs file holds only lists, dicts, strings and numbers, "
            "so this file is not a refs file or has been tampered with"
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise SphinxError(f"{path} is not a readable pickle: {type(exc).__name__}: {exc}") from None


def split_matches(wanted: str, split: str) -> bool:
    """Whether a ref of `split` belongs to the requested split (the `refer.py` rules)."""
    if wanted == "all":
        return True
    if wanted in ("testA", "testB", "testC"):
        return wanted[-1] in split
    if wanted == "test":
        return "test" in split
    return split == wanted


def refcoco(
    refs: str | os.PathLike, instances: str | os.PathLike, report: ConversionReport, *, split: str = "val",
    images_root: str | os.PathLike | None = None, seed: int = 0, dataset: str = "refcoco",
) -> Iterator[Record]:
    """REC records (one per referring sentence) of the refs in `split`."""
    if split not in SPLITS:
        raise SphinxError(f"unknown RefCOCO split {split!r}; choose one of {', '.join(SPLITS)}")
    builder = typed_task("rec", RECTask)
    ref_list = load_data_pickle(refs)
    if not isinstance(ref_list, list):
        raise SphinxError(f"{refs}: expected a list of refs, got {type(ref_list).__name__}")
    inst = load_json(instances, "RefCOCO instances")
    require_keys(inst, ("images", "annotations"), f"RefCOCO instances {instances}")
    images = {im["id"]: im for im in inst["images"] if isinstance(im, dict) and "id" in im}
    anns = {a["id"]: a for a in inst["annotations"] if isinstance(a, dict) and "id" in a}
    sizer = ImageSizer(images_root)
    for ref in ref_list:
        if not isinstance(ref, dict) or not {"ref_id", "ann_id", "image_id", "split", "sentences"} <= set(ref):
            report.skip(MALFORMED, f"ref {str(ref)[:80]}")
            continue
        if not split_matches(split, str(ref["split"])):
            continue
        yield from _ref_records(ref, images, anns, sizer, builder, report, seed=seed, dataset=dataset)


def _ref_records(
    ref: dict[str, Any], images: dict[int, Any], anns: dict[int, Any], sizer: ImageSizer, builder: RECTask,
    report: ConversionReport, *, seed: int, dataset: str,
) -> Iterator[Record]:
    image, ann = images.get(ref["image_id"]), anns.get(ref["ann_id"])
    where = f"ref {ref['ref_id']}"
    if image is None or not isinstance(image.get("file_name"), str):
        report.skip("unknown_image_id", where)
        return
    if ann is None:
        report.skip("unknown_annotation_id", where)
        return
    size = sizer.size(image["file_name"], report, image.get("width"), image.get("height"))
    if size is None:
        return
    pixels = xywh_xyxy(ann.get("bbox") or [], size, report, where)
    if pixels is None:
        return
    box = box_from_pixels(pixels, *size)
    for sent in ref["sentences"]:
        text = (sent.get("sent") or sent.get("raw")) if isinstance(sent, dict) else None
        if not isinstance(text, str) or not text.strip():
            report.skip("empty_expression", where)
            continue
        rid = f"{dataset}-{ref['split']}-{sent.get('sent_id', ref['ref_id'])}"
        turns = builder.build(text, box, seed=seed, key=rid)
        meta = {"ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "split": ref["split"],
                "image_id": ref["image_id"], "box": list(pixels)}
        yield make_record(rid, image["file_name"], size, "rec", turns, meta)

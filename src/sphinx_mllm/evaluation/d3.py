"""D3 (Description Detection Dataset, shikras/d-cube): described object detection scored as box mAP on its
FULL / PRES / ABS splits (all 422 descriptions / presence-only 316 / absence 106).

The release folder layout read here:
- `d3_json/d3_full_annotations.json`, `d3_pres_annotations.json`, `d3_abs_annotations.json`: COCO-format
  ground truth where each category is one description (category id = sentence id, name = the sentence);
- `d3_pkl/images.pkl`, `d3_pkl/groups.pkl`: the toolkit's index; images carry `group_id`, groups their
  `inner_sent_id` (the descriptions of the image's scenario). Needed for the default intra-group setting
  (each image is asked only its group's descriptions, as the benchmark's protocol says); the inter-group
  setting (`load_d3_items(root, setting="inter")`) asks every description and needs no pickles.
- images under `d3_images/` (`file_name` of the JSON images).

The pickles are read with an unpickler that only builds builtin containers and numpy arrays (no other
global is allowed), so a pickle cannot run code. Each description is asked with the release's REC wording;
boxes parsed from the answer are scored like `tasks.metrics.detection_map` (pseudo-confidence by output
rank; the d-cube SPHINX script gives every box 1.0, so ties break differently).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sphinx_mllm.evaluation.benchmarks import EvalItem
from sphinx_mllm.tasks import TASKS
from sphinx_mllm.utils.errors import SphinxError

SPLITS: dict[str, str] = {"FULL": "d3_full_annotations.json", "PRES": "d3_pres_annotations.json",
                          "ABS": "d3_abs_annotations.json"}
_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "ndarray"),
    ("numpy", "dtype"),
}  # fmt: skip


class _DataUnpickler(pickle.Unpickler):
    """Builtin containers and numpy arrays only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: D3 index pickles hold only data")


def load_index_pickle(path: Path) -> Any:
    if not path.is_file():
        raise SphinxError(f"D3 index not found: {path} (the intra-group setting needs d3_pkl/; "
                          "use setting='inter' without it)")
    try:
        with path.open("rb") as f:
            return _DataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise SphinxError(f"{path}: not a D3 index pickle ({exc})") from None


def _ints(value: Any) -> list[int]:
    """A list / numpy array / scalar of ids as ints."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, int | float):
        return [int(value)]
    return [int(v) for v in value]


def load_gt(root: Path, split: str) -> dict[str, Any]:
    import json

    path = root / "d3_json" / SPLITS[split]
    if not path.is_file():
        raise SphinxError(f"D3 ground truth not found: {path}")
    try:
        gt = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SphinxError(f"{path}: bad JSON ({exc.msg})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise SphinxError(f"{path}: COCO ground truth lacks a {key!r} list")
    return gt


def _intra_group_sentences(root: Path) -> dict[int, list[int]]:
    """image id -> the sentence ids of its group(s)."""
    images = load_index_pickle(root / "d3_pkl" / "images.pkl")
    groups = load_index_pickle(root / "d3_pkl" / "groups.pkl")
    if not isinstance(images, Mapping) or not isinstance(groups, Mapping):
        raise SphinxError(f"{root / 'd3_pkl'}: images.pkl and groups.pkl must be dicts keyed by id")
    out: dict[int, list[int]] = {}
    for img_id, img in images.items():
        sents: set[int] = set()
        for gid in _ints(img.get("group_id", [])):
            group = groups.get(gid)
            if group is None:
                raise SphinxError(f"D3 image {img_id} names unknown group {gid}")
            sents.update(_ints(group.get("inner_sent_id", [])))
        out[int(img_id)] = sorted(sents)
    return out


def load_d3_items(root: str | Path, setting: str = "intra") -> list[EvalItem]:
    """One item per (image, description) asked, with the release's REC wording."""
    root = Path(root)
    if setting not in ("intra", "inter"):
        raise SphinxError(f"D3 setting must be 'intra' or 'inter', got {setting!r}")
    gt = load_gt(root, "FULL")
    names = {int(c["id"]): str(c.get("name", "")) for c in gt["categories"]}
    per_image = _intra_group_sentences(root) if setting == "intra" else None
    template = TASKS["rec"].templates[0]
    items = []
    for img in gt["images"]:
        img_id = int(img["id"])
        sent_ids = sorted(names) if per_image is None else per_image.get(img_id, [])
        for sid in sent_ids:
            if sid not in names:
                raise SphinxError(f"D3 sentence {sid} (group of image {img_id}) is not a category of the ground truth")
            rid = f"d3-{img_id}-{sid}"
            prompt = template.format(expression=names[sid].strip().rstrip("."))
            ref = {"id": rid, "image_id": img_id, "category_id": sid, "width": img.get("width"),
                   "height": img.get("height")}
            items.append(EvalItem(rid, str(Path("d3_images") / img["file_name"]), prompt, ref, "d3"))
    return items


def score_d3(predictions: Sequence[Mapping[str, Any]], references: Sequence[Mapping[str, Any]],
             root: str | Path) -> dict[str, dict[str, float]]:
    """{"FULL" | "PRES" | "ABS": detection metrics} of `{"id", "text"}` predictions of D3 items."""
    from sphinx_mllm.tasks.metrics import detection_map

    root = Path(root)
    texts = {str(p["id"]): str(p.get("text", "")) for p in predictions}
    queries = [{"image_id": r["image_id"], "category_id": r["category_id"], "text": texts.get(str(r["id"]), "")}
               for r in references]
    out = {}
    for split in SPLITS:
        path = root / "d3_json" / SPLITS[split]
        if not path.is_file():
            continue
        gt = load_gt(root, split)
        cats = {c["id"] for c in gt["categories"]}
        imgs = {i["id"] for i in gt["images"]}
        asked = [q for q in queries if q["category_id"] in cats and q["image_id"] in imgs]
        if asked:
            out[split] = detection_map(asked, gt)
    if not out:
        raise SphinxError(f"no D3 split could be scored from {root / 'd3_json'}")
    return out


__all__ = ["SPLITS", "load_d3_items", "load_index_pickle", "score_d3"]

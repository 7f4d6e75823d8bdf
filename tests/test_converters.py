"""Converters: small fixtures in each real public format, hand-checked records, skip counts by reason.

Box arithmetic used below (the release's padded-square frame, two decimals):
- landscape 640x480: S = 640, pad_y = 80. Pixel (32, 16, 320, 240) -> [0.05,0.15,0.50,0.50];
  (320, 240, 448, 336) -> [0.50,0.50,0.70,0.65]; (64, 48, 128, 80) -> [0.10,0.20,0.20,0.25].
- portrait 480x640: S = 640, pad_x = 80. Pixel (48, 64, 208, 384) -> [0.20,0.10,0.45,0.60];
  (112, 576, 208, 640.4) clipped to y2 = 640 -> [0.30,0.90,0.45,1.00].
- small real images read from their headers: 100x50 (pad_y = 25) and 50x100 (pad_x = 25): pixel
  (10, 5, 40, 25) -> [0.10,0.30,0.40,0.50] and [0.35,0.05,0.65,0.25].
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import tarfile
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sphinx_mllm.cli import data_convert
from sphinx_mllm.data import FORMATS, ConversionReport, convert
from sphinx_mllm.data.converters import refcoco as refcoco_mod
from sphinx_mllm.data.converters.common import write_jsonl
from sphinx_mllm.tasks import COCO_KEYPOINT_NAMES, TASKS
from sphinx_mllm.tasks.language import DETAILED_CAPTION_TEMPLATES, SHORT_CAPTION_TEMPLATES, VQA_TEMPLATES
from sphinx_mllm.tasks.spatial import (
    DETECTION_TEMPLATES,
    KEYPOINT_TEMPLATES,
    LAYOUT_TEMPLATES,
    REC_TEMPLATES,
    REG_TEMPLATES,
    RELATION_TEMPLATES,
)
from sphinx_mllm.utils.errors import SphinxError

LAND_A = "[0.05,0.15,0.50,0.50]"
LAND_B = "[0.50,0.50,0.70,0.65]"
LAND_C = "[0.10,0.20,0.20,0.25]"
PORT_A = "[0.20,0.10,0.45,0.60]"
PORT_EDGE = "[0.30,0.90,0.45,1.00]"


def _json(path: Path, obj: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _image(path: Path, size: tuple[int, int], fmt: str = "JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 10, 10)).save(path, format=fmt)
    return path


def _run(tmp_path: Path, fmt: str, *args: Any, **options: Any) -> tuple[list[dict[str, Any]], ConversionReport]:
    out = tmp_path / f"{fmt}.jsonl"
    report = convert(fmt, out, *args, **options)
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert report.written == len(records)
    return records, report


def _asked(template_set: tuple[str, ...], **values: str) -> set[str]:
    return {t.format(**values) for t in template_set}


# ----------------------------------------------------------------------------- COCO family


def _coco_instances(tmp_path: Path) -> Path:
    return _json(tmp_path / "instances_val2017.json", {
        "images": [
            {"id": 1, "file_name": "land.jpg", "width": 640, "height": 480},
            {"id": 2, "file_name": "port.jpg", "width": 480, "height": 640},
            {"id": 3, "file_name": "empty.jpg", "width": 640, "height": 480},
        ],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"},
                       {"id": 18, "name": "dog", "supercategory": "animal"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 18, "bbox": [320, 240, 128, 96], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 18, "bbox": [32, 16, 288, 224], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 1, "bbox": [64, 48, 64, 32], "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "iscrowd": 1},
            {"id": 5, "image_id": 1, "category_id": 1, "bbox": [10, 10, 0, 5], "iscrowd": 0},
            {"id": 6, "image_id": 1, "category_id": 18, "bbox": [600, 10, 100, 50], "iscrowd": 0},
            {"id": 7, "image_id": 2, "category_id": 1, "bbox": [48, 64, 160, 320], "iscrowd": 0},
            {"id": 8, "image_id": 3, "category_id": 1, "bbox": [5, 5, 0.5, 0.5], "iscrowd": 0},
            {"id": 9, "image_id": 99, "category_id": 1, "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 10, "image_id": 1, "category_id": 77, "bbox": [5, 5, 10, 10], "iscrowd": 0},
            {"id": 11, "image_id": 2, "category_id": 18, "bbox": [112, 576, 96, 64.4], "iscrowd": 0},
        ],
    })


def test_coco_instances_one_multi_turn_record_per_image(tmp_path: Path) -> None:
    records, report = _run(tmp_path, "coco-instances", _coco_instances(tmp_path), seed=0)
    assert [r["id"] for r in records] == ["coco_instances-1", "coco_instances-2"]
    land, port = records
    assert (land["image"], land["width"], land["height"], land["task"]) == ("land.jpg", 640, 480, "detection")
    assert [t["from"] for t in land["conversations"]] == ["human", "gpt", "human", "gpt"]
    assert land["conversations"][0]["value"] in _asked(DETECTION_TEMPLATES, category="people")
    assert land["conversations"][1]["value"] == LAND_C
    assert land["conversations"][2]["value"] in _asked(DETECTION_TEMPLATES, category="dogs")
    assert land["conversations"][3]["value"] == f"[{LAND_A[1:-1]};{LAND_B[1:-1]}]"  # reading order
    assert land["meta"] == {"image_id": 1, "queries": [
        {"category_id": 1, "category": "person", "boxes": [[64.0, 48.0, 128.0, 80.0], [0.0, 0.0, 100.0, 100.0]],
         "iscrowd": [0, 1]},
        {"category_id": 18, "category": "dog", "boxes": [[32.0, 16.0, 320.0, 240.0], [320.0, 240.0, 448.0, 336.0]],
         "iscrowd": [0, 0]},
    ]}
    assert [t["value"] for t in port["conversations"][1::2]] == [PORT_A, PORT_EDGE]
    assert dict(report.skipped) == {
        "crowd_annotation": 1, "degenerate_box": 2, "box_outside_image": 1, "unknown_image_id": 1,
        "unknown_category": 1, "image_without_valid_boxes": 1,
    }


def test_coco_instances_per_category_and_missing_images(tmp_path: Path) -> None:
    ann = _coco_instances(tmp_path)
    records, _ = _run(tmp_path, "coco-instances", ann, per_category=True)
    assert [r["id"] for r in records] == [
        "coco_instances-1-1", "coco_instances-1-18", "coco_instances-2-1", "coco_instances-2-18"]
    assert all(len(r["conversations"]) == 2 for r in records)
    assert records[3]["meta"] == {"image_id": 2, "category_id": 18, "category": "dog",
                                  "boxes": [[112.0, 576.0, 208.0, 640.0]], "iscrowd": [0]}  # clipped
    root = tmp_path / "images"
    (root).mkdir()
    (root / "land.jpg").write_bytes(b"sizes come from the annotation; only existence is checked")
    records, report = _run(tmp_path, "coco-instances", ann, images_root=root)
    assert [r["id"] for r in records] == ["coco_instances-1"]
    assert report.skipped["missing_image"] == 2


def test_coco_keypoints_landscape_and_portrait(tmp_path: Path) -> None:
    def kps(**named: tuple[float, float, int]) -> list[float]:
        flat: list[float] = []
        for name in COCO_KEYPOINT_NAMES:
            flat += list(named.get(name, (0, 0, 0)))
        return flat

    ann = _json(tmp_path / "person_keypoints_val2017.json", {
        "images": [{"id": 1, "file_name": "land.jpg", "width": 640, "height": 480},
                   {"id": 2, "file_name": "port.jpg", "width": 480, "height": 640}],
        "categories": [{"id": 1, "name": "person", "keypoints": list(COCO_KEYPOINT_NAMES), "skeleton": [[16, 14]]}],
        "annotations": [
            {"id": 5, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [32, 16, 288, 224], "num_keypoints": 3,
             "keypoints": kps(nose=(320, 176, 2), left_ankle=(64, 400, 1), right_ankle=(700, 10, 2))},
            {"id": 6, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [32, 16, 288, 224], "num_keypoints": 0,
             "keypoints": kps()},
            {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 1, "bbox": [32, 16, 288, 224], "keypoints": kps()},
            {"id": 8, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [48, 64, 160, 320], "num_keypoints": 1,
             "keypoints": kps(nose=(112, 96, 2))},
        ],
    })
    records, report = _run(tmp_path, "coco-keypoints", ann, seed=1)
    assert [r["id"] for r in records] == ["coco_keypoints-5", "coco_keypoints-8"]
    assert records[0]["conversations"][0]["value"] in _asked(KEYPOINT_TEMPLATES, box=LAND_A)
    assert records[0]["conversations"][1]["value"] == "<p>nose</p> [0.50,0.40] <p>left_ankle</p> [0.10,0.75]"
    assert records[1]["conversations"][0]["value"] in _asked(KEYPOINT_TEMPLATES, box=PORT_A)
    assert records[1]["conversations"][1]["value"] == "<p>nose</p> [0.30,0.15]"
    assert records[1]["meta"]["bbox"] == [48, 64, 160, 320] and len(records[1]["meta"]["keypoints"]) == 51
    assert dict(report.skipped) == {"keypoint_outside_image": 1, "no_labelled_keypoints": 1, "crowd_annotation": 1}

    bad = _json(tmp_path / "bad.json", {"images": [], "annotations": [],
                                        "categories": [{"id": 1, "name": "person", "keypoints": ["head"]}]})
    with pytest.raises(SphinxError, match="expected the 17 COCO names"):
        _run(tmp_path, "coco-keypoints", bad)


def test_coco_captions(tmp_path: Path) -> None:
    ann = _json(tmp_path / "captions_val2017.json", {
        "images": [{"id": 1, "file_name": "land.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 10, "image_id": 1, "caption": "A dog runs  on grass. "},
                        {"id": 11, "image_id": 1, "caption": "  "},
                        {"id": 12, "image_id": 1, "caption": "Two dogs."}],
    })
    records, report = _run(tmp_path, "coco-captions", ann)
    assert [r["id"] for r in records] == ["coco_captions-10", "coco_captions-12"]
    assert records[0]["conversations"][0]["value"] in SHORT_CAPTION_TEMPLATES
    assert records[0]["meta"] == {"image_id": 1, "captions": ["A dog runs on grass.", "Two dogs."]}
    assert records[0]["conversations"][1]["value"] == "A dog runs on grass."
    assert report.skipped == {"empty_caption": 1}


def test_publaynet_layout(tmp_path: Path) -> None:
    ann = _json(tmp_path / "val.json", {
        "images": [{"id": 341, "file_name": "PMC1234_00001.jpg", "width": 480, "height": 640}],
        "categories": [{"id": 1, "name": "text", "supercategory": ""}, {"id": 2, "name": "title", "supercategory": ""},
                       {"id": 4, "name": "table", "supercategory": ""}],
        "annotations": [
            {"id": 1, "image_id": 341, "category_id": 2, "bbox": [48, 64, 160, 320], "iscrowd": 0},
            {"id": 2, "image_id": 341, "category_id": 1, "bbox": [48, 512, 384, 64], "iscrowd": 0},
            {"id": 3, "image_id": 341, "category_id": 1, "bbox": [48, 384, 384, 64], "iscrowd": 0},
        ],
    })
    records, report = _run(tmp_path, "layout", ann)
    (rec,) = records
    assert (rec["id"], rec["task"], rec["width"], rec["height"]) == ("layout-341", "layout", 480, 640)
    turns = rec["conversations"]
    assert turns[0]["value"] in _asked(LAYOUT_TEMPLATES, region="text")
    assert turns[1]["value"] == "[0.20,0.60,0.80,0.70;0.20,0.80,0.80,0.90]"
    assert turns[2]["value"] in _asked(LAYOUT_TEMPLATES, region="title")
    assert turns[3]["value"] == PORT_A
    assert report.total_skipped == 0


# ----------------------------------------------------------------------------- RefCOCO


def _refcoco_files(tmp_path: Path, extra_train_sentences: int = 0) -> tuple[Path, Path]:
    def sent(sent_id: int, text: str) -> dict[str, Any]:
        return {"tokens": text.split(), "raw": text.capitalize() + ".", "sent_id": sent_id, "sent": text}

    train_sents = [sent(0, "man on left"), sent(1, "guy in red")]
    train_sents += [sent(100 + i, f"dog number {i}") for i in range(extra_train_sentences)]
    refs = [
        {"sent_ids": [s["sent_id"] for s in train_sents], "file_name": "COCO_train2014_000000000001_10.jpg",
         "ann_id": 10, "ref_id": 0, "image_id": 1, "split": "train", "sentences": train_sents, "category_id": 1},
        {"sent_ids": [2], "file_name": "COCO_train2014_000000000002_20.jpg", "ann_id": 20, "ref_id": 1,
         "image_id": 2, "split": "val", "sentences": [sent(2, "the tall woman")], "category_id": 1},
        {"sent_ids": [3], "file_name": "x", "ann_id": 10, "ref_id": 2, "image_id": 1, "split": "testA",
         "sentences": [sent(3, "left man")], "category_id": 1},
        {"sent_ids": [4], "file_name": "x", "ann_id": 999, "ref_id": 3, "image_id": 1, "split": "val",
         "sentences": [sent(4, "ghost")], "category_id": 1},
        {"sent_ids": [5], "file_name": "x", "ann_id": 20, "ref_id": 4, "image_id": 2, "split": "testB",
         "sentences": [sent(5, "woman")], "category_id": 1},
        {"sent_ids": [6], "file_name": "x", "ann_id": 20, "ref_id": 5, "image_id": 2, "split": "val",
         "sentences": [{"tokens": [], "raw": "", "sent_id": 6, "sent": ""}], "category_id": 1},
    ]
    folder = tmp_path / "refcoco"
    folder.mkdir(exist_ok=True)
    refs_path = folder / "refs(unc).p"
    with refs_path.open("wb") as f:
        pickle.dump(refs, f)
    instances = _json(folder / "instances.json", {
        "images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 640, "height": 480},
                   {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 480, "height": 640}],
        "annotations": [{"id": 10, "image_id": 1, "bbox": [32, 16, 288, 224], "category_id": 1},
                        {"id": 20, "image_id": 2, "bbox": [48, 64, 160, 320], "category_id": 1}],
        "categories": [{"id": 1, "name": "person"}],
    })
    return refs_path, instances


def test_refcoco_val_split_records(tmp_path: Path) -> None:
    refs, instances = _refcoco_files(tmp_path)
    records, report = _run(tmp_path, "refcoco", refs, instances, split="val")
    (rec,) = records
    assert (rec["id"], rec["image"], rec["width"], rec["height"], rec["task"]) == (
        "refcoco-val-2", "COCO_train2014_000000000002.jpg", 480, 640, "rec")
    assert rec["conversations"][0]["value"] in _asked(REC_TEMPLATES, expression="the tall woman")
    assert rec["conversations"][1]["value"] == PORT_A
    assert rec["meta"] == {"ref_id": 1, "ann_id": 20, "split": "val", "image_id": 2,
                           "box": [48.0, 64.0, 208.0, 384.0]}
    assert report.skipped == {"unknown_annotation_id": 1, "empty_expression": 1}


@pytest.mark.parametrize(("split", "ids"), [
    ("train", ["refcoco-train-0", "refcoco-train-1"]),
    ("testA", ["refcoco-testA-3"]),
    ("testB", ["refcoco-testB-5"]),
    ("test", ["refcoco-testA-3", "refcoco-testB-5"]),
])
def test_refcoco_split_selection(tmp_path: Path, split: str, ids: list[str]) -> None:
    refs, instances = _refcoco_files(tmp_path)
    records, _ = _run(tmp_path, "refcoco", refs, instances, split=split)
    assert [r["id"] for r in records] == ids
    land = [r for r in records if r["meta"]["image_id"] == 1]
    assert all(r["conversations"][1]["value"] == LAND_A for r in land)


def test_refcoco_instruction_choice_reproducible_and_varied(tmp_path: Path) -> None:
    refs, instances = _refcoco_files(tmp_path, extra_train_sentences=20)
    first, _ = _run(tmp_path, "refcoco", refs, instances, split="train", seed=5)
    again, _ = _run(tmp_path, "refcoco", refs, instances, split="train", seed=5)
    other, _ = _run(tmp_path, "refcoco", refs, instances, split="train", seed=6)
    asked = [r["conversations"][0]["value"] for r in first]
    assert asked == [r["conversations"][0]["value"] for r in again]
    assert asked != [r["conversations"][0]["value"] for r in other]
    templates_used = {next(t for t in REC_TEMPLATES if t.split("{")[0] in q) for q in asked}
    assert len(templates_used) == 3


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_refs_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "refs(unc).p"
    evil.write_bytes(pickle.dumps([_Evil(marker)]))
    _, instances = _refcoco_files(tmp_path)
    out = tmp_path / "out.jsonl"
    with pytest.raises(SphinxError, match=r"refusing to load .*global '(posix|nt)\.system' is not allowed"):
        convert("refcoco", out, evil, instances, split="val")
    assert not marker.exists()
    assert not out.exists()
    with pytest.raises(SphinxError, match="not a readable pickle"):
        (tmp_path / "trunc.p").write_bytes(pickle.dumps([{"a": 1}])[:-3])
        refcoco_mod.load_data_pickle(tmp_path / "trunc.p")
    assert refcoco_mod.load_data_pickle(_refcoco_files(tmp_path)[0])[1]["split"] == "val"


# ----------------------------------------------------------------------------- VQA family


def _vqav2_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    questions = _json(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "val2014", "license": {},
        "questions": [{"image_id": 42, "question": "What color is the bus?", "question_id": 420},
                      {"image_id": 42, "question": "How many wheels?", "question_id": 421},
                      {"image_id": 7, "question": "Is it raining?", "question_id": 70}],
    })
    answers = ["red"] * 8 + ["maroon", "red and white"]
    annotations = _json(tmp_path / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": 420, "image_id": 42, "question_type": "what color", "answer_type": "other",
         "multiple_choice_answer": "red",
         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]},
        {"question_id": 70, "image_id": 7, "question_type": "is it", "answer_type": "yes/no",
         "multiple_choice_answer": "no", "answers": [{"answer": "no", "answer_confidence": "yes", "answer_id": 1}]},
    ]})
    info = _json(tmp_path / "instances_val2014.json", {"images": [{"id": 42, "width": 640, "height": 480},
                                                                  {"id": 7, "width": 480, "height": 640}]})
    return questions, annotations, info


def test_vqav2_with_and_without_annotations(tmp_path: Path) -> None:
    questions, annotations, info = _vqav2_files(tmp_path)
    records, report = _run(tmp_path, "vqav2", questions, annotations=annotations, image_info=info)
    assert [r["id"] for r in records] == ["vqav2-420", "vqav2-70"]
    bus = records[0]
    assert (bus["image"], bus["width"], bus["height"], bus["task"]) == (
        "COCO_val2014_000000000042.jpg", 640, 480, "vqa")
    assert bus["conversations"][0]["value"] in _asked(VQA_TEMPLATES, question="What color is the bus?")
    assert bus["conversations"][1]["value"] == "red"
    assert bus["meta"]["answers"][8:] == ["maroon", "red and white"]
    assert (records[1]["width"], records[1]["height"]) == (480, 640)
    assert report.skipped == {"question_without_annotation": 1}

    prompts, _ = _run(tmp_path, "vqav2", questions, image_info=info)
    assert [len(r["conversations"]) for r in prompts] == [1, 1, 1]
    assert prompts[1]["meta"] == {"question_id": 421}
    _, unsized = _run(tmp_path, "vqav2", questions)
    assert unsized.skipped == {"unknown_image_size": 3}


def test_gqa_sizes_from_image_headers(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image(root / "n161313.jpg", (100, 50))
    questions = _json(tmp_path / "testdev_balanced_questions.json", {
        "20968006": {"imageId": "n161313", "question": "Is the sky blue?", "answer": "yes",
                     "fullAnswer": "Yes, the sky is blue.", "isBalanced": True},
        "20968007": {"imageId": "n999", "question": "What is it?", "answer": "cat", "fullAnswer": "It is a cat."},
        "20968008": {"question": "No image id"},
    })
    records, report = _run(tmp_path, "gqa", questions, images_root=root)
    (rec,) = records
    assert (rec["id"], rec["image"], rec["width"], rec["height"], rec["task"]) == (
        "gqa-20968006", "n161313.jpg", 100, 50, "gqa")
    assert rec["conversations"][1]["value"] == "yes"
    assert rec["meta"] == {"question_id": "20968006", "full_answer": "Yes, the sky is blue.", "answer": "yes"}
    assert report.skipped == {"missing_image": 1, "malformed_item": 1}


def test_textvqa_majority_answer(tmp_path: Path) -> None:
    questions = _json(tmp_path / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "question": "what brand is this camera?", "image_id": "003a8ae2ef43b901",
         "image_width": 1024, "image_height": 664, "answers": ["nous les gosses"] * 3 + ["dakota"] * 3 + ["clos"] * 4},
        {"question_id": 34603, "question": "what?", "image_id": "x", "image_width": 10, "image_height": 10,
         "answers": ["", " "]},
    ]})
    records, report = _run(tmp_path, "textvqa", questions)
    (rec,) = records
    assert (rec["image"], rec["width"], rec["height"]) == ("003a8ae2ef43b901.jpg", 1024, 664)
    assert rec["conversations"][1]["value"] == "clos"
    assert len(rec["meta"]["answers"]) == 10
    assert report.skipped == {"empty_answers": 1}


# ----------------------------------------------------------------------------- Flickr30k Entities


_XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>
  {objects}
</annotation>"""


def _box_object(names: list[str], box: tuple[int, int, int, int]) -> str:
    tags = "".join(f"<name>{n}</name>" for n in names)
    return (f"<object>{tags}<bndbox><xmin>{box[0]}</xmin><ymin>{box[1]}</ymin>"
            f"<xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>")


def test_flickr30k_entities_grounded_captions(tmp_path: Path) -> None:
    root = tmp_path / "flickr30k_entities"
    (root / "Sentences").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "Sentences" / "100.txt").write_text(
        "[/EN#18/people A child] in [/EN#19/clothing a pink dress] is climbing up [/EN#20/other a set of stairs] "
        "in [/EN#0/notvisual an entry way] .\n"
        "[/EN#0/notvisual Someone] is there .\n"
        "[/EN#18/people A girl broken markup .\n", encoding="utf-8")
    objects = [_box_object(["18"], (33, 17, 320, 240)), _box_object(["19", "21"], (321, 241, 448, 336)),
               _box_object(["19"], (65, 49, 128, 80)),
               "<object><name>20</name><nobndbox>1</nobndbox><scene>0</scene></object>"]
    (root / "Annotations" / "100.xml").write_text(
        _XML.format(name="100", w=640, h=480, objects="".join(objects)), encoding="utf-8")
    (root / "Sentences" / "300.txt").write_text("[/EN#5/people/other A woman] walks .\n", encoding="utf-8")
    (root / "Annotations" / "300.xml").write_text(
        _XML.format(name="300", w=480, h=640, objects=_box_object(["5"], (49, 65, 208, 384))), encoding="utf-8")
    split = tmp_path / "val.txt"
    split.write_text("100\n200\n300\n", encoding="utf-8")

    records, report = _run(tmp_path, "flickr30k-entities", root, split_file=split)
    assert [r["id"] for r in records] == ["flickr30k-100-0", "flickr30k-300-0"]
    assert records[0]["conversations"][1]["value"] == (
        f"<p>A child</p> {LAND_A} in <p>a pink dress</p> [0.10,0.20,0.20,0.25;0.50,0.50,0.70,0.65] "
        "is climbing up a set of stairs in an entry way."
    )
    assert records[0]["conversations"][0]["value"] in TASKS["grounded_caption"].templates
    assert records[0]["meta"]["phrases"] == [
        {"phrase": "A child", "boxes": [[32.0, 16.0, 320.0, 240.0]]},
        {"phrase": "a pink dress", "boxes": [[64.0, 48.0, 128.0, 80.0], [320.0, 240.0, 448.0, 336.0]]},
    ]
    assert (records[1]["width"], records[1]["height"]) == (480, 640)
    assert records[1]["conversations"][1]["value"] == f"<p>A woman</p> {PORT_A} walks."
    assert report.skipped == {"no_boxed_phrase": 1, "malformed_sentence": 1, "missing_annotation_file": 1}


# ----------------------------------------------------------------------------- Visual Genome


def test_vg_regions_with_image_data(tmp_path: Path) -> None:
    regions = _json(tmp_path / "region_descriptions.json", [{"id": 1, "regions": [
        {"region_id": 11, "image_id": 1, "phrase": "a brown dog", "x": 32, "y": 16, "width": 288, "height": 224},
        {"region_id": 12, "image_id": 1, "phrase": "A brown  dog", "x": 0, "y": 0, "width": 50, "height": 50},
        {"region_id": 13, "image_id": 1, "phrase": "", "x": 0, "y": 0, "width": 50, "height": 50},
        {"region_id": 14, "image_id": 1, "phrase": "a thin line", "x": 0, "y": 0, "width": 0, "height": 50},
        {"region_id": 15, "image_id": 1, "phrase": "green grass", "x": 64, "y": 48, "width": 64, "height": 32},
    ]}, {"id": 5, "regions": []}])
    image_data = _json(tmp_path / "image_data.json", [
        {"image_id": 1, "width": 640, "height": 480, "url": "https://example.org/VG_100K_2/1.jpg",
         "coco_id": None, "flickr_id": None}])
    records, report = _run(tmp_path, "vg-regions", regions, image_data=image_data)
    assert [r["id"] for r in records] == ["vg_regions-11", "vg_regions-15"]
    assert (records[0]["image"], records[0]["width"], records[0]["task"]) == ("VG_100K_2/1.jpg", 640, "reg")
    assert records[0]["conversations"][0]["value"] in _asked(REG_TEMPLATES, box=LAND_A)
    assert records[0]["conversations"][1]["value"] == "a brown dog"
    assert records[1]["conversations"][0]["value"] in _asked(REG_TEMPLATES, box=LAND_C)
    assert report.skipped == {"duplicate_region": 1, "empty_phrase": 1, "degenerate_box": 1,
                              "unknown_image_size": 1}
    capped, capped_report = _run(tmp_path, "vg-regions", regions, image_data=image_data, max_per_image=1)
    assert [r["id"] for r in capped] == ["vg_regions-11"]
    assert capped_report.skipped["over_max_per_image"] == 4


def test_vg_regions_from_image_folders(tmp_path: Path) -> None:
    root = tmp_path / "vg"
    _image(root / "VG_100K" / "2.jpg", (100, 50))
    _image(root / "VG_100K_2" / "3.jpg", (50, 100))

    def region(rid: int, image_id: int) -> dict[str, Any]:
        return {"region_id": rid, "image_id": image_id, "phrase": "a red sign", "x": 10, "y": 5, "width": 30,
                "height": 20}

    regions = _json(tmp_path / "region_descriptions.json", [
        {"id": 2, "regions": [region(21, 2)]}, {"id": 3, "regions": [region(31, 3)]},
        {"id": 4, "regions": [region(41, 4)]}])
    records, report = _run(tmp_path, "vg-regions", regions, images_root=root)
    assert [(r["image"], r["width"], r["height"]) for r in records] == [
        ("VG_100K/2.jpg", 100, 50), ("VG_100K_2/3.jpg", 50, 100)]
    assert records[0]["conversations"][0]["value"] in _asked(REG_TEMPLATES, box="[0.10,0.30,0.40,0.50]")
    assert records[1]["conversations"][0]["value"] in _asked(REG_TEMPLATES, box="[0.35,0.05,0.65,0.25]")
    assert report.skipped == {"missing_image": 1}


def test_vg_relations(tmp_path: Path) -> None:
    subj = {"object_id": 1, "x": 32, "y": 16, "w": 288, "h": 224, "names": ["Cat"], "synsets": ["cat.n.01"]}
    obj = {"object_id": 2, "x": 320, "y": 240, "w": 128, "h": 96, "name": "mat", "synsets": ["mat.n.01"]}
    rels = _json(tmp_path / "relationships.json", [{"image_id": 1, "relationships": [
        {"relationship_id": 11, "predicate": "ON", "subject": subj, "object": obj, "synsets": ["along.r.01"]},
        {"relationship_id": 12, "predicate": "on", "subject": subj, "object": obj, "synsets": []},
        {"relationship_id": 13, "predicate": " ", "subject": subj, "object": obj, "synsets": []},
        {"relationship_id": 14, "predicate": "near", "subject": subj, "object": {**obj, "w": -5}, "synsets": []},
    ]}])
    image_data = _json(tmp_path / "image_data.json", [{"image_id": 1, "width": 640, "height": 480, "url": ""}])
    records, report = _run(tmp_path, "vg-relations", rels, image_data=image_data)
    (rec,) = records
    assert (rec["id"], rec["image"], rec["task"]) == ("vg_relations-11", "1.jpg", "relation")
    assert rec["conversations"][0]["value"] in _asked(
        RELATION_TEMPLATES, subject="cat", subject_box=LAND_A, object="mat", object_box=LAND_B)
    assert rec["conversations"][1]["value"] == "cat on mat"
    assert rec["meta"] == {"image_id": 1, "answer": "cat on mat"}
    assert report.skipped == {"duplicate_relation": 1, "empty_predicate_or_name": 1, "degenerate_box": 1}


# ----------------------------------------------------------------------------- OCR, LLaVA, captions


def test_textocr_words_in_reading_order(tmp_path: Path) -> None:
    ann = _json(tmp_path / "TextOCR_0.1_train.json", {
        "imgs": {"a1": {"id": "a1", "width": 640, "height": 480, "set": "train", "file_name": "train/a1.jpg"},
                 "b2": {"id": "b2", "width": 480, "height": 640, "set": "train", "file_name": "train/b2.jpg"},
                 "c3": {"id": "c3", "width": 480, "height": 640, "set": "val", "file_name": "train/c3.jpg"}},
        "anns": {
            "a1_1": {"id": "a1_1", "image_id": "a1", "bbox": [320, 240, 128, 96], "utf8_string": "EXIT",
                     "points": [320, 240, 448, 240, 448, 336, 320, 336], "area": 12288},
            "a1_2": {"id": "a1_2", "image_id": "a1", "bbox": [32, 16, 288, 224], "utf8_string": "STOP"},
            "a1_3": {"id": "a1_3", "image_id": "a1", "bbox": [1, 1, 20, 20], "utf8_string": "."},
            "a1_4": {"id": "a1_4", "image_id": "a1", "bbox": [1, 1, 0, 20], "utf8_string": "x"},
            "b2_1": {"id": "b2_1", "image_id": "b2", "bbox": [48, 64, 160, 320], "utf8_string": "OPEN",
                     "legibility": "illegible"},
            "c3_1": {"id": "c3_1", "image_id": "c3", "bbox": [48, 64, 160, 320], "utf8_string": "VAL"},
        },
        "imgToAnns": {"a1": ["a1_1", "a1_2", "a1_3", "a1_4"], "b2": ["b2_1"], "c3": ["c3_1"]},
    })
    records, report = _run(tmp_path, "textocr", ann, split="train")
    (rec,) = records
    assert (rec["id"], rec["image"], rec["task"]) == ("textocr-a1", "train/a1.jpg", "ocr")
    assert rec["conversations"][1]["value"] == f"<p>STOP</p> {LAND_A} <p>EXIT</p> {LAND_B}"
    assert rec["conversations"][0]["value"] in TASKS["ocr"].templates
    assert rec["meta"]["words"] == [{"text": "STOP", "box": [32.0, 16.0, 320.0, 240.0]},
                                    {"text": "EXIT", "box": [320.0, 240.0, 448.0, 336.0]}]
    assert report.skipped == {"illegible_word": 2, "degenerate_box": 1, "image_without_legible_words": 1}
    capped, capped_report = _run(tmp_path, "textocr", ann, max_words=1)
    assert [r["conversations"][1]["value"] for r in capped] == [f"<p>STOP</p> {LAND_A}", f"<p>VAL</p> {PORT_A}"]
    assert capped_report.skipped["over_max_words"] == 1


def test_llava_pass_through(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image(root / "coco" / "train2017" / "000000033471.jpg", (100, 50))
    good = [{"from": "human", "value": "What are the colors of the bus in the image?\n<image>"},
            {"from": "gpt", "value": "The bus is white and red."}]
    data = _json(tmp_path / "llava_instruct.json", [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": good},
        {"id": "bad", "image": "coco/train2017/000000033471.jpg", "conversations": [good[1], good[0]]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "gone", "image": "coco/train2017/missing.jpg", "conversations": good},
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": good},
        "not an object",
    ])
    records, report = _run(tmp_path, "llava", data, images_root=root)
    assert [r["id"] for r in records] == ["llava-000000033471", "llava-text", "llava-000000033471-4"]
    first = records[0]
    assert (first["width"], first["height"], first["task"]) == (100, 50, "conversation")
    assert first["conversations"][0] == {"from": "human", "value": "What are the colors of the bus in the image?"}
    assert (records[1]["image"], records[1]["width"], records[1]["height"]) == (None, 0, 0)
    assert report.skipped == {"invalid_conversation": 1, "missing_image": 1, "malformed_item": 1}


def test_caption_pairs_csv_jsonl_and_tar(tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image(root / "land.png", (100, 50), "PNG")
    _image(root / "port.png", (50, 100), "PNG")
    csv_file = tmp_path / "pairs.csv"
    csv_file.write_text('image,caption\nland.png,"A red car, parked."\nport.png,\nnope.png,A ghost\n',
                        encoding="utf-8")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"image": "port.png", "caption": "A tall tower"}) + "\nnot json\n", encoding="utf-8")
    jpeg = io.BytesIO()
    Image.new("RGB", (100, 50)).save(jpeg, format="JPEG")
    shard = tmp_path / "shard-000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in [("000.jpg", jpeg.getvalue()), ("000.txt", b"a synthetic castle"),
                           ("001.txt", b"caption without image"), ("002.jpg", b"not an image"),
                           ("002.txt", b"broken")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out_images = tmp_path / "extracted"
    records, report = _run(tmp_path, "captions", [csv_file, jsonl, shard], domain="synthetic", images_root=root,
                           extract_to=out_images)
    assert records == [
        {"id": "synthetic-pairs.csv-0", "image": "land.png", "width": 100, "height": 50, "task": "caption_pretrain",
         "caption": "A red car, parked.", "domain": "synthetic"},
        {"id": "synthetic-pairs.jsonl-0", "image": "port.png", "width": 50, "height": 100, "task": "caption_pretrain",
         "caption": "A tall tower", "domain": "synthetic"},
        {"id": "synthetic-shard-000-000", "image": "shard-000/000.jpg", "width": 100, "height": 50,
         "task": "caption_pretrain", "caption": "a synthetic castle", "domain": "synthetic"},
    ]
    assert (out_images / "shard-000" / "000.jpg").read_bytes() == jpeg.getvalue()
    assert report.skipped == {"empty_caption": 1, "missing_image": 1, "malformed_line": 1,
                              "incomplete_sample": 1, "unreadable_image": 1}
    with pytest.raises(SphinxError, match="domain must be one of real, synthetic"):
        _run(tmp_path, "captions", [csv_file], domain="cartoon")
    with pytest.raises(SphinxError, match="need a folder to extract images"):
        _run(tmp_path, "captions", [shard], domain="real")


# ----------------------------------------------------------------------------- writer and CLI


def test_failed_conversion_leaves_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n", encoding="utf-8")

    def records() -> Any:
        yield {"id": "a"}
        raise SphinxError("broken input half-way")

    with pytest.raises(SphinxError, match="half-way"):
        write_jsonl(records(), out, ConversionReport("test"))
    assert out.read_text(encoding="utf-8") == "previous\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sphinx-mllm")
    data_sub = parser.add_subparsers(dest="command").add_parser("data").add_subparsers(dest="data_command")
    data_convert.register(data_sub)
    return parser


def test_cli_convert_prints_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert set(data_convert.COMMANDS) == set(FORMATS)
    ann = _coco_instances(tmp_path)
    out = tmp_path / "det.jsonl"
    args = _parser().parse_args(["data", "convert", "coco-instances", "--annotations", str(ann),
                                 "--output", str(out), "--seed", "3", "--limit", "1"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote 1 records to {out}" in printed
    assert len(out.read_text(encoding="utf-8").splitlines()) == 1


@pytest.mark.parametrize("fmt", sorted(data_convert.COMMANDS))
def test_cli_help_for_every_format(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["data", "convert", fmt, "--help"])
    assert exc.value.code == 0
    assert "--output" in capsys.readouterr().out


def test_detailed_caption_templates_are_distinct_from_short() -> None:
    assert not set(SHORT_CAPTION_TEMPLATES) & set(DETAILED_CAPTION_TEMPLATES)


def test_meta_is_an_evaluation_reference(tmp_path: Path) -> None:
    """A record's `meta` (with its id and size) is the reference of `tasks.metrics.score`: its own answer
    scores perfectly."""
    from sphinx_mllm.tasks.metrics import score

    refs, instances = _refcoco_files(tmp_path)
    rec_records, _ = _run(tmp_path, "refcoco", refs, instances, split="all")
    kp_ann = tmp_path / "ocr.json"
    _json(kp_ann, {"imgs": {"a": {"id": "a", "width": 480, "height": 640, "file_name": "a.jpg"}},
                   "anns": {"1": {"id": "1", "image_id": "a", "bbox": [48, 64, 160, 320], "utf8_string": "HI"}},
                   "imgToAnns": {"a": ["1"]}})
    ocr_records, _ = _run(tmp_path, "textocr", kp_ann)
    for task, records in (("rec", rec_records), ("ocr", ocr_records)):
        predictions = [{"id": r["id"], "text": r["conversations"][1]["value"]} for r in records]
        references = [{"id": r["id"], "width": r["width"], "height": r["height"], **r["meta"]} for r in records]
        assert min(score(task, predictions, references).values()) == 1.0, task

"""Short-answer VQA sets: VQAv2, GQA and TextVQA, as the release words them (question + "Answer the
question using a single word or phrase.").

- VQAv2: `v2_OpenEnded_mscoco_<subtype>_questions.json` (`{"data_subtype", "questions": [{"image_id",
  "question", "question_id"}]}`) and, for train/val, `v2_mscoco_<subtype>_annotations.json`
  (`{"annotations": [{"question_id", "multiple_choice_answer", "answers": [{"answer", ...}] * 10,
  "answer_type"}]}`). Image path `COCO_<subtype>_<image_id:012d>.jpg` relative to the subtype folder.
  The questions have no image sizes: they come from `image_info` (any COCO JSON of the same images, e.g.
  `instances_val2014.json`) or from the image headers under the images root.
- GQA: `<split>_questions.json`, a dict `{question_id: {"imageId", "question", "answer", "fullAnswer"}}`;
  image `<imageId>.jpg` under `images/`; sizes from the image headers.
- TextVQA: `TextVQA_0.5.1_<split>.json`, `{"data": [{"question_id", "question", "image_id",
  "image_width", "image_height", "answers": [10 strings]}]}`; image `<image_id>.jpg` under
  `train_images/`; the training answer is the most frequent of the ten (first on ties).

Without answers (test splits) a record holds the question turn only: an evaluation prompt. The ground
truth for scoring (all ten answers, question id) goes to `meta`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
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
)
from sphinx_mllm.tasks import VQATask
from sphinx_mllm.utils.errors import SphinxError

NO_ANNOTATION = "question_without_annotation"


def _image_info(path: str | os.PathLike | None) -> dict[int, tuple[Any, Any]]:
    if path is None:
        return {}
    data = load_json(path, "image info")
    require_keys(data, ("images",), f"image info {path}")
    return {im["id"]: (im.get("width"), im.get("height")) for im in data["images"] if isinstance(im, dict)}


def _vqa_answers(path: str | os.PathLike | None) -> dict[int, dict[str, Any]] | None:
    if path is None:
        return None
    data = load_json(path, "VQAv2 annotations")
    require_keys(data, ("annotations",), f"VQAv2 annotations {path}")
    return {a["question_id"]: a for a in data["annotations"] if isinstance(a, dict) and "question_id" in a}


def vqav2(
    questions: str | os.PathLike, report: ConversionReport, *, annotations: str | os.PathLike | None = None,
    images_root: str | os.PathLike | None = None, image_info: str | os.PathLike | None = None, seed: int = 0,
    id_prefix: str = "vqav2",
) -> Iterator[Record]:
    """One record per question; the answer is `multiple_choice_answer`."""
    builder = typed_task("vqa", VQATask)
    data = load_json(questions, "VQAv2 questions")
    require_keys(data, ("questions", "data_subtype"), f"VQAv2 questions {questions}")
    subtype = str(data["data_subtype"])
    answers = _vqa_answers(annotations)
    sizes = _image_info(image_info)
    sizer = ImageSizer(images_root)
    for q in data["questions"]:
        if not isinstance(q, dict) or not {"image_id", "question", "question_id"} <= set(q):
            report.skip(MALFORMED, f"question {str(q)[:80]}")
            continue
        rid = f"{id_prefix}-{q['question_id']}"
        meta: dict[str, Any] = {"question_id": q["question_id"]}
        answer = None
        if answers is not None:
            ann = answers.get(q["question_id"])
            if ann is None or not isinstance(ann.get("multiple_choice_answer"), str):
                report.skip(NO_ANNOTATION, rid)
                continue
            answer = ann["multiple_choice_answer"]
            meta["answers"] = [a.get("answer", "") for a in ann.get("answers", []) if isinstance(a, dict)]
            meta["answer_type"] = ann.get("answer_type")
        image = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        size = sizer.size(image, report, *sizes.get(q["image_id"], (None, None)))
        if size is None:
            continue
        turns = builder.build(q["question"], answer, seed=seed, key=rid)
        yield make_record(rid, image, size, "vqa", turns, meta)


def gqa(
    questions: str | os.PathLike, report: ConversionReport, *, images_root: str | os.PathLike | None = None,
    seed: int = 0, id_prefix: str = "gqa",
) -> Iterator[Record]:
    """One record per GQA question (task `gqa`: VQA wording, exact-match metric)."""
    builder = typed_task("gqa", VQATask)
    data = load_json(questions, "GQA questions")
    if not isinstance(data, dict):
        raise SphinxError(f"GQA questions {questions}: expected an object keyed by question id")
    sizer = ImageSizer(images_root)
    for qid, q in data.items():
        if not isinstance(q, dict) or not isinstance(q.get("imageId"), str) or "question" not in q:
            report.skip(MALFORMED, f"question {qid}")
            continue
        rid = f"{id_prefix}-{qid}"
        size = sizer.size(f"{q['imageId']}.jpg", report)
        if size is None:
            continue
        answer = q.get("answer") if isinstance(q.get("answer"), str) else None
        meta = {"question_id": qid, "full_answer": q.get("fullAnswer")}
        if answer is not None:
            meta["answer"] = answer
        turns = builder.build(q["question"], answer, seed=seed, key=rid)
        yield make_record(rid, f"{q['imageId']}.jpg", size, "gqa", turns, meta)


def majority_answer(answers: list[str]) -> str | None:
    """The most frequent non-empty answer; ties go to the one seen first."""
    cleaned = [" ".join(a.split()) for a in answers if isinstance(a, str) and a.strip()]
    if not cleaned:
        return None
    counts = Counter(cleaned)
    best = max(counts.values())
    return next(a for a in cleaned if counts[a] == best)


def textvqa(
    questions: str | os.PathLike, report: ConversionReport, *, images_root: str | os.PathLike | None = None,
    seed: int = 0, id_prefix: str = "textvqa",
) -> Iterator[Record]:
    """One record per TextVQA question; the answer is the majority of the ten human answers."""
    builder = typed_task("vqa", VQATask)
    data = load_json(questions, "TextVQA questions")
    require_keys(data, ("data",), f"TextVQA questions {questions}")
    sizer = ImageSizer(images_root)
    for q in data["data"]:
        if not isinstance(q, dict) or not {"image_id", "question", "question_id"} <= set(q):
            report.skip(MALFORMED, f"question {str(q)[:80]}")
            continue
        rid = f"{id_prefix}-{q['question_id']}"
        image = f"{q['image_id']}.jpg"
        size = sizer.size(image, report, q.get("image_width"), q.get("image_height"))
        if size is None:
            continue
        answers = q.get("answers")
        answer = majority_answer(answers) if isinstance(answers, list) else None
        if isinstance(answers, list) and answer is None:
            report.skip("empty_answers", rid)
            continue
        meta = {"question_id": q["question_id"], "answers": answers} if answers else {"question_id": q["question_id"]}
        turns = builder.build(q["question"], answer, seed=seed, key=rid)
        yield make_record(rid, image, size, "vqa", turns, meta)

"""Tasks whose text carries space: REC, REG, grounded captions, detection, layout, keypoints, OCR, relations.

Every box or point is a `sphinx_mllm.geometry` object already in the release's frame (0-1 in the padded
square) and is written with its formatters: `[x1,y1,x2,y2]`, several boxes of one thing in one bracket
split by `;`, phrases as `<p>phrase</p> [box]`, points `[x,y]`. Wordings for REG, layout and relations
were not released; they are written here in the released ones' style.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sphinx_mllm.geometry import Box, Grounding, Point, format_box, format_boxes, format_point
from sphinx_mllm.tasks.base import Task, Turn, clean_text, pluralize, strip_final_period
from sphinx_mllm.utils.errors import SphinxError

COCO_KEYPOINT_NAMES: tuple[str, ...] = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)

REC_TEMPLATES = (
    "Please provide the bounding box coordinate of the region this sentence describes: {expression}.",
    "Locate the region described as \"{expression}\" and give its bounding box coordinate.",
    "Give the bounding box coordinate of the object this phrase refers to: {expression}.",
)
REG_TEMPLATES = (
    "Please provide a short description for this region: {box}.",
    "Describe the region {box} in a few words.",
    "What is shown in the region {box}? Answer with a short phrase.",
)
GROUNDED_CAPTION_TEMPLATES = (
    "Describe the image concisely. Include the bounding box for each mentioned object.",
    "Briefly describe the image and give the bounding box of every object you mention.",
    "Write a short caption for the image, with the bounding box coordinate of each mentioned object.",
)
DETECTION_TEMPLATES = (
    "Detect all {category} shown in the image.",
    "Find all {category} in the image and provide their bounding box coordinates.",
    "Locate every one of the {category} in the image.",
)
LAYOUT_TEMPLATES = (
    "Detect all {region} regions in the document.",
    "Find every {region} region on this page and provide their bounding box coordinates.",
    "Locate all {region} blocks in the document image.",
)
KEYPOINT_TEMPLATES = (
    "Detect the key points of the person in the region {box}.",
    "Locate the body key points of the person in the region {box}.",
    "Give the coordinates of the key points of the person at {box}.",
)
OCR_TEMPLATES = (
    "Please detect all texts and provide their bounding box coordinate.",
    "Find every piece of text in the image and give its bounding box coordinate.",
    "Read all the text in the image and provide the bounding box of each word.",
)
RELATION_TEMPLATES = (
    "What is the relationship between the {subject} {subject_box} and the {object} {object_box}?",
    "How is the {subject} in the region {subject_box} related to the {object} in the region {object_box}?",
    "Describe the relation between the {subject} {subject_box} and the {object} {object_box} in a few words.",
)

_P_TAGS = re.compile(r"</?p>")


def phrase_markup(text: str) -> str:
    """A phrase safe inside `<p>...</p>` (stray tags removed, whitespace collapsed)."""
    return clean_text(_P_TAGS.sub(" ", text), "phrase")


def _boxes(boxes: Sequence[Box], what: str) -> tuple[Box, ...]:
    if not boxes:
        raise SphinxError(f"{what} has no box")
    for b in boxes:
        if not isinstance(b, Box):
            raise SphinxError(f"{what}: expected geometry.Box, got {type(b).__name__}")
    return tuple(boxes)


@dataclass(frozen=True)
class RECTask(Task):
    """Referring expression comprehension: expression in, one box out."""

    def build(self, expression: str, box: Box, *, seed: int, key: str) -> list[Turn]:
        expr = strip_final_period(clean_text(expression, "referring expression"))
        _boxes([box], "REC target")
        return self.qa(seed, key, format_box(box), expression=expr)


@dataclass(frozen=True)
class REGTask(Task):
    """Referring expression generation / region captioning: box in, short description out."""

    def build(self, box: Box, description: str, *, seed: int, key: str) -> list[Turn]:
        _boxes([box], "REG region")
        return self.qa(seed, key, clean_text(description, "region description"), box=format_box(box))


def grounded_text(spans: Sequence[str | Grounding]) -> str:
    """Join plain text and `Grounding`s into `... <p>phrase</p> [box;box] ...`; a grounding without boxes or
    points is written as plain text. Spaces before punctuation are removed."""
    pieces: list[str] = []
    for span in spans:
        if isinstance(span, Grounding):
            phrase = phrase_markup(span.phrase or "")
            if span.boxes:
                pieces.append(f"<p>{phrase}</p> {format_boxes(list(span.boxes))}")
            elif span.points:
                pieces.append(f"<p>{phrase}</p> " + " ".join(format_point(p) for p in span.points))
            else:
                pieces.append(phrase)
        elif isinstance(span, str):
            if span.strip():
                pieces.append(" ".join(span.split()))
        else:
            raise SphinxError(f"grounded text span must be str or Grounding, got {type(span).__name__}")
    return re.sub(r"\s+([.,;:!?])(?=\s|$)", r"\1", " ".join(pieces)).strip()


@dataclass(frozen=True)
class GroundedCaptionTask(Task):
    """A caption whose object phrases carry their boxes."""

    def build(self, spans: Sequence[str | Grounding], *, seed: int, key: str) -> list[Turn]:
        if not any(isinstance(s, Grounding) and s.boxes for s in spans):
            raise SphinxError("grounded caption has no phrase with a box")
        return self.qa(seed, key, grounded_text(spans))


@dataclass(frozen=True)
class DetectionTask(Task):
    """All instances of one category: the answer is every box in one bracket, in the given order."""

    def build(self, category: str, boxes: Sequence[Box], *, seed: int, key: str) -> list[Turn]:
        name = clean_text(category, "category name")
        answer = format_boxes(list(_boxes(boxes, f"detection of {name!r}")))
        return self.qa(seed, key, answer, category=pluralize(name))


@dataclass(frozen=True)
class LayoutTask(Task):
    """Document layout: all regions of one class (text, title, table...) as boxes."""

    def build(self, region_class: str, boxes: Sequence[Box], *, seed: int, key: str) -> list[Turn]:
        region = clean_text(region_class.replace("-", " ").replace("_", " ").lower(), "region class")
        answer = format_boxes(list(_boxes(boxes, f"layout class {region!r}")))
        return self.qa(seed, key, answer, region=region)


@dataclass(frozen=True)
class KeypointsTask(Task):
    """Human key points of the person in a given box; the answer lists labelled points in COCO order as
    `<p>name</p> [x,y]`."""

    def build(self, person: Box, keypoints: Mapping[str, Point], *, seed: int, key: str) -> list[Turn]:
        _boxes([person], "keypoint person")
        unknown = sorted(set(keypoints) - set(COCO_KEYPOINT_NAMES))
        if unknown:
            raise SphinxError(f"unknown keypoint names {unknown}; expected COCO names")
        if not keypoints:
            raise SphinxError("person has no labelled keypoint")
        answer = " ".join(
            f"<p>{name}</p> {format_point(keypoints[name])}" for name in COCO_KEYPOINT_NAMES if name in keypoints
        )
        return self.qa(seed, key, answer, box=format_box(person))


@dataclass(frozen=True)
class OCRTask(Task):
    """Text detection with transcription: `<p>word</p> [box]` for every word, in the given order."""

    def build(self, words: Sequence[tuple[str, Box]], *, seed: int, key: str) -> list[Turn]:
        if not words:
            raise SphinxError("OCR record has no word")
        parts = []
        for text, box in words:
            _boxes([box], "OCR word")
            parts.append(f"<p>{phrase_markup(text)}</p> {format_box(box)}")
        return self.qa(seed, key, " ".join(parts))


@dataclass(frozen=True)
class RelationTask(Task):
    """Visual relationship: two boxed objects in, `subject predicate object` out (e.g. "man riding horse")."""

    def build(
        self, subject: str, subject_box: Box, predicate: str, object_: str, object_box: Box, *, seed: int, key: str
    ) -> list[Turn]:
        _boxes([subject_box, object_box], "relation")
        subj = clean_text(subject, "relation subject").lower()
        obj = clean_text(object_, "relation object").lower()
        pred = clean_text(predicate, "relation predicate").lower()
        return self.qa(
            seed, key, f"{subj} {pred} {obj}",
            subject=subj, subject_box=format_box(subject_box), object=obj, object_box=format_box(object_box),
        )

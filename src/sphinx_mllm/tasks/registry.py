"""The task registry: one object per task name, with its wordings and the key of its metric.

Metric keys name entries of `sphinx_mllm.tasks.metrics.METRICS` (imported lazily by evaluation, never
here). `conversation` has no automatic metric (`None`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from sphinx_mllm.tasks import language, spatial
from sphinx_mllm.tasks.base import Task
from sphinx_mllm.utils.errors import SphinxError

_ALL: tuple[Task, ...] = (
    language.VQATask(
        "vqa", "vqa", language.VQA_TEMPLATES, "short-answer visual question answering (VQAv2, TextVQA...)"
    ),
    language.VQATask("gqa", "gqa", language.VQA_TEMPLATES, "GQA questions: VQA wording, exact-match metric"),
    language.CaptionTask(
        "caption", "caption", language.SHORT_CAPTION_TEMPLATES, "one-sentence or detailed image captions",
        detailed_templates=language.DETAILED_CAPTION_TEMPLATES,
    ),
    spatial.RECTask("rec", "rec", spatial.REC_TEMPLATES, "referring expression -> box (RefCOCO family)"),
    spatial.REGTask("reg", "caption", spatial.REG_TEMPLATES, "box -> short region description (VG regions)"),
    spatial.GroundedCaptionTask(
        "grounded_caption", "grounded_caption", spatial.GROUNDED_CAPTION_TEMPLATES,
        "caption with a box after each object phrase (Flickr30k Entities)",
    ),
    spatial.DetectionTask(
        "detection", "detection", spatial.DETECTION_TEMPLATES, "all boxes of one category (COCO instances)"
    ),
    spatial.KeypointsTask(
        "keypoints", "keypoints", spatial.KEYPOINT_TEMPLATES, "17 COCO key points of the person in a box"
    ),
    spatial.OCRTask("ocr", "ocr", spatial.OCR_TEMPLATES, "text detection: every word with its box (TextOCR)"),
    spatial.LayoutTask(
        "layout", "layout", spatial.LAYOUT_TEMPLATES, "document regions of one class (PubLayNet, DocLayNet)"
    ),
    spatial.RelationTask(
        "relation", "relation", spatial.RELATION_TEMPLATES, "two boxed objects -> their relation (VG)"
    ),
    language.ConversationTask("conversation", None, (), "free multi-turn dialogue (LLaVA-Instruct)"),
)

TASKS: Mapping[str, Task] = MappingProxyType({task.name: task for task in _ALL})
"""Every task by name (read-only)."""


def get_task(name: str) -> Task:
    """The task registered as `name`; `SphinxError` listing the known names otherwise."""
    try:
        return TASKS[name]
    except KeyError:
        raise SphinxError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}") from None

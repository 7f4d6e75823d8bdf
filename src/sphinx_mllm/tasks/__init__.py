"""Tasks: instruction wordings, conversation builders and metric names, one small object per task.

`get_task("rec").build("man on the left", box, seed=0, key="refcoco-17")` gives the turns of one record.
Metrics live in `sphinx_mllm.tasks.metrics` and are not imported here (importing tasks stays light).
"""

from sphinx_mllm.tasks.base import Task, Turn, choose_index, pluralize
from sphinx_mllm.tasks.language import CaptionTask, ConversationTask, VQATask, strip_image_tag
from sphinx_mllm.tasks.registry import TASKS, get_task
from sphinx_mllm.tasks.spatial import (
    COCO_KEYPOINT_NAMES,
    DetectionTask,
    GroundedCaptionTask,
    KeypointsTask,
    LayoutTask,
    OCRTask,
    RECTask,
    REGTask,
    RelationTask,
    grounded_text,
)

__all__ = [
    "COCO_KEYPOINT_NAMES",
    "TASKS",
    "CaptionTask",
    "ConversationTask",
    "DetectionTask",
    "GroundedCaptionTask",
    "KeypointsTask",
    "LayoutTask",
    "OCRTask",
    "RECTask",
    "REGTask",
    "RelationTask",
    "Task",
    "Turn",
    "VQATask",
    "choose_index",
    "get_task",
    "grounded_text",
    "pluralize",
    "strip_image_tag",
]

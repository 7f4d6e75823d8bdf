"""Tasks: registry, released wordings, seeded wording choice, exact turns built from typed inputs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sphinx_mllm.geometry import Box, Grounding, Point, box_from_pixels
from sphinx_mllm.tasks import (
    COCO_KEYPOINT_NAMES,
    TASKS,
    CaptionTask,
    ConversationTask,
    DetectionTask,
    GroundedCaptionTask,
    KeypointsTask,
    LayoutTask,
    OCRTask,
    RECTask,
    REGTask,
    RelationTask,
    VQATask,
    choose_index,
    get_task,
    grounded_text,
    pluralize,
    strip_image_tag,
)
from sphinx_mllm.tasks.base import Task
from sphinx_mllm.utils.errors import SphinxError

# Landscape 640x480: S = 640, pad_y = 80. Pixel box (32, 16, 320, 240) -> [0.05,0.15,0.50,0.50].
LAND = box_from_pixels((32, 16, 320, 240), 640, 480)
LAND_TEXT = "[0.05,0.15,0.50,0.50]"
# Portrait 480x640: S = 640, pad_x = 80. Pixel box (48, 64, 208, 384) -> [0.20,0.10,0.45,0.60].
PORT = box_from_pixels((48, 64, 208, 384), 480, 640)
PORT_TEXT = "[0.20,0.10,0.45,0.60]"

RELEASED = {
    "rec": "Please provide the bounding box coordinate of the region this sentence describes: {expression}.",
    "grounded_caption": "Describe the image concisely. Include the bounding box for each mentioned object.",
    "detection": "Detect all {category} shown in the image.",
    "keypoints": "Detect the key points of the person in the region {box}.",
    "ocr": "Please detect all texts and provide their bounding box coordinate.",
    "vqa": "{question}\nAnswer the question using a single word or phrase.",
    "caption": "Provide a one-sentence caption for the provided image.",
}


def _fixed(task: Task) -> Task:
    """The same task with only its first (released) template, to check exact text."""
    import dataclasses

    return dataclasses.replace(task, templates=task.templates[:1])


def test_registry_names_metrics_and_unknown_name() -> None:
    expected = {
        "vqa": "vqa", "gqa": "gqa", "caption": "caption", "rec": "rec", "reg": "caption",
        "grounded_caption": "grounded_caption", "detection": "detection", "keypoints": "keypoints",
        "ocr": "ocr", "layout": "layout", "relation": "relation", "conversation": None,
    }
    assert {name: task.metric for name, task in TASKS.items()} == expected
    assert get_task("rec") is TASKS["rec"]
    with pytest.raises(SphinxError, match=r"unknown task 'nope'.*detection"):
        get_task("nope")


def test_released_wordings_come_first() -> None:
    for name, wording in RELEASED.items():
        assert TASKS[name].templates[0] == wording, name
    caption = TASKS["caption"]
    assert isinstance(caption, CaptionTask)
    assert caption.detailed_templates[0] == "Generate a detailed description about the image."
    for task in TASKS.values():
        assert len(set(task.templates)) == len(task.templates)
        if task.name != "conversation":
            assert len(task.templates) >= 3, task.name


def test_templates_must_share_fields() -> None:
    with pytest.raises(ValueError, match="different fields"):
        Task("bad", None, ("{a} x", "{b} y"))
    with pytest.raises(ValueError, match="needs fields"):
        TASKS["rec"].instruction(0, "k", wrong="x")


def test_choose_index_is_reproducible_and_varies() -> None:
    picks = [choose_index(3, 7, "rec", f"id-{i}") for i in range(300)]
    assert picks == [choose_index(3, 7, "rec", f"id-{i}") for i in range(300)]
    assert set(picks) == {0, 1, 2}
    assert min(picks.count(k) for k in range(3)) > 60  # roughly uniform
    other_seed = [choose_index(3, 8, "rec", f"id-{i}") for i in range(300)]
    assert other_seed != picks
    with pytest.raises(ValueError):
        choose_index(0, 0)


def test_instruction_choice_differs_across_records_but_not_runs() -> None:
    rec = TASKS["rec"]
    assert isinstance(rec, RECTask)
    first = [rec.build("the dog", LAND, seed=3, key=f"r{i}")[0]["value"] for i in range(30)]
    again = [rec.build("the dog", LAND, seed=3, key=f"r{i}")[0]["value"] for i in range(30)]
    assert first == again
    assert len(set(first)) == 3


def test_rec_exact_turns_and_trailing_period() -> None:
    rec = _fixed(TASKS["rec"])
    assert isinstance(rec, RECTask)
    turns = rec.build("  the man   on the left. ", PORT, seed=0, key="x")
    assert turns == [
        {"from": "human", "value": "Please provide the bounding box coordinate of the region this sentence "
         "describes: the man on the left."},
        {"from": "gpt", "value": PORT_TEXT},
    ]
    with pytest.raises(SphinxError, match="referring expression is empty"):
        rec.build("   ", PORT, seed=0, key="x")


def test_reg_detection_layout_keypoints_exact() -> None:
    reg = _fixed(TASKS["reg"])
    assert isinstance(reg, REGTask)
    assert reg.build(LAND, "a brown dog", seed=0, key="k") == [
        {"from": "human", "value": f"Please provide a short description for this region: {LAND_TEXT}."},
        {"from": "gpt", "value": "a brown dog"},
    ]
    det = _fixed(TASKS["detection"])
    assert isinstance(det, DetectionTask)
    assert det.build("person", [LAND, PORT], seed=0, key="k") == [
        {"from": "human", "value": "Detect all people shown in the image."},
        {"from": "gpt", "value": "[0.05,0.15,0.50,0.50;0.20,0.10,0.45,0.60]"},
    ]
    with pytest.raises(SphinxError, match="has no box"):
        det.build("person", [], seed=0, key="k")
    layout = _fixed(TASKS["layout"])
    assert isinstance(layout, LayoutTask)
    assert layout.build("Section-header", [PORT], seed=0, key="k")[0]["value"] == (
        "Detect all section header regions in the document."
    )
    kp = _fixed(TASKS["keypoints"])
    assert isinstance(kp, KeypointsTask)
    points = {"left_ankle": Point(0.1, 0.75), "nose": Point(0.5, 0.4)}
    assert kp.build(LAND, points, seed=0, key="k") == [
        {"from": "human", "value": f"Detect the key points of the person in the region {LAND_TEXT}."},
        {"from": "gpt", "value": "<p>nose</p> [0.50,0.40] <p>left_ankle</p> [0.10,0.75]"},  # COCO order
    ]
    with pytest.raises(SphinxError, match="unknown keypoint names"):
        kp.build(LAND, {"tail": Point(0.1, 0.1)}, seed=0, key="k")
    assert len(COCO_KEYPOINT_NAMES) == 17 and COCO_KEYPOINT_NAMES[-1] == "right_ankle"


def test_grounded_caption_ocr_relation_exact() -> None:
    spans = [Grounding("A child", (LAND,)), "in", Grounding("a pink dress", (LAND, PORT)),
             "is climbing up", Grounding("a set of stairs"), "."]
    assert grounded_text(spans) == (
        f"<p>A child</p> {LAND_TEXT} in <p>a pink dress</p> [0.05,0.15,0.50,0.50;0.20,0.10,0.45,0.60] "
        "is climbing up a set of stairs."
    )
    gc = _fixed(TASKS["grounded_caption"])
    assert isinstance(gc, GroundedCaptionTask)
    assert gc.build(spans, seed=0, key="k")[0]["value"] == RELEASED["grounded_caption"]
    with pytest.raises(SphinxError, match="no phrase with a box"):
        gc.build(["a dog", Grounding("a cat")], seed=0, key="k")
    ocr = _fixed(TASKS["ocr"])
    assert isinstance(ocr, OCRTask)
    assert ocr.build([("STOP", LAND), ("<p>x</p>", PORT)], seed=0, key="k")[1]["value"] == (
        f"<p>STOP</p> {LAND_TEXT} <p>x</p> {PORT_TEXT}"
    )
    rel = _fixed(TASKS["relation"])
    assert isinstance(rel, RelationTask)
    assert rel.build("Man", LAND, "riding", "horse", PORT, seed=0, key="k") == [
        {"from": "human", "value": f"What is the relationship between the man {LAND_TEXT} and the horse "
         f"{PORT_TEXT}?"},
        {"from": "gpt", "value": "man riding horse"},
    ]


def test_vqa_and_caption() -> None:
    vqa = _fixed(TASKS["vqa"])
    assert isinstance(vqa, VQATask)
    assert vqa.build("What color is the bus?", "red", seed=0, key="q1") == [
        {"from": "human", "value": "What color is the bus?\nAnswer the question using a single word or phrase."},
        {"from": "gpt", "value": "red"},
    ]
    assert len(vqa.build("Why?", None, seed=0, key="q1")) == 1  # an evaluation prompt
    cap = TASKS["caption"]
    assert isinstance(cap, CaptionTask)
    short = cap.build("A dog  runs.", seed=0, key="c")
    detailed = cap.build("A dog runs.", detailed=True, seed=0, key="c")
    assert short[0]["value"] in cap.templates and short[1]["value"] == "A dog runs."
    assert detailed[0]["value"] in cap.detailed_templates


def test_conversation_checks_roles_and_strips_image_tag() -> None:
    conv = TASKS["conversation"]
    assert isinstance(conv, ConversationTask)
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
             {"from": "human", "value": "Which colour? <image>"}, {"from": "gpt", "value": "Black."}]
    assert conv.build(turns) == [
        {"from": "human", "value": "What is this?"}, {"from": "gpt", "value": "A cat."},
        {"from": "human", "value": "Which colour?"}, {"from": "gpt", "value": "Black."},
    ]
    with pytest.raises(SphinxError, match="turn 1 is from 'human', expected 'gpt'"):
        conv.build([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}])
    with pytest.raises(SphinxError, match="must end with a gpt answer"):
        conv.build([{"from": "human", "value": "a"}])
    with pytest.raises(SphinxError, match="turn 0 is empty"):
        conv.build([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "b"}])
    assert strip_image_tag("Look: <image> here") == "Look: here"
    assert strip_image_tag("Q?\n<image>\n  code\n\nmore") == "Q?\n  code\n\nmore"


def test_pluralize() -> None:
    cases = {"person": "people", "bus": "buses", "knife": "knives", "teddy bear": "teddy bears",
             "skis": "skis", "wine glass": "wine glasses", "couch": "couches", "mouse": "mice",
             "sheep": "sheep", "baby": "babies", "toy": "toys", "hot dog": "hot dogs"}
    assert {k: pluralize(k) for k in cases} == cases


def test_tasks_import_is_light() -> None:
    code = ("import sys, sphinx_mllm.tasks; "
            "assert 'sphinx_mllm.tasks.metrics' not in sys.modules; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_boxes_are_geometry_boxes() -> None:
    rec = TASKS["rec"]
    assert isinstance(rec, RECTask)
    with pytest.raises(SphinxError, match=r"expected geometry.Box"):
        rec.build("dog", (0.1, 0.1, 0.2, 0.2), seed=0, key="k")  # type: ignore[arg-type]
    assert isinstance(LAND, Box)

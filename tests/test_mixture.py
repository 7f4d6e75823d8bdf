"""Record files (validation, skipping by reason, lazy reads) and mixture configs / MixtureDataset."""

from __future__ import annotations

import json
import logging
import pickle
import random
from collections import Counter
from pathlib import Path

import pytest

from sphinx_mllm.data.mixture import MixtureConfig, MixtureDataset
from sphinx_mllm.data.records import RecordFile
from sphinx_mllm.utils import SphinxError


def conv(i: int, image: str | None = "img0.jpg", answer: str = "A cat.", task: str = "vqa") -> dict:
    return {
        "id": f"r{i}", "image": image, "width": 640, "height": 480, "task": task,
        "conversations": [{"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": answer}],
    }


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def make_images(root: Path, *names: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for n in names:
        (root / n).write_bytes(b"\xff\xd8 not decoded here")
    return root


# ----------------------------------------------------------------------------- records


def test_broken_records_are_skipped_and_counted_by_reason(tmp_path, caplog):
    images = make_images(tmp_path / "imgs", "img0.jpg")
    bad_roles = conv(6)
    bad_roles["conversations"][1]["from"] = "human"
    lines = [
        conv(0),                                                      # good
        '{"id": "r1", "image": "img0.jpg", "conversations": [',       # bad_json
        conv(2, image="missing.jpg"),                                 # missing_image
        conv(3, answer="It is at [0.10,0.20,1.20,0.40]."),            # box_out_of_range
        conv(4, answer="<p>dog</p> [0.10,0.20,0.30,0.40;0.50,0.50,0.50,0.90]"),  # degenerate_box
        conv(5, answer="Nose at [0.50,-0.20]."),                      # point_out_of_range
        bad_roles,                                                    # bad_roles
        {"id": "r7", "image": None, "task": "x"},                     # missing_field
        [1, 2, 3],                                                    # not_object
        "",                                                           # blank: not a record
        conv(8, image=None, answer="Lists like [1.5, 2.5] in text-only records are prose."),  # good
        conv(9, answer="<image>\nA dog at [0.10,0.20,0.30,0.40]."),   # good (placeholder removed)
        {"id": "c", "image": "img0.jpg", "width": 0, "height": 3, "caption": "x"},  # bad_size
        {"id": "c2", "image": "img0.jpg", "caption": "a red bus", "task": "caption_pretrain"},  # good
    ]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    with caplog.at_level(logging.DEBUG, logger="sphinx_mllm"):
        records = RecordFile(path, images)
    report = records.report
    assert report.total == 13 and report.kept == len(records) == 4
    assert report.skipped == Counter(bad_json=1, missing_image=1, box_out_of_range=1, degenerate_box=1,
                                     point_out_of_range=1, bad_roles=1, missing_field=1, not_object=1,
                                     bad_size=1)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 9 of 13 records" in warnings[0].getMessage()
    assert "bad_json: 1" in warnings[0].getMessage()
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("line 2: skipped, bad_json" in m for m in debug)
    assert any("line 4: skipped, box_out_of_range (box [0.10,0.20,1.20,0.40] is outside [0, 1])" in m
               for m in debug)
    assert [r["id"] for r in records] == ["r0", "r8", "r9", "c2"]
    assert records[2]["conversations"][1]["value"] == "A dog at [0.10,0.20,0.30,0.40]."
    assert records[-1]["caption"] == "a red bus"
    assert list(records.lengths) == [len("Question 0?A cat."), len("Question 8?") + 53,
                                     len("Question 9?A dog at [0.10,0.20,0.30,0.40]."), 9]


def test_record_file_reads_lazily_and_pickles(tmp_path):
    images = make_images(tmp_path / "imgs", "img0.jpg")
    path = write_jsonl(tmp_path / "d.jsonl", [conv(i) for i in range(50)])
    records = RecordFile(path, images)
    assert records[37]["id"] == "r37" and records[-1]["id"] == "r49"
    copy = pickle.loads(pickle.dumps(records))
    assert copy[12] == records[12]
    with pytest.raises(IndexError):
        records[50]
    records.close()
    with pytest.raises(SphinxError, match="record file not found"):
        RecordFile(tmp_path / "nope.jsonl")


def test_images_default_to_the_file_folder_and_can_be_unchecked(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [conv(0, image="a.jpg"), conv(1, image="b.jpg")])
    make_images(tmp_path, "a.jpg")
    assert len(RecordFile(path)) == 1
    assert len(RecordFile(path, check_images=False)) == 2


# ----------------------------------------------------------------------------- config


def release_layout(tmp_path: Path) -> Path:
    """A release-style config: a .json list with root and ratio, plus a text-only .jsonl."""
    make_images(tmp_path / "coco", "img0.jpg")
    (tmp_path / "conv.json").write_text(json.dumps([conv(i) for i in range(40)]))
    write_jsonl(tmp_path / "text.jsonl", [conv(100 + i, image=None, task="chat") for i in range(6)])
    (tmp_path / "mix.yaml").write_text(
        "META:\n"
        "  - path: conv.json\n    type: image_text\n    root: coco\n    ratio: 0.35\n"
        "  - path: text.jsonl\n    type: text\n"
    )
    return tmp_path / "mix.yaml"


def test_release_style_config_keeps_the_release_subset(tmp_path):
    config = MixtureConfig.from_yaml(release_layout(tmp_path))
    assert config.seed == 0 and config.batch_by_type and config.check_images
    first, second = config.sources
    assert first.path == tmp_path / "conv.json" and first.root == tmp_path / "coco"
    assert (first.type, first.ratio, first.weight, first.task) == ("image_text", 0.35, 1.0, None)
    assert (second.type, second.root, second.ratio) == ("text", None, 1.0)

    dataset = MixtureDataset(config)
    assert len(dataset) == 14 + 6  # int(40 * 0.35) = 14
    # what the release does: random.seed(0); random.sample(records, int(len * ratio))
    random.seed(0)
    release_ids = {r["id"] for r in random.sample([conv(i) for i in range(40)], int(40 * 0.35))}
    assert {dataset[i]["id"] for i in range(14)} == release_ids
    item = dataset[0]
    assert item["image"] == str((tmp_path / "coco" / "img0.jpg").resolve())
    assert (item["source_index"], item["source_type"], item["task"]) == (0, "image_text", "vqa")
    text_item = dataset[19]
    assert text_item["image"] is None and text_item["source_type"] == "text" and text_item["task"] == "chat"
    assert dataset.locate(15) == (1, 1)


def test_our_config_keys_weight_task_and_top_level(tmp_path):
    make_images(tmp_path / "imgs", "img0.jpg")
    write_jsonl(tmp_path / "a.jsonl", [conv(i) for i in range(12)])
    write_jsonl(tmp_path / "b.jsonl", [conv(i, task="other") for i in range(8)])
    (tmp_path / "m.yaml").write_text(
        "seed: 3\nbatch_by_type: false\ncheck_images: true\nMETA:\n"
        "  - {path: a.jsonl, type: image_text, root: imgs, weight: 2}\n"
        "  - {path: b.jsonl, type: image_text, root: imgs, weight: 0.5, task: grounding}\n"
    )
    dataset = MixtureDataset.from_yaml(tmp_path / "m.yaml")
    assert dataset.config.seed == 3 and not dataset.config.batch_by_type
    assert [s.spec.weight for s in dataset.sources] == [2.0, 0.5]
    assert dataset[0]["task"] == "vqa" and dataset[12]["task"] == "grounding"  # config task wins
    sampler = dataset.batch_sampler(4, world_size=2, rank=1)
    assert sampler.seed == 3 and not sampler.batch_by_type
    assert sampler.num_batches_per_epoch() == (24 + 4) // 4
    layouts = dataset.layouts()
    assert [(lay.offset, lay.size, lay.weight) for lay in layouts] == [(0, 12, 2.0), (12, 8, 0.5)]
    assert layouts[1].lengths[0] == len("Question 0?A cat.")
    assert dataset.layouts(length_fn=lambda rec: len(rec["conversations"]))[0].lengths[0] == 2


def test_every_global_batch_of_a_dataset_has_one_type(tmp_path):
    dataset = MixtureDataset.from_yaml(release_layout(tmp_path))
    sampler = dataset.batch_sampler(2)
    for batch in sampler:
        assert len({dataset[i]["source_type"] for i in batch}) == 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("META:\n  - {path: a.jsonl, type: t, weigth: 2}\n", "META[0]: unknown key 'weigth'"),
        ("META:\n  - {path: a.jsonl, type: t}\nsed: 1\n", "unknown key 'sed'"),
        ("META:\n  - {path: a.jsonl, type: t}\n  - {path: gone.jsonl, type: t}\n",
         "META[1]: data file not found: "),
        ("META:\n  - {path: a.jsonl}\n", "META[0]: missing required key 'type'"),
        ("META:\n  - {path: a.jsonl, type: t, ratio: 1.5}\n", "'ratio' must be in (0, 1]"),
        ("META:\n  - {path: a.jsonl, type: t, weight: true}\n", "'weight' must be a float"),
        ("META:\n  - {path: a.jsonl, type: t, root: nowhere}\n", "image root folder not found"),
        ("META: []\n", "'META' must be a non-empty list"),
        ("seed: 1\n", "'META' must be a non-empty list"),
        ("META: [\n", "not valid YAML"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, text, message):
    write_jsonl(tmp_path / "a.jsonl", [conv(0)])
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(SphinxError) as err:
        MixtureConfig.from_yaml(tmp_path / "m.yaml")
    assert message in str(err.value)
    if "gone.jsonl" in text:
        assert str(tmp_path / "gone.jsonl") in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(SphinxError, match="mixture config not found"):
        MixtureConfig.from_yaml(tmp_path / "none.yaml")

"""Evaluation runner: benchmark loading with the release's prompts, hand-checked scoring through the padded
square, end-to-end runs on a `debug` model with random weights (files, resumption, errors), `eval run` /
`eval table`, and the public formats (ScienceQA, VizWiz)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fixtures.tiny_chat import save_tiny_chat, write_image
from sphinx_mllm.cli.main import main
from sphinx_mllm.evaluation import load_items, metrics_table, run_benchmark, score_items
from sphinx_mllm.evaluation.benchmarks import SHORT_ANSWER, load_records, record_items, release_prompt
from sphinx_mllm.geometry import box_from_pixels, format_box
from sphinx_mllm.inference import SphinxChat
from sphinx_mllm.tasks import TASKS, get_task
from sphinx_mllm.utils.errors import SphinxError

REC_RELEASE = "Please provide the bounding box coordinate of the region this sentence describes: {expression}."


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """`main()` attaches a stderr handler to the package logger; pytest closes that stream after the test."""
    logger = logging.getLogger("sphinx_mllm")
    before = list(logger.handlers)
    yield
    logger.handlers[:] = before


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat(tokenizer, tmp_path_factory.mktemp("tiny_chat_eval"))


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> SphinxChat:
    return SphinxChat.load(model_dir, device="cpu")


def _record(rid: str, image: str, size: tuple[int, int], task: str, humans: list[str], meta: dict) -> dict:
    convs = []
    for h in humans:
        convs += [{"from": "human", "value": h}, {"from": "gpt", "value": "(reference answer)"}]
    return {"id": rid, "image": image, "width": size[0], "height": size[1], "task": task, "conversations": convs,
            "meta": meta}


def _records(tmp_path: Path) -> Path:
    """Records as `sphinx-mllm data convert` writes them (meta = reference fields, pixel boxes)."""
    write_image(tmp_path / "imgs" / "wide.png", 200, 100)
    write_image(tmp_path / "imgs" / "tall.png", 60, 120)
    rec = get_task("rec").templates[1].format(expression="the red box")  # an alternative wording
    rows = [
        _record("refcoco-val-1", "wide.png", (200, 100), "rec", [rec],
                {"ref_id": 1, "ann_id": 5, "split": "val", "image_id": 1, "box": [20, 10, 100, 70]}),
        _record("refcoco-val-2", "tall.png", (60, 120), "rec", [REC_RELEASE.format(expression="the top")],
                {"ref_id": 2, "ann_id": 6, "split": "val", "image_id": 2, "box": [0, 0, 60, 40]}),
        _record("vqav2-7", "wide.png", (200, 100), "vqa", ["What color is it?" + SHORT_ANSWER],
                {"question_id": 7, "answers": ["red"] * 10}),
        _record("coco-1", "wide.png", (200, 100), "detection",
                ["Detect all dogs shown in the image.", "Detect all cats shown in the image."],
                {"image_id": 1, "queries": [
                    {"category_id": 18, "category": "dog", "boxes": [[20, 10, 100, 70]], "iscrowd": [0]},
                    {"category_id": 17, "category": "cat", "boxes": [[120, 20, 180, 90]], "iscrowd": [0]}]}),
        _record("flickr-1", "tall.png", (60, 120), "grounded_caption",
                ["Describe the image concisely. Include the bounding box for each mentioned object."],
                {"image_id": "1", "phrases": [{"phrase": "a man", "boxes": [[0, 0, 30, 60]]}]}),
    ]
    path = tmp_path / "bench.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_release_prompt_rewords_every_alternative_template() -> None:
    values = {"expression": "the dog", "question": "What is it?", "category": "dogs", "box": "[0.10,0.20,0.30,0.40]",
              "region": "title"}
    for name in ("rec", "vqa", "detection", "keypoints", "layout", "grounded_caption", "ocr"):
        task = TASKS[name]
        fields = {k: v for k, v in values.items() if "{" + k + "}" in task.templates[0]}
        release = task.templates[0].format(**fields)
        for template in task.templates:
            assert release_prompt(name, template.format(**fields)) == release, (name, template)
    assert release_prompt("rec", "free text") == "free text"
    assert release_prompt("vqa", "What is it?" + SHORT_ANSWER) == "What is it?" + SHORT_ANSWER


def test_records_become_items_with_release_prompts_and_references(tmp_path: Path) -> None:
    items = load_records(_records(tmp_path))
    assert [it.id for it in items] == ["refcoco-val-1", "refcoco-val-2", "vqav2-7", "coco-1#0", "coco-1#1",
                                       "flickr-1"]
    assert items[0].prompt == REC_RELEASE.format(expression="the red box")
    assert items[0].reference == {"id": "refcoco-val-1", "width": 200, "height": 100, "ref_id": 1, "ann_id": 5,
                                  "split": "val", "image_id": 1, "box": [20, 10, 100, 70]}
    assert items[4].prompt == "Detect all cats shown in the image."
    assert items[4].reference["category_id"] == 17 and items[4].reference["image_id"] == 1
    assert [it.metric for it in items] == ["rec", "rec", "vqa", "detection", "detection", "grounded_caption"]
    with pytest.raises(SphinxError, match="meta"):
        record_items({"id": "x", "task": "rec", "conversations": []}, "here")


def test_scores_are_hand_checked_through_the_padded_square(tmp_path: Path) -> None:
    items = load_records(_records(tmp_path))
    # Wide 200x100 (pad_y 50): GT [20,10,100,70] px = [0.10,0.30,0.50,0.60] in the frame.
    assert format_box(box_from_pixels([20, 10, 100, 70], 200, 100)) == "[0.10,0.30,0.50,0.60]"
    # Tall 60x120 (pad_x 30): GT [0,0,60,40] px = [0.25,0.00,0.75,0.33]; this guess is off by a lot.
    preds = {
        "refcoco-val-1": {"text": "[0.10,0.30,0.50,0.60]"},
        "refcoco-val-2": {"text": "[0.00,0.60,0.20,0.90]"},
        "vqav2-7": {"text": "Red"},
        "coco-1#0": {"text": "[0.10,0.30,0.50,0.60]"},
        "coco-1#1": {"error": "image file not found"},  # a failed item scores as an empty answer
        "flickr-1": {"text": "<p>A man</p> [0.25,0.00,0.50,0.50] stands."},  # [0,0,30,60] px in the tall frame
    }
    metrics = score_items(items, preds)
    assert metrics["rec"]["accuracy"] == pytest.approx(0.5)
    assert metrics["vqa"]["accuracy"] == pytest.approx(1.0)
    assert metrics["grounded_caption"]["phrase_recall"] == pytest.approx(1.0)
    assert metrics["detection"]["AP50"] == pytest.approx(0.5)  # dog found, cat missed: mean over 2 categories


def test_run_benchmark_end_to_end_files_errors_and_resume(chat: SphinxChat, tmp_path: Path) -> None:
    bench = _records(tmp_path)
    with bench.open("a") as f:
        f.write(json.dumps(_record("vqav2-8", "missing.png", (10, 10), "vqa", ["Why?" + SHORT_ANSWER],
                                   {"question_id": 8, "answers": ["no"] * 10})) + "\n")
    out = tmp_path / "run"
    summary = run_benchmark(chat, bench, out, images_root=tmp_path / "imgs", max_new_tokens=6)
    assert {p.name for p in out.iterdir()} == {"requests.jsonl", "references.jsonl", "predictions.jsonl",
                                               "metrics.json"}
    assert json.loads((out / "metrics.json").read_text()) == summary
    assert summary["items"] == 7 and summary["errors"] == 1 and summary["generated_this_run"] == 7
    assert set(summary["metrics"]) == {"rec", "vqa", "detection", "grounded_caption"}
    assert 0.0 <= summary["metrics"]["rec"]["accuracy"] <= 1.0
    preds = {json.loads(x)["id"]: json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()}
    assert "not found" in preds["vqav2-8"]["error"]
    assert json.loads((out / "requests.jsonl").read_text().splitlines()[0])["prompt"] == \
        REC_RELEASE.format(expression="the red box")
    again = run_benchmark(chat, bench, out, images_root=tmp_path / "imgs", max_new_tokens=6)
    assert again["generated_this_run"] == 0 and again["metrics"] == summary["metrics"]
    with pytest.raises(SphinxError, match="neither a known benchmark"):
        run_benchmark(chat, tmp_path / "nope.jsonl", tmp_path / "x")


def test_eval_run_and_table_cli(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bench = _records(tmp_path)
    base = ["eval", "run", "--model", str(model_dir), "--device", "cpu", "--no-progress", "--images-root",
            str(tmp_path / "imgs"), "--max-new-tokens", "6"]
    assert main([*base, "--benchmark", "refcoco", "--data", str(bench), "--output", str(tmp_path / "r1"),
                 "--limit", "2"]) == 0
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())["benchmark"] == "refcoco"
    assert main([*base, "--benchmark", str(bench), "--output", str(tmp_path / "r2"), "--limit", "3"]) == 0
    capsys.readouterr()
    assert main(["eval", "table", str(tmp_path / "r1"), str(tmp_path / "r2")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "benchmark", "rec.accuracy", "vqa.accuracy"]
    assert table[2].split()[:2] == [str(tmp_path / "r1"), "refcoco"] and table[2].split()[3] == "-"
    assert metrics_table([tmp_path / "r2"], ["vqa.accuracy"]).splitlines()[0].split()[-1] == "vqa.accuracy"
    assert main(["eval", "run", "--model", str(model_dir), "--benchmark", "refcoco", "--output",
                 str(tmp_path / "r3")]) == 2  # a named benchmark needs --data
    assert "needs its data" in capsys.readouterr().err
    assert main(["eval", "table", str(tmp_path)]) == 2


def test_scienceqa_and_vizwiz_public_files(tmp_path: Path) -> None:
    problems = {
        "11": {"question": "Which is a mammal?", "choices": ["shark", "whale"], "answer": 1, "hint": "",
               "image": "image.png", "split": "test"},
        "12": {"question": "No image here", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
               "split": "test"},
        "13": {"question": "Which is red?", "choices": ["sky", "rose", "grass"], "answer": 1,
               "hint": "Look closely.", "image": "image.png", "split": "val"},
    }
    (tmp_path / "problems.json").write_text(json.dumps(problems))
    spec, items, _ = load_items("scienceqa", tmp_path / "problems.json", None)
    assert spec is not None and spec.max_new_tokens == 16
    assert [it.id for it in items] == ["scienceqa-11"]
    assert items[0].prompt == ("Which is a mammal?\nA. shark\nB. whale\n"
                               "Answer with the option's letter from the given choices directly.")
    assert items[0].image == "test/11/image.png" and items[0].reference["answer"] == "B"
    assert score_items(items, {"scienceqa-11": {"text": "B."}})["gqa"]["accuracy"] == 1.0

    vizwiz = [{"image": "VizWiz_val_00000001.jpg", "question": "What is this?",
               "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10}]
    (tmp_path / "val.json").write_text(json.dumps(vizwiz))
    _, items, _ = load_items("vizwiz", tmp_path / "val.json", None)
    assert items[0].prompt.startswith("What is this?\nWhen the provided information is insufficient")
    assert items[0].prompt.endswith(SHORT_ANSWER)
    assert score_items(items, {items[0].id: {"text": "Unanswerable"}})["vqa"]["accuracy"] == 1.0

"""Judge-scored benchmarks against a local stand-in OpenAI-compatible server, and D3 described detection from
its release layout (COCO JSON per split + index pickles), scored by hand-checked mAP."""

from __future__ import annotations

import json
import pickle
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fixtures.tiny_chat import save_tiny_chat, write_image
from sphinx_mllm.evaluation import Judge, JudgeConfig, run_benchmark
from sphinx_mllm.evaluation.d3 import load_d3_items, load_index_pickle, score_d3
from sphinx_mllm.evaluation.judge import parse_score, score_judged
from sphinx_mllm.geometry import box_from_pixels, format_box
from sphinx_mllm.inference import SphinxChat
from sphinx_mllm.utils.errors import SphinxError


class _StandIn(BaseHTTPRequestHandler):
    """Grades like a judge would, from the model answer in the prompt: "cat" -> 1.0, "junk" -> no number,
    anything else -> 0.0. Records every request (path, auth header, body)."""

    seen: list[tuple[str, str | None, dict]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append((self.path, self.headers.get("Authorization"), body))
        if self.path != "/v1/chat/completions":
            self.send_response(404)
            self.end_headers()
            return
        answer = body["messages"][0]["content"].rsplit("Model answer:", 1)[1]
        reply = "1.0" if "cat" in answer else ("I cannot say" if "junk" in answer else "0.0")
        data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture
def judge_url() -> Iterator[str]:
    _StandIn.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sphinx_mllm.evaluation.judge.time.sleep", lambda s: None)


def test_judge_scores_against_the_stand_in_server(judge_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sekret")
    refs = [{"id": "1", "question": "What animal?", "answer": "cat", "category": ["rec"]},
            {"id": "2", "question": "What animal?", "answer": "cat", "category": ["rec", "ocr"]},
            {"id": "3", "question": "Count?", "answer": "3", "category": "math"}]
    preds = [{"id": "1", "text": "a cat"}, {"id": "2", "text": "a dog"}, {"id": "3", "text": "junk"}]
    with Judge(JudgeConfig(judge_url, "grader", api_key_env="JUDGE_KEY", max_attempts=2)) as judge:
        result = score_judged(preds, refs, judge)
    assert result["per_item"] == {"1": 1.0, "2": 0.0, "3": 0.0}
    assert result["score"] == pytest.approx(100 / 3)
    assert result["by_category"] == {"math": 0.0, "ocr": 0.0, "rec": 50.0}
    assert result["judge_failures"] == 1  # "junk" never got a number, after 2 attempts
    assert len(_StandIn.seen) == 4
    assert {path for path, _, _ in _StandIn.seen} == {"/v1/chat/completions"}
    assert {auth for _, auth, _ in _StandIn.seen} == {"Bearer sekret"}
    assert _StandIn.seen[0][2]["model"] == "grader" and _StandIn.seen[0][2]["temperature"] == 0.0


def test_judge_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(SphinxError, match="NO_SUCH_KEY_VAR"):
        Judge(JudgeConfig("http://127.0.0.1:9/v1", "m", api_key_env="NO_SUCH_KEY_VAR"))
    with pytest.raises(SphinxError, match="base URL"):
        JudgeConfig("file:///etc/passwd", "m")
    assert parse_score("Score: 0.75") == 0.75 and parse_score("7") is None and parse_score("none") is None


def test_mmvet_run_with_a_judge(tokenizer, judge_url: str, tmp_path: Path) -> None:
    chat = SphinxChat.load(save_tiny_chat(tokenizer, tmp_path / "model"), device="cpu")
    write_image(tmp_path / "mmvet" / "images" / "v1_0.png", 40, 30)
    mmvet = {"v1_0": {"imagename": "v1_0.png", "question": "What is shown?", "answer": "a red square",
                      "capability": ["rec"]},
             "v1_1": {"imagename": "v1_0.png", "question": "Which color?", "answer": "red", "capability": ["rec"]}}
    (tmp_path / "mmvet" / "mm-vet.json").write_text(json.dumps(mmvet))
    with Judge(JudgeConfig(judge_url, "grader", api_key_env=None)) as judge:
        summary = run_benchmark(chat, "mmvet", tmp_path / "run", data=tmp_path / "mmvet" / "mm-vet.json",
                                images_root=tmp_path / "mmvet" / "images", judge=judge, max_new_tokens=4)
    judged = summary["metrics"]["judge"]
    assert summary["errors"] == 0 and set(judged["per_item"]) == {"v1_0", "v1_1"}
    assert 0.0 <= judged["score"] <= 100.0 and judged["judge_failures"] == 0
    assert {auth for _, auth, _ in _StandIn.seen} == {None}
    with pytest.raises(SphinxError, match="judge"):
        run_benchmark(chat, "mmvet", tmp_path / "run2", data=tmp_path / "mmvet" / "mm-vet.json",
                      images_root=tmp_path / "mmvet" / "images", max_new_tokens=2)


# ------------------------------------------------------------------------------------------------- D3

SENTS = {1: "a dog with a leash", 2: "a dog without a leash", 3: "a cup that is not empty"}


def _coco(cats: list[int], anns: list[tuple[int, int, list[float]]]) -> dict:
    return {"images": [{"id": 1, "file_name": "1.jpg", "width": 200, "height": 100},
                       {"id": 2, "file_name": "2.jpg", "width": 100, "height": 200}],
            "categories": [{"id": c, "name": SENTS[c]} for c in cats],
            "annotations": [{"id": i + 1, "image_id": img, "category_id": c, "bbox": bbox, "area": bbox[2] * bbox[3],
                             "iscrowd": 0} for i, (img, c, bbox) in enumerate(anns)]}


@pytest.fixture
def d3_root(tmp_path: Path) -> Path:
    """D3's release layout: image 1 belongs to group 10 (sentences 1, 2), image 2 to group 20 (sentence 3).
    GT (COCO xywh): sentence 1 in image 1 at [20,10,80,60]; sentence 2 in image 1 at [120,20,60,70];
    sentence 3 in image 2 at [10,50,40,40]. FULL = {1,2,3}, PRES = {1,3}, ABS = {2}."""
    root = tmp_path / "d3"
    anns = [(1, 1, [20, 10, 80, 60]), (1, 2, [120, 20, 60, 70]), (2, 3, [10, 50, 40, 40])]
    (root / "d3_json").mkdir(parents=True)
    for name, cats in (("full", [1, 2, 3]), ("pres", [1, 3]), ("abs", [2])):
        kept = [a for a in anns if a[1] in cats]
        (root / "d3_json" / f"d3_{name}_annotations.json").write_text(json.dumps(_coco(cats, kept)))
    (root / "d3_pkl").mkdir()
    images = {1: {"id": 1, "file_name": "1.jpg", "group_id": 10, "anno_id": np.array([1, 2])},
              2: {"id": 2, "file_name": "2.jpg", "group_id": 20, "anno_id": np.array([3])}}
    groups = {10: {"id": 10, "inner_sent_id": np.array([1, 2]), "img_id": [1]},
              20: {"id": 20, "inner_sent_id": [3], "img_id": [2]}}
    (root / "d3_pkl" / "images.pkl").write_bytes(pickle.dumps(images))
    (root / "d3_pkl" / "groups.pkl").write_bytes(pickle.dumps(groups))
    write_image(root / "d3_images" / "1.jpg", 200, 100)
    write_image(root / "d3_images" / "2.jpg", 100, 200)
    return root


def _frame_box(xywh: list[float], width: int, height: int) -> str:
    x, y, w, h = xywh
    return format_box(box_from_pixels([x, y, x + w, y + h], width, height))


def test_d3_items_follow_the_intra_group_protocol(d3_root: Path) -> None:
    items = load_d3_items(d3_root)
    assert [it.id for it in items] == ["d3-1-1", "d3-1-2", "d3-2-3"]
    assert items[1].prompt == ("Please provide the bounding box coordinate of the region this sentence "
                               "describes: a dog without a leash.")
    assert items[2].image == "d3_images/2.jpg" and items[2].reference["category_id"] == 3
    assert len(load_d3_items(d3_root, setting="inter")) == 6


def test_d3_map_on_full_pres_abs_is_hand_checked(d3_root: Path) -> None:
    refs = [it.reference for it in load_d3_items(d3_root)]
    preds = [{"id": "d3-1-1", "text": _frame_box([20, 10, 80, 60], 200, 100)},   # right
             {"id": "d3-1-2", "text": _frame_box([0, 0, 40, 30], 200, 100)},     # wrong place
             {"id": "d3-2-3", "text": _frame_box([10, 50, 40, 40], 100, 200)}]   # right
    result = score_d3(preds, refs, d3_root)
    assert result["PRES"]["AP50"] == pytest.approx(1.0)
    assert result["ABS"]["AP50"] == pytest.approx(0.0)
    assert result["FULL"]["AP50"] == pytest.approx(2 / 3)


def test_d3_run_end_to_end_and_unsafe_pickles_refused(tokenizer, d3_root: Path, tmp_path: Path) -> None:
    chat = SphinxChat.load(save_tiny_chat(tokenizer, tmp_path / "model"), device="cpu")
    summary = run_benchmark(chat, "d3", tmp_path / "run", data=d3_root, max_new_tokens=4)
    assert summary["items"] == 3 and summary["errors"] == 0
    assert set(summary["metrics"]["d3"]) == {"FULL", "PRES", "ABS"}

    class Evil:
        def __reduce__(self):  # would run a shell command if unpickled without restrictions
            return (print, ("pwned",))

    (d3_root / "d3_pkl" / "groups.pkl").write_bytes(pickle.dumps({10: Evil()}))
    with pytest.raises(SphinxError, match="refused global builtins.print"):
        load_index_pickle(d3_root / "d3_pkl" / "groups.pkl")

"""`sphinx-mllm infer`: batched answers, per-item error records, resumption (also after a torn last line)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fixtures.tiny_chat import save_tiny_chat, write_image
from sphinx_mllm.cli.main import main
from sphinx_mllm.inference import GenerationConfig, SphinxChat
from sphinx_mllm.inference.batch import done_ids, item_turns, run_batch
from sphinx_mllm.utils.errors import SphinxError


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_chat(tokenizer, tmp_path_factory.mktemp("tiny_chat_batch"))


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers():
    """`main()` attaches a stderr handler to the package logger; pytest closes that stream after the test."""
    logger = logging.getLogger("sphinx_mllm")
    before = list(logger.handlers)
    yield
    logger.handlers[:] = before


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _write_items(path: Path, rows: list[dict | str]) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def test_infer_cli_answers_records_errors_and_resumes(model_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    images = tmp_path / "images"
    write_image(images / "a.png", 64, 32)
    write_image(images / "b.jpg", 20, 50)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    record = {"id": "rec-1", "image": "a.png", "width": 64, "height": 32, "task": "vqa",
              "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]}
    items = tmp_path / "items.jsonl"
    _write_items(items, [
        record,
        {"id": "p-1", "image": "b.jpg", "prompt": "describe it"},
        {"id": "missing", "image": "nope.png", "prompt": "describe it"},
        {"id": "corrupt", "image": "corrupt.png", "prompt": "describe it"},
        {"id": "text-only", "prompt": "say hello"},
        "{not json",
        {"id": "no-turn", "image": "a.png"},
    ])
    out = tmp_path / "preds.jsonl"
    args = ["infer", "--model", str(model_dir), "--input", str(items), "--output", str(out), "--images-root",
            str(images), "--batch-size", "2", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    rows = {r["id"]: r for r in _lines(out)}
    assert set(rows) == {"rec-1", "p-1", "missing", "corrupt", "text-only", "line-6", "no-turn"}
    assert all(isinstance(rows[i]["text"], str) and rows[i]["text"] for i in ("rec-1", "p-1", "text-only"))
    assert "not found" in rows["missing"]["error"]
    assert "cannot read image" in rows["corrupt"]["error"] or "corrupt" in rows["corrupt"]["error"]
    assert "bad JSON" in rows["line-6"]["error"] and "prompt" in rows["no-turn"]["error"]
    assert "answered 3, failed 4, skipped (already done) 0" in capsys.readouterr().out

    # A crash left a torn line; new items were added: only the new item is answered, nothing is repeated.
    before = out.read_text()
    with out.open("a") as f:
        f.write('{"id": "p-2", "te')
    _write_items(items, [record, {"id": "p-2", "image": "a.png", "prompt": "again"}])
    assert main(args) == 0
    after = _lines(out)
    assert out.read_text().startswith(before)
    assert [r["id"] for r in after] == [*rows, "p-2"] and "text" in after[-1]
    assert "answered 1, failed 0, skipped (already done) 1" in capsys.readouterr().out


def test_batched_run_equals_unbatched_and_errors_do_not_stop_it(model_dir: Path, tmp_path: Path) -> None:
    chat = SphinxChat.load(model_dir, device="cpu")
    write_image(tmp_path / "x.png", 30, 60)
    items = tmp_path / "items.jsonl"
    _write_items(items, [{"id": f"q{i}", "image": "x.png" if i % 2 else "gone.png", "prompt": f"question {i}"}
                         for i in range(5)])
    config = GenerationConfig(max_new_tokens=3, temperature=0.0)
    seen: list[int] = []
    batched = run_batch(chat, items, tmp_path / "b.jsonl", config, batch_size=4, progress=seen.append)
    single = run_batch(chat, items, tmp_path / "s.jsonl", config, batch_size=1)
    assert (batched.answered, batched.failed) == (2, 3) == (single.answered, single.failed)
    def by_id(path: Path) -> list[dict]:  # errors are written at once, answers when their batch is done
        return sorted(_lines(path), key=lambda r: r["id"])

    assert by_id(tmp_path / "b.jsonl") == by_id(tmp_path / "s.jsonl")
    assert sum(seen) == 5
    with pytest.raises(SphinxError, match="batch size"):
        run_batch(chat, items, tmp_path / "z.jsonl", config, batch_size=0)


def test_item_turns_and_output_checks(tmp_path: Path) -> None:
    turns = item_turns({"conversations": [{"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "a1"},
                                          {"from": "human", "value": "q2"}, {"from": "gpt", "value": "ref"}]})
    assert turns == [("user", "q1"), ("assistant", "a1"), ("user", "q2")]
    with pytest.raises(SphinxError, match="turn 0"):
        item_turns({"conversations": [{"from": "robot", "value": "x"}]})
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"id": 1, "text": "a"}\n[1, 2]\n')
    with pytest.raises(SphinxError, match="not a prediction line"):
        done_ids(foreign)

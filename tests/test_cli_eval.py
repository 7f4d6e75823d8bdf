"""`sphinx-mllm eval score` through `sphinx_mllm.cli.main.main`, with JSONL files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sphinx_mllm.cli.main import main


def write_jsonl(path: Path, rows: list[dict] | list[str]) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["eval", "score", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_eval_score_prints_metrics_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = write_jsonl(
        tmp_path / "refs.jsonl",
        [{"id": "q1", "answers": ["2"] * 10}, "", {"id": "q2", "answers": ["yes"] * 2 + ["no"] * 8}],
    )
    preds = write_jsonl(tmp_path / "preds.jsonl", [{"id": "q2", "text": "Yes"}, {"id": "q1", "text": "two"}])
    rc, out, _ = run(capsys, "--task", "vqa", "--predictions", str(preds), "--references", str(refs))
    assert rc == 0
    assert json.loads(out) == {"accuracy": pytest.approx((1.0 + 0.6) / 2)}


def test_eval_score_rec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "width": 640, "height": 480, "box": [64, 48, 320, 240]}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "[0.10,0.20,0.50,0.50]"}])
    rc, out, _ = run(capsys, "--task", "rec", "--predictions", str(preds), "--references", str(refs), "--pretty")
    assert rc == 0 and json.loads(out) == {"accuracy": 1.0}


def test_eval_score_bad_json_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "answers": ["x"]}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "x"}, "{not json"])
    rc, out, err = run(capsys, "--task", "vqa", "--predictions", str(preds), "--references", str(refs))
    assert rc == 2 and out == ""
    assert "p.jsonl:2: bad JSON in predictions file" in err
    write_jsonl(preds, ["[1, 2]"])
    rc, _, err = run(capsys, "--task", "vqa", "--predictions", str(preds), "--references", str(refs))
    assert rc == 2 and "p.jsonl:1: predictions line is not a JSON object" in err


def test_eval_score_missing_ids_and_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    refs = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "answers": ["x"]}, {"id": "b", "answers": ["y"]}])
    preds = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "text": "x"}])
    rc, _, err = run(capsys, "--task", "vqa", "--predictions", str(preds), "--references", str(refs))
    assert rc == 2 and "references have no prediction: 'b'" in err
    rc, _, err = run(capsys, "--task", "vqa", "--predictions", str(tmp_path / "none.jsonl"), "--references", str(refs))
    assert rc == 2 and "predictions file not found" in err


def test_eval_score_unknown_task_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "score", "--task", "nope", "--predictions", "p", "--references", "r"])
    assert exc.value.code == 2
    assert "invalid choice: 'nope'" in capsys.readouterr().err

"""`data stats`: exact per-task numbers on a small hand-written file, tokenizer counts, the plot, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sphinx_mllm.cli.main import main
from sphinx_mllm.data.stats import compute_stats, format_table, load_token_counter, plot_stats
from sphinx_mllm.utils import SphinxError


def turns(*values: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]


RECORDS = [
    # vqa: 1 turn, 3 + 2 = 5 words
    {"id": "1", "image": "a.jpg", "width": 640, "height": 480, "task": "vqa",
     "conversations": turns("What is this?", "A cat.")},
    # vqa: 2 turns, 2 + 1 + 3 + 1 = 7 words
    {"id": "2", "image": "b.jpg", "width": 800, "height": 600, "task": "vqa",
     "conversations": turns("Q one", "yes", "Q two words", "no")},
    # rec: 14 + 1 = 15 words, 2 boxes in one bracket
    {"id": "3", "image": "c.jpg", "width": 1000, "height": 500, "task": "rec",
     "conversations": turns("Please provide the bounding box coordinate of the region this sentence "
                            "describes: the dog.", "[0.10,0.20,0.30,0.40;0.50,0.50,0.60,0.70]")},
    # keypoint: 14 + 4 = 18 words, 1 box (in the question), 2 points
    {"id": "4", "image": "d.jpg", "width": 300, "height": 400, "task": "keypoint",
     "conversations": turns("Detect the key points of the person in the region [0.10, 0.10, 0.90, 0.90].",
                            "<p>nose</p> [0.50,0.20] <p>left_eye</p> [0.45,0.18]")},
    # caption: 0 turns, 6 words
    {"id": "5", "image": "e.jpg", "width": 1024, "height": 768, "task": "caption_pretrain",
     "caption": "a red bus on a street", "domain": "real"},
    # text only: 1 turn, 2 + 1 = 3 words, no image
    {"id": "6", "image": None, "task": "text", "conversations": turns("Hello there", "Hi")},
]
BROKEN = [
    '{"id": "7", "conversations": [',
    json.dumps({"id": "8", "image": "f.jpg", "width": 10, "height": 10, "task": "rec",
                "conversations": turns("Where?", "[0.10,0.20,1.30,0.40]")}),
]


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "mix.jsonl"
    path.write_text("\n".join([json.dumps(r) for r in RECORDS] + BROKEN) + "\n")
    return path


def test_stats_exact_numbers(data_file):
    stats = compute_stats(data_file)
    assert stats.length_unit == "words (whitespace)"
    d = stats.to_dict()
    assert d["records"] == 6 and d["skipped"] == {"bad_json": 1, "box_out_of_range": 1}
    assert set(d["tasks"]) == {"vqa", "rec", "keypoint", "caption_pretrain", "text"}
    vqa = d["tasks"]["vqa"]
    assert (vqa["records"], vqa["turns"], vqa["images"], vqa["boxes"], vqa["points"]) == (2, 3, 2, 0, 0)
    assert vqa["text_length"] == {"count": 2, "mean": 6.0, "median": 6.0, "min": 5, "max": 7}
    assert (vqa["width"]["mean"], vqa["height"]["mean"]) == (720.0, 540.0)
    assert (d["tasks"]["rec"]["boxes"], d["tasks"]["rec"]["text_length"]["max"]) == (2, 15)
    kp = d["tasks"]["keypoint"]
    assert (kp["boxes"], kp["points"], kp["text_length"]["mean"]) == (1, 2, 18.0)
    cap = d["tasks"]["caption_pretrain"]
    assert (cap["turns"], cap["text_length"]["mean"], cap["width"]["max"]) == (0, 6.0, 1024)
    text = d["tasks"]["text"]
    assert (text["images"], text["turns"], text["width"]["count"]) == (0, 1, 0)
    everything = d["all"]
    assert (everything["records"], everything["turns"], everything["images"]) == (6, 6, 5)
    assert (everything["boxes"], everything["points"]) == (3, 2)
    assert everything["text_length"] == {"count": 6, "mean": 9.0, "median": 6.5, "min": 3, "max": 18}
    assert everything["width"]["mean"] == pytest.approx(752.8)
    assert everything["height"]["mean"] == pytest.approx(549.6)

    table = format_table(stats).splitlines()
    assert table[0].endswith("6 records; text length in words (whitespace)")
    assert "skipped 2 of 8 records (bad_json: 1, box_out_of_range: 1)" in table[1]
    assert table[-1].split() == ["all", "6", "6", "9.0", "6.5", "18", "5", "753x550", "3", "2"]
    assert table[-2].split() == ["vqa", "2", "3", "6.0", "6", "7", "2", "720x540", "0", "0"]


def test_token_lengths_with_a_tokenizer_json(tmp_path, data_file):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({"[UNK]": 0, "cat": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()  # words and punctuation runs: "this?" -> "this", "?"
    tok.save(str(tmp_path / "tokenizer.json"))
    counter = load_token_counter(tmp_path)  # a folder holding tokenizer.json
    assert counter.unit == "tokens (tokenizer.json)"
    stats = compute_stats(data_file, counter).to_dict()
    # "What is this?" -> 4, "A cat." -> 3; "Q one" 2, "yes" 1, "Q two words" 3, "no" 1
    assert stats["tasks"]["vqa"]["text_length"]["min"] == 7
    assert stats["tasks"]["vqa"]["text_length"]["max"] == 7
    # "a red bus on a street" -> 6
    assert stats["tasks"]["caption_pretrain"]["text_length"]["max"] == 6


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(SphinxError, match="cannot read tokenizer"):
        load_token_counter(tmp_path / "tokenizer.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SphinxError, match=r"no tokenizer\.json or tokenizer\.model"):
        load_token_counter(tmp_path / "empty")
    with pytest.raises(SphinxError, match="tokenizer file not found"):
        load_token_counter(tmp_path / "nothing.json")


def test_plot_is_a_png(tmp_path, data_file):
    out = tmp_path / "plots" / "stats.png"
    plot_stats(compute_stats(data_file), out)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1100, 400)
    assert not [p for p in out.parent.iterdir() if p.name != "stats.png"]  # no temporary left behind


def test_cli_table_json_and_plot(tmp_path, data_file, capsys):
    out = tmp_path / "s.png"
    assert main(["data", "stats", str(data_file), "--plot", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "caption_pretrain" in printed and f"wrote {out}" in printed
    with Image.open(out) as img:
        img.verify()
    assert main(["data", "stats", str(data_file), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["all"]["records"] == 6 and d["length_unit"] == "words (whitespace)"


def test_cli_errors_exit_2(tmp_path, data_file, capsys):
    assert main(["data", "stats", str(tmp_path / "missing.jsonl")]) == 2
    assert "record file not found" in capsys.readouterr().err
    (tmp_path / "tokenizer.model").write_bytes(b"junk")
    assert main(["data", "stats", str(data_file), "--tokenizer", str(tmp_path / "tokenizer.model")]) == 2
    assert "cannot read tokenizer" in capsys.readouterr().err

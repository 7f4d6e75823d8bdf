"""The world demo (`sphinx-mllm world demo`): the shipped world model (`world.shipped`), or a finished recipe
run's models, answer held-out world questions.

The fine-tuned model of the sighted arm and, beside it, its blind twin answer the same held-out VQA and REC
items (never seen in training); the truth is printed next to both, and the sighted model's boxes are drawn
on the images. It uses the same inference API as `sphinx-mllm chat` and the web demo (`SphinxChat`).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from sphinx_mllm.geometry import parse_boxes
from sphinx_mllm.inference import SphinxChat
from sphinx_mllm.inference.batch import build_messages
from sphinx_mllm.inference.chat import GenerationConfig
from sphinx_mllm.inference.draw import draw_answer
from sphinx_mllm.tasks.metrics import rec_accuracy, vqa_accuracy
from sphinx_mllm.utils import SphinxError, get_logger
from sphinx_mllm.world.packing import read_records

log = get_logger(__name__)


@dataclass(frozen=True)
class DemoAnswer:
    """One held-out question, its truth and the answers of the sighted model and its blind twin."""

    task: str
    image: str
    question: str
    truth: str
    sighted: str
    blind: str | None
    correct: bool
    drawn: str | None = None


def _correct(task: str, truth: str, answer: str) -> bool:
    """Right by the task's own metric (what `eval run` scores): REC Acc@0.5, VQA accuracy."""
    if task == "rec":
        gold = parse_boxes(truth)
        return bool(gold) and rec_accuracy([answer], gold[:1]) == 1.0
    return vqa_accuracy(answer, [truth]) == 1.0


def _draw(image: Image.Image, answer: str, draw_dir: str | os.PathLike | None, name: str, index: int) -> str | None:
    """The answer's boxes drawn on `image`, saved as DRAW_DIR/<stem of name>-<index>.png (None without a folder)."""
    if draw_dir is None:
        return None
    target = Path(draw_dir) / f"{Path(name).stem}-{index}.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    draw_answer(image, answer).save(target)
    return str(target)


def shipped_demo(folder: str | os.PathLike, draw_dir: str | os.PathLike | None = None) -> list[DemoAnswer]:
    """Answers of the shipped model (`world.shipped`) to the held-out examples stored beside it."""
    folder = Path(folder)
    examples = folder / "examples.jsonl"
    if not examples.is_file():
        raise SphinxError(f"{folder} has no examples.jsonl; is it a shipped world model (`sphinx-mllm world export`)?")
    chat = SphinxChat.load(folder, device="cpu", dtype="float32")
    config = GenerationConfig(max_new_tokens=32, temperature=0.0)
    out: list[DemoAnswer] = []
    for record in read_records(examples):
        image = Image.open(folder / record["image"]).convert("RGB")
        question, truth = record["question"], record["answer"]
        answer = chat.generate([build_messages([("user", question)], image)], config)[0]
        drawn = _draw(image, answer, draw_dir, record["image"], len(out)) if record["task"] == "rec" else None
        out.append(DemoAnswer(record["task"], record["image"], question.split("\n")[0], truth, answer, None,
                              _correct(record["task"], truth, answer), drawn))
    return out


def run_demo(run: str | os.PathLike, per_task: int = 4, draw_dir: str | os.PathLike | None = None,
             seed: int = 0) -> list[DemoAnswer]:
    """Answers of `run`'s fine-tuned models to `per_task` held-out VQA and REC items each."""
    run = Path(run)
    sighted_dir = run / "sighted" / "finetune" / "final"
    if not sighted_dir.is_dir():
        raise SphinxError(f"{run} has no fine-tuned model ({sighted_dir}); run `sphinx-mllm world run --out {run}` "
                          "first")
    blind_dir = run / "blind" / "finetune" / "final"
    sighted = SphinxChat.load(sighted_dir, device="cpu")
    blind = SphinxChat.load(blind_dir, device="cpu") if blind_dir.is_dir() else None
    config = GenerationConfig(max_new_tokens=32, temperature=0.0)
    world = run / "world"
    blank_path = run / "blind" / "data" / "blank.png"
    blank = Image.open(blank_path).convert("RGB") if blind is not None and blank_path.is_file() else None
    out: list[DemoAnswer] = []
    for task in ("vqa", "rec"):
        path = run / "data" / "eval" / f"{task}.jsonl"
        if not path.is_file():
            continue
        records = read_records(path)
        random.Random(seed).shuffle(records)
        for record in records[:per_task]:
            question, truth = record["conversations"][0]["value"], record["conversations"][1]["value"]
            image = Image.open(world / record["image"]).convert("RGB")
            answer = sighted.generate([build_messages([("user", question)], image)], config)[0]
            blind_answer = None
            if blind is not None and blank is not None:
                blind_answer = blind.generate([build_messages([("user", question)], blank)], config)[0]
            drawn = _draw(image, answer, draw_dir, record["image"], len(out)) if task == "rec" else None
            out.append(DemoAnswer(task, record["image"], question.split("\n")[0], truth, answer, blind_answer,
                                  _correct(task, truth, answer), drawn))
    return out


__all__ = ["DemoAnswer", "run_demo", "shipped_demo"]

"""Benchmarks: a small registry (name -> task, prompt wording, max new tokens, metric) and the loaders that
turn benchmark files into evaluation items (prompt + image + reference).

Two kinds of input:
- **Records** (`sphinx-mllm data convert` output, JSONL): each record's human turn is the question and its
  `meta` the ground truth, in the reference fields of `sphinx_mllm.tasks.metrics`. A human turn written with
  one of its task's alternative wordings is re-worded with the release's wording (the task's first
  template), so every item is asked as the release asked it. Multi-turn detection/layout records (one per
  image, `meta.queries`) give one item per turn.
- **Public files** where a benchmark has its own format: ScienceQA `problems.json`, VizWiz `val.json`,
  MM-Vet `mm-vet.json` (or a judge JSONL `{"id", "image", "question", "answer"}`), and a D3 folder
  (`sphinx_mllm.evaluation.d3`).

Evaluation prompts of the release: short answers end with "\\nAnswer the question using a single word or
phrase."; REC uses "Please provide the bounding box coordinate of the region this sentence describes: ...".
"""

from __future__ import annotations

import json
import os
import re
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphinx_mllm.tasks import TASKS
from sphinx_mllm.utils.errors import SphinxError

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
VIZWIZ_SUFFIX = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT_ANSWER
SCIENCEQA_SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class EvalItem:
    """One question: its id, image path (None: text only), prompt, and reference (`{"id", ...}` in the
    reference fields of its metric)."""

    id: str
    image: str | None
    prompt: str
    reference: dict[str, Any]
    metric: str


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: the metric that scores it (a key of `tasks.metrics.METRICS`, or "judge" / "d3"),
    the answer length, and a loader of its public format (records JSONL always work)."""

    name: str
    metric: str
    max_new_tokens: int
    description: str
    loader: Callable[[Path, Path], list[EvalItem]] | None = None  # (data path, images root) -> items
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- release wording


def _template_regex(template: str) -> re.Pattern[str]:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name:
            parts.append(f"(?P<{name}>.+?)")
    return re.compile("".join(parts) + r"\Z", re.DOTALL)


def release_prompt(task: str, text: str) -> str:
    """`text` re-worded with the release's wording (the task's first template) when it is one of the task's
    other wordings; otherwise unchanged."""
    spec = TASKS.get(task)
    if spec is None or len(spec.templates) < 2:
        return text
    for template in spec.templates[1:]:
        m = _template_regex(template).match(text)
        if m:
            return spec.templates[0].format(**m.groupdict())
    return text


# ----------------------------------------------------------------------------- records


def _human_turns(record: dict[str, Any], where: str) -> list[str]:
    convs = record.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise SphinxError(f"{where}: record has no conversations")
    turns = [t.get("value") for t in convs if isinstance(t, dict) and t.get("from") == "human"]
    if not turns or not all(isinstance(t, str) for t in turns):
        raise SphinxError(f"{where}: record has no human turn")
    return [t.replace("<image>", "").strip() for t in turns]


def record_items(record: dict[str, Any], where: str, metric: str | None = None) -> list[EvalItem]:
    """The evaluation items of one converted record (see the module docstring)."""
    for key in ("id", "task", "meta"):
        if key not in record:
            raise SphinxError(f"{where}: record lacks {key!r} (evaluation needs records with ground truth in meta)")
    task = str(record["task"])
    spec = TASKS.get(task)
    metric = metric or (spec.metric if spec is not None else None)
    if metric is None:
        raise SphinxError(f"{where}: task {task!r} has no metric")
    meta = record["meta"]
    if not isinstance(meta, dict):
        raise SphinxError(f"{where}: 'meta' must be an object")
    base = {"width": record.get("width"), "height": record.get("height")}
    rid = str(record["id"])
    turns = _human_turns(record, where)
    image = record.get("image")
    if isinstance(meta.get("queries"), list):  # one record per image, one turn per category
        if len(meta["queries"]) != len(turns):
            raise SphinxError(f"{where}: {len(turns)} human turns but {len(meta['queries'])} queries in meta")
        return [
            EvalItem(f"{rid}#{k}", image, release_prompt(task, turn),
                     {**base, "image_id": meta.get("image_id"), **query, "id": f"{rid}#{k}"}, metric)
            for k, (turn, query) in enumerate(zip(turns, meta["queries"]))
        ]
    return [EvalItem(rid, image, release_prompt(task, turns[0]), {**base, **meta, "id": rid}, metric)]


def read_jsonl_objects(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, object) per non-blank line; a SphinxError names the line of bad JSON."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SphinxError(f"{where}: bad JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise SphinxError(f"{where}: not a JSON object")
            yield where, obj


def load_records(path: Path, metric: str | None = None) -> list[EvalItem]:
    """Items of a records JSONL (`metric` forces one metric; otherwise each record's task decides)."""
    items: list[EvalItem] = []
    for where, obj in read_jsonl_objects(path):
        items += record_items(obj, where, metric)
    return items


# ----------------------------------------------------------------------------- public formats


def _load_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise SphinxError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SphinxError(f"{path}: bad JSON in {what} ({exc.msg})") from None


def load_scienceqa(path: Path, images_root: Path, split: str = "test") -> list[EvalItem]:
    """ScienceQA-IMG: `problems.json` ({pid: {question, choices, answer (index), hint, image, split}}), the
    questions of `split` that have an image (at `<images_root>/<split>/<pid>/image.png`)."""
    problems = _load_json(path, "ScienceQA problems.json")
    if not isinstance(problems, dict):
        raise SphinxError(f"{path}: expected an object keyed by problem id")
    items = []
    for pid, p in problems.items():
        if not isinstance(p, dict) or p.get("split") != split or not p.get("image"):
            continue
        choices = p.get("choices")
        if not isinstance(choices, list) or not isinstance(p.get("answer"), int) or not 0 <= p["answer"] < len(choices):
            raise SphinxError(f"{path}: problem {pid} needs 'choices' and an 'answer' index into them")
        letters = string.ascii_uppercase
        options = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(choices))
        hint = (p.get("hint") or "").strip()
        question = f"{p.get('question', '').strip()}\n{options}" + SCIENCEQA_SUFFIX
        prompt = (f"Context: {hint}\n" if hint else "") + question
        image = str(Path(split) / str(pid) / str(p["image"]))
        items.append(EvalItem(f"scienceqa-{pid}", image, prompt, {"id": f"scienceqa-{pid}",
                                                                   "answer": letters[p["answer"]]}, "gqa"))
    return items


def load_vizwiz(path: Path, images_root: Path) -> list[EvalItem]:
    """VizWiz VQA `val.json`: a list of {image, question, answers: [{answer, answer_confidence}]}."""
    data = _load_json(path, "VizWiz annotations")
    if not isinstance(data, list):
        raise SphinxError(f"{path}: expected a list of questions")
    items = []
    for n, q in enumerate(data):
        if not isinstance(q, dict) or not isinstance(q.get("image"), str) or not isinstance(q.get("question"), str):
            raise SphinxError(f"{path}: entry {n} needs 'image' and 'question'")
        answers = [a.get("answer", "") for a in q.get("answers", []) if isinstance(a, dict)]
        rid = f"vizwiz-{Path(q['image']).stem}"
        items.append(EvalItem(rid, q["image"], q["question"].strip() + VIZWIZ_SUFFIX,
                              {"id": rid, "answers": answers or [""]}, "vqa"))
    return items


def load_judge_file(path: Path, images_root: Path) -> list[EvalItem]:
    """MM-Vet `mm-vet.json` ({id: {imagename, question, answer, capability}}) or a JSONL of
    `{"id", "image", "question", "answer", "category"?}` (InfiMM-Eval, BenchLMM... prepared that way)."""
    rows: list[tuple[str, dict[str, Any]]] = []
    if path.suffix == ".jsonl":
        rows = [(str(obj.get("id")), obj) for _, obj in read_jsonl_objects(path)]
    else:
        data = _load_json(path, "judge benchmark file")
        if not isinstance(data, dict):
            raise SphinxError(f"{path}: expected MM-Vet's object keyed by question id")
        rows = [(str(k), v) for k, v in data.items()]
    items = []
    for rid, row in rows:
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or "answer" not in row:
            raise SphinxError(f"{path}: item {rid} needs 'question' and 'answer'")
        image = row.get("image", row.get("imagename"))
        category = row.get("category", row.get("capability"))
        ref = {"id": rid, "question": row["question"], "answer": str(row["answer"]), "category": category}
        items.append(EvalItem(rid, image, row["question"], ref, "judge"))
    return items


def _load_d3(path: Path, images_root: Path) -> list[EvalItem]:
    from sphinx_mllm.evaluation.d3 import load_d3_items

    return load_d3_items(path)


# ----------------------------------------------------------------------------- the registry


def _bench(name: str, metric: str, tokens: int, description: str,
           loader: Callable[[Path, Path], list[EvalItem]] | None = None, **extra: Any) -> Benchmark:
    return Benchmark(name, metric, tokens, description, loader, dict(extra))


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    _bench("vqav2", "vqa", 32, "VQAv2 (records from `data convert vqav2`): VQA accuracy over ten answers"),
    _bench("okvqa", "vqa", 32, "OK-VQA (VQAv2 format, `data convert vqav2`): VQA accuracy"),
    _bench("textvqa", "vqa", 32, "TextVQA (`data convert textvqa`): VQA accuracy"),
    _bench("gqa", "gqa", 32, "GQA (`data convert gqa`): exact match"),
    _bench("vizwiz", "vqa", 32, "VizWiz val.json (or records): VQA accuracy, 'unanswerable' prompt",
           load_vizwiz),
    _bench("scienceqa", "gqa", 16, "ScienceQA-IMG problems.json (test split): option-letter accuracy",
           load_scienceqa),
    _bench("refcoco", "rec", 64, "RefCOCO (`data convert refcoco`): Acc@0.5"),
    _bench("refcoco+", "rec", 64, "RefCOCO+ (`data convert refcoco`): Acc@0.5"),
    _bench("refcocog", "rec", 64, "RefCOCOg (`data convert refcoco`): Acc@0.5"),
    _bench("coco-detection", "detection", 512, "COCO instances (`data convert coco-instances`): box mAP"),
    _bench("coco-keypoints", "keypoints", 512, "COCO person keypoints (`data convert coco-keypoints`): OKS AP"),
    _bench("layout", "layout", 512, "PubLayNet / DocLayNet (`data convert layout`): box mAP"),
    _bench("flickr30k", "grounded_caption", 256, "Flickr30k Entities (`data convert flickr30k`): phrase recall"),
    _bench("mmvet", "judge", 512, "MM-Vet mm-vet.json: judge-scored (0-1 per answer, reported x100)",
           load_judge_file),
    _bench("infimm-eval", "judge", 512, "InfiMM-Eval as judge JSONL: judge-scored", load_judge_file),
    _bench("benchlmm", "judge", 512, "BenchLMM as judge JSONL: judge-scored", load_judge_file),
    _bench("d3", "d3", 256, "D3 described object detection folder: mAP on FULL / PRES / ABS", _load_d3),
)}
"""Every named benchmark; `sphinx-mllm eval run --benchmark NAME --data PATH`."""

# Answer lengths of records files run without a benchmark name, by metric.
MAX_NEW_TOKENS_BY_METRIC: dict[str, int] = {
    "vqa": 32, "gqa": 32, "relation": 32, "rec": 64, "detection": 512, "layout": 512, "keypoints": 512,
    "grounded_caption": 256, "ocr": 512, "docvqa": 64, "chartqa": 64, "caption": 128,
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise SphinxError(f"unknown benchmark {name!r}; known: {', '.join(sorted(BENCHMARKS))} "
                          "(or give a records JSONL file)")
    return BENCHMARKS[name]


def load_items(benchmark: str | os.PathLike, data: str | os.PathLike | None,
               images_root: str | os.PathLike | None) -> tuple[Benchmark | None, list[EvalItem], Path]:
    """(the named benchmark or None, its items, the root image paths are relative to).

    `benchmark` is a registry name (then `data` is its file or folder) or a records JSONL file itself."""
    if str(benchmark) in BENCHMARKS:
        spec = BENCHMARKS[str(benchmark)]
        if data is None:
            raise SphinxError(f"benchmark {spec.name!r} needs its data: --data FILE_OR_FOLDER ({spec.description})")
        path = Path(data)
        if not path.exists():
            raise SphinxError(f"benchmark data not found: {path}")
        root = Path(images_root) if images_root is not None else (path if path.is_dir() else path.parent)
        if path.suffix == ".jsonl" and spec.metric not in ("judge",):
            items = load_records(path, None if spec.metric == "d3" else spec.metric)
        elif spec.loader is not None:
            items = spec.loader(path, root)
        else:
            raise SphinxError(f"benchmark {spec.name!r} reads records JSONL (from `sphinx-mllm data convert`), "
                              f"got {path}")
        return spec, items, root
    path = Path(benchmark)
    if not path.is_file():
        raise SphinxError(f"--benchmark {benchmark!r} is neither a known benchmark ({', '.join(sorted(BENCHMARKS))}) "
                          "nor a records JSONL file")
    root = Path(images_root) if images_root is not None else path.parent
    return None, load_records(path), root


__all__ = ["BENCHMARKS", "MAX_NEW_TOKENS_BY_METRIC", "SHORT_ANSWER", "Benchmark", "EvalItem", "get_benchmark",
           "load_items", "load_records", "load_scienceqa", "load_vizwiz", "record_items", "release_prompt"]

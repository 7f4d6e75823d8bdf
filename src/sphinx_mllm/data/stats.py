"""Statistics of one record file, per task: records, turns, text length, image sizes, boxes and points.

Definitions (so the numbers can be checked by hand):
- records are the valid ones (`RecordFile` rules, image files not looked up); skipped ones are reported
  by reason;
- a turn is one answer (`gpt` message); caption records have 0 turns;
- text length is per record, summed over all its texts (every turn, or the caption), in tokens of the
  given tokenizer (no special tokens) or else in whitespace-separated words;
- image sizes come from the records' `width`/`height` (records with an image and both fields);
- boxes and points are those `sphinx_mllm.geometry.parse_boxes` / `parse_points` read in the texts.
"""

from __future__ import annotations

import io
import json
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphinx_mllm.data.records import SKIP_REASONS, RecordFile, SkipReport, record_texts
from sphinx_mllm.geometry import parse_boxes, parse_points
from sphinx_mllm.utils import SphinxError, atomic_write_bytes, get_logger

logger = get_logger(__name__)
NO_TASK = "(none)"


@dataclass(frozen=True)
class TokenCounter:
    """Counts the units of a text; `unit` names them in reports ("words (whitespace)", ...)."""

    unit: str
    count: Callable[[str], int]


WHITESPACE_WORDS = TokenCounter("words (whitespace)", lambda text: len(text.split()))


def load_token_counter(path: str | os.PathLike) -> TokenCounter:
    """A counter from a `tokenizer.json` (Hugging Face `tokenizers`) or a SentencePiece `.model` file, or
    a folder holding one of them."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("tokenizer.json", "tokenizer.model") if (path / n).is_file()]
        if not found:
            raise SphinxError(f"no tokenizer.json or tokenizer.model in {path}")
        path = found[0]
    if not path.is_file():
        raise SphinxError(f"tokenizer file not found: {path}")
    try:
        if path.suffix == ".json":
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(str(path))
            return TokenCounter(f"tokens ({path.name})",
                                lambda text: len(tok.encode(text, add_special_tokens=False).ids))
        if path.suffix == ".model":
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            return TokenCounter(f"tokens ({path.name})", lambda text: len(sp.encode(text)))
    except Exception as exc:  # both libraries raise plain Exception/RuntimeError for a bad file
        raise SphinxError(f"cannot read tokenizer {path}: {exc}") from None
    raise SphinxError(f"tokenizer {path}: expected a tokenizer.json or a SentencePiece .model file")


@dataclass
class Summary:
    """count / mean / median / min / max of some numbers (zeros when there are none)."""

    count: int = 0
    mean: float = 0.0
    median: float = 0.0
    min: float = 0.0
    max: float = 0.0

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            return cls()
        return cls(len(values), statistics.fmean(values), statistics.median(values), min(values), max(values))


@dataclass
class TaskStats:
    records: int = 0
    turns: int = 0
    with_image: int = 0
    boxes: int = 0
    points: int = 0
    text_lengths: list[int] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    heights: list[int] = field(default_factory=list)

    def add(self, rec: dict[str, Any], counter: TokenCounter) -> None:
        texts = record_texts(rec)
        self.records += 1
        self.turns += sum(1 for t in rec.get("conversations", ()) if t["from"] == "gpt")
        self.text_lengths.append(sum(counter.count(t) for t in texts))
        self.boxes += sum(len(parse_boxes(t)) for t in texts)
        self.points += sum(len(parse_points(t)) for t in texts)
        if rec.get("image") is not None:
            self.with_image += 1
            if rec.get("width") is not None and rec.get("height") is not None:
                self.widths.append(rec["width"])
                self.heights.append(rec["height"])

    def merge(self, other: TaskStats) -> None:
        for name in ("records", "turns", "with_image", "boxes", "points"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.text_lengths += other.text_lengths
        self.widths += other.widths
        self.heights += other.heights

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records, "turns": self.turns, "images": self.with_image,
            "boxes": self.boxes, "points": self.points,
            "text_length": vars(Summary.of(self.text_lengths)),
            "width": vars(Summary.of(self.widths)), "height": vars(Summary.of(self.heights)),
        }


@dataclass
class DataStats:
    path: str
    length_unit: str
    tasks: dict[str, TaskStats]
    report: SkipReport

    def overall(self) -> TaskStats:
        total = TaskStats()
        for task in self.tasks.values():
            total.merge(task)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "length_unit": self.length_unit,
            "records": self.report.kept,
            "skipped": {r: self.report.skipped[r] for r in SKIP_REASONS if self.report.skipped[r]},
            "tasks": {name: self.tasks[name].to_dict() for name in sorted(self.tasks)},
            "all": self.overall().to_dict(),
        }


def compute_stats(path: str | os.PathLike, counter: TokenCounter = WHITESPACE_WORDS) -> DataStats:
    """Statistics of one `.jsonl`/`.json` record file (image files are not opened or looked up)."""
    records = RecordFile(path, check_images=False)
    tasks: dict[str, TaskStats] = {}
    for rec in records:
        tasks.setdefault(rec.get("task") or NO_TASK, TaskStats()).add(rec, counter)
    records.close()
    return DataStats(str(path), counter.unit, tasks, records.report)


def format_table(stats: DataStats) -> str:
    """A plain-text table, one row per task and one for all."""
    head = ["task", "records", "turns", "len mean", "len median", "len max", "images", "mean WxH",
            "boxes", "points"]
    rows = [_row(name, stats.tasks[name]) for name in sorted(stats.tasks)] + [_row("all", stats.overall())]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    skipped = stats.report.summary() if stats.report.num_skipped else f"{stats.path}: no record skipped"
    out = [f"{stats.path}: {stats.report.kept} records; text length in {stats.length_unit}", skipped,
           line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _row(name: str, t: TaskStats) -> list[str]:
    lengths = Summary.of(t.text_lengths)
    size = (f"{statistics.fmean(t.widths):.0f}x{statistics.fmean(t.heights):.0f}" if t.widths else "-")
    return [name, str(t.records), str(t.turns), f"{lengths.mean:.1f}", _num(lengths.median),
            _num(lengths.max), str(t.with_image), size, str(t.boxes), str(t.points)]


def _num(x: float) -> str:
    return f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}"


def plot_stats(stats: DataStats, out: str | os.PathLike) -> None:
    """Write a PNG (atomically): text-length histogram per task, and image long-side histogram."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_text, ax_img = fig.subplots(1, 2)
    names = sorted(stats.tasks)
    data = [stats.tasks[n].text_lengths for n in names]
    if any(data):
        ax_text.hist(data, bins=30, stacked=True, label=names)
        ax_text.legend(fontsize="small")
    ax_text.set_xlabel(f"text length ({stats.length_unit})")
    ax_text.set_ylabel("records")
    total = stats.overall()
    sides = [max(w, h) for w, h in zip(total.widths, total.heights)]
    if sides:
        ax_img.hist(sides, bins=30)
    ax_img.set_xlabel("image long side (pixels)")
    ax_img.set_ylabel("records")
    fig.suptitle(f"{Path(stats.path).name}: {stats.report.kept} records")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(out, buf.getvalue())


def stats_json(stats: DataStats) -> str:
    return json.dumps(stats.to_dict(), indent=2)

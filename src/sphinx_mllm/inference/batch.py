"""Batch inference over a JSONL of items: batched (left padding), resumable, errors recorded per item.

Input lines are either conversation records of the project's format (`{"id", "image", "conversations":
[{"from": "human"|"gpt", "value"}...]}`: the model answers the LAST human turn, earlier turns are the
history, a trailing gpt turn, the reference, is ignored) or simple items `{"id", "image"?, "prompt"}`.
`image` is a path, relative to `images_root` when given (else to the input file's folder).

Output lines are `{"id", "text"}` (the prediction format of `sphinx_mllm.tasks.metrics`) or `{"id", "error"}`
when that item could not be answered (missing or corrupt image, prompt too long...). Each line is written
whole, flushed and fsynced before the next batch, so a crash loses at most the batch in flight; a rerun skips
every id already in the output (answers and errors alike: delete an error line to retry it) and drops a
torn last line left by a crash.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphinx_mllm.inference.chat import GenerationConfig, Message, SphinxChat
from sphinx_mllm.processing import load_image
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

log = get_logger(__name__)

GREEDY = GenerationConfig(temperature=0.0)


@dataclass
class BatchReport:
    """What a run did: items answered, failed (with the error lines written), skipped as already done."""

    answered: int = 0
    failed: int = 0
    skipped: int = 0
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    """One input line turned into chat messages (image part holding the loaded PIL image)."""

    id: str
    messages: list[Message]


def read_items(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, object or None, error or None) for every non-blank line of a JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise SphinxError(f"input file not found: {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                yield n, None, f"line {n}: bad JSON ({exc.msg})"
                continue
            yield (n, obj, None) if isinstance(obj, dict) else (n, None, f"line {n}: not a JSON object")


def item_turns(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(role, text) turns ending with the user turn to answer, from `conversations` or `prompt`."""
    if isinstance(obj.get("prompt"), str):
        return [("user", obj["prompt"])]
    convs = obj.get("conversations")
    if not isinstance(convs, list) or not convs:
        raise SphinxError("item has neither a 'prompt' string nor a 'conversations' list")
    turns = []
    for i, t in enumerate(convs):
        if not isinstance(t, dict) or t.get("from") not in ("human", "gpt") or not isinstance(t.get("value"), str):
            raise SphinxError(f"conversation turn {i} must be {{'from': 'human'|'gpt', 'value': str}}")
        turns.append(("user" if t["from"] == "human" else "assistant", t["value"].replace("<image>", "").strip()))
    if turns[-1][0] == "assistant":
        turns = turns[:-1]
    if not turns or turns[-1][0] != "user":
        raise SphinxError("conversation has no human turn to answer")
    return turns


def build_messages(turns: Sequence[tuple[str, str]], image: Any) -> list[Message]:
    """Turns -> HF messages, the image part (if any) in the first user message."""
    messages: list[Message] = []
    for i, (role, text) in enumerate(turns):
        if i == 0 and image is not None:
            parts = [{"type": "image", "image": image}, {"type": "text", "text": text}]
            messages.append({"role": role, "content": parts})
        else:
            messages.append({"role": role, "content": text})
    return messages


def resolve_image(value: Any, root: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise SphinxError(f"'image' must be a path string, got {value!r}")
    path = Path(value)
    return path if path.is_absolute() else root / path


def load_item(obj: dict[str, Any], root: Path, max_pixels: int) -> Item:
    """An input object -> Item; SphinxError (bad image, bad turns) names the problem."""
    image_path = resolve_image(obj.get("image"), root)
    image = load_image(image_path, max_pixels) if image_path is not None else None
    return Item(str(obj["id"]), build_messages(item_turns(obj), image))


def done_ids(path: Path) -> set[str]:
    """Ids already in an output file. A torn last line (no newline, bad JSON) is cut off, so appending
    resumes on a clean line; a bad line elsewhere is an error (the file is not ours)."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1].strip():
        try:
            json.loads(lines[-1])
            with path.open("ab") as f:  # a complete last line that lacks only its newline
                f.write(b"\n")
        except json.JSONDecodeError:
            log.warning("%s: dropping a torn last line left by an interrupted run", path)
            with path.open("r+b") as f:
                f.truncate(len(data) - len(lines[-1]))
            lines = lines[:-1]
    ids = set()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            ids.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SphinxError(f"{path}:{n}: not a prediction line ({{'id', 'text'|'error'}}); "
                              "is this the right output file?") from None
    return ids


class JsonlAppender:
    """Appends JSON lines; each write is one line, flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8")

    def write(self, obj: dict[str, Any]) -> None:
        self._f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def answer_items(chat: SphinxChat, items: Sequence[Item], config: GenerationConfig) -> list[tuple[str, str, bool]]:
    """(id, answer or error, ok) per item; a failing batch is retried item by item to isolate the culprit."""
    try:
        answers = chat.generate([it.messages for it in items], config)
        return [(it.id, a, True) for it, a in zip(items, answers)]
    except SphinxError as exc:
        if len(items) == 1:
            return [(items[0].id, str(exc), False)]
    out = []
    for it in items:
        out += answer_items(chat, [it], config)
    return out


def run_batch(
    chat: SphinxChat, input_path: str | os.PathLike, output_path: str | os.PathLike,
    config: GenerationConfig = GREEDY, batch_size: int = 8,
    images_root: str | os.PathLike | None = None, progress: Callable[[int], None] | None = None,
) -> BatchReport:
    """Answer every item of `input_path` not yet in `output_path` (see the module docstring).

    `progress(n)` is called with the number of items finished (answered, failed or skipped) after each step.
    """
    if batch_size < 1:
        raise SphinxError(f"batch size must be at least 1, got {batch_size}")
    output = Path(output_path)
    root = Path(images_root) if images_root is not None else Path(input_path).parent
    done = done_ids(output)
    report = BatchReport()
    pending: list[Item] = []
    max_pixels = chat.processor.image_processor.max_pixels
    with JsonlAppender(output) as out:

        def record(rid: str, text: str, ok: bool) -> None:
            out.write({"id": rid, "text": text} if ok else {"id": rid, "error": text})
            done.add(rid)
            if ok:
                report.answered += 1
            else:
                report.failed += 1
                report.errors[rid] = text

        def flush() -> None:
            for rid, text, ok in answer_items(chat, pending, config):
                record(rid, text, ok)
            if progress is not None:
                progress(len(pending))
            pending.clear()

        for n, obj, error in read_items(input_path):
            if obj is None or "id" not in obj:
                rid = f"line-{n}"
                if rid not in done:
                    record(rid, error or f"line {n}: item has no 'id'", False)
                continue
            rid = str(obj["id"])
            if rid in done or any(it.id == rid for it in pending):
                report.skipped += 1
                if progress is not None:
                    progress(1)
                continue
            try:
                pending.append(load_item(obj, root, max_pixels))
            except (SphinxError, OSError, ValueError) as exc:  # Pillow raises OSError on some broken headers
                record(rid, str(exc) if isinstance(exc, SphinxError) else f"cannot read image: {exc}", False)
                if progress is not None:
                    progress(1)
            if len(pending) >= batch_size:
                flush()
        if pending:
            flush()
    log.info("batch inference: %d answered, %d failed, %d skipped", report.answered, report.failed, report.skipped)
    return report


def count_lines(path: str | os.PathLike) -> int:
    """Non-blank lines of a file (the total of a progress bar)."""
    with Path(path).open("rb") as f:
        return sum(1 for line in f if line.strip())


__all__ = ["BatchReport", "Item", "JsonlAppender", "build_messages", "count_lines", "done_ids", "item_turns",
           "load_item", "read_items", "run_batch"]

"""LLaVA-Instruct conversations (`llava_instruct_150k.json`, `llava_v1_5_mix665k.json`...), passed through
after checks.

Input: a JSON list (or JSONL) of `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}]}`.
Roles must alternate human, gpt, ..., gpt; "<image>" placeholders are removed (SPHINX puts the image right
after BOS) and whitespace tidied. Image sizes come from the image headers under the images root. Items
without an image (text-only dialogues) keep `"image": null` with width and height 0. Repeated ids get
`-<index>` appended so that ids stay unique.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sphinx_mllm.data.converters.common import (
    MALFORMED,
    ConversionReport,
    ImageSizer,
    Record,
    load_json,
    make_record,
    typed_task,
)
from sphinx_mllm.tasks import ConversationTask
from sphinx_mllm.utils.errors import SphinxError


def _items(path: Path, report: ConversionReport) -> Iterator[Any]:
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise SphinxError(f"LLaVA conversations file not found: {path}")
        with path.open("r", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    report.skip("malformed_line", f"{path}:{n}")
        return
    data = load_json(path, "LLaVA conversations")
    if not isinstance(data, list):
        raise SphinxError(f"LLaVA conversations {path}: expected a JSON list of conversations")
    yield from data


def llava_conversations(
    conversations: str | os.PathLike, report: ConversionReport, *, images_root: str | os.PathLike | None = None,
    id_prefix: str = "llava",
) -> Iterator[Record]:
    """Validated conversation records; bad role order or empty turns are skipped as `invalid_conversation`."""
    builder = typed_task("conversation", ConversationTask)
    sizer = ImageSizer(images_root)
    seen: set[str] = set()
    for index, item in enumerate(_items(Path(conversations), report)):
        if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
            report.skip(MALFORMED, f"item {index}")
            continue
        rid = f"{id_prefix}-{item.get('id', index)}"
        if rid in seen:
            rid = f"{rid}-{index}"
        try:
            turns = builder.build(item["conversations"])
        except SphinxError as exc:
            report.skip("invalid_conversation", f"{rid}: {exc}")
            continue
        image = item.get("image")
        if image is None:
            size = (0, 0)
        elif not isinstance(image, str) or not image:
            report.skip(MALFORMED, f"{rid} image {image!r}")
            continue
        else:
            found = sizer.size(image, report)
            if found is None:
                continue
            size = found
        seen.add(rid)
        yield make_record(rid, image, size, "conversation", turns)

"""`sphinx-mllm eval ...`: score generated answers against references (`eval score`).

File formats (JSONL, joined on "id") are those of `sphinx_mllm.tasks.metrics`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from sphinx_mllm.utils.errors import SphinxError


def read_jsonl(path: str | Path, what: str) -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines skipped); a SphinxError names the file and line of any
    line that is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        raise SphinxError(f"{what} file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SphinxError(f"{path}:{n}: bad JSON in {what} file ({exc.msg})") from None
            if not isinstance(row, dict):
                raise SphinxError(f"{path}:{n}: {what} line is not a JSON object")
            rows.append(row)
    return rows


def _score(args: argparse.Namespace) -> int:
    from sphinx_mllm.tasks.metrics import score

    predictions = read_jsonl(args.predictions, "predictions")
    references = read_jsonl(args.references, "references")
    result = score(args.task, predictions, references)
    print(json.dumps(result, indent=2 if args.pretty else None, sort_keys=False))
    sys.stdout.flush()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from sphinx_mllm.tasks.metrics import METRICS

    parser = sub.add_parser("eval", help="evaluate generated answers")
    eval_sub = parser.add_subparsers(dest="eval_command", required=True, metavar="EVAL_COMMAND")
    p = eval_sub.add_parser(
        "score",
        help="score a predictions JSONL against a references JSONL; prints the metrics as JSON",
        description="Predictions are {'id', 'text'} lines; reference fields depend on the task "
        "(see sphinx_mllm.tasks.metrics). Every reference id needs one prediction.",
    )
    p.add_argument("--task", required=True, choices=sorted(METRICS), help="metric to compute")
    p.add_argument("--predictions", required=True, help="JSONL of {'id', 'text'}")
    p.add_argument("--references", required=True, help="JSONL of {'id', ...ground truth...}")
    p.add_argument("--pretty", action="store_true", help="indent the JSON output")
    p.set_defaults(func=_score)

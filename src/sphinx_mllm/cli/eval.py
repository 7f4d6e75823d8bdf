"""`sphinx-mllm eval ...`: score generated answers against references (`eval score`), run a benchmark on a
model (`eval run`) and compare runs (`eval table`).

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


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sphinx_mllm.evaluation import Judge, JudgeConfig, load_items, run_benchmark
    from sphinx_mllm.inference import SphinxChat

    _, items, _ = load_items(args.benchmark, args.data, args.images_root)  # bad input fails before loading
    total = min(len(items), args.limit) if args.limit else len(items)
    judge = None
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise SphinxError("give both --judge-url and --judge-model")
        judge = Judge(JudgeConfig(args.judge_url, args.judge_model, args.judge_key_env or None))
    chat = SphinxChat.load(args.model, device=args.device, dtype=args.dtype)
    try:
        with tqdm(total=total, desc="eval", unit="item", disable=args.no_progress, file=sys.stderr) as bar:
            summary = run_benchmark(chat, args.benchmark, args.output, args.limit, data=args.data,
                                    images_root=args.images_root, judge=judge, batch_size=args.batch_size,
                                    max_new_tokens=args.max_new_tokens, progress=bar.update)
    finally:
        if judge is not None:
            judge.close()
    summary["model"] = str(args.model)
    shown = {k: v for k, v in summary.items() if k != "metrics"}
    print(json.dumps(shown))
    from sphinx_mllm.evaluation import metrics_table

    print(metrics_table([args.output]))
    return 0


def _table(args: argparse.Namespace) -> int:
    from sphinx_mllm.evaluation import metrics_table

    print(metrics_table(args.runs, args.keys.split(",") if args.keys else None))
    return 0


def _register_run(eval_sub: argparse._SubParsersAction) -> None:
    from sphinx_mllm.evaluation.benchmarks import BENCHMARKS

    names = ", ".join(sorted(BENCHMARKS))
    p = eval_sub.add_parser(
        "run", help="generate answers to a benchmark with the release's prompts and score them",
        description="Benchmarks: a registry name with --data (" + names + "), or a records JSONL from "
        "`sphinx-mllm data convert` (ground truth in each record's meta). Writes OUTPUT/requests.jsonl, "
        "references.jsonl, predictions.jsonl (resumable) and metrics.json. Greedy decoding.",
    )
    p.add_argument("--model", required=True, help="model folder (ours, or a release folder)")
    p.add_argument("--benchmark", required=True, help="registry name or records JSONL file")
    p.add_argument("--data", default=None, help="the named benchmark's file or folder")
    p.add_argument("--images-root", default=None, help="folder image paths are relative to "
                   "(default: the data's folder)")
    p.add_argument("--output", required=True, help="run folder (rerun into it to resume)")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--batch-size", type=int, default=8, help="items per generate call")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override the benchmark's answer length")
    p.add_argument("--device", default="auto", help="cpu, cuda... (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16... (default: as stored)")
    p.add_argument("--judge-url", default=None, help="OpenAI-compatible base URL of the judge model "
                   "(judge-scored benchmarks: mmvet, infimm-eval, benchlmm), e.g. http://127.0.0.1:8001/v1")
    p.add_argument("--judge-model", default=None, help="the judge's model name")
    p.add_argument("--judge-key-env", default="OPENAI_API_KEY", help="environment variable holding the "
                   "judge's API key ('' for none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
    t = eval_sub.add_parser("table", help="print a table of the metrics of several run folders")
    t.add_argument("runs", nargs="+", help="run folders (each with metrics.json)")
    t.add_argument("--keys", default=None, help="comma-separated metric columns (default: all)")
    t.set_defaults(func=_table)


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
    _register_run(eval_sub)

"""Run a benchmark: generate answers with the release's evaluation prompts, score them, write the run folder.

A run folder holds `requests.jsonl` (what was asked: id, image, prompt), `references.jsonl` (the ground
truth, re-scorable with `sphinx-mllm eval score`), `predictions.jsonl` (`{"id", "text"}` or `{"id",
"error"}`, appended and resumable: rerunning into the same folder answers only what is missing) and
`metrics.json` (written atomically last). Decoding is greedy, as in the release's evaluation.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sphinx_mllm.evaluation.benchmarks import MAX_NEW_TOKENS_BY_METRIC, Benchmark, EvalItem, load_items
from sphinx_mllm.evaluation.judge import Judge, score_judged
from sphinx_mllm.inference.batch import run_batch
from sphinx_mllm.inference.chat import GenerationConfig, SphinxChat
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.io import atomic_write_jsonl, atomic_write_text
from sphinx_mllm.utils.logging import get_logger

log = get_logger(__name__)

METRICS_FILE = "metrics.json"


def _read_predictions(path: Path) -> dict[str, dict[str, Any]]:
    """Last line per id wins (a rerun never rewrites, but a user may have appended fixes)."""
    out: dict[str, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                out[str(row["id"])] = row
    return out


def score_items(items: Sequence[EvalItem], predictions: Mapping[str, Mapping[str, Any]],
                judge: Judge | None = None, data_root: Path | None = None) -> dict[str, Any]:
    """Metrics per metric group of `items` from their predictions; failed or missing answers score as empty
    text (and are counted in "errors")."""
    from sphinx_mllm.tasks.metrics import score

    groups: dict[str, list[EvalItem]] = defaultdict(list)
    for item in items:
        groups[item.metric].append(item)
    results: dict[str, Any] = {}
    for metric, group in groups.items():
        preds = [{"id": it.id, "text": str(predictions.get(it.id, {}).get("text", ""))} for it in group]
        refs = [it.reference for it in group]
        if metric == "judge":
            if judge is None:
                raise SphinxError("this benchmark is scored by a judge model: give --judge-url and --judge-model")
            results[metric] = score_judged(preds, refs, judge)
        elif metric == "d3":
            from sphinx_mllm.evaluation.d3 import score_d3

            if data_root is None:
                raise SphinxError("D3 scoring needs the D3 folder")
            results[metric] = score_d3(preds, refs, data_root)
        else:
            results[metric] = score(metric, preds, refs)
    return results


def _chat_of(model_or_chat: SphinxChat | str | os.PathLike) -> tuple[SphinxChat, str]:
    if isinstance(model_or_chat, SphinxChat):
        return model_or_chat, str(getattr(model_or_chat.model, "name_or_path", "") or "in-memory model")
    return SphinxChat.load(model_or_chat), str(model_or_chat)


def run_benchmark(
    model_or_chat: SphinxChat | str | os.PathLike,
    benchmark: str | os.PathLike,
    output_dir: str | os.PathLike,
    limit: int | None = None,
    *,
    data: str | os.PathLike | None = None,
    images_root: str | os.PathLike | None = None,
    judge: Judge | None = None,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Generate and score one benchmark; returns (and writes as `metrics.json`) the run summary.

    `benchmark` is a registry name (with `data`, its file or folder) or a records JSONL. `limit` keeps the
    first N items (a quick look, or a weight-mixing sweep).
    """
    spec, items, root = load_items(benchmark, data, images_root)
    if limit is not None:
        if limit < 1:
            raise SphinxError(f"limit must be at least 1, got {limit}")
        items = items[:limit]
    if not items:
        raise SphinxError(f"benchmark {benchmark} has no items")
    chat, model_name = _chat_of(model_or_chat)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = max_new_tokens or _max_new_tokens(spec, items)
    config = GenerationConfig(max_new_tokens=tokens, temperature=0.0)
    requests = [{"id": it.id, "image": it.image, "prompt": it.prompt} for it in items]
    atomic_write_jsonl(out / "requests.jsonl", requests)
    atomic_write_jsonl(out / "references.jsonl", [it.reference for it in items])
    started = time.time()
    report = run_batch(chat, out / "requests.jsonl", out / "predictions.jsonl", config, batch_size=batch_size,
                       images_root=root, progress=progress)
    predictions = _read_predictions(out / "predictions.jsonl")
    errors = sum(1 for it in items if "text" not in predictions.get(it.id, {}))
    data_root = Path(data) if data is not None else None
    summary = {
        "benchmark": spec.name if spec is not None else str(benchmark),
        "model": model_name,
        "items": len(items),
        "errors": errors,
        "max_new_tokens": tokens,
        "generated_this_run": report.answered + report.failed,
        "seconds": round(time.time() - started, 3),
        "metrics": score_items(items, predictions, judge, data_root),
    }
    atomic_write_text(out / METRICS_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    log.info("%s: %s", summary["benchmark"], flatten_metrics(summary["metrics"]))
    return summary


def _max_new_tokens(spec: Benchmark | None, items: Sequence[EvalItem]) -> int:
    if spec is not None:
        return spec.max_new_tokens
    return max(MAX_NEW_TOKENS_BY_METRIC.get(it.metric, 256) for it in items)


# ----------------------------------------------------------------------------- tables across runs


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metrics -> {"rec.accuracy": 0.81, ...}; per-item detail is left out."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "per_item":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name + "."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def load_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise SphinxError(f"{run_dir} is not an evaluation run folder (no {METRICS_FILE})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SphinxError(f"{path}: bad JSON ({exc.msg})") from None


def metrics_table(run_dirs: Sequence[str | os.PathLike], keys: Sequence[str] | None = None) -> str:
    """A plain-text table: one row per run, one column per metric (union over runs, or `keys`)."""
    rows = []
    for run_dir in run_dirs:
        run = load_run(run_dir)
        rows.append((str(run_dir), str(run.get("benchmark", "?")), flatten_metrics(run.get("metrics", {}))))
    columns = list(keys) if keys else sorted({k for _, _, flat in rows for k in flat})
    header = ["run", "benchmark", *columns]
    body = [[name, bench, *(f"{flat[c]:.4f}" if c in flat else "-" for c in columns)] for name, bench, flat in rows]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


__all__ = ["METRICS_FILE", "flatten_metrics", "load_run", "metrics_table", "run_benchmark", "score_items"]

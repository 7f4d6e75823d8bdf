"""Training logs people can read: a JSONL metrics file, optional TensorBoard events, a PNG of the loss
curves per task, and the callback interface a progress bar (in the CLI) hangs on.

Only rank 0 writes. One JSONL record per `log_every` steps:
`{"step", "epoch", "loss", "tokens", "task_loss": {task: loss}, "task_tokens": {task: n}, "lr",
"grad_norm", "tokens_per_s", "elapsed_s"}` where `loss` is the mean over the answer tokens of the steps
since the previous record, `tokens` counts those answer tokens and `tokens_per_s` counts all input
tokens (image placeholders included) per second of training.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from sphinx_mllm.utils import atomic_write_bytes, atomic_write_text, get_logger

logger = get_logger(__name__)


class TrainCallback(Protocol):
    """Hooks called on rank 0 (a progress bar, a test probe...)."""

    def on_start(self, start_step: int, total_steps: int) -> None: ...

    def on_step(self, step: int, metrics: dict[str, Any]) -> None: ...

    def on_end(self) -> None: ...


class MetricsLog:
    """Append-only JSONL metrics; on resume, records after the resumed step are dropped first."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        else:
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics JSONL (missing file: none; a torn last line from a crash is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class TensorBoardLog:
    """TensorBoard scalars if `torch.utils.tensorboard` works (the `tensorboard` package is optional)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError):
            logger.warning("run.tensorboard is set but the tensorboard package is not installed; skipping it")
            self.writer = None
            return
        self.writer = SummaryWriter(str(folder))

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"train/{key}", record[key], step)
        for task, value in record.get("task_loss", {}).items():
            self.writer.add_scalar(f"task_loss/{task}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss_curves(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "training loss") -> bool:
    """A PNG with the overall loss and one curve per task against the step (atomic). False if no data."""
    points = [r for r in records if r.get("loss") is not None and math.isfinite(r["loss"])]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    marker = "o" if len(points) <= 30 else None  # short runs: show the points themselves
    ax.plot([r["step"] for r in points], [r["loss"] for r in points], color="black", linewidth=2, marker=marker,
            label="all")
    tasks = sorted({t for r in points for t in r.get("task_loss", {})})
    if len(tasks) > 1:
        for task in tasks:
            steps = [r["step"] for r in points if task in r.get("task_loss", {})]
            values = [r["task_loss"][task] for r in points if task in r.get("task_loss", {})]
            ax.plot(steps, values, linewidth=1, alpha=0.8, marker=marker, markersize=3, label=task)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return True


__all__ = ["MetricsLog", "TensorBoardLog", "TrainCallback", "plot_loss_curves", "read_metrics"]

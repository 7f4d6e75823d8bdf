"""One rank-aware logger for the library. Library code never prints; the CLI configures handlers."""

from __future__ import annotations

import logging
import os

_ROOT = "sphinx_mllm"


class _RankFilter(logging.Filter):
    """Only rank 0 logs INFO and below under torchrun; warnings pass on every rank, tagged with it."""

    def filter(self, record: logging.LogRecord) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0:
            record.msg = f"[rank {rank}] {record.msg}"
            return record.levelno >= logging.WARNING
        return True


def get_logger(name: str) -> logging.Logger:
    """Logger under the `sphinx_mllm` hierarchy (pass `__name__`)."""
    logger = logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")
    if not any(isinstance(f, _RankFilter) for f in logger.filters):
        logger.addFilter(_RankFilter())
    return logger


def configure_logging(level: int | str = logging.INFO) -> None:
    """Attach one stderr handler to the package root (called by the CLI, not by the library)."""
    root = logging.getLogger(_ROOT)
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(level)

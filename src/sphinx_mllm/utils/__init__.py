"""L0 helpers: logging, atomic file writes, small errors shared by every layer."""

from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.io import (
    atomic_dir,
    atomic_open,
    atomic_write_bytes,
    atomic_write_jsonl,
    atomic_write_text,
    read_yaml,
)
from sphinx_mllm.utils.logging import get_logger

__all__ = [
    "SphinxError", "atomic_dir", "atomic_open", "atomic_write_bytes", "atomic_write_jsonl", "atomic_write_text",
    "get_logger", "read_yaml",
]

"""Whole-folder conversions, both directions (the functions behind `sphinx-mllm convert`).

- `release_to_hf`: a release folder -> our Hugging Face folder (safetensors shards, `config.json`, processor
  and tokenizer files, plus the release's `tokenizer.model` so the way back can copy it).
- `to_release`: our folder (or a release folder, to re-shard it) -> a release folder with N shards.
Outputs are written through `atomic_dir`: a half-written DST never looks complete.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sphinx_mllm.formats.loader import Progress, load_release_model, resolve_dtype
from sphinx_mllm.formats.release import TOKENIZER_FILE, is_release_folder
from sphinx_mllm.formats.writer import save_release
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing.processor import SphinxProcessor
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.io import atomic_dir
from sphinx_mllm.utils.logging import get_logger

logger = get_logger(__name__)


def release_to_hf(
    src: str | Path,
    dst: str | Path,
    dtype: torch.dtype | str | None = "auto",
    max_shard_size: str = "5GB",
    check_replicas: bool = True,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Convert a release folder into our format; `dtype="auto"` keeps the release's (bf16)."""
    src, dst = Path(src), Path(dst)
    if not is_release_folder(src):
        raise SphinxError(f"{src} is not a release folder (needs meta.json with llama_type and "
                          "consolidated.NN-of-MM.model.pth shards)")
    if dst.exists() and not overwrite:
        raise SphinxError(f"{dst} already exists (pass --overwrite to replace it)")
    model = load_release_model(src, dtype=dtype, check_replicas=check_replicas, progress=progress)
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        model.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if (src / TOKENIZER_FILE).is_file():
            SphinxProcessor.from_pretrained(src).save_pretrained(tmp)
            shutil.copyfile(src / TOKENIZER_FILE, tmp / TOKENIZER_FILE)
        else:
            logger.warning("%s has no tokenizer.model: the converted folder has no processor or tokenizer", src)
    return dst


def to_release(
    src: str | Path,
    dst: str | Path,
    num_shards: int = 1,
    dtype: torch.dtype | str | None = "auto",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write our model folder (or a release folder, re-sharded) as a release folder with `num_shards` shards."""
    src = Path(src)
    if not src.is_dir():
        raise SphinxError(f"{src}: not a folder")
    target = resolve_dtype(dtype)
    if is_release_folder(src):
        model = load_release_model(src, dtype="auto")
    else:
        if not (src / "config.json").is_file():
            raise SphinxError(f"{src} is neither a release folder nor a model saved by sphinx-mllm (no config.json)")
        model = SphinxForConditionalGeneration.from_pretrained(str(src), dtype="auto")
    tokenizer_file = src / TOKENIZER_FILE
    return save_release(model, dst, num_shards=num_shards, dtype=target,
                        tokenizer=tokenizer_file if tokenizer_file.is_file() else None,
                        overwrite=overwrite, progress=progress)


__all__ = ["release_to_hf", "to_release"]

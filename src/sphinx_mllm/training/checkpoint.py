"""Sharded, atomic, world-size-independent training checkpoints with `torch.distributed.checkpoint` (DCP).

A checkpoint is a folder `checkpoints/step_00000042/` holding the DCP files of the trainable parameters
and their optimizer state (frozen weights are rebuilt from the model source, so they are not copied
into every checkpoint) plus `trainer_state.json` (step, epoch, sampler position, world size). Every
rank writes its shards into a hidden `.step_00000042.partial/` folder; when all have finished, rank 0
writes `trainer_state.json` and renames the folder, so a folder named `step_*` is always complete and a
run killed mid-save loses only the steps since the previous one. DCP stores tensors with their global
shapes and offsets, so a checkpoint saved by N ranks under FSDP2 or DDP loads on M ranks under either.

Randomness needs no state: the trainer reseeds torch from (seed, step, rank) at every step.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.optim import Optimizer

from sphinx_mllm.training.dist import DistEnv
from sphinx_mllm.utils import SphinxError, atomic_write_text, get_logger

logger = get_logger(__name__)

STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Frozen weights are not in checkpoints: setting must not ask for them (DCP's load already failed on any
# trainable key that the checkpoint lacks).
_SET_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' without a process group: that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        yield


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(root: str | os.PathLike, step: int, model: nn.Module, optimizer: Optimizer,
                    trainer_state: dict[str, Any], env: DistEnv, keep_last: int) -> Path:
    """Write checkpoint `step` atomically (collective: every rank calls it), then prune to `keep_last`."""
    root = Path(root)
    final = step_dir(root, step)
    partial = root / f".{final.name}.partial"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    env.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(partial))
    env.barrier()
    if env.is_main:
        state = dict(trainer_state, step=step, world_size=env.world_size)
        atomic_write_text(partial / STATE_FILE, json.dumps(state, indent=2) + "\n")
        if final.exists():  # the same step saved again (e.g. a resumed run): replace it
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    env.barrier()
    return final


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise SphinxError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return json.loads(state_file.read_text())


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """Load model + optimizer state into the (already wrapped) model; returns the trainer state."""
    state = read_trainer_state(path)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    try:
        with _single_process_quiet():
            dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    except Exception as exc:  # DCP raises plain errors for missing keys / shape mismatches
        raise SphinxError(f"cannot load checkpoint {path} into this model: {exc}") from exc
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_SET_OPTIONS)
    logger.info("resumed from %s (step %d, saved by %d processes)", path, state["step"], state["world_size"])
    return state


__all__ = ["latest_checkpoint", "list_checkpoints", "load_checkpoint", "read_trainer_state", "save_checkpoint"]

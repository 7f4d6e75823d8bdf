"""The process group under torchrun (or none), device choice, and the few collectives the trainer needs.

The same code runs as one plain process (no process group), as N CPU processes (gloo) and as N GPUs
(nccl). Teardown follows the workaround measured on the project's CPUs (ENVIRONMENT.md): a gloo rank
sometimes aborts after the run unless the model and optimizer are deleted, garbage is collected and the
ranks meet at a barrier before `destroy_process_group`.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from sphinx_mllm.utils import SphinxError, get_logger

logger = get_logger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands: rank, world size, device; `owns_group` if it created the process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers over ranks (float64 on the device)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def pick_device(choice: str, local_rank: int) -> torch.device:
    """`auto`: the local GPU if CUDA is available, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SphinxError("run.device is 'cuda' but CUDA is not available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_choice: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join torchrun's process group if launched by torchrun (WORLD_SIZE set), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_choice, local_rank)
    owns = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if device.type == "cuda":
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
        owns = True
        logger.info("process group: %s, world size %d", backend, world)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


def shutdown(env: DistEnv, clean: bool = True) -> None:
    """Destroy the process group we created, after gc and a barrier (the exit-abort workaround).

    After an error (`clean=False`) there is no barrier: the other ranks may be gone.
    """
    gc.collect()
    if env.owns_group and dist.is_initialized():
        if clean:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def main_first(env: DistEnv) -> Iterator[None]:
    """Rank 0 runs the body first (e.g. to create folders), the others after it."""
    if not env.is_main:
        env.barrier()
    yield
    if env.is_main:
        env.barrier()


__all__ = ["DistEnv", "init_distributed", "main_first", "pick_device", "shutdown"]

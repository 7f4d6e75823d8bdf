"""The batch sampler of a data mixture: typed global batches, length grouping, weights, ranks, resume.

Each epoch has one plan, a list of GLOBAL batches (`global_batch_size` dataset indices each) that depends
only on the sources, the options, `seed` and `epoch`, never on the world size. It is built as follows:

1. Weights: a source of `size` items with `weight` w contributes `round(size * w)` items: `floor` whole
   copies of itself plus a subset drawn without repetition, redrawn every epoch (w < 1 gives only a subset).
2. Pools: with `batch_by_type` (the release's behaviour) one pool per source `type`, so every global batch
   holds one type; otherwise one pool.
3. Each pool is shuffled, then cut to a multiple of one optimizer step (`accumulation_steps` global
   batches, 1 by default): `last_batch="drop"` drops the rest (the release truncates each type the same
   way; a type smaller than one step is dropped whole, with a warning), `"pad"` repeats the first items
   of the shuffled pool to fill the last step.
4. With `group_by_length`, each window of `length_window` consecutive steps is sorted by length
   (stable), so a batch holds items of similar length while windows stay random.
5. The steps of all pools are shuffled together, then each step is cut into its global batches, so the
   micro-batches accumulated into one step share a type (the release's `acc_grad`).

Rank `r` of `w` takes the slice `[r*b, (r+1)*b)` of every global batch (`b = global_batch_size // w`), as
the release does: the ranks' batches are disjoint, their union is the global batch, and every rank yields
the same number of batches. Resuming counts global batches, so a run can resume with another world size
as long as the global batch size is unchanged. All randomness is Python's `random` seeded with strings,
stable across processes and versions. No torch: the object works as a DataLoader `batch_sampler`.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sphinx_mllm.utils import SphinxError, get_logger

logger = get_logger(__name__)

LastBatch = Literal["drop", "pad"]
_STATE_VERSION = 1


@dataclass(frozen=True)
class SourceLayout:
    """One source as the sampler sees it: dataset indices `[offset, offset + size)`, its batch `type`,
    its sampling `weight` and (optionally) one length per item for grouping."""

    offset: int
    size: int
    type: str = "default"
    weight: float = 1.0
    lengths: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if self.offset < 0 or self.size < 0:
            raise SphinxError(f"source layout needs offset, size >= 0, got {self.offset}, {self.size}")
        if not self.weight > 0:
            raise SphinxError(f"source weight must be > 0, got {self.weight}")
        if self.lengths is not None and len(self.lengths) != self.size:
            raise SphinxError(f"source has {self.size} items but {len(self.lengths)} lengths")

    def weighted_size(self) -> int:
        return round(self.size * self.weight)


class MixtureBatchSampler:
    """Yields this rank's part of each global batch (a list of dataset indices); see the module docstring.

    Typical loop: `for epoch in ...: sampler.set_epoch(epoch); for batch in loader: ...`. To resume, save
    `state_dict()` with the checkpoint and call `load_state_dict()` on a fresh sampler: the next iteration
    yields exactly the batches that were not consumed yet.
    """

    def __init__(
        self,
        sources: Sequence[SourceLayout],
        global_batch_size: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        batch_by_type: bool = True,
        group_by_length: bool = True,
        length_window: int = 64,
        last_batch: LastBatch = "drop",
        accumulation_steps: int = 1,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise SphinxError(f"invalid rank {rank} of world size {world_size}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise SphinxError(
                f"global batch size {global_batch_size} must be a positive multiple of "
                f"the world size {world_size}"
            )
        if last_batch not in ("drop", "pad"):
            raise SphinxError(f"last_batch must be 'drop' or 'pad', got {last_batch!r}")
        if accumulation_steps < 1:
            raise SphinxError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
        if length_window < 1:
            raise SphinxError(f"length_window must be >= 1, got {length_window}")
        self.sources = list(sources)
        self.global_batch_size = global_batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.batch_by_type = batch_by_type
        self.group_by_length = group_by_length
        self.length_window = length_window
        self.last_batch: LastBatch = last_batch
        self.accumulation_steps = accumulation_steps
        self.epoch = 0
        self._position = 0  # global batches of this epoch already handed out
        self._plan_cache: tuple[int, list[list[int]]] | None = None
        self._length_of = self._index_lengths()
        self._fingerprint = self._make_fingerprint()

    @property
    def local_batch_size(self) -> int:
        return self.global_batch_size // self.world_size

    # ------------------------------------------------------------------------- plan

    def _index_lengths(self) -> array | None:
        """One length per dataset index (0 where unknown), or None when there is nothing to group by."""
        if not self.group_by_length or all(src.lengths is None for src in self.sources):
            return None
        lengths = array("q", bytes(8 * max((s.offset + s.size for s in self.sources), default=0)))
        for src in self.sources:
            if src.lengths is not None:
                lengths[src.offset : src.offset + src.size] = array("q", src.lengths)
        return lengths

    def _rng(self, epoch: int, what: str) -> random.Random:
        return random.Random(f"sphinx-mllm:{self.seed}:{epoch}:{what}")

    def _pools(self, epoch: int) -> dict[str, list[int]]:
        pools: dict[str, list[int]] = {}
        for s, src in enumerate(self.sources):
            base = range(src.offset, src.offset + src.size)
            copies, rest = divmod(src.weighted_size(), src.size) if src.size else (0, 0)
            items = list(base) * copies + sorted(self._rng(epoch, f"weight:{s}").sample(base, rest))
            pools.setdefault(src.type if self.batch_by_type else "*", []).extend(items)
        return pools

    def _pool_steps(self, pool: list[int], rng: random.Random, name: str) -> list[list[int]]:
        """The pool as optimizer steps of `accumulation_steps * global_batch_size` items."""
        size = self.global_batch_size * self.accumulation_steps
        rng.shuffle(pool)
        rest = len(pool) % size
        if rest and self.last_batch == "drop":
            if len(pool) < size:
                logger.warning("type %r has %d items, fewer than one step (%d): dropped",
                               name, len(pool), size)
            pool = pool[: len(pool) - rest]
        elif rest:
            pool = pool + [pool[i % len(pool)] for i in range(size - rest)]
        if self._length_of is not None:
            window, length = size * self.length_window, self._length_of.__getitem__
            for start in range(0, len(pool), window):
                pool[start : start + window] = sorted(pool[start : start + window], key=length)
        return [pool[i : i + size] for i in range(0, len(pool), size)]

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """The whole plan of `epoch` (default: the current one): every global batch, in order."""
        epoch = self.epoch if epoch is None else epoch
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        steps: list[list[int]] = []
        for name, pool in self._pools(epoch).items():
            steps += self._pool_steps(pool, self._rng(epoch, f"pool:{name}"), name)
        self._rng(epoch, "order").shuffle(steps)
        g = self.global_batch_size
        batches = [step[i : i + g] for step in steps for i in range(0, len(step), g)]
        self._plan_cache = (epoch, batches)
        return batches

    def num_batches_per_epoch(self) -> int:
        """Global batches per epoch (= batches per rank), computed without building the plan."""
        sizes: dict[str, int] = {}
        for src in self.sources:
            key = src.type if self.batch_by_type else "*"
            sizes[key] = sizes.get(key, 0) + src.weighted_size()
        div = self.global_batch_size * self.accumulation_steps
        if self.last_batch == "drop":
            steps = sum(n // div for n in sizes.values())
        else:
            steps = sum(-(-n // div) for n in sizes.values())
        return steps * self.accumulation_steps

    # ------------------------------------------------------------------------- iteration

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts at its first batch (the same one keeps a loaded position)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._position = 0

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.global_batches()
        if self._position >= len(plan):  # a finished epoch iterated again repeats it
            self._position = 0
        lo = self.rank * self.local_batch_size
        while self._position < len(plan):
            batch = plan[self._position]
            self._position += 1
            yield batch[lo : lo + self.local_batch_size]

    def __len__(self) -> int:
        """Batches the next iteration yields (fewer than an epoch after a mid-epoch resume)."""
        total = self.num_batches_per_epoch()
        return total - self._position if self._position < total else total

    # ------------------------------------------------------------------------- resume

    def _make_fingerprint(self) -> str:
        desc = {
            "sources": [[s.offset, s.size, s.type, s.weight, None if s.lengths is None else sum(s.lengths)]
                        for s in self.sources],
            "options": [self.batch_by_type, self.group_by_length, self.length_window, self.last_batch,
                        self.accumulation_steps],
        }
        return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]

    def state_dict(self, consumed_batches: int | None = None) -> dict[str, Any]:
        """The position to resume from. By default every batch handed out counts as consumed; a DataLoader
        with workers prefetches ahead, so a trainer should pass `consumed_batches`, the number of batches
        of this epoch it has actually trained on."""
        position = self._position if consumed_batches is None else consumed_batches
        if not 0 <= position <= self.num_batches_per_epoch():
            raise SphinxError(f"consumed_batches {position} is outside this epoch "
                              f"(0..{self.num_batches_per_epoch()})")
        return {"version": _STATE_VERSION, "epoch": self.epoch, "position": position, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "fingerprint": self._fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a saved position; the world size may differ, the global batch size and data may not."""
        expected = {"seed": self.seed, "global_batch_size": self.global_batch_size,
                    "fingerprint": self._fingerprint, "version": _STATE_VERSION}
        for key, value in expected.items():
            if key not in state:
                raise SphinxError(f"sampler state lacks {key!r}")
            if state[key] != value:
                what = "the data mixture or sampler options" if key == "fingerprint" else key
                raise SphinxError(f"cannot resume: {what} changed (saved {state[key]!r}, now {value!r})")
        self.epoch = int(state["epoch"])
        self._position = int(state["position"])

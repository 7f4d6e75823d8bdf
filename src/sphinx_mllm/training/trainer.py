"""The training loop: one code path for 1 process, N CPU processes (gloo) and N GPUs (nccl) under torchrun.

One optimizer step = one global batch of `data.batch_size` sequences from the mixture's sampler; each
rank takes its slice and cuts it into micro-batches (gradient accumulation). The loss is the mean over
all answer tokens of the global batch: every micro-batch's summed token loss is divided by the step's
global token count (all-reduced before the first backward) and multiplied by the world size (DDP and
FSDP2 average gradients over ranks), so 1 process with accumulation and N processes give the same update.
Logits are computed only at the positions inside the loss (`logits_to_keep` mask), which skips the LM
head over the hundreds of image tokens.

Randomness is reseeded from (seed, step, rank) at every step, so a resumed run draws what an
uninterrupted one would have drawn.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sphinx_mllm.data.mixture import MixtureDataset
from sphinx_mllm.data.sampler import MixtureBatchSampler
from sphinx_mllm.data.sft import SFTCollator, SFTDataset, answer_token_count
from sphinx_mllm.processing import IGNORE_INDEX, SphinxProcessor
from sphinx_mllm.training import checkpoint as ckpt
from sphinx_mllm.training.adapters import apply_adapters
from sphinx_mllm.training.config import TrainConfig
from sphinx_mllm.training.dist import DistEnv, init_distributed, shutdown
from sphinx_mllm.training.feature_cache import FeatureCache
from sphinx_mllm.training.logs import MetricsLog, TensorBoardLog, TrainCallback, plot_loss_curves, read_metrics
from sphinx_mllm.training.model_setup import (
    base_model,
    build_optimizer,
    enable_activation_checkpointing,
    load_model_and_processor,
    lr_at,
    parallelize,
    select_trainable,
    unwrap_ddp,
)
from sphinx_mllm.utils import SphinxError, atomic_dir, atomic_write_text, get_logger

logger = get_logger(__name__)


@dataclass
class TrainResult:
    """What a run produced (on every rank; paths are written by rank 0)."""

    output_dir: Path
    steps: int
    final_dir: Path | None
    metrics_path: Path
    losses: list[float] = field(default_factory=list)  # per step of this invocation, global mean


@dataclass
class _Interval:
    """Sums since the last metrics record."""

    loss_sum: float = 0.0
    tokens: float = 0.0
    input_tokens: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    tasks: dict[str, list[float]] = field(default_factory=dict)  # this rank's {task: [loss sum, tokens]}


class Trainer:
    """`Trainer(config).fit()`; `callbacks` (rank 0) get `on_start`, `on_step`, `on_end`."""

    def __init__(self, config: TrainConfig, callbacks: Sequence[TrainCallback] = ()) -> None:
        self.config = config
        self.callbacks = list(callbacks)
        self.out = Path(config.run.output_dir)
        self.env: DistEnv = DistEnv()
        self.total_steps = 0
        self._checked_encoders = False

    # ------------------------------------------------------------------------------- setup
    def _build_model(self) -> tuple[nn.Module, SphinxProcessor, FeatureCache | None]:
        cfg = self.config
        if cfg.lora.enabled and (not Path(cfg.model.name).is_dir() or cfg.model.init_from):
            raise SphinxError("lora.enabled needs model.name to be a saved model folder (and no model.init_from): "
                              "an adapter is only usable on top of a base that can be loaded again")
        model, processor = load_model_and_processor(cfg.model, cfg.run.seed)
        cache = None
        if cfg.data.feature_cache:
            cache = FeatureCache(cfg.data.feature_cache)
            cache.check(model)
        trainable = select_trainable(model, cfg)
        if cfg.lora.enabled:
            model = apply_adapters(model, cfg.lora, train_fusion=any(n.startswith("fusion.") for n in trainable))
        if cfg.run.activation_checkpointing:
            enable_activation_checkpointing(model)
        return parallelize(model, cfg.run.parallel, self.env), processor, cache

    def _build_data(self, processor: SphinxProcessor, cache: FeatureCache | None
                    ) -> tuple[SFTDataset, MixtureBatchSampler, SFTCollator]:
        data, env = self.config.data, self.env
        per_rank, rest = divmod(data.batch_size, env.world_size)
        if rest or per_rank % data.micro_batch_size:
            raise SphinxError(f"data.batch_size {data.batch_size} must be a multiple of micro_batch_size x processes "
                              f"= {data.micro_batch_size} x {env.world_size}")
        mixture = MixtureDataset.from_yaml(data.mixture)
        lookup = cache.features_for_image if cache is not None else None
        dataset = SFTDataset(mixture, processor, data.max_length, feature_lookup=lookup)
        sampler = mixture.batch_sampler(data.batch_size, world_size=env.world_size, rank=env.rank,
                                        group_by_length=data.group_by_length)
        if sampler.num_batches_per_epoch() == 0:
            raise SphinxError(f"the mixture {data.mixture} has fewer items per batch type than one global batch "
                              f"({data.batch_size})")
        return dataset, sampler, SFTCollator(processor, data.micro_batch_size)

    def _resume(self, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: MixtureBatchSampler
                ) -> tuple[int, int] | None:
        """Load a checkpoint if asked; returns (step, position in its epoch) or None."""
        run = self.config.run
        path = Path(run.resume_from) if run.resume_from else None
        if path is None and run.resume:
            path = ckpt.latest_checkpoint(self.out / "checkpoints")
            if path is None:
                logger.info("run.resume: no checkpoint in %s yet; starting from step 0", self.out / "checkpoints")
        if path is None:
            return None
        state = ckpt.load_checkpoint(path, model, optimizer)
        sampler.load_state_dict(state["sampler"])
        position = int(state["sampler"]["position"])
        if position >= sampler.num_batches_per_epoch():
            sampler.set_epoch(sampler.epoch + 1)
            position = 0
        return int(state["step"]), position

    # ------------------------------------------------------------------------------- one step
    @staticmethod
    def _sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """Gradient all-reduce only on the last micro-batch of a step (DDP `no_sync`, FSDP2 flag)."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext() if sync else model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
            model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def _forward(self, model: nn.Module, mb: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (summed token loss, per-row loss sums [b], per-row token counts [b])."""
        dev = self.env.device
        labels = mb["labels"].to(dev)
        keep = torch.zeros_like(labels, dtype=torch.bool)  # position t predicts label t + 1
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][keep[:, :-1]]  # [N]
        inputs: dict[str, Any] = {"input_ids": mb["input_ids"].to(dev), "attention_mask": mb["attention_mask"].to(dev),
                                  "logits_to_keep": keep, "use_cache": False}
        if "pixel_values" in mb:
            inputs["pixel_values"] = mb["pixel_values"].to(dev)
        if "encoder_features" in mb:
            inputs["encoder_features"] = {k: v.to(dev) for k, v in mb["encoder_features"].items()}
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.config.run.bf16):
            logits = model(**inputs).logits  # [N, vocab]
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none")  # [N]
        rows = keep.nonzero()[:, 0]
        row_sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=dev)
        row_sums.index_add_(0, rows, token_loss.detach().double())
        return token_loss.sum(), row_sums, keep.sum(dim=1)

    def _step(self, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: list[dict[str, Any]],
              step: int, interval: _Interval) -> dict[str, float]:
        env, run = self.env, self.config.run
        torch.manual_seed((run.seed * 1_000_003 + step) * 1009 + env.rank)
        lr = lr_at(step, self.total_steps, self.config.optim)
        for group in optimizer.param_groups:
            group["lr"] = lr
        local_tokens = sum(answer_token_count(mb["labels"]) for mb in micro_batches)
        global_tokens = env.all_reduce_sum([float(local_tokens)])[0]
        scale = env.world_size / max(global_tokens, 1.0)
        loss_sum, input_tokens = 0.0, 0
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self._sync(model, last):
                summed, row_sums, row_counts = self._forward(model, mb)
                (summed * scale).backward()
            loss_sum += float(summed.detach())
            input_tokens += int(mb["attention_mask"].sum())
            for task, s, c in zip(mb["tasks"], row_sums.tolist(), row_counts.tolist()):
                acc = interval.tasks.setdefault(task, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
        if not self._checked_encoders:
            self._check_frozen_encoders(model)
            self._checked_encoders = True
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.config.optim.grad_clip or float("inf"))
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # the same on every rank
        if math.isfinite(norm):
            optimizer.step()
        else:
            logger.warning("step %d: gradient norm is %s; the update is skipped", step + 1, norm)
        optimizer.zero_grad(set_to_none=True)
        loss_global, inputs_global = env.all_reduce_sum([loss_sum, float(input_tokens)])
        interval.loss_sum += loss_global
        interval.tokens += global_tokens
        interval.input_tokens += inputs_global
        return {"loss": loss_global / max(global_tokens, 1.0), "tokens": global_tokens,
                "input_tokens": inputs_global, "lr": lr, "grad_norm": norm}

    def _check_frozen_encoders(self, model: nn.Module) -> None:
        """Frozen encoders must stay in eval mode and get no gradient, whatever wraps the model."""
        vision = base_model(model).vision
        if vision is None or not vision.frozen:
            return
        if vision.training or any(m.training for m in vision.modules()):
            raise RuntimeError("a frozen vision encoder is in training mode")
        if any(p.requires_grad or p.grad is not None for p in vision.parameters()):
            raise RuntimeError("a frozen vision encoder received gradients")

    # ------------------------------------------------------------------------------- logging
    def _record(self, step: int, epoch: int, last: dict[str, float], interval: _Interval) -> dict[str, Any]:
        """The metrics record of the interval that ends at `step` (collective: all ranks call it)."""
        per_rank = self.env.gather_objects(interval.tasks)
        tasks: dict[str, list[float]] = {}
        for part in per_rank:
            for task, (s, c) in part.items():
                acc = tasks.setdefault(task, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
        elapsed = time.perf_counter() - interval.start
        return {
            "step": step, "epoch": epoch, "loss": interval.loss_sum / max(interval.tokens, 1.0),
            "tokens": int(interval.tokens),
            "task_loss": {t: s / c for t, (s, c) in sorted(tasks.items()) if c > 0},
            "task_tokens": {t: int(c) for t, (s, c) in sorted(tasks.items())},
            "lr": last["lr"], "grad_norm": last["grad_norm"],
            "tokens_per_s": interval.input_tokens / max(elapsed, 1e-9), "elapsed_s": round(elapsed, 4),
        }

    # ------------------------------------------------------------------------------- export
    def _export(self, model: nn.Module, processor: SphinxProcessor) -> Path:
        """Write the final model (or adapter) with save_pretrained, plus the processor, to output_dir/final."""
        final = self.out / "final"
        full_state = None
        if self.config.run.parallel == "fsdp" and self.env.world_size > 1:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.env.is_main:
            target = unwrap_ddp(model)
            with atomic_dir(final, overwrite=True) as tmp:
                if full_state is not None:
                    target.save_pretrained(tmp, state_dict=full_state)
                else:
                    target.save_pretrained(tmp)
                processor.save_pretrained(tmp)
            logger.info("exported the final %s to %s", "adapter" if self.config.lora.enabled else "model", final)
        self.env.barrier()
        return final

    def _save(self, model: nn.Module, optimizer: torch.optim.Optimizer, sampler: MixtureBatchSampler,
              step: int, position: int) -> None:
        state = {"epoch": sampler.epoch, "sampler": sampler.state_dict(consumed_batches=position),
                 "total_steps": self.total_steps}
        ckpt.save_checkpoint(self.out / "checkpoints", step, model, optimizer, state, self.env,
                             self.config.run.keep_last)

    # ------------------------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        self.env = init_distributed(self.config.run.device)
        clean = False
        try:
            result = self._fit()
            clean = True
            return result
        finally:
            shutdown(self.env, clean=clean)

    def _fit(self) -> TrainResult:
        cfg, env = self.config, self.env
        if not (cfg.run.resume or cfg.run.resume_from) and ckpt.list_checkpoints(self.out / "checkpoints"):
            raise SphinxError(f"{self.out} already holds checkpoints of a run: pass --resume to continue it, or "
                              "choose another run.output_dir")
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", cfg.to_yaml())
        model, processor, cache = self._build_model()
        optimizer = build_optimizer(model, cfg.optim)
        dataset, sampler, collator = self._build_data(processor, cache)
        per_epoch = sampler.num_batches_per_epoch()
        self.total_steps = cfg.run.max_steps or cfg.run.epochs * per_epoch
        resumed = self._resume(model, optimizer, sampler)
        step, position = resumed if resumed is not None else (0, 0)
        metrics_path = self.out / "metrics.jsonl"
        log = MetricsLog(metrics_path, resume_step=step if resumed else None) if env.is_main else None
        board = TensorBoardLog(self.out / "tensorboard") if env.is_main and cfg.run.tensorboard else None
        logger.info("training %d steps (%d per epoch) from step %d on %d process(es), %s, global batch %d",
                    self.total_steps, per_epoch, step, env.world_size, env.device, cfg.data.batch_size)
        for cb in self.callbacks if env.is_main else ():
            cb.on_start(step, self.total_steps)
        losses = self._loop(model, optimizer, dataset, sampler, collator, step, position, log, board)
        final = self._export(model, processor)
        if env.is_main:
            assert log is not None
            log.close()
            if board is not None:
                board.close()
            plot_loss_curves(read_metrics(metrics_path), self.out / "loss_curves.png", title=str(self.out.name))
            for cb in self.callbacks:
                cb.on_end()
        del model, optimizer  # before the barrier in shutdown: the exit-abort workaround
        return TrainResult(self.out, self.total_steps, final, metrics_path, losses)

    def _loop(self, model: nn.Module, optimizer: torch.optim.Optimizer, dataset: SFTDataset,
              sampler: MixtureBatchSampler, collator: SFTCollator, step: int, position: int,
              log: MetricsLog | None, board: TensorBoardLog | None) -> list[float]:
        cfg, env = self.config, self.env
        model.train()
        losses: list[float] = []
        interval = _Interval()
        while step < self.total_steps:
            loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collator,
                                num_workers=cfg.data.num_workers, pin_memory=env.device.type == "cuda")
            for micro_batches in loader:
                last = self._step(model, optimizer, micro_batches, step, interval)
                step += 1
                position += 1
                losses.append(last["loss"])
                if step % cfg.run.log_every == 0 or step == self.total_steps:
                    record = self._record(step, sampler.epoch, last, interval)
                    if log is not None:
                        log.write(record)
                    if board is not None:
                        board.write(record)
                    interval = _Interval()
                for cb in self.callbacks if env.is_main else ():
                    cb.on_step(step, last)
                if cfg.run.save_every and (step % cfg.run.save_every == 0 or step == self.total_steps):
                    self._save(model, optimizer, sampler, step, position)
                if step >= self.total_steps:
                    break
            else:
                sampler.set_epoch(sampler.epoch + 1)
                position = 0
        return losses


def train(config: TrainConfig, callbacks: Sequence[TrainCallback] = ()) -> TrainResult:
    """Run one training job (see `Trainer`)."""
    return Trainer(config, callbacks).fit()


__all__ = ["TrainResult", "Trainer", "train"]

"""Everything done to the single-device model from outside before training: building or loading it, the
stage's trainable set, adapters, activation checkpointing, DDP / FSDP2 wrapping, the optimizer and the
learning-rate schedule. The model code itself stays plain (ARCHITECTURE.md: parallelism from outside).
"""

from __future__ import annotations

import fnmatch
import math
from pathlib import Path

import torch
from torch import nn

from sphinx_mllm.config import SphinxConfig, available_presets
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import SphinxProcessor, load_tokenizer
from sphinx_mllm.training.config import ModelSection, OptimSection, TrainConfig
from sphinx_mllm.training.dist import DistEnv
from sphinx_mllm.utils import SphinxError, get_logger

logger = get_logger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Parameter-name patterns each stage trains (SPHINX.md section 9); encoders are never trainable here.
STAGE_TRAINABLE: dict[str, tuple[str, ...]] = {
    "pretrain": ("language_model.*", "fusion.*"),
    "finetune": ("language_model.*", "fusion.*"),
    "projector": ("fusion.*",),
}
NO_DECAY_NAMES = ("start_img", "end_img")


# ----------------------------------------------------------------------------------- model, processor

def load_model(section: ModelSection, seed: int) -> SphinxForConditionalGeneration:
    """A preset (random init under `seed`) or a pretrained folder; then `init_from`; then `dtype`."""
    folder = Path(section.name)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise SphinxError(f"model.name {folder} is a folder without config.json (not a saved model)")
        model = SphinxForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    elif section.name in available_presets():
        torch.manual_seed(seed)
        model = SphinxForConditionalGeneration(SphinxConfig.from_preset(section.name))
    else:
        raise SphinxError(f"model.name {section.name!r} is neither a folder nor a preset "
                          f"(presets: {', '.join(available_presets())})")
    if section.init_from is not None:
        load_weights(model, section.init_from)
    return model.to(DTYPES[section.dtype])


def load_processor(section: ModelSection, config: SphinxConfig) -> SphinxProcessor:
    """The saved folder's processor, or one built from the config and `model.tokenizer`."""
    if section.tokenizer is not None:
        return SphinxProcessor.from_config(config, load_tokenizer(section.tokenizer))
    if Path(section.name).is_dir():
        return SphinxProcessor.from_pretrained(section.name)
    raise SphinxError(f"model.tokenizer is required with the preset {section.name!r} "
                      "(a tokenizer folder or tokenizer.model)")


def load_model_and_processor(section: ModelSection, seed: int) -> tuple[SphinxForConditionalGeneration,
                                                                        SphinxProcessor]:
    """`load_model` and `load_processor` (a preset without a tokenizer fails before building anything)."""
    if section.tokenizer is None and not Path(section.name).is_dir() and section.name in available_presets():
        raise SphinxError(f"model.tokenizer is required with the preset {section.name!r} "
                          "(a tokenizer folder or tokenizer.model)")
    model = load_model(section, seed)
    return model, load_processor(section, model.config)


def load_weights(model: nn.Module, folder: str | Path) -> None:
    """Replace every weight of `model` by those of a saved model folder; keys and shapes must match exactly.

    The folder is read through `from_pretrained`, which undoes transformers' on-disk key renames and reads
    the other layouts registered with the model (release folders).
    """
    if not (Path(folder) / "config.json").is_file():
        raise SphinxError(f"model.init_from {folder} is not a saved model folder (no config.json)")
    state = SphinxForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).state_dict()
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        raise SphinxError(f"model.init_from {folder} does not fit the model: missing {missing[:10]} "
                          f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)}), "
                          f"shape mismatches {shapes[:10]} ({len(shapes)})")
    model.load_state_dict(state, strict=True)
    if getattr(model, "vision", None) is not None:
        model.vision.apply_freeze()
    logger.info("initialised all %d tensors from %s", len(state), folder)


# ----------------------------------------------------------------------------------- trainable set

def select_trainable(model: SphinxForConditionalGeneration, config: TrainConfig) -> list[str]:
    """Set requires_grad by the stage, then `trainable` (added) and `frozen` (removed) patterns.

    Returns the trainable names. Patterns must each match some parameter; encoders stay frozen.
    """
    names = [n for n, _ in model.named_parameters()]
    for pattern in (*config.trainable, *config.frozen):
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise SphinxError(f"parameter pattern {pattern!r} matches no parameter (names look like {names[-1]!r})")
    chosen = []
    for name, param in model.named_parameters():
        on = any(fnmatch.fnmatchcase(name, p) for p in (*STAGE_TRAINABLE[config.stage], *config.trainable))
        on = on and not any(fnmatch.fnmatchcase(name, p) for p in config.frozen)
        if on and name.startswith("vision.") and model.config.freeze_encoders:
            raise SphinxError(f"parameter {name!r} belongs to a frozen encoder; encoders do not train here "
                              "(the model config has freeze_encoders=true)")
        param.requires_grad_(on)
        if on:
            chosen.append(name)
    if not chosen:
        raise SphinxError("no parameter is trainable with this stage and these patterns")
    if config.lora.enabled and any(n.startswith("language_model.") for n in config.trainable):
        raise SphinxError("with lora.enabled the LLM trains through adapters; remove LLM names from `trainable`")
    return chosen


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each LLM decoder block in the backward pass (transformers' non-reentrant checkpointing)."""
    llm = base_model(model).language_model
    llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def base_model(model: nn.Module) -> SphinxForConditionalGeneration:
    """The SPHINX model inside DDP and peft wrappers (FSDP2 keeps the module itself)."""
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    if not isinstance(inner, SphinxForConditionalGeneration):
        raise TypeError(f"expected a SPHINX model inside the wrappers, found {type(inner).__name__}")
    return inner


def unwrap_ddp(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------- parallelism

def parallelize(model: nn.Module, mode: str, env: DistEnv) -> nn.Module:
    """DDP, or FSDP2 (`fully_shard` per LLM decoder layer, per vision encoder, then the root)."""
    model.to(env.device)
    if env.world_size == 1 or mode == "none":
        if env.world_size > 1:
            raise SphinxError(f"run.parallel is 'none' but {env.world_size} processes were started")
        return model
    if mode == "ddp":
        ids = [env.device.index] if env.device.type == "cuda" else None
        # Unused parameters are normal here: a text-only micro-batch never reaches the fusion.
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    sphinx = base_model(model)
    layer_classes = tuple(getattr(sphinx.language_model, "_no_split_modules", None) or ())
    units = [m for m in sphinx.language_model.modules() if type(m).__name__ in layer_classes]
    if not units:
        raise SphinxError(f"FSDP: found no decoder layers ({layer_classes}) in the LLM")
    if sphinx.vision is not None:
        units += list(sphinx.vision.encoders.values())
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ----------------------------------------------------------------------------------- optimizer, schedule

def build_optimizer(model: nn.Module, optim: OptimSection) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases, norms (ndim < 2) and start/end vectors."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or name.endswith(NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=optim.lr, betas=optim.betas, eps=optim.eps)


def warmup_steps(optim: OptimSection, total_steps: int) -> int:
    return optim.warmup_steps if optim.warmup_steps else int(optim.warmup_ratio * total_steps)


def lr_at(step: int, total_steps: int, optim: OptimSection) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then a half-cosine to lr * min_lr_ratio."""
    warm = warmup_steps(optim, total_steps)
    if step < warm:
        return optim.lr * (step + 1) / warm
    span = max(total_steps - warm, 1)
    progress = min((step - warm) / span, 1.0)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = [
    "STAGE_TRAINABLE", "base_model", "build_optimizer", "enable_activation_checkpointing", "load_model",
    "load_model_and_processor", "load_processor", "load_weights", "lr_at", "parallelize", "select_trainable",
    "unwrap_ddp", "warmup_steps",
]

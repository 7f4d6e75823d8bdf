"""The training config: one typed tree of dataclasses read from YAML, with dotted command-line overrides.

    model:  {name, tokenizer, init_from, dtype}
    data:   {mixture, batch_size, micro_batch_size, max_length, feature_cache, num_workers, group_by_length}
    optim:  {lr, betas, eps, weight_decay, warmup_steps, warmup_ratio, min_lr_ratio, grad_clip}
    stage:  pretrain | finetune | projector       trainable: [patterns]   frozen: [patterns]
    lora:   {enabled, r, alpha, dropout, target_modules, bias_only}
    run:    {output_dir, max_steps, epochs, save_every, keep_last, log_every, seed, resume, resume_from,
             activation_checkpointing, bf16, parallel, device, tensorboard}

Unknown keys are errors naming the dotted key; values are checked against the field's type (YAML gives
`1e-4` as a string, so numbers are also read from strings). `--optim.lr 1e-4` style overrides are parsed
with the same rules. `data.batch_size` is the GLOBAL batch of one optimizer step; gradient accumulation
is derived from it (`batch_size / (micro_batch_size * world_size)`), so the same config means the same
optimisation on any number of processes.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sphinx_mllm.utils import SphinxError, read_yaml

Stage = Literal["pretrain", "finetune", "projector"]
Parallel = Literal["none", "ddp", "fsdp"]

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelSection:
    name: str = "debug"  # a preset name, or a folder written by save_pretrained (or a previous run's final/)
    tokenizer: str | None = None  # folder or tokenizer.model; required with a preset, optional with a folder
    init_from: str | None = None  # a save_pretrained folder whose weights replace the initial ones (all keys)
    dtype: Literal["float32", "bfloat16"] = "float32"  # parameter dtype; float32 = fp32 master weights


@dataclass
class DataSection:
    mixture: str = ""  # mixture YAML (sphinx_mllm.data.mixture)
    batch_size: int = 8  # global batch of one optimizer step, over all ranks and accumulation
    micro_batch_size: int = 1  # sequences per forward pass on one rank
    max_length: int = 2048  # tokens per sequence, image placeholders included; longer ones are cut
    feature_cache: str | None = None  # folder from `sphinx-mllm cache-features`: skip the frozen encoders
    num_workers: int = 0  # DataLoader worker processes per rank
    group_by_length: bool = True  # batch items of similar length (the release does)

    def __post_init__(self) -> None:
        for key in ("batch_size", "micro_batch_size", "max_length"):
            if getattr(self, key) < 1:
                raise SphinxError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.num_workers < 0:
            raise SphinxError(f"data.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class OptimSection:
    lr: float = 2e-5  # the release's fine-tune lr
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0  # never on biases, norms or the start/end vectors
    warmup_steps: int = 0  # linear warm-up; if 0, `warmup_ratio` of the run's steps
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # the half-cosine ends at lr * min_lr_ratio
    grad_clip: float = 8.0  # max global grad norm; 0 disables clipping (the norm is still logged)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise SphinxError(f"optim.lr must be > 0, got {self.lr}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise SphinxError(f"optim.betas must be in [0, 1), got {self.betas}")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise SphinxError("optim.weight_decay, optim.grad_clip and optim.warmup_steps must be >= 0")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise SphinxError("optim.warmup_ratio must be in [0, 1) and optim.min_lr_ratio in [0, 1]")


@dataclass
class LoraSection:
    enabled: bool = False  # train the LLM through peft adapters instead of in full
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))  # LLM linear names
    bias_only: bool = False  # no LoRA matrices: tune only the LLM's bias-like parameters (its norm gains)

    def __post_init__(self) -> None:
        if self.r < 1 or self.alpha < 1:
            raise SphinxError(f"lora.r and lora.alpha must be >= 1, got {self.r}, {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise SphinxError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise SphinxError("lora.target_modules must not be empty")


@dataclass
class RunSection:
    output_dir: str = ""  # metrics, checkpoints/, final/ go here
    max_steps: int = 0  # optimizer steps; 0: `epochs` whole epochs
    epochs: int = 1
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_last: int = 2  # complete checkpoints kept
    log_every: int = 10  # steps per metrics record
    seed: int = 0  # model init and per-step randomness; data order comes from the mixture's seed
    resume: bool = False  # continue from the latest complete checkpoint in output_dir/checkpoints
    resume_from: str | None = None  # or from this checkpoint folder (any world size)
    activation_checkpointing: bool = False  # recompute each LLM block in the backward pass
    bf16: bool = False  # bf16 autocast; parameters and optimizer state stay in model.dtype
    parallel: Parallel = "ddp"  # how several processes share the work: ddp, fsdp (FSDP2), none (1 process)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    tensorboard: bool = False  # also write TensorBoard events if the package is installed

    def __post_init__(self) -> None:
        if self.max_steps < 0 or self.epochs < 1:
            raise SphinxError(f"run.max_steps must be >= 0 and run.epochs >= 1, got {self.max_steps}, {self.epochs}")
        if self.save_every < 0 or self.keep_last < 1 or self.log_every < 1:
            raise SphinxError("run.save_every must be >= 0, run.keep_last and run.log_every >= 1")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    stage: Stage = "finetune"  # pretrain / finetune: LLM + projections + start/end; projector: the latter only
    trainable: list[str] = field(default_factory=list)  # extra trainable parameter-name patterns (fnmatch)
    frozen: list[str] = field(default_factory=list)  # parameter-name patterns frozen after the stage's choice
    lora: LoraSection = field(default_factory=LoraSection)
    run: RunSection = field(default_factory=RunSection)

    def __post_init__(self) -> None:
        if not self.data.mixture:
            raise SphinxError("data.mixture is required (a mixture YAML)")
        if not self.run.output_dir:
            raise SphinxError("run.output_dir is required")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------- parsing

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` (from YAML or a command-line string) as type `tp`, or a SphinxError naming `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~"))
        if is_none and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise SphinxError(f"{key}: must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise SphinxError(f"{key}: expected a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise SphinxError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return [_coerce(v, args[0], key) for v in value]
    return _coerce_scalar(value, tp, key)


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config field type {tp!r} at {key}")
    raise SphinxError(f"{key}: expected {tp.__name__}, got {value!r}")


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from a mapping; unknown keys and bad values are errors naming the key."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SphinxError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise SphinxError(f"unknown config key {dotted!r} (allowed in {where}: {', '.join(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = build_dataclass(tp, value, dotted)
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`["--optim.lr", "1e-4", "--run.bf16=true", "--resume"]` -> {"optim.lr": "1e-4", "run.bf16": "true",
    "run.resume": "true"}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise SphinxError(f"unexpected argument {arg!r}; overrides look like --section.key VALUE")
        key = arg[2:]
        if key == "resume":
            out["run.resume"] = "true"
            i += 1
            continue
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise SphinxError(f"override {arg} has no value")
            value = args[i + 1]
            i += 2
        out[key.replace("-", "_")] = value
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: str) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise SphinxError(f"override {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _deep_update(tree: dict[str, Any], new: dict[str, Any]) -> None:
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            _deep_update(tree[key], value)
        else:
            tree[key] = value


def load_config(path: str | Path | None = None, overrides: dict[str, str] | None = None,
                base: dict[str, Any] | None = None) -> TrainConfig:
    """Read a training YAML (or start from `base`), apply dotted overrides, validate.

    Relative paths inside the YAML (`data.mixture`, `data.feature_cache`, `model.*`, `run.*` folders) stay
    relative to the working directory, as with every command-line tool.
    """
    tree: dict[str, Any] = copy.deepcopy(base or {})
    if path is not None:
        loaded = read_yaml(path, "training config")
        _deep_update(tree, loaded or {})
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    return build_dataclass(TrainConfig, tree)


__all__ = [
    "DEFAULT_LORA_TARGETS", "DataSection", "LoraSection", "ModelSection", "OptimSection", "RunSection",
    "TrainConfig", "build_dataclass", "load_config", "parse_overrides",
]

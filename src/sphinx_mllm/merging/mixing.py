"""Streaming weight mixing: `mix(MixConfig)` reads the inputs one tensor at a time, merges the tensors the
module policy selects with a registered method, copies the others, and writes sharded safetensors.

Order of work: open the inputs; check that names and shapes agree (every problem listed); decide each
tensor's fate (`policy.ModulePolicy`); read the kept tensors (encoders) once to check that they are identical;
only then write. Peak memory is a few copies of the largest tensor (the inputs' tensors of one name, their
fp32 versions and the result), whatever the model or shard size. A sweep (`sweep: "0:1:0.1"`) writes one model
per value of the method's scalar (`beta` for linear, `t` for slerp) from a single pass over the inputs.

Outputs: a folder per model holding the shards, copies of the first model's non-weight files (config.json,
tokenizer/processor files, or the release's config.json/meta.json/tokenizer.model) and `mix_info.json` (what
was done). The output folder appears complete or not at all (`utils.atomic_dir`); for a sweep, the whole
sweep folder is one atomic unit. Release (`.pth`) inputs keep their release tensor names (`llma.*`) in the
safetensors output: no key conversion is made here (for a Hugging Face-format result, convert each release
folder with `sphinx_mllm.formats` first, then mix the converted folders).

The YAML form (`MixConfig.from_yaml`) takes the same fields as the CLI's options; unknown keys are errors and
relative paths are relative to the working directory (as in the training configs).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from sphinx_mllm.merging.methods import get_method
from sphinx_mllm.merging.policy import (
    ACTIONS,
    KEEP,
    MIX,
    ModulePolicy,
    check_compatible,
    describe_differences,
    find_differences,
    module_of,
)
from sphinx_mllm.merging.sources import TensorSource, open_source
from sphinx_mllm.merging.writer import ShardedWriter, TensorSpec, parse_size
from sphinx_mllm.utils import SphinxError, atomic_dir, atomic_write_text, get_logger, read_yaml

logger = get_logger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARAM_FIELDS = ("beta", "t", "weights", "density", "seed", "combine")
INFO_NAME = "mix_info.json"

# Progress callback: (stage, bytes just done, total bytes of the stage).
Progress = Callable[[str, int, int], None]


def sweep_values(spec: str) -> list[float]:
    """`"start:stop:step"` -> the values from start to stop inclusive (`"0:1:0.25"` -> 0, 0.25, 0.5, 0.75, 1)."""
    try:
        start, stop, step = (float(x) for x in spec.split(":"))
    except ValueError:
        raise SphinxError(f"bad sweep {spec!r}: expected start:stop:step, e.g. 0:1:0.1") from None
    if step <= 0 or stop < start:
        raise SphinxError(f"bad sweep {spec!r}: need step > 0 and start <= stop")
    count = int((stop - start) / step + 1e-9) + 1
    if count > 1000:
        raise SphinxError(f"bad sweep {spec!r}: {count} models is too many")
    return [round(start + i * step, 10) for i in range(count)]


def sweep_folder_names(param: str, values: Sequence[float]) -> list[str]:
    """`beta_0.30`-style names, with more decimals only when two values would share a name."""
    for decimals in range(2, 11):
        names = [f"{param}_{v:.{decimals}f}" for v in values]
        if len(set(names)) == len(names):
            return names
    raise SphinxError(f"sweep values are not distinct: {values}")


@dataclass(frozen=True)
class MixConfig:
    """Every option of a mix (CLI flags and YAML keys have these names, `-` for `_` on the command line)."""

    models: tuple[str, ...]  # the models to merge, in order (A, B, ...)
    output: str  # the output folder (for a sweep: the folder that holds one folder per value)
    method: str = "linear"  # linear | slerp | task_arithmetic | ties | dare
    base: str | None = None  # the base model of task_arithmetic / ties / dare
    beta: float | None = None  # linear: weight of the first model
    t: float | None = None  # slerp: 0 gives the first model, 1 the second
    weights: tuple[float, ...] | None = None  # task_arithmetic / ties / dare: one per model (default 1 each)
    density: float | None = None  # ties: fraction kept by magnitude; dare: keep probability
    seed: int | None = None  # dare: seed of the drop masks (default 0)
    combine: str | None = None  # dare: "linear" (default) or "ties"
    include: tuple[str, ...] = ()  # glob patterns added to the mixed set
    exclude: tuple[str, ...] = ()  # glob patterns copied from the first model unchecked
    allow_encoder_mismatch: bool = False  # kept tensors that differ are taken from the first model
    dtype: str | None = None  # output dtype of float tensors (default: the first model's)
    max_shard_size: str = "5GB"
    sweep: str | None = None  # "start:stop:step" over the method's scalar
    eval: str | None = None  # benchmark to score each sweep value with (scored by `sphinx-mllm mix`, the CLI)
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.eval is not None and self.sweep is None:
            raise SphinxError("--eval / 'eval' scores the models of a sweep; give --sweep too")
        method = get_method(self.method)
        n = len(self.models)
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                    else f"at least {method.min_models}")
            raise SphinxError(f"method {self.method!r} takes {want} models, got {n}")
        if method.needs_base and self.base is None:
            raise SphinxError(f"method {self.method!r} needs a base model (--base)")
        if not method.needs_base and self.base is not None:
            raise SphinxError(f"method {self.method!r} does not use a base model")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SphinxError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        parse_size(self.max_shard_size)
        if self.sweep is not None:
            if method.sweep_param is None:
                raise SphinxError(f"method {self.method!r} has no scalar to sweep (linear sweeps beta, slerp t)")
            if method.sweep_param in self.given_params():
                raise SphinxError(f"give either a sweep or {method.sweep_param}, not both")
        for params in self.output_params():
            method.resolve_params(params, n)
        paths = {os.path.realpath(p) for p in (*self.models, *([self.base] if self.base else []))}
        if os.path.realpath(self.output) in paths:
            raise SphinxError(f"the output {self.output} is one of the inputs")

    def given_params(self) -> dict[str, Any]:
        """The method parameters that were set."""
        return {k: getattr(self, k) for k in PARAM_FIELDS if getattr(self, k) is not None}

    def output_params(self) -> list[dict[str, Any]]:
        """The parameters of each output model (one, or one per sweep value)."""
        if self.sweep is None:
            return [self.given_params()]
        param = get_method(self.method).sweep_param
        assert param is not None
        return [{**self.given_params(), param: v} for v in sweep_values(self.sweep)]

    def output_folders(self) -> list[str]:
        """Each output model's folder relative to `output` ("." for a single model)."""
        if self.sweep is None:
            return ["."]
        param = get_method(self.method).sweep_param
        assert param is not None
        return sweep_folder_names(param, sweep_values(self.sweep))

    def policy(self) -> ModulePolicy:
        return ModulePolicy(include=self.include, exclude=self.exclude,
                            allow_encoder_mismatch=self.allow_encoder_mismatch)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> MixConfig:
        """Read a YAML mix config; `overrides` (e.g. flags given on the command line) replace its values."""
        path = Path(path)
        data = read_yaml(path, "mix config")
        if data is None:
            raise SphinxError(f"mix config {path}: empty")
        return cls.from_dict({**data, **(overrides or {})}, origin=f"mix config {path}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], origin: str = "mix config") -> MixConfig:
        """A validated config from plain values; every type is checked and unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise SphinxError(f"{origin}: unknown keys {unknown} (allowed: {', '.join(sorted(known))})")
        for key in ("models", "output"):
            if data.get(key) is None:
                raise SphinxError(f"{origin}: {key!r} is required")
        values = {key: _check_type(key, value, origin) for key, value in data.items()}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


_STR_LIST = ("models", "include", "exclude")
_OPT_STR = ("base", "combine", "dtype", "sweep", "eval")
_OPT_FLOAT = ("beta", "t", "density")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_type(key: str, value: Any, origin: str) -> Any:
    """The value converted to its field's type, or a SphinxError naming the key."""
    def bad(kind: str) -> SphinxError:
        return SphinxError(f"{origin}: {key!r} must be {kind}, got {value!r}")

    if key in _STR_LIST:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if key in ("output", "method"):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if key in _OPT_STR:
        if value is not None and not isinstance(value, str):
            raise bad("a string")
        return value
    if key in _OPT_FLOAT:
        if value is not None and not _is_number(value):
            raise bad("a number")
        return None if value is None else float(value)
    if key == "weights":
        if value is not None and (not isinstance(value, list | tuple) or not all(_is_number(v) for v in value)):
            raise bad("a list of numbers")
        return None if value is None else tuple(float(v) for v in value)
    if key == "seed":
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise bad("an integer")
        return value
    if key == "max_shard_size":
        if not isinstance(value, str) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise bad("a size such as 5GB")
        return str(value)
    if key in ("allow_encoder_mismatch", "overwrite"):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    raise AssertionError(f"unhandled field {key}")


@dataclass
class MixReport:
    """What a mix did: per-action tensor counts (`policy.ACTIONS`), the outputs and their sizes."""

    outputs: list[Path]
    method: str
    params: list[dict[str, Any]]
    total: int
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))
    modules: dict[str, dict[str, int]] = field(default_factory=dict)  # action -> {module: tensors}
    differing_kept: list[str] = field(default_factory=list)
    metadata_files: list[str] = field(default_factory=list)
    bytes_per_output: int = 0
    shards_per_output: int = 0

    def summary(self) -> str:
        lines = [f"{self.method}: {len(self.outputs)} output model(s), {self.total} tensors each input"]
        for action in ACTIONS:
            mods = self.modules.get(action, {})
            detail = ": " + ", ".join(f"{m} ({n})" for m, n in mods.items()) if mods else ""
            lines.append(f"  {self.counts[action]:6d} {action}{detail}")
        if self.differing_kept:
            lines.append(f"  ({len(self.differing_kept)} kept tensors differed and were taken from the first model)")
        lines.append(f"  {self.bytes_per_output / 1e9:.3f} GB in {self.shards_per_output} shard(s) per output; "
                     f"copied files: {', '.join(self.metadata_files) or 'none'}")
        lines += [f"  -> {path}" for path in self.outputs]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "total": self.total, "counts": self.counts,
                "modules": self.modules,
                "differing_kept": self.differing_kept, "metadata_files": self.metadata_files,
                "bytes_per_output": self.bytes_per_output, "outputs": [str(p) for p in self.outputs]}


def _open_sources(config: MixConfig, stack: ExitStack) -> dict[str, TensorSource]:
    """Inputs named A, B, C... and `base`."""
    sources: dict[str, TensorSource] = {}
    for i, path in enumerate(config.models):
        sources[chr(ord("A") + i) if i < 26 else f"model{i}"] = stack.enter_context(open_source(path))
    if config.base is not None:
        sources["base"] = stack.enter_context(open_source(config.base))
    return sources


def _out_dtype(config: MixConfig, dtype: torch.dtype) -> torch.dtype:
    return DTYPES[config.dtype] if config.dtype is not None and dtype.is_floating_point else dtype


def _bytes(source: TensorSource, key: str) -> int:
    return int(torch.Size(source.shape(key)).numel()) * torch.empty((), dtype=source.dtype(key)).element_size()


def _check_kept(config: MixConfig, sources: Mapping[str, TensorSource], kept: Sequence[str],
                progress: Progress | None) -> list[str]:
    """Names of kept tensors that differ between inputs; an error listing all of them unless allowed."""
    first = next(iter(sources.values()))
    total = sum(_bytes(first, k) for k in kept)
    tick = (lambda n: progress("checking kept tensors", n, total)) if progress else None
    differ = find_differences(sources, kept, tick)
    if differ and not config.allow_encoder_mismatch:
        raise SphinxError(f"{len(differ)} tensors that are not mixed (encoders, non-float or unmatched tensors) "
                          "differ between the inputs; mix them with --include, take them from the first model "
                          "with --allow-encoder-mismatch, or --exclude them:\n  " + describe_differences(differ))
    if differ:
        logger.warning("%d kept tensors differ; taken from the first model", len(differ))
    return differ


def _stream(config: MixConfig, sources: Mapping[str, TensorSource], keys: Sequence[str], actions: Mapping[str, str],
            writers: Sequence[ShardedWriter], progress: Progress | None) -> dict[str, int]:
    """The single pass: per name, read the inputs, merge (once per output) or copy, write."""
    method = get_method(config.method)
    models = [src for name, src in sources.items() if name != "base"]
    base = sources.get("base")
    params = [method.resolve_params(p, len(models)) for p in config.output_params()]
    first = models[0]
    total = sum(_bytes(first, k) for k in keys)
    counts = dict.fromkeys(ACTIONS, 0)
    for key in keys:
        dtype = _out_dtype(config, first.dtype(key))
        if actions[key] == MIX:
            tensors = [m.get(key) for m in models]
            base_tensor = base.get(key) if base is not None else None
            for writer, p in zip(writers, params):
                writer.write(key, method.merge(tensors, base_tensor, p, key).to(dtype))
            del tensors, base_tensor
        else:
            tensor = first.get(key).to(dtype)
            for writer in writers:
                writer.write(key, tensor)
            del tensor
        counts[actions[key]] += 1
        if progress is not None:
            progress("mixing", _bytes(first, key), total)
    return counts


def _check_complete(sources: Mapping[str, TensorSource], counts: Mapping[str, int],
                    writers: Sequence[ShardedWriter]) -> None:
    """Every input tensor went somewhere: the per-action counts add up to each input's tensors, and every
    output received each input name exactly once."""
    for name, src in sources.items():
        keys = set(src.keys())
        handled = sum(counts.values())
        for writer in writers:
            lost, extra = sorted(keys - set(writer.written)), sorted(set(writer.written) - keys)
            if handled != len(keys) or lost or extra or len(writer.written) != len(keys):
                raise SphinxError(f"completeness check failed for input {name} ({src.path}) -> {writer.folder}: "
                                  f"{len(keys)} tensors, {handled} handled, {len(writer.written)} written; "
                                  f"not written: {lost}; unexpected: {extra}")


def _modules(actions: Mapping[str, str]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for key, action in actions.items():
        mods = out.setdefault(action, {})
        mods[module_of(key)] = mods.get(module_of(key), 0) + 1
    return {action: dict(sorted(mods.items())) for action, mods in out.items()}


def _finish_output(folder: Path, first: TensorSource, info: dict[str, Any]) -> list[str]:
    copied = []
    for path in first.metadata_files():
        shutil.copy2(path, folder / path.name)
        copied.append(path.name)
    atomic_write_text(folder / INFO_NAME, json.dumps(info, indent=2) + "\n")
    return copied


def mix(config: MixConfig, progress: Progress | None = None) -> MixReport:
    """Run a mix (or a sweep) as configured; returns what was done. Raises SphinxError on bad input, before
    anything is written when the inputs disagree."""
    with ExitStack() as stack:
        sources = _open_sources(config, stack)
        keys = check_compatible(sources)
        first = sources["A"]
        policy = config.policy()
        unused = policy.unused_patterns(keys)
        if unused:
            raise SphinxError(f"include/exclude patterns that match no tensor: {unused}")
        actions = {k: policy.action(k, first.dtype(k)) for k in keys}
        differ = _check_kept(config, sources, [k for k in keys if actions[k] == KEEP], progress)
        specs = [TensorSpec(k, _out_dtype(config, first.dtype(k)), tuple(first.shape(k))) for k in keys]
        max_bytes = parse_size(config.max_shard_size)
        root = stack.enter_context(atomic_dir(config.output, overwrite=config.overwrite))
        folders = [root / name for name in config.output_folders()]
        writers = []
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            writers.append(ShardedWriter(folder, specs, max_bytes))
        try:
            counts = _stream(config, sources, keys, actions, writers, progress)
            for writer in writers:
                writer.finish()
        finally:
            for writer in writers:
                writer.abort()
        _check_complete(sources, counts, writers)
        final = Path(config.output)
        report = MixReport(outputs=[final / name if name != "." else final for name in config.output_folders()],
                           method=config.method, params=config.output_params(), total=len(keys), counts=counts,
                           modules=_modules(actions), differing_kept=differ, bytes_per_output=writers[0].bytes_written,
                           shards_per_output=len(writers[0].shards))
        for folder, params in zip(folders, report.params):
            info = {"method": config.method, "params": params, "models": list(config.models), "base": config.base,
                    "include": list(config.include), "exclude": list(config.exclude),
                    "allow_encoder_mismatch": config.allow_encoder_mismatch, "counts": counts,
                    "differing_kept": differ}
            report.metadata_files = _finish_output(folder, first, info)
    logger.debug("mix done: %s", ", ".join(f"{n} {a}" for a, n in counts.items()))
    return report

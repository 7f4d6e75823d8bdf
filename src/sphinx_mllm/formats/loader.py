"""Release folder -> `SphinxForConditionalGeneration`, one tensor at a time.

The model is built on the meta device (no memory), every release key is checked against the key map
before any data is read (missing, unexpected and mis-shaped tensors are all listed, then the load fails),
and each tensor is merged across shards, converted and assigned in place (a tensor merged for the load
becomes the parameter itself, without a second copy). The shards are memory-mapped, and mapped pages count
as resident memory until they are unmapped, so the checkpoint is reopened whenever about half a shard of
data has been read since it was opened (the maps of what was already copied go): peak memory stays near one
model plus half a shard (or the largest tensor, if bigger), not the model twice.

The config comes from our extra file `sphinx_mllm.json` when the folder has one (written by
`save_release`, so models whose encoders are not the release's read back exactly), else from the preset
of the folder's `llama_type`; `config.json` (the release's LLM args) must agree with it.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as hf_init

from sphinx_mllm.config import RELEASE_LLAMA_TYPES, SphinxConfig
from sphinx_mllm.formats.keymap import Rule, build_plan, is_known_leftover
from sphinx_mllm.formats.release import ReleaseCheckpoint, split_kind
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

logger = get_logger(__name__)

EXTRA_CONFIG_FILE = "sphinx_mllm.json"  # our full SphinxConfig, beside the release's files
Progress = Callable[[int, int], None]  # (done, total)
_MAX_LISTED = 50


# ---- config --------------------------------------------------------------------------------------
def preset_for_llama_type(llama_type: str) -> str:
    by_type = {t: p for p, t in RELEASE_LLAMA_TYPES.items()}
    if llama_type not in by_type:
        raise SphinxError(f"unknown llama_type {llama_type!r} in meta.json; SPHINX variants: {sorted(by_type)}")
    return by_type[llama_type]


def release_config(folder: str | Path, llama_type: str, llm_args: dict[str, Any]) -> SphinxConfig:
    """Our config for a release folder (extra file, else the llama_type's preset), checked against `config.json`."""
    extra = Path(folder) / EXTRA_CONFIG_FILE
    if extra.is_file():
        try:
            config = SphinxConfig.from_dict(json.loads(extra.read_text()))
        except ValueError as exc:
            raise SphinxError(f"{extra}: not a valid SphinxConfig ({exc})") from None
    else:
        config = SphinxConfig.from_preset(preset_for_llama_type(llama_type))
    check_llm_args(config, llm_args)
    return config


def release_llm_fields(config: SphinxConfig) -> dict[str, Any]:
    """Our LLM config in the release's ModelArgs names (only fields its dataclass accepts)."""
    tc = config.text_config
    fields: dict[str, Any] = {
        "dim": tc.hidden_size, "n_layers": tc.num_hidden_layers, "n_heads": tc.num_attention_heads,
        "n_kv_heads": tc.num_key_value_heads or tc.num_attention_heads, "norm_eps": tc.rms_norm_eps,
        "rope_theta": (tc.rope_parameters or {}).get("rope_theta"), "vocab_size": tc.vocab_size,
    }
    if tc.model_type == "mixtral":
        fields.update(hidden_dim=tc.intermediate_size, head_dim=tc.hidden_size // tc.num_attention_heads,
                      moe={"num_experts": tc.num_local_experts, "num_experts_per_tok": tc.num_experts_per_tok})
    return fields


def check_llm_args(config: SphinxConfig, llm_args: dict[str, Any]) -> None:
    """Every LLM arg the release's `config.json` states must match our config (absent ones are not checked)."""
    ours = release_llm_fields(config)
    wrong = []
    for name, value in llm_args.items():
        if name not in ours or value is None or (name == "vocab_size" and value == -1):
            continue
        if name == "n_kv_heads" and value is None:
            value = llm_args.get("n_heads")
        expected = ours[name]
        if isinstance(expected, dict):
            diffs = {k: (v, expected.get(k)) for k, v in value.items() if k in expected and v != expected[k]}
            if diffs:
                wrong.append(f"{name}: {diffs}")
        elif isinstance(expected, float) or isinstance(value, float):
            if not math.isclose(float(value), float(expected), rel_tol=1e-6):
                wrong.append(f"{name}={value} (config: {expected})")
        elif value != expected:
            wrong.append(f"{name}={value} (config: {expected})")
    if wrong:
        raise SphinxError(f"config.json disagrees with the model config (preset {config.preset!r}): "
                          + ", ".join(wrong))


# ---- checks before reading data ------------------------------------------------------------------------
def expected_release_shapes(plan: list[Rule], meta_state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Release key -> shape our model needs, by running the key map on meta tensors (no data)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in plan:
        for key, tensor in zip(rule.release, rule.to_release([meta_state[k] for k in rule.ours])):
            shapes[key] = tuple(tensor.shape)
    return shapes


def _listing(label: str, names: list[str]) -> str:
    more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{label} ({len(names)}): {', '.join(names[:_MAX_LISTED])}{more}"


def check_keys(ckpt: ReleaseCheckpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """List every missing, unexpected, mis-shaped and non-float tensor, then fail; log dropped leftovers."""
    present = set(ckpt.keys())
    missing = sorted(set(expected) - present)
    leftovers = sorted(k for k in present - set(expected) if is_known_leftover(k))
    unexpected = sorted(present - set(expected) - set(leftovers))
    misshaped = sorted(f"{k} {list(ckpt.shape(k))} (model needs {list(expected[k])})"
                       for k in present & set(expected) if ckpt.shape(k) != expected[k])
    not_float = sorted(f"{k} ({ckpt.dtype(k)})" for k in present & set(expected) if not ckpt.dtype(k).is_floating_point)
    if leftovers:
        logger.debug("dropping %d release tensors on purpose (CLIP text tower, unused projection): %s",
                     len(leftovers), ", ".join(leftovers))
    problems = [(label, names) for label, names in (("missing", missing), ("unexpected", unexpected),
                                                   ("mis-shaped", misshaped), ("not floating point", not_float))
                if names]
    if problems:
        for label, names in problems:
            logger.error("%s: %s tensors: %s", ckpt.folder, label, ", ".join(names))
        raise SphinxError(f"{ckpt.folder} (llama_type {ckpt.llama_type!r}) does not fit the model: "
                          + "; ".join(_listing(label, names) for label, names in problems))


# ---- assignment ------------------------------------------------------------------------------------
def _owns_storage(value: torch.Tensor) -> bool:
    """Is `value` exactly its whole storage (contiguous, from offset 0), so it can become a parameter as is?"""
    return (value.is_contiguous() and value.storage_offset() == 0
            and value.untyped_storage().nbytes() == value.numel() * value.element_size())


def _assign(model: nn.Module, key: str, value: torch.Tensor, dtype: torch.dtype | None, reuse: bool = False) -> None:
    """Put `value` (cast to `dtype`) in place of the meta tensor `key`: a fresh contiguous copy, or `value` itself
    when `reuse` (it was made for this load, not mapped from a shard) and it already has the dtype and layout."""
    owner_name, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_name)
    target = dtype if dtype is not None and value.is_floating_point() else value.dtype
    if reuse and value.dtype == target and _owns_storage(value):
        data = value.detach()
    else:
        data = torch.empty(value.shape, dtype=target)
        data.copy_(value)
    if name in owner._parameters:
        old = owner._parameters[name]
        param = nn.Parameter(data, requires_grad=bool(old is not None and old.requires_grad))
        param._is_hf_initialized = True  # type: ignore[attr-defined]
        setattr(owner, name, param)
    else:
        data._is_hf_initialized = True  # type: ignore[attr-defined]
        owner.register_buffer(name, data, persistent=name not in owner._non_persistent_buffers_set)


def _materialise_buffers(model: PreTrainedModel) -> None:
    """Non-persistent buffers (RoPE frequencies, CLIP position ids) are computed, not stored: allocate
    them and let the owning transformers model's `_init_weights` fill them (loaded tensors are flagged)."""
    owners: dict[str, PreTrainedModel] = {"": model}
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel):
            owners[name] = module
    for name, module in model.named_modules():
        meta = [(n, b) for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        for buf_name, buf in meta:
            module._buffers[buf_name] = torch.empty_like(buf, device="cpu")
        owner_name = max((o for o in owners if name == o or name.startswith(o + ".") or o == ""), key=len)
        with torch.no_grad(), hf_init.guard_torch_init_functions():
            owners[owner_name]._init_weights(module)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise SphinxError(f"tensors left without values after loading: {left[:20]}")


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """None -> float32 (the transformers default); "auto" -> None (keep each tensor's dtype); names allowed."""
    if dtype is None:
        return torch.float32
    if dtype == "auto":
        return None
    if isinstance(dtype, str):
        value = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(value, torch.dtype):
            raise SphinxError(f"unknown dtype {dtype!r}; use float32, bfloat16, float16 or auto")
        return value
    return dtype


def _remap_budget(ckpt: ReleaseCheckpoint) -> float:
    """Bytes of shard data to read before reopening: half the largest shard; never for legacy (non-zip) shards,
    which are read into memory, not mapped."""
    if not all(zipfile.is_zipfile(p) for p in ckpt.shard_paths):
        return math.inf
    return max(p.stat().st_size for p in ckpt.shard_paths) / 2


def _mapped_bytes(ckpt: ReleaseCheckpoint, key: str) -> int:
    """Shard bytes that reading `key` touches (every rank's piece; each replica when they are compared)."""
    copies = ckpt.num_shards if split_kind(key) == "replicated" and ckpt.check_replicas else 1
    return math.prod(ckpt.shape(key)) * ckpt.dtype(key).itemsize * copies


def _reopen(ckpt: ReleaseCheckpoint) -> ReleaseCheckpoint:
    """A fresh view of the same folder (the old maps go once the tensors read from them are freed)."""
    shapes = {k: ckpt.shape(k) for k in ckpt}
    ckpt.close()
    fresh = ReleaseCheckpoint(ckpt.folder, check_replicas=ckpt.check_replicas)
    if {k: fresh.shape(k) for k in fresh} != shapes:
        fresh.close()
        raise SphinxError(f"{ckpt.folder}: the checkpoint changed while it was being loaded")
    return fresh


def _load_rule(model: nn.Module, ckpt: ReleaseCheckpoint, rule: Rule, dtype: torch.dtype | None) -> list[str]:
    """Read, check and assign one rule's tensors; -> the release keys with NaN or inf values (nothing assigned).
    A function of its own so that no reference to mapped data outlives it."""
    tensors = [ckpt.get(k) for k in rule.release]
    bad = [k for k, t in zip(rule.release, tensors) if not _all_finite(t)]
    if bad:
        return bad
    # what `get` returns for a replicated key (or from a single shard) is the mapped tensor; split keys are merged
    # into new tensors, which can become parameters without a second copy
    taken = {t.untyped_storage().data_ptr() for k, t in zip(rule.release, tensors)
             if split_kind(k) == "replicated" or ckpt.num_shards == 1}
    for key, value in zip(rule.ours, rule.to_ours(tensors)):
        storage = value.untyped_storage().data_ptr()
        _assign(model, key, value, dtype, reuse=storage not in taken)
        taken.add(storage)  # never two parameters on one storage
    return []


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or inf (min and max propagate NaN), without a full-size boolean temporary."""
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _load_tensors(model: nn.Module, ckpt: ReleaseCheckpoint, plan: list[Rule], dtype: torch.dtype | None,
                  progress: Progress | None) -> list[str]:
    """Every rule of `plan` into `model`, reopening the checkpoint each `_remap_budget` bytes; -> corrupt keys."""
    budget, read, corrupt = _remap_budget(ckpt), 0, []
    try:
        for done, rule in enumerate(plan, start=1):
            size = sum(_mapped_bytes(ckpt, k) for k in rule.release)
            if read and read + size > budget:
                ckpt, read = _reopen(ckpt), 0
            corrupt += _load_rule(model, ckpt, rule, dtype)
            read += size
            if progress is not None:
                progress(done, len(plan))
    finally:
        ckpt.close()
    return corrupt


def load_release_model(
    folder: str | Path,
    dtype: torch.dtype | str | None = None,
    check_replicas: bool = True,
    progress: Progress | None = None,
) -> SphinxForConditionalGeneration:
    """Read a release folder into our model (eval mode, encoders frozen).

    `dtype`: float32 by default, "auto" keeps the checkpoint's (bf16 for the release).
    """
    target = resolve_dtype(dtype)
    with ReleaseCheckpoint(folder, check_replicas=check_replicas) as ckpt:
        config = release_config(ckpt.folder, ckpt.llama_type, ckpt.llm_args)
        with torch.device("meta"):
            model = SphinxForConditionalGeneration(config)
        meta_state = model.state_dict()
        plan = build_plan(config, list(meta_state))
        check_keys(ckpt, expected_release_shapes(plan, meta_state))
        corrupt = _load_tensors(model, ckpt, plan, target, progress)
        if corrupt:
            raise SphinxError(f"{ckpt.folder}: corrupt tensors (NaN or inf values): " + ", ".join(corrupt))
    _materialise_buffers(model)
    if model.vision is not None:
        model.vision.apply_freeze()
    model.eval()
    logger.info("loaded %s (llama_type %s, %d shards, preset %s)", ckpt.folder, ckpt.llama_type, ckpt.num_shards,
                config.preset)
    return model


def from_pretrained_hook(folder: Path, *args: Any, **kwargs: Any) -> SphinxForConditionalGeneration:
    """`SphinxForConditionalGeneration.from_pretrained(release_folder, dtype=..., check_replicas=...)`."""
    if args:
        raise SphinxError(f"from_pretrained({folder}) takes keyword arguments only for a release folder")
    dtype = kwargs.pop("dtype", None)
    torch_dtype = kwargs.pop("torch_dtype", None)
    check_replicas = bool(kwargs.pop("check_replicas", True))
    ignored = sorted(k for k in kwargs if kwargs[k] is not None)
    if ignored:
        logger.warning("from_pretrained(%s): options ignored for a release folder: %s", folder, ", ".join(ignored))
    return load_release_model(folder, dtype=dtype if dtype is not None else torch_dtype,
                              check_replicas=check_replicas)


__all__ = [
    "EXTRA_CONFIG_FILE", "check_keys", "check_llm_args", "expected_release_shapes", "from_pretrained_hook",
    "load_release_model", "preset_for_llama_type", "release_config", "release_llm_fields", "resolve_dtype",
]

"""Our model -> a release folder the release's tooling (LLaMA2-Accessory) can load.

Writes `consolidated.NN-of-MM.model.pth` (`{"model": state_dict}`, one per tensor-parallel rank, split
by the release's rules), `config.json` (the LLM as the release's ModelArgs), `meta.json` (`llama_type`),
`tokenizer.model` when the tokenizer came from a SentencePiece file, and `sphinx_mllm.json` (our full
config, so a model whose encoders are not the release's reads back exactly). Shards are produced one at a
time: peak memory is the model plus one shard. The folder appears complete or not at all.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sphinx_mllm.config import RELEASE_LLAMA_TYPES, SphinxConfig
from sphinx_mllm.formats.keymap import Rule, build_plan
from sphinx_mllm.formats.loader import EXTRA_CONFIG_FILE, release_llm_fields
from sphinx_mllm.formats.release import CONFIG_FILE, META_FILE, TOKENIZER_FILE, shard_name, split_kind, split_tensor
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.io import atomic_dir
from sphinx_mllm.utils.logging import get_logger

logger = get_logger(__name__)

Progress = Callable[[int, int], None]  # (done, total)


def release_llama_type(config: SphinxConfig) -> str:
    """The release model class with this config's structure (LLM family, encoders, number of views)."""
    if config.preset in RELEASE_LLAMA_TYPES:
        return RELEASE_LLAMA_TYPES[config.preset]
    families = {s.family for s in config.encoder_specs}
    moe = config.text_config.model_type == "mixtral"
    full = families == {"clip_vit", "convnext", "dinov2", "blip2_qformer"}
    light = families == {"convnext", "dinov2"}
    by_views: dict[tuple[bool, bool, int], str] = {
        (False, True, 1): "llama_ens", (False, True, 5): "llama_ens5", (False, True, 10): "llama_ens10",
        (False, False, 1): "llama_ens_light", (False, False, 5): "llama_ens5_light",
        (True, True, 1): "mixtral_sparse_ens", (True, True, 5): "mixtral_sparse_ens5",
    }
    key = (moe, full, config.num_views)
    if not (full or light) or key not in by_views:
        raise SphinxError(f"no release model type has this structure (LLM {config.text_config.model_type}, encoders "
                          f"{sorted(families)}, {config.num_views} views); the release's tooling could not load it")
    return by_views[key]


def release_llm_args(config: SphinxConfig) -> dict[str, Any]:
    """`config.json` in the release's ModelArgs terms (the FFN size expressed through multiple_of)."""
    args = release_llm_fields(config)
    tc = config.text_config
    args["max_seq_len"] = tc.max_position_embeddings
    if tc.model_type != "mixtral":
        # The release computes hidden = multiple_of * ceil(int(ffn_mult * int(8 * dim / 3)) / multiple_of).
        hidden, base = tc.intermediate_size, int(2 * 4 * tc.hidden_size / 3)
        if 256 * -(-base // 256) == hidden:
            args.update(multiple_of=256, ffn_dim_multiplier=None)
        else:
            args.update(multiple_of=hidden, ffn_dim_multiplier=None if base <= hidden else hidden / base)
    return args


def _sentencepiece_file(tokenizer: Any) -> Path | None:
    """The SentencePiece `.model` file given, or the one a tokenizer was built from, if it still exists."""
    if isinstance(tokenizer, (str, Path)):
        path: Any = tokenizer
    else:
        path = getattr(tokenizer, "vocab_file", None) or getattr(tokenizer, "init_kwargs", {}).get("vocab_file")
    if path and Path(path).is_file() and Path(path).suffix == ".model":
        return Path(path)
    return None


def _shard_state(state: dict[str, torch.Tensor], plan: list[Rule], rank: int, num_shards: int,
                 experts: int | None, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Rank `rank`'s piece of every release tensor (fresh copies: torch.save would store a view's whole storage)."""
    out: dict[str, torch.Tensor] = {}
    for rule in plan:
        tensors = rule.to_release([state[k] for k in rule.ours])
        for key, tensor in zip(rule.release, tensors):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            moe = experts if split_kind(key) == "moe_expert" else None
            out[key] = split_tensor(key, tensor.detach(), num_shards, moe)[rank].clone()
    return out


def save_release(
    model: SphinxForConditionalGeneration,
    folder: str | Path,
    num_shards: int = 1,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Write `model` as a release folder with `num_shards` tensor-parallel shards; returns the folder.

    `dtype`: cast floating tensors (the release ships bf16); None keeps the model's dtypes. `tokenizer`: a
    tokenizer built from a SentencePiece file, or the path of a `tokenizer.model`, copied into the folder.
    """
    config: SphinxConfig = model.config
    if num_shards < 1:
        raise SphinxError(f"--shards must be at least 1, got {num_shards}")
    tc = config.text_config
    kv = tc.num_key_value_heads or tc.num_attention_heads
    if tc.num_attention_heads % num_shards or kv % num_shards:
        raise SphinxError(f"{num_shards} shards do not divide the {tc.num_attention_heads} heads / {kv} KV heads")
    if Path(folder).exists() and not overwrite:
        raise SphinxError(f"{folder} already exists (pass overwrite=True / --overwrite to replace it)")
    llama_type = release_llama_type(config)
    state = model.state_dict()
    plan = build_plan(config, list(state))
    experts = tc.num_local_experts if tc.model_type == "mixtral" else None
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        for rank in range(num_shards):
            shard = _shard_state(state, plan, rank, num_shards, experts, dtype)
            torch.save({"model": shard}, tmp / shard_name(rank, num_shards))
            del shard
            if progress is not None:
                progress(rank + 1, num_shards)
        (tmp / CONFIG_FILE).write_text(json.dumps(release_llm_args(config), indent=2) + "\n")
        (tmp / META_FILE).write_text(json.dumps({"llama_type": llama_type}) + "\n")
        (tmp / EXTRA_CONFIG_FILE).write_text(config.to_json_string())
        source = _sentencepiece_file(tokenizer) if tokenizer is not None else None
        if source is not None:
            shutil.copyfile(source, tmp / TOKENIZER_FILE)
        else:
            logger.warning("no SentencePiece tokenizer.model to copy (the tokenizer was not built from one); "
                           "the release folder has no tokenizer")
    logger.info("wrote %s (llama_type %s, %d shards)", folder, llama_type, num_shards)
    return Path(folder)


__all__ = ["release_llama_type", "release_llm_args", "save_release"]

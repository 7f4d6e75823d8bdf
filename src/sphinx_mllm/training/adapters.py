"""Parameter-efficient tuning through `peft`: LoRA (or bias-only tuning) on the LLM as a config option.

- LoRA: `LoraConfig` on the LLM's linear layers named in `lora.target_modules` (only inside
  `language_model`: the vision towers have `q_proj`-like names too and stay frozen).
- bias-only: no LoRA matrices; the LLM's bias-like parameters train. LLaMA and Mixtral have no linear
  biases, so these are the gains of their RMSNorm layers, tuned through peft's `LNTuningConfig` (the
  layers are copied into the adapter, so it folds like LoRA does).
- The stage's fusion parameters (projections, start/end vectors) train in full and are saved inside the
  adapter (`modules_to_save`), so an adapter is everything that changed.

An adapter folder (`adapter_config.json`, `adapter_model.safetensors`) loads on top of its base with
`load_adapter`, and `fold_adapter` merges it into full weights (`merge_and_unload`) saved as a normal model.
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import SphinxProcessor
from sphinx_mllm.training.config import LoraSection
from sphinx_mllm.utils import SphinxError, atomic_dir, get_logger

logger = get_logger(__name__)

LLM_PREFIX = "language_model."


def _llm_modules(model: nn.Module, want: type[nn.Module] | None = None) -> list[tuple[str, nn.Module]]:
    return [(name, mod) for name, mod in model.named_modules()
            if name.startswith(LLM_PREFIX) and (want is None or isinstance(mod, want))]


def _exact(names: list[str]) -> str:
    """A peft `target_modules` regex matching exactly these module names."""
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the LLM's Linear layers whose last name is in `targets`; an error if a target is unused."""
    linears = _llm_modules(model, nn.Linear)
    chosen = [name for name, _ in linears if name.rsplit(".", 1)[-1] in targets]
    seen = {name.rsplit(".", 1)[-1] for name, _ in linears}
    unused = sorted(set(targets) - seen)
    if unused:
        raise SphinxError(f"lora.target_modules {unused} name no Linear layer of the LLM "
                          f"(its Linear layers: {sorted(seen)})")
    return chosen


def norm_targets(model: nn.Module) -> list[str]:
    """Full names of the LLM's normalisation layers (classes named *Norm: LlamaRMSNorm, LayerNorm...)."""
    names = [name for name, mod in _llm_modules(model) if type(mod).__name__.endswith("Norm")]
    if not names:
        raise SphinxError("lora.bias_only: the LLM has no normalisation layers to tune")
    return names


@contextlib.contextmanager
def _norm_layers_are_fine() -> Iterator[None]:
    """peft's LN tuning warns about RMSNorm classes it does not list; it copies them whole, which is right
    (the fold is tested to reproduce the logits of base + adapter)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unsupported layer type .*RMSNorm", category=UserWarning)
        yield


def apply_adapters(model: SphinxForConditionalGeneration, lora: LoraSection, train_fusion: bool) -> nn.Module:
    """Wrap `model` in a `PeftModel`; base weights are frozen, adapters (and the fusion if `train_fusion`)
    train. Returns the peft model."""
    try:
        from peft import LNTuningConfig, LoraConfig, get_peft_model
    except ImportError as exc:  # an optional dependency (extra "train")
        raise SphinxError("lora.enabled needs the `peft` package (pip install 'sphinx-mllm[train]')") from exc
    modules_to_save = ["fusion"] if train_fusion and model.fusion is not None else None
    if lora.bias_only:
        config = LNTuningConfig(target_modules=_exact(norm_targets(model)), modules_to_save=modules_to_save)
    else:
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                            target_modules=_exact(lora_targets(model, lora.target_modules)),
                            modules_to_save=modules_to_save)
    with _norm_layers_are_fine():
        peft_model = get_peft_model(model, config)
    if model.vision is not None:
        model.vision.apply_freeze()
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("%s: %d trainable parameters of %d (%.2f%%)", "bias-only" if lora.bias_only else "LoRA",
                trainable, total, 100.0 * trainable / max(total, 1))
    return peft_model


def load_adapter(base: str | os.PathLike, adapter: str | os.PathLike) -> nn.Module:
    """A base model folder with an adapter folder on top (a `PeftModel`, eval mode)."""
    from peft import PeftModel

    base, adapter = Path(base), Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise SphinxError(f"{adapter} is not an adapter folder (no adapter_config.json)")
    if not (base / "config.json").is_file():
        raise SphinxError(f"{base} is not a model folder (no config.json)")
    model = SphinxForConditionalGeneration.from_pretrained(base)
    with _norm_layers_are_fine():
        return PeftModel.from_pretrained(model, adapter).eval()


def fold_adapter(base: str | os.PathLike, adapter: str | os.PathLike, output: str | os.PathLike,
                 overwrite: bool = False) -> Path:
    """Merge an adapter into its base (`merge_and_unload`) and save the full model (+ processor) to `output`."""
    from peft.utils import ModulesToSaveWrapper

    peft_model = load_adapter(base, adapter)
    # Fully trained modules (the fusion) live in `modules_to_save` copies. LoRA's unload puts the trained copy
    # in place; LN tuning's (peft 0.21) leaves the wrapper: put the trained copies in place explicitly.
    trained = {name: mod.modules_to_save[mod.active_adapter]
               for name, mod in peft_model.get_base_model().named_modules() if isinstance(mod, ModulesToSaveWrapper)}
    merged = peft_model.merge_and_unload()
    for name, module in trained.items():
        merged.set_submodule(name, module)
    processor_src = Path(adapter) if (Path(adapter) / "processor_config.json").is_file() else Path(base)
    processor = SphinxProcessor.from_pretrained(processor_src)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    logger.info("folded %s into %s -> %s", adapter, base, output)
    return Path(output)


__all__ = ["apply_adapters", "fold_adapter", "load_adapter", "lora_targets", "norm_targets"]

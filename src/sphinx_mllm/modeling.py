"""L4: `SphinxForConditionalGeneration`, a Hugging Face-native SPHINX model.

Sequence layout (the release's): [BOS] [image tokens of all views, view 0 first] [text]. The processor
puts exactly `config.num_image_tokens` placeholder ids (`config.image_token_id`) after BOS; this model
scatters the fused image vectors into those positions and hands `inputs_embeds` to the transformers causal
LM (LLaMA or Mixtral), which does the rest: RoPE positions run through the image tokens, attention is
causal everywhere, and the loss is the LM's shifted cross-entropy over labels != -100.

Everything users run on transformers models works here: `generate` (KV cache, batched with left padding,
stop strings), `save_pretrained` / `from_pretrained` (safetensors shards), `device_map`, PEFT, gradient
checkpointing, SDPA / flash attention through the LLM.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from sphinx_mllm.config import SphinxConfig
from sphinx_mllm.fusion import Fusion
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.vision.encoders import Blip2QFormerEncoder
from sphinx_mllm.vision.tower import VisionTower


class SphinxPreTrainedModel(PreTrainedModel):
    config: SphinxConfig
    config_class = SphinxConfig
    base_model_prefix = ""
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "MixtralDecoderLayer", "VisionTower"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, Fusion):
            nn.init.uniform_(module.start_img, 0.0, 1.0)
            nn.init.uniform_(module.end_img, 0.0, 1.0)
        elif isinstance(module, Blip2QFormerEncoder):
            nn.init.normal_(module.query_tokens, std=0.02)


_BUILD_LOCK = threading.RLock()
"""Held while a model is built or loaded. transformers' loader swaps process-wide functions for no-ops while it
runs (`torch.nn.init.*`, `PreTrainedModel.init_weights` and `.tie_weights`, in `initialization.no_init_weights`
/ `no_tie_weights`) and puts back what it found: two loads in two threads can put back the no-ops for good, and
every later model of the process is then built untied and uninitialised. The world recipe loads in threads."""


class SphinxForConditionalGeneration(SphinxPreTrainedModel, GenerationMixin):
    """SPHINX: frozen encoders -> fusion -> placeholders of a transformers causal LM."""

    def __init__(self, config: SphinxConfig) -> None:
        with _BUILD_LOCK:  # a fresh model must not be built while another thread's load has init switched off
            super().__init__(config)
            self.vision = VisionTower(config) if config.encoders else None
            self.fusion = Fusion(config) if config.encoders else None
            self.language_model = AutoModelForCausalLM.from_config(config.text_config)
            self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> SphinxForConditionalGeneration:
        """transformers' loader, plus foreign layouts (release folders) through registered readers."""
        if args and isinstance(args[0], (str, os.PathLike)) and Path(args[0]).is_dir():
            for detect, load in _CHECKPOINT_READERS:
                if detect(Path(args[0])):
                    return load(Path(args[0]), *args[1:], **kwargs)
        with _BUILD_LOCK:
            model = super().from_pretrained(*args, **kwargs)
        if model.vision is not None:
            model.vision.apply_freeze()  # loading replaces parameters, and with them requires_grad
        return model

    # -- plumbing expected by transformers (generate, resize, PEFT) --------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    # -- images -----------------------------------------------------------------------------------
    def get_image_features(
        self, pixel_values: torch.Tensor | None = None, encoder_features: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """pixel_values [B, 3, S, S] -> image tokens [B, num_image_tokens, dim].

        `encoder_features` ({encoder: [B * V, T_e, C_e]}, e.g. from a feature cache) skips the frozen
        encoders; the trainable fusion still runs.
        """
        if self.vision is None or self.fusion is None:
            raise SphinxError("this model has no vision encoders; it cannot take images")
        if encoder_features is None:
            if pixel_values is None:
                raise SphinxError("pass pixel_values or encoder_features")
            size = self.config.image_size
            if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
                raise SphinxError(f"pixel_values must be [num_images, 3, {size}, {size}] for this model, "
                                  f"got {list(pixel_values.shape)}")
            encoder_features = self.vision(pixel_values)  # {encoder: [B * V, T_e, C_e]}
        else:
            missing = sorted(set(self.vision.encoders) - set(encoder_features))
            if missing:
                raise SphinxError(f"encoder_features lack the encoders {missing}")
        return self.fusion(encoder_features)  # [B, V * tokens_per_view, dim]

    def embed_inputs(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
                     image_features: torch.Tensor | None = None, prefill: bool = True,
                     encoder_features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings with the fused image vectors scattered into the placeholder positions.

        input_ids [B, L] -> [B, L, dim]. Images come from `pixel_values`, from cached `encoder_features`
        ({encoder: [B * V, T_e, C_e]}), or as finished `image_features` ([num_images, N, dim]).
        """
        image_mask = input_ids == self.config.image_token_id  # [B, L]
        embeds = self.get_input_embeddings()(input_ids.masked_fill(image_mask, 0))
        if image_features is None and (pixel_values is not None or encoder_features is not None):
            image_features = self.get_image_features(pixel_values, encoder_features)
        if image_features is None:
            n_placeholders = int(image_mask.sum())
            if prefill and n_placeholders and self.config.encoders:
                raise SphinxError(f"input_ids hold {n_placeholders} image placeholder tokens but no pixel_values "
                                  "were given")
            return embeds
        n_placeholders = int(image_mask.sum())
        n_vectors = image_features.shape[0] * image_features.shape[1]
        if n_placeholders != n_vectors:
            raise SphinxError(
                f"image placeholders and image features disagree: {n_placeholders} placeholder tokens in input_ids, "
                f"{n_vectors} fused image vectors ({image_features.shape[0]} images x {image_features.shape[1]} "
                f"tokens each; config.num_image_tokens = {self.config.num_image_tokens})"
            )
        return embeds.masked_scatter(image_mask.unsqueeze(-1), image_features.to(embeds.dtype))

    # -- forward ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Any | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        image_features: torch.Tensor | None = None,
        encoder_features: dict[str, torch.Tensor] | None = None,
        image_sizes: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Loss and logits; `labels` use -100 for positions outside the loss (image, prompt, padding).

        `image_sizes` (from the processor) is accepted and unused here: inference maps boxes with it.
        """
        del image_sizes
        if (input_ids is None) == (inputs_embeds is None):
            raise SphinxError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            prefill = cache is None or cache.get_seq_length() == 0
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_features, prefill=prefill,
                                              encoder_features=encoder_features)
        with cpu_single_row_kernels(inputs_embeds):
            return self.language_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                labels=labels,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )

    # -- sizes, for `sphinx-mllm info` --------------------------------------------------------------
    def parameter_counts(self) -> dict[str, Any]:
        """{"llm": n, "projector": n, "encoders": {name: n}}; projector = neither LLM nor encoder."""
        def count(module: nn.Module | None) -> int:
            return 0 if module is None else sum(p.numel() for p in module.parameters())

        encoders = {name: count(enc) for name, enc in self.vision.encoders.items()} if self.vision else {}
        total = count(self)
        llm = count(self.language_model)
        return {"llm": llm, "projector": total - llm - sum(encoders.values()), "encoders": encoders}


@contextlib.contextmanager
def cpu_single_row_kernels(embeds: torch.Tensor) -> Iterator[None]:
    """Run a one-token, batch-1 bf16 step on CPU with ATen's matmul kernels instead of oneDNN's.

    A decode step's linear layers are matrix-vector products; for one row, oneDNN's bf16 kernel streams the
    weights at about half the rate of ATen's (docs/benchmarks.md, "Inference"), from two rows up oneDNN wins,
    so only batch-1 decode steps switch. The switch is torch's process-wide oneDNN flag, restored on exit: a
    concurrent forward in another thread of the same process would run on ATen's kernels meanwhile (same
    results up to bf16 rounding, slower for large matmuls).
    """
    if (embeds.device.type != "cpu" or embeds.dtype != torch.bfloat16 or embeds.shape[0] * embeds.shape[1] != 1
            or not torch.backends.mkldnn.enabled):
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


# Readers of foreign checkpoint layouts, registered by `sphinx_mllm.formats` (a higher layer) on import:
# (detect(folder) -> bool, load(folder, *args, **kwargs) -> model).
_CHECKPOINT_READERS: list[tuple[Callable[[Path], bool], Callable[..., SphinxForConditionalGeneration]]] = []


def register_checkpoint_reader(
    detect: Callable[[Path], bool], load: Callable[..., SphinxForConditionalGeneration]
) -> None:
    """Let `from_pretrained` read another layout (the release's `consolidated.*.pth` folders...)."""
    if (detect, load) not in _CHECKPOINT_READERS:
        _CHECKPOINT_READERS.append((detect, load))


def has_checkpoint_reader(folder: str | os.PathLike) -> bool:
    """Is `folder` in a foreign layout that a registered reader recognises?"""
    return Path(folder).is_dir() and any(detect(Path(folder)) for detect, _ in _CHECKPOINT_READERS)


AutoConfig.register("sphinx", SphinxConfig, exist_ok=True)
AutoModelForImageTextToText.register(SphinxConfig, SphinxForConditionalGeneration, exist_ok=True)

__all__ = [
    "SphinxForConditionalGeneration", "SphinxPreTrainedModel", "has_checkpoint_reader", "register_checkpoint_reader",
]

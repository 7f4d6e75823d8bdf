"""L2: one adapter per encoder family, each over a transformers vision model (random init from config,
no download; real weights come through `sphinx_mllm.formats`).

Every adapter answers the same contract (`VisionEncoder`): pixels arrive as CLIP-normalised views at the
spec's `view_size`; the adapter resizes them to its `input_size` (mode `input_resize`), re-normalises if
the tower wants other statistics, and returns tokens [N, T, C] exactly as the release used them:
- CLIP ViT: all 1 + grid^2 tokens after `post_layernorm` (open_clip's ln_post), no projection;
- ConvNeXt: the last stage's map after the head LayerNorm (applied here with the model's own
  `layernorm` weights, since `ConvNextModel` only norms the pooled vector), raster order, no CLS;
- DINOv2: CLS + patch tokens after the final LayerNorm (the hub's x_norm_clstoken / x_norm_patchtokens);
- BLIP-2: EVA ViT-g then the Q-Former over the learned query tokens (the 5.x `get_qformer_features`).
Fusion only sees this contract.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2VisionConfig,
    Blip2VisionModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
    Dinov2Config,
    Dinov2Model,
)
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

from sphinx_mllm.config import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EncoderSpec
from sphinx_mllm.processing.views import resize_square


class VisionEncoder(nn.Module):
    """Base adapter: `forward(views [N, 3, view_size, view_size]) -> tokens [N, T, C]`."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        self.spec = spec

    # -- the contract ------------------------------------------------------------------------------
    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def grid(self) -> int | None:
        return self.spec.grid

    @property
    def width(self) -> int:
        return self.spec.width

    @property
    def has_cls(self) -> bool:
        return self.spec.has_cls

    def prepare(self, views: torch.Tensor) -> torch.Tensor:
        """Resize to the tower's input size and convert the normalisation. [N, 3, v, v] -> [N, 3, s, s]"""
        x = resize_square(views, self.spec.input_size, self.spec.input_resize)
        if self.spec.normalization == "imagenet":
            # x_imagenet = (x_clip * clip_std + clip_mean - imagenet_mean) / imagenet_std, as the release does.
            # Constants, not buffers: nothing to save, nothing left uninitialised by meta-device loading.
            clip_mean, clip_std, mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
                                              for v in (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD))
            x = (x * clip_std + clip_mean - mean) / std
        return x

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        tokens = self.encode(self.prepare(views))
        expected = self.spec.num_tokens
        if tokens.shape[1] != expected:
            raise RuntimeError(f"encoder {self.spec.name!r} gave {tokens.shape[1]} tokens, config says {expected}")
        return tokens

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # each family implements its tower call


class ClipViTEncoder(VisionEncoder):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        self.model = CLIPVisionModel(CLIPVisionConfig(**spec.config))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(pixel_values=pixels).last_hidden_state  # [N, 1 + g*g, C]
        return self.model.post_layernorm(hidden)


class ConvNextEncoder(VisionEncoder):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        self.model = ConvNextModel(ConvNextConfig(**spec.config))
        # transformers hard-codes eps=1e-6 in the stem, downsampling and block norms; timm's ConvNeXt (the
        # release's convnext_xxlarge) uses one norm_eps (1e-5) everywhere: take the config's for all of them.
        for module in self.model.modules():
            if isinstance(module, nn.LayerNorm):
                module.eps = self.model.config.layer_norm_eps

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self.model.encoder(self.model.embeddings(pixels)).last_hidden_state  # [N, C, g, g]
        tokens = fmap.flatten(2).transpose(1, 2)  # [N, g*g, C], raster order
        return self.model.layernorm(tokens)  # the head LayerNorm, per position


class HubDinov2Embeddings(Dinov2Embeddings):
    """`Dinov2Embeddings` whose position table is resized the way the DINOv2 hub code does (what the release
    ran): bicubic with scale factor (grid + 0.1) / side, in float32. transformers resizes to an exact size
    instead, which samples other points (37x37 -> 16x16 differs by ~0.2 cells). Same parameters and keys."""

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        pos = self.position_embeddings  # [1, 1 + side*side, C]
        num_positions = pos.shape[1] - 1
        if embeddings.shape[1] - 1 == num_positions and height == width:
            return pos
        patch_h, patch_w = self.patch_embeddings.patch_size
        grid_h, grid_w = height // patch_h, width // patch_w
        side = int(math.sqrt(num_positions))
        table = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, C, side, side]
        scale = ((grid_h + 0.1) / math.sqrt(num_positions), (grid_w + 0.1) / math.sqrt(num_positions))
        table = F.interpolate(table, scale_factor=scale, mode="bicubic")  # [1, C, grid_h, grid_w]
        table = table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([pos[:, :1].float(), table], dim=1).to(embeddings.dtype)


class Dinov2Encoder(VisionEncoder):
    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        config = Dinov2Config(**spec.config)
        self.model = Dinov2Model(config)
        self.model.embeddings = HubDinov2Embeddings(config)  # the hub's position-table resizing

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state  # [N, 1 + g*g, C], final LayerNorm applied


class Blip2QFormerEncoder(VisionEncoder):
    """EVA ViT-g + Q-Former; attribute names follow transformers' `Blip2Model` so keys map one to one."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__(spec)
        cfg = spec.config
        self.vision_model = Blip2VisionModel(Blip2VisionConfig(**cfg["vision_config"]))
        self.query_tokens = nn.Parameter(torch.zeros(1, int(cfg.get("num_query_tokens", 32)),
                                                     int(cfg["qformer_config"]["hidden_size"])))
        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(**cfg["qformer_config"]))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision_model(pixel_values=pixels).last_hidden_state  # [N, P, C_vis]
        queries = self.query_tokens.expand(image_embeds.shape[0], -1, -1)  # [N, Q, C_q]
        # Every image patch is valid: no encoder mask (the same as an all-ones mask, and cheaper).
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image_embeds)
        return out.last_hidden_state.to(pixels.dtype)  # [N, Q, C_q]


ENCODER_CLASSES: dict[str, type[VisionEncoder]] = {
    "clip_vit": ClipViTEncoder,
    "convnext": ConvNextEncoder,
    "dinov2": Dinov2Encoder,
    "blip2_qformer": Blip2QFormerEncoder,
}


def build_encoder(spec: EncoderSpec) -> VisionEncoder:
    return ENCODER_CLASSES[spec.family](spec)

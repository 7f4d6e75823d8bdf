"""The set of frozen encoders run over every view of every image, one batched pass per encoder."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from sphinx_mllm.config import SphinxConfig
from sphinx_mllm.processing.views import make_views
from sphinx_mllm.vision.encoders import VisionEncoder, build_encoder


class VisionTower(nn.Module):
    """All encoders of a config. Frozen (no grad, eval mode) unless `config.freeze_encoders` is False."""

    def __init__(self, config: SphinxConfig) -> None:
        super().__init__()
        self.view_grid = config.view_grid
        self.frozen = config.freeze_encoders
        self.encoders = nn.ModuleDict({spec.name: build_encoder(spec) for spec in config.encoder_specs})
        self.apply_freeze()

    def apply_freeze(self) -> None:
        """(Re)apply the frozen state; loaders that replace parameters call this again."""
        if self.frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> VisionTower:
        # Frozen encoders stay in eval mode whatever the parent asks (dropout, drop-path off).
        return super().train(mode and not self.frozen)

    def forward(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixel_values [B, 3, S, S] (CLIP-normalised padded squares) -> {encoder: [B * V, T_e, C_e]}.

        Views are cut once per distinct view size and shared by the encoders that use it.
        """
        grad = contextlib.nullcontext() if not self.frozen else torch.no_grad()
        views_by_size: dict[int, torch.Tensor] = {}
        feats: dict[str, torch.Tensor] = {}
        with grad:
            for name, enc in self.encoders.items():
                assert isinstance(enc, VisionEncoder)
                size = enc.spec.view_size
                if size not in views_by_size:
                    views = make_views(pixel_values, size, self.view_grid)  # [B, V, 3, v, v]
                    views_by_size[size] = views.flatten(0, 1)  # [B * V, 3, v, v]
                feats[name] = enc(views_by_size[size].to(self._dtype_of(enc)))
        return feats

    @staticmethod
    def _dtype_of(module: nn.Module) -> torch.dtype:
        return next(module.parameters()).dtype

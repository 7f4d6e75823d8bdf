"""Held-out losses of a trained model: per-token answer loss on a mixture, with each item's own image or
with the images swapped between items (if the model reads its image, the loss rises when it gets
another one: the shuffle check of the recipe's report and tests).

Items go through the training pipeline itself (`SFTDataset` + `SFTCollator`, cached encoder features
when a feature cache is given, else pixels), so a held-out loss is directly comparable to training losses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from sphinx_mllm.data.mixture import MixtureDataset
from sphinx_mllm.data.sft import SFTCollator, SFTDataset
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import IGNORE_INDEX, SphinxProcessor
from sphinx_mllm.training.feature_cache import FeatureCache
from sphinx_mllm.utils import SphinxError


@dataclass(frozen=True)
class HeldOutLoss:
    """Mean answer-token loss with the right images, with images swapped between items, and token count."""

    loss: float
    shuffled_loss: float | None
    tokens: int

    def as_dict(self) -> dict[str, float | int | None]:
        return {"loss": self.loss, "shuffled_loss": self.shuffled_loss, "tokens": self.tokens}


def _swap_images(items: list[dict]) -> list[dict]:
    """The items with their images rotated by one (item i gets item i+1's image): a derangement when the
    images differ."""
    keys = [k for k in ("encoder_features", "pixel_values") if k in items[0]]
    out = [dict(it) for it in items]
    for i, it in enumerate(out):
        donor = items[(i + 1) % len(items)]
        for k in keys:
            it[k] = donor[k]
    return out


@torch.no_grad()
def _batch_loss(model: SphinxForConditionalGeneration, batch: dict) -> tuple[float, int]:
    labels = batch["labels"]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if "encoder_features" in batch:
        inputs["encoder_features"] = batch["encoder_features"]
    if "pixel_values" in batch:
        inputs["pixel_values"] = batch["pixel_values"].to(model.dtype)
    logits = model(**inputs).logits[:, :-1].float()
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return float(loss), int((target != IGNORE_INDEX).sum())


def held_out_loss(model: SphinxForConditionalGeneration, processor: SphinxProcessor, mixture: str | os.PathLike, *,
                  feature_cache: str | os.PathLike | None = None, limit: int | None = None, batch_size: int = 8,
                  max_length: int = 2048, shuffled: bool = True) -> HeldOutLoss:
    """Token-mean loss of the first `limit` items of `mixture` (all with images, for the shuffled loss)."""
    data = MixtureDataset.from_yaml(mixture)
    lookup = None
    if feature_cache is not None:
        cache = FeatureCache(feature_cache)
        cache.check(model)
        lookup = cache.features_for_image
    dataset = SFTDataset(data, processor, max_length, feature_lookup=lookup)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    if n < 2:
        raise SphinxError(f"{mixture}: need at least 2 items for a held-out loss, got {n}")
    collate = SFTCollator(processor, 1).collate_micro
    model.eval()
    sums = {"plain": [0.0, 0], "shuffled": [0.0, 0]}
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        if any(it["image"] is None for it in items):
            raise SphinxError(f"{mixture}: held-out losses need records with images")
        variants = {"plain": items, "shuffled": _swap_images(items)} if shuffled and len(items) > 1 else \
            {"plain": items}
        for name, batch_items in variants.items():
            loss, count = _batch_loss(model, collate(batch_items))
            sums[name][0] += loss
            sums[name][1] += count
    plain = sums["plain"][0] / max(1, sums["plain"][1])
    shuffled_loss = sums["shuffled"][0] / sums["shuffled"][1] if sums["shuffled"][1] else None
    return HeldOutLoss(plain, shuffled_loss, int(sums["plain"][1]))


def load_for_loss(folder: str | os.PathLike) -> tuple[SphinxForConditionalGeneration, SphinxProcessor]:
    """A saved model (float32, eval mode) and its processor."""
    folder = Path(folder)
    model = SphinxForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, SphinxProcessor.from_pretrained(folder)


__all__ = ["HeldOutLoss", "held_out_loss", "load_for_loss"]

"""Held-out losses of a trained model: per-token answer loss on a mixture, with each item's own image or
with the images swapped between items (if the model reads its image, the loss rises when it gets
another one: the shuffle check of the recipe's report and tests). Beside the loss: the share of items whose
every answer token is the model's top choice (teacher-forced exact answers), overall and per question type,
which shows image use even where greedy answers all look alike.

Items go through the training pipeline itself (`SFTDataset` + `SFTCollator`, cached encoder features
when a feature cache is given, else pixels), so a held-out loss is directly comparable to training losses.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    """Mean answer-token loss with the right images and with images swapped between items, token count; the
    share of items answered exactly (teacher-forced) both ways, item count, and those shares per group (the
    record's task, with its `meta.question_type` when it has one): `{group: [own, swapped or None, items]}`."""

    loss: float
    shuffled_loss: float | None
    tokens: int
    accuracy: float = 0.0
    shuffled_accuracy: float | None = None
    items: int = 0
    groups: dict[str, list[float | int | None]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "shuffled_loss": self.shuffled_loss, "tokens": self.tokens,
                "accuracy": self.accuracy, "shuffled_accuracy": self.shuffled_accuracy, "items": self.items,
                "groups": self.groups}


def _swap_images(items: list[dict]) -> list[dict]:
    """The items with their images rotated: item i gets the image of the next item (cyclically) whose image
    is another file, so consecutive questions about one image do not swap it with itself; an item whose batch
    holds no other image keeps its own."""
    keys = [k for k in ("encoder_features", "pixel_values") if k in items[0]]
    out = [dict(it) for it in items]
    n = len(items)
    for i, it in enumerate(out):
        donor = next((items[(i + k) % n] for k in range(1, n) if items[(i + k) % n]["image"] != items[i]["image"]),
                     items[i])
        for k in keys:
            it[k] = donor[k]
    return out


@torch.no_grad()
def _batch_loss(model: SphinxForConditionalGeneration, batch: dict) -> tuple[float, int, list[bool]]:
    """Summed answer-token loss, answer tokens, and per item whether every answer token is the argmax."""
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
    answer = target != IGNORE_INDEX  # [B, L-1]
    exact = ((logits.argmax(-1) == target) | ~answer).all(-1) & answer.any(-1)  # [B]
    return float(loss), int(answer.sum()), exact.tolist()


def _group(record: dict[str, Any]) -> str:
    qtype = (record.get("meta") or {}).get("question_type")
    task = str(record.get("task") or "?")
    return f"{task}:{qtype}" if qtype else task


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
    exact: dict[str, dict[str, list[bool]]] = {"plain": defaultdict(list), "shuffled": defaultdict(list)}
    for start in range(0, n, batch_size):
        index = range(start, min(n, start + batch_size))
        items = [dataset[i] for i in index]
        if any(it["image"] is None for it in items):
            raise SphinxError(f"{mixture}: held-out losses need records with images")
        groups = [_group(data[i]) for i in index]
        variants = {"plain": items, "shuffled": _swap_images(items)} if shuffled and len(items) > 1 else \
            {"plain": items}
        for name, batch_items in variants.items():
            loss, count, hits = _batch_loss(model, collate(batch_items))
            sums[name][0] += loss
            sums[name][1] += count
            for group, hit in zip(groups, hits):
                exact[name][group].append(hit)
    plain = sums["plain"][0] / max(1, sums["plain"][1])
    shuffled_loss = sums["shuffled"][0] / sums["shuffled"][1] if sums["shuffled"][1] else None

    def share(hits: list[bool]) -> float:
        return sum(hits) / len(hits)

    mine = [h for hits in exact["plain"].values() for h in hits]
    theirs = [h for hits in exact["shuffled"].values() for h in hits]
    table: dict[str, list[float | int | None]] = {
        g: [share(h), share(exact["shuffled"][g]) if exact["shuffled"].get(g) else None, len(h)]
        for g, h in sorted(exact["plain"].items())}
    return HeldOutLoss(plain, shuffled_loss, int(sums["plain"][1]), share(mine), share(theirs) if theirs else None,
                       len(mine), table)


def load_for_loss(folder: str | os.PathLike) -> tuple[SphinxForConditionalGeneration, SphinxProcessor]:
    """A saved model (float32, eval mode) and its processor."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SphinxError(f"{folder} is not a saved model folder (no config.json)")
    model = SphinxForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    return model, SphinxProcessor.from_pretrained(folder)


__all__ = ["HeldOutLoss", "held_out_loss", "load_for_loss"]

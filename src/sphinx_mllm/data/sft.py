"""Training items from a mixture: records -> (input_ids, labels, pixels or cached encoder features, task).

Caption records (`"caption"`) become `[BOS] [image] caption [EOS]` with the loss on the caption and EOS
(`SphinxProcessor.encode_caption`); conversation records become the templated dialog with the loss on the
answers (`SphinxProcessor.encode_conversation`). Each item keeps its task name, so a trainer can report
the loss per task.

Images are either decoded here into pixels (`processor.image_processor`) or, when a `feature_lookup` is
given (the feature cache of `sphinx_mllm.training.feature_cache`), replaced by the frozen encoders'
stored outputs `{encoder: [V, T, C]}`; the lookup is injected so that this layer never imports the model.

`SFTCollator` turns one rank's share of a global batch into its micro-batches (gradient accumulation),
each padded on the right; images are concatenated in row order, the order in which the model fills the
placeholders.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from sphinx_mllm.data.mixture import MixtureDataset
from sphinx_mllm.processing import IGNORE_INDEX, SphinxProcessor
from sphinx_mllm.utils import SphinxError, get_logger

logger = get_logger(__name__)

FeatureLookup = Callable[[str], dict[str, torch.Tensor]]  # image path -> {encoder: [V, T, C]}


def encode_record(record: dict[str, Any], processor: SphinxProcessor) -> tuple[list[int], list[int]]:
    """A caption or conversation record -> (input_ids, labels), image placeholders included."""
    has_image = record.get("image") is not None
    if "caption" in record and "conversations" not in record:
        return processor.encode_caption(record["caption"], has_image)
    turns = [(turn["from"], turn["value"]) for turn in record["conversations"]]
    return processor.encode_conversation(turns, has_image)


def truncate(ids: list[int], labels: list[int], max_length: int, keep: int) -> tuple[list[int], list[int]]:
    """Cut a sequence to `max_length` tokens; the first `keep` (BOS + image placeholders) must fit."""
    if len(ids) <= max_length:
        return ids, labels
    if keep >= max_length:
        raise SphinxError(f"max_length {max_length} leaves no room for text after the {keep} tokens of BOS and "
                          "image placeholders; raise data.max_length")
    return ids[:max_length], labels[:max_length]


class SFTDataset:
    """Indexable training items of a `MixtureDataset` (works as a torch map-style dataset).

    Item: `{"input_ids": [int], "labels": [int], "task": str, "image": path | None, "pixel_values":
    [1, 3, S, S] | absent, "encoder_features": {enc: [V, T, C]} | absent}`.
    """

    def __init__(self, mixture: MixtureDataset, processor: SphinxProcessor, max_length: int,
                 feature_lookup: FeatureLookup | None = None) -> None:
        if max_length < 2:
            raise SphinxError(f"max_length must be at least 2, got {max_length}")
        self.mixture = mixture
        self.processor = processor
        self.max_length = max_length
        self.feature_lookup = feature_lookup
        self._warned_truncation = False

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.mixture[index]
        ids, labels = encode_record(record, self.processor)
        image = record.get("image")
        keep = 1 + (self.processor.num_image_tokens if image is not None else 0)
        if len(ids) > self.max_length and not self._warned_truncation:
            logger.warning("record %r has %d tokens, cut to max_length %d (warned once)", record.get("id"),
                           len(ids), self.max_length)
            self._warned_truncation = True
        ids, labels = truncate(ids, labels, self.max_length, keep)
        item: dict[str, Any] = {"input_ids": ids, "labels": labels, "task": str(record.get("task") or "unknown"),
                                "image": image}
        if image is not None:
            if self.feature_lookup is not None:
                item["encoder_features"] = self.feature_lookup(image)
            else:
                item["pixel_values"] = self.processor.image_processor([image])[0]  # [1, 3, S, S]
        return item


class SFTCollator:
    """One rank's batch (a list of items) -> a list of `micro_batch_size` micro-batches.

    Each micro-batch: `input_ids`, `attention_mask`, `labels` [b, L] (right padding), `tasks` (list of
    str), and `pixel_values` [n_img, 3, S, S] or `encoder_features` {enc: [n_img * V, T, C]} when any
    row has an image.
    """

    def __init__(self, processor: SphinxProcessor, micro_batch_size: int) -> None:
        if micro_batch_size < 1:
            raise SphinxError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        self.processor = processor
        self.micro_batch_size = micro_batch_size

    def __call__(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(items) % self.micro_batch_size:
            raise SphinxError(f"a rank batch of {len(items)} items does not split into micro-batches of "
                              f"{self.micro_batch_size}")
        step = self.micro_batch_size
        return [self.collate_micro(items[i : i + step]) for i in range(0, len(items), step)]

    def collate_micro(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = dict(self.processor.collate([(it["input_ids"], it["labels"]) for it in items],
                                                            padding_side="right"))
        batch["tasks"] = [it["task"] for it in items]
        pixels = [it["pixel_values"] for it in items if "pixel_values" in it]
        feats = [it["encoder_features"] for it in items if "encoder_features" in it]
        if pixels and feats:
            raise SphinxError("a batch mixes pixels and cached encoder features")
        if pixels:
            batch["pixel_values"] = torch.cat(pixels, dim=0)  # [n_img, 3, S, S]
        if feats:
            batch["encoder_features"] = {name: torch.cat([f[name] for f in feats], dim=0)  # [n_img * V, T, C]
                                         for name in feats[0]}
        return batch


def answer_token_count(labels: torch.Tensor) -> int:
    """Tokens inside the loss of a [b, L] label batch (shifted: the first position is never a target)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


__all__ = ["FeatureLookup", "SFTCollator", "SFTDataset", "answer_token_count", "encode_record", "truncate"]

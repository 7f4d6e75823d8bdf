"""Converters from public data set formats to the project's conversation JSONL, one module per family.

Each converter is a generator `fn(<inputs>, report, **options) -> Iterator[Record]` that records every
skipped item in a `ConversionReport` by reason. `convert(format, output, ...)` runs one and writes the
JSONL atomically (a temporary file renamed at the end), returning the report.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from sphinx_mllm.data.converters import captions, coco, flickr30k, llava, ocr, refcoco, visual_genome, vqa
from sphinx_mllm.data.converters.common import ConversionReport, Record, write_jsonl
from sphinx_mllm.data.converters.refcoco import load_data_pickle
from sphinx_mllm.utils.errors import SphinxError


@dataclass(frozen=True)
class Format:
    """A convertible format: its converter, the task its records carry and the files it reads."""

    name: str
    converter: Callable[..., Iterator[Record]]
    task: str
    files: str


def _layout(*args: Any, **kwargs: Any) -> Iterator[Record]:
    return coco.coco_boxes(*args, task="layout", **{"id_prefix": "layout", **kwargs})


FORMATS: Mapping[str, Format] = MappingProxyType({f.name: f for f in (
    Format("coco-instances", coco.coco_boxes, "detection", "COCO instances_<split>.json"),
    Format("coco-keypoints", coco.coco_keypoints, "keypoints", "COCO person_keypoints_<split>.json"),
    Format("coco-captions", coco.coco_captions, "caption", "COCO captions_<split>.json"),
    Format("layout", _layout, "layout", "PubLayNet / DocLayNet COCO-format JSON"),
    Format("refcoco", refcoco.refcoco, "rec", "refs(unc).p | refs(umd).p | refs(google).p + instances.json"),
    Format("vqav2", vqa.vqav2, "vqa", "v2_OpenEnded_mscoco_<split>_questions.json [+ annotations]"),
    Format("gqa", vqa.gqa, "gqa", "GQA <split>_questions.json"),
    Format("textvqa", vqa.textvqa, "vqa", "TextVQA_0.5.1_<split>.json"),
    Format("flickr30k-entities", flickr30k.flickr30k_entities, "grounded_caption",
           "Sentences/*.txt + Annotations/*.xml [+ split .txt]"),
    Format("vg-regions", visual_genome.vg_regions, "reg", "region_descriptions.json [+ image_data.json]"),
    Format("vg-relations", visual_genome.vg_relations, "relation", "relationships.json [+ image_data.json]"),
    Format("textocr", ocr.textocr, "ocr", "TextOCR_0.1_<split>.json or cocotext.v2.json"),
    Format("llava", llava.llava_conversations, "conversation", "LLaVA-Instruct .json list or .jsonl"),
    Format("captions", captions.caption_pairs, "caption_pretrain", ".csv / .jsonl / WebDataset .tar shards"),
)})
"""Every format by the name the CLI uses."""


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise SphinxError(f"unknown data format {name!r}; known formats: {', '.join(FORMATS)}") from None


def convert(
    format_name: str, output: str | os.PathLike, *args: Any, limit: int | None = None, **options: Any
) -> ConversionReport:
    """Convert with format `format_name` (`args`/`options` go to its converter) and write `output` JSONL."""
    fmt = get_format(format_name)
    report = ConversionReport(format_name)
    return write_jsonl(fmt.converter(*args, report, **options), output, report, limit=limit)


__all__ = ["FORMATS", "ConversionReport", "Format", "Record", "convert", "get_format", "load_data_pickle"]

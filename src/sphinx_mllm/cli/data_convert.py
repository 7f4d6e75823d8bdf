"""`sphinx-mllm data convert FORMAT ... --output OUT.jsonl`: public data set formats -> conversation JSONL.

One sub-command per format; `sphinx-mllm data convert FORMAT --help` describes the files it reads and
how records are built. The output is written atomically; the report (written, skipped by reason) is
printed at the end.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sphinx_mllm.data.converters import captions as captions_mod
from sphinx_mllm.data.converters import coco, convert, flickr30k, llava, ocr, refcoco, visual_genome, vqa


@dataclass(frozen=True)
class Arg:
    """One command-line argument; `dest` is the converter's parameter name."""

    flag: str
    dest: str
    help: str
    kwargs: dict[str, Any] = field(default_factory=dict)


IMAGES_ROOT = Arg("--images-root", "images_root", "folder the image paths are relative to; when given, "
                  "missing images are skipped and sizes absent from the annotations are read from image headers",
                  {"type": Path})
SEED = Arg("--seed", "seed", "seed of the instruction-wording choice (default 0)", {"type": int, "default": 0})


def _file(flag: str, dest: str, help_text: str, required: bool = True) -> Arg:
    return Arg(flag, dest, help_text, {"type": Path, "required": required})


@dataclass(frozen=True)
class FormatCli:
    """The inputs (passed positionally, in order) and options (keywords) of one format's sub-command."""

    summary: str
    doc: str
    inputs: tuple[Arg, ...]
    options: tuple[Arg, ...] = ()


_PER_CATEGORY = Arg("--per-category", "per_category", "one record per (image, category) instead of one "
                    "multi-turn record per image", {"action": "store_true"})
_MAX_PER_IMAGE = Arg("--max-per-image", "max_per_image", "keep at most N records per image", {"type": int})

COMMANDS: dict[str, FormatCli] = {
    "coco-instances": FormatCli(
        "COCO instances -> detection", coco.__doc__ or "",
        (_file("--annotations", "annotations", "instances_<split>.json"),), (IMAGES_ROOT, SEED, _PER_CATEGORY),
    ),
    "coco-keypoints": FormatCli(
        "COCO person keypoints -> keypoints", coco.__doc__ or "",
        (_file("--annotations", "annotations", "person_keypoints_<split>.json"),), (IMAGES_ROOT, SEED),
    ),
    "coco-captions": FormatCli(
        "COCO captions -> short captions", coco.__doc__ or "",
        (_file("--annotations", "annotations", "captions_<split>.json"),), (IMAGES_ROOT, SEED),
    ),
    "layout": FormatCli(
        "PubLayNet / DocLayNet (COCO format) -> layout", coco.__doc__ or "",
        (_file("--annotations", "annotations", "COCO-format layout JSON (e.g. PubLayNet val.json)"),),
        (IMAGES_ROOT, SEED, _PER_CATEGORY),
    ),
    "refcoco": FormatCli(
        "RefCOCO / RefCOCO+ / RefCOCOg -> REC", refcoco.__doc__ or "",
        (_file("--refs", "refs", "refs(unc).p, refs(umd).p or refs(google).p"),
         _file("--instances", "instances", "the data set's instances.json")),
        (Arg("--split", "split", "split to convert (default val)", {"choices": refcoco.SPLITS, "default": "val"}),
         Arg("--dataset", "dataset", "name used in record ids (default refcoco)", {"default": "refcoco"}),
         IMAGES_ROOT, SEED),
    ),
    "vqav2": FormatCli(
        "VQAv2 -> short-answer VQA", vqa.__doc__ or "",
        (_file("--questions", "questions", "v2_OpenEnded_mscoco_<split>_questions.json"),),
        (_file("--annotations", "annotations", "v2_mscoco_<split>_annotations.json (omit for test)", False),
         _file("--image-info", "image_info", "a COCO JSON of the same images giving their sizes", False),
         IMAGES_ROOT, SEED),
    ),
    "gqa": FormatCli(
        "GQA -> short-answer VQA", vqa.__doc__ or "",
        (_file("--questions", "questions", "<split>_questions.json"),), (IMAGES_ROOT, SEED),
    ),
    "textvqa": FormatCli(
        "TextVQA -> short-answer VQA", vqa.__doc__ or "",
        (_file("--questions", "questions", "TextVQA_0.5.1_<split>.json"),), (IMAGES_ROOT, SEED),
    ),
    "flickr30k-entities": FormatCli(
        "Flickr30k Entities -> grounded captions", flickr30k.__doc__ or "",
        (_file("--entities-root", "root", "folder holding Sentences/ and Annotations/"),),
        (_file("--split-file", "split_file", "train.txt / val.txt / test.txt (default: every image)", False),
         IMAGES_ROOT, SEED),
    ),
    "vg-regions": FormatCli(
        "Visual Genome region descriptions -> REG", visual_genome.__doc__ or "",
        (_file("--regions", "regions", "region_descriptions.json"),),
        (_file("--image-data", "image_data", "image_data.json (sizes and folders)", False),
         IMAGES_ROOT, SEED, _MAX_PER_IMAGE),
    ),
    "vg-relations": FormatCli(
        "Visual Genome relationships -> relation", visual_genome.__doc__ or "",
        (_file("--relationships", "relationships", "relationships.json"),),
        (_file("--image-data", "image_data", "image_data.json (sizes and folders)", False),
         IMAGES_ROOT, SEED, _MAX_PER_IMAGE),
    ),
    "textocr": FormatCli(
        "TextOCR / COCO-Text v2 -> text detection", ocr.__doc__ or "",
        (_file("--annotations", "annotations", "TextOCR_0.1_<split>.json or cocotext.v2.json"),),
        (Arg("--split", "split", "keep images whose 'set' is this (e.g. train, val)", {}),
         Arg("--max-words", "max_words", "keep at most N words per image", {"type": int}), IMAGES_ROOT, SEED),
    ),
    "llava": FormatCli(
        "LLaVA-Instruct conversations -> conversation (checked pass-through)", llava.__doc__ or "",
        (_file("--conversations", "conversations", "llava_instruct_150k.json or a .jsonl"),), (IMAGES_ROOT,),
    ),
    "captions": FormatCli(
        "image-caption pairs -> caption pre-training records", captions_mod.__doc__ or "",
        (Arg("--inputs", "inputs", ".csv / .jsonl / .tar files", {"type": Path, "nargs": "+", "required": True}),),
        (Arg("--domain", "domain", "domain tag of these captions", {"choices": captions_mod.DOMAINS,
                                                                       "required": True}),
         Arg("--extract-to", "extract_to", "folder for images extracted from tar shards", {"type": Path}),
         IMAGES_ROOT),
    ),
}


def register(data_sub: argparse._SubParsersAction) -> None:
    """Add `convert` and its per-format sub-commands under `sphinx-mllm data`."""
    parser = data_sub.add_parser(
        "convert", help="convert a public data set to conversation JSONL",
        description="Convert a public data set format to the project's conversation JSONL. "
        "Run `sphinx-mllm data convert FORMAT --help` for the files a format expects.",
    )
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, spec in COMMANDS.items():
        sub = formats.add_parser(
            name, help=spec.summary, description=spec.doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        for arg in (*spec.inputs, *spec.options):
            sub.add_argument(arg.flag, dest=arg.dest, help=arg.help, **arg.kwargs)
        sub.add_argument("--output", "-o", type=Path, required=True, help="output JSONL file (replaced atomically)")
        sub.add_argument("--limit", type=int, help="stop after N records (a quick look)")
        sub.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Run the chosen format's converter and print its report."""
    spec = COMMANDS[args.format]
    inputs = [getattr(args, a.dest) for a in spec.inputs]
    options = {a.dest: getattr(args, a.dest) for a in spec.options}
    report = convert(args.format, args.output, *inputs, limit=args.limit, **options)
    print(f"wrote {report.written} records to {args.output}")
    for reason, count in sorted(report.skipped.items()):
        print(f"  skipped {reason}: {count}")
    if report.written == 0:
        print("warning: no record was written; check the paths and the format", file=sys.stderr)
    return 0

"""`sphinx-mllm data stats FILE`: describe a record file per task (counts, turns, lengths, images, boxes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sphinx_mllm.data.stats import (
    WHITESPACE_WORDS,
    compute_stats,
    format_table,
    load_token_counter,
    plot_stats,
    stats_json,
)
from sphinx_mllm.utils import SphinxError


def register(data_sub: argparse._SubParsersAction) -> None:
    parser = data_sub.add_parser(
        "stats",
        help="per-task statistics of a conversation/caption JSONL file",
        description=(
            "Per-task counts, turns (answers), text length, image sizes (from the records' width/height), "
            "box and point counts of a .jsonl/.json record file. Broken records are skipped and counted "
            "by reason. Text length is in tokens when --tokenizer is given, else in whitespace words."
        ),
    )
    parser.add_argument("file", type=Path, help="the record file (.jsonl, or a .json list)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json or SentencePiece tokenizer.model (or a folder with one)")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                        help="also write histograms of text length and image size to this PNG")
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise SphinxError(f"record file not found: {args.file}")
    counter = load_token_counter(args.tokenizer) if args.tokenizer is not None else WHITESPACE_WORDS
    stats = compute_stats(args.file, counter)
    print(stats_json(stats) if args.json else format_table(stats))
    if args.plot is not None:
        plot_stats(stats, args.plot)
        if not args.json:
            print(f"wrote {args.plot}")
    return 0

"""`sphinx-mllm infer`: answer every item of a JSONL file, batched, resumable, with per-item error lines.

Input: conversation records (`{"id", "image", "conversations"}`, the last human turn is answered) or simple
items (`{"id", "image"?, "prompt"}`). Output: `{"id", "text"}` per answered item, `{"id", "error"}` per item
that failed; a rerun skips the ids already in the output. Greedy decoding by default (temperature 0).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sphinx_mllm.cli.chat import add_generation_args, generation_config
from sphinx_mllm.utils.errors import SphinxError


def _infer(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sphinx_mllm.inference import SphinxChat
    from sphinx_mllm.inference.batch import count_lines, run_batch

    config = generation_config(args)
    if args.batch_size < 1:
        raise SphinxError(f"--batch-size must be at least 1, got {args.batch_size}")
    total = count_lines(args.input) if Path(args.input).is_file() else None
    chat = SphinxChat.load(args.model, device=args.device, dtype=args.dtype)
    with tqdm(total=total, desc="infer", unit="item", disable=args.no_progress, file=sys.stderr) as bar:
        report = run_batch(chat, args.input, args.output, config, batch_size=args.batch_size,
                           images_root=args.images_root, progress=bar.update)
    print(f"answered {report.answered}, failed {report.failed}, skipped (already done) {report.skipped} "
          f"-> {args.output}")
    for rid, error in list(report.errors.items())[:10]:
        print(f"  {rid}: {error}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("infer", help="batch inference over a JSONL of items (resumable)",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_args(parser, temperature=0.0)
    parser.add_argument("--input", required=True, help="JSONL of items")
    parser.add_argument("--output", required=True, help="JSONL of predictions (appended; reruns resume)")
    parser.add_argument("--batch-size", type=int, default=8, help="items per generate call (default 8)")
    parser.add_argument("--images-root", default=None, help="folder image paths are relative to "
                        "(default: the input file's folder)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_infer)

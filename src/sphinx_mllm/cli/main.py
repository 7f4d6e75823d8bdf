"""`sphinx-mllm` entry point: builds the argparse tree from the per-area modules and maps
`SphinxError` (bad input) to a one-line message and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import configure_logging

# Each module exposes `register(subparsers)` and sets `func` on its parsers.
_AREAS: tuple[str, ...] = (
    "sphinx_mllm.cli.info", "sphinx_mllm.cli.data", "sphinx_mllm.cli.eval", "sphinx_mllm.cli.convert",
    "sphinx_mllm.cli.mix",
    "sphinx_mllm.cli.train", "sphinx_mllm.cli.cache_features",
    "sphinx_mllm.cli.chat", "sphinx_mllm.cli.infer",
    "sphinx_mllm.cli.serve", "sphinx_mllm.cli.demo_ui",
    "sphinx_mllm.cli.world",
)


def build_parser() -> argparse.ArgumentParser:
    import importlib
    import importlib.util

    parser = argparse.ArgumentParser(
        prog="sphinx-mllm",
        description="SPHINX multimodal LLMs: describe presets, prepare data, convert release checkpoints, train, "
        "mix weights, chat, batch-infer, evaluate, serve, and run the synthetic world. "
        "`sphinx-mllm COMMAND --help` explains each command.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for area in _AREAS:
        if importlib.util.find_spec(area) is None:  # an area not built yet
            continue
        importlib.import_module(area).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level.upper())
    func: Callable[[argparse.Namespace], int | None] = args.func
    try:
        return int(func(args) or 0)
    except SphinxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

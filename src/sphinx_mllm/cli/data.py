"""`sphinx-mllm data ...`: convert public data sets to conversation JSONL, and describe a data file."""

from __future__ import annotations

import argparse
import importlib
import importlib.util


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("data", help="prepare data: convert public formats, describe a data file")
    data_sub = parser.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    for name in ("sphinx_mllm.cli.data_convert", "sphinx_mllm.cli.data_stats"):
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(data_sub)

"""`sphinx-mllm world ...`: the synthetic SPHINX world (`world generate`: write its data set)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sphinx_mllm.utils.errors import SphinxError


def _generate(args: argparse.Namespace) -> int:
    from sphinx_mllm.world import WorldConfig, generate_world

    config = WorldConfig(seed=args.seed, size=args.size, image_size=args.image_size)
    workers = args.workers if args.workers is not None else (1 if args.size == "small" else 2)
    if workers < 1:
        raise SphinxError(f"--workers must be >= 1, got {workers}")
    manifest = generate_world(args.out, config, overwrite=args.overwrite, workers=workers)
    summary = {
        "out": str(args.out), "seed": manifest["seed"], "size": manifest["size"],
        "image_size": manifest["image_size"], "images": {s: manifest[s]["images"] for s in ("train", "eval")},
        "records": manifest["records"],
    }
    print(json.dumps(summary, indent=2))
    sys.stdout.flush()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from sphinx_mllm.world import SIZES

    parser = sub.add_parser("world", help="the synthetic SPHINX world: generate its multi-task data set")
    world_sub = parser.add_subparsers(dest="world_command", required=True, metavar="WORLD_COMMAND")
    p = world_sub.add_parser(
        "generate",
        help="write a world: images, task JSONL files, caption corpora, mixtures and manifest.json",
        description="Seeded and byte-identical for the same seed, size and image size. The folder is built "
        "beside OUT and renamed into place; manifest.json, written last, marks a complete world.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="world seed (default 0)")
    p.add_argument("--size", choices=sorted(SIZES), default="default",
                   help="number of images: small (tests, ~100 images) or default (~2900 images)")
    p.add_argument("--image-size", type=int, default=448, help="long side of every image in px (default 448)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes drawing the images (default: 1 for the small size, else 2)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    p.set_defaults(func=_generate)

"""`sphinx-mllm cache-features`: run the frozen encoders once over a mixture's images and store the outputs.

Give the model as in a training config (`--config TRAIN.yaml`: its model section, seed and mixture, and
`data.feature_cache` as the output) or directly (`--model PRESET_OR_FOLDER --mixture M.yaml --output DIR`).
A preset is random-initialised under `--seed` exactly as `sphinx-mllm train` does, so the cache matches
a training run with the same preset and seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sphinx_mllm.data.mixture import MixtureDataset
from sphinx_mllm.training.config import ModelSection, load_config
from sphinx_mllm.training.dist import pick_device
from sphinx_mllm.training.feature_cache import build_feature_cache
from sphinx_mllm.training.model_setup import DTYPES, load_model
from sphinx_mllm.utils import SphinxError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "cache-features",
        help="cache the frozen vision encoders' outputs for a mixture (training then skips the encoders)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--config", type=Path, default=None, help="a training config: model, seed, mixture, output")
    parser.add_argument("--model", default=None, help="preset name or saved model folder")
    parser.add_argument("--init-from", default=None, help="folder whose weights replace the model's (as in training)")
    parser.add_argument("--seed", type=int, default=0, help="init seed of a preset model (run.seed in training)")
    parser.add_argument("--mixture", type=Path, default=None, help="mixture YAML whose images are cached")
    parser.add_argument("--output", "-o", type=Path, default=None, help="cache folder (created or completed)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per encoder pass")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="stored feature dtype")
    parser.add_argument("--shard-size-mb", type=int, default=1024, help="target size of one shard file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.set_defaults(func=run)


def _resolve(args: argparse.Namespace) -> tuple[ModelSection, int, Path, Path]:
    if args.config is not None:
        cfg = load_config(args.config)
        section, seed, mixture = cfg.model, cfg.run.seed, Path(cfg.data.mixture)
        output = args.output or (Path(cfg.data.feature_cache) if cfg.data.feature_cache else None)
        if output is None:
            raise SphinxError("the config has no data.feature_cache; pass --output")
        return section, seed, mixture, output
    if args.model is None or args.mixture is None or args.output is None:
        raise SphinxError("pass --config TRAIN.yaml, or all of --model, --mixture and --output")
    section = ModelSection(name=args.model, init_from=args.init_from)
    return section, args.seed, args.mixture, args.output


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1 or args.shard_size_mb < 1:
        raise SphinxError("--batch-size and --shard-size-mb must be >= 1")
    section, seed, mixture_path, output = _resolve(args)
    model = load_model(section, seed)
    model.eval().to(pick_device(args.device, 0))
    mixture = MixtureDataset.from_yaml(mixture_path)
    images = (rec["image"] for rec in (mixture[i] for i in range(len(mixture))) if rec.get("image"))
    report = build_feature_cache(model, images, output, batch_size=args.batch_size, dtype=DTYPES[args.dtype],
                                 shard_bytes=args.shard_size_mb << 20)
    print(f"{output}: {report.images} distinct images, {report.already_cached} already cached, "
          f"{report.computed} computed, {report.bad_images} unreadable, {report.shards_written} shard(s) written")
    return 0

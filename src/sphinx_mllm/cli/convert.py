"""`sphinx-mllm convert SRC DST`: move checkpoints between the release's layout and ours.

Two directions:
  sphinx-mllm convert RELEASE_DIR OUT_DIR
      a release folder (consolidated.NN-of-MM.model.pth + config.json + meta.json + tokenizer.model, as
      downloaded for SPHINX, SPHINX-1k, SPHINX-v2-1k, SPHINX-Tiny(-1k), SPHINX-MoE(-1k)) -> our Hugging Face
      folder (safetensors shards, config, processor and tokenizer files), loadable with
      SphinxForConditionalGeneration.from_pretrained / SphinxProcessor.from_pretrained.
  sphinx-mllm convert --to release MODEL_DIR OUT_DIR [--shards N]
      a model saved by sphinx-mllm (or a release folder, to re-shard it) -> a release folder with N
      tensor-parallel shards that LLaMA2-Accessory loads, plus sphinx_mllm.json (our full config) so models
      whose encoders are not the release's read back exactly.

A release folder can also be loaded directly, without converting: from_pretrained accepts it.
The output appears complete or not at all (written beside OUT_DIR, then renamed).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sphinx_mllm.utils.errors import SphinxError

DTYPES = ("auto", "float32", "bfloat16", "float16")


def _progress_bar(desc: str, unit: str) -> tuple[Callable[[int, int], None], Any]:
    """A tqdm bar driven by the library's (done, total) progress callback."""
    from tqdm.auto import tqdm

    bar = tqdm(desc=desc, unit=unit, leave=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update, bar


def run(args: argparse.Namespace) -> int:
    from sphinx_mllm.formats.conversion import release_to_hf, to_release

    if args.shards < 1:
        raise SphinxError(f"--shards must be at least 1, got {args.shards}")
    if args.to == "hf" and args.shards != 1:
        raise SphinxError("--shards applies to --to release only")
    if args.to == "hf":
        update, bar = _progress_bar("loading release tensors", "tensor")
        try:
            out = release_to_hf(args.src, args.dst, dtype=args.dtype, max_shard_size=args.max_shard_size,
                                check_replicas=not args.no_check_replicas, overwrite=args.overwrite, progress=update)
        finally:
            bar.close()
    else:
        update, bar = _progress_bar("writing release shards", "shard")
        try:
            out = to_release(args.src, args.dst, num_shards=args.shards, dtype=args.dtype, overwrite=args.overwrite,
                             progress=update)
        finally:
            bar.close()
    print(f"wrote {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("convert", help="convert release checkpoints to our format, or ours to the release's",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", metavar="SRC", help="release folder (default direction) or our model folder")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist unless --overwrite)")
    parser.add_argument("--to", choices=("hf", "release"), default="hf",
                        help="hf: release -> our Hugging Face format (default); release: ours -> release folder")
    parser.add_argument("--shards", type=int, default=1,
                        help="tensor-parallel shards to write with --to release (the 13B release uses 2, MoE 8)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="tensor dtype of the output; auto keeps the source's (the release ships bfloat16)")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size for --to hf")
    parser.add_argument("--no-check-replicas", action="store_true",
                        help="skip comparing replicated tensors across release shards (faster)")
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.set_defaults(func=run)

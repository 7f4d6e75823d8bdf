"""`sphinx-mllm train CONFIG.yaml [--section.key VALUE ...] [--resume]` and `sphinx-mllm fold-adapter`.

The same command runs on one process or under torchrun:
`torchrun --nproc_per_node 2 -m sphinx_mllm.cli.main train CONFIG.yaml --run.parallel fsdp`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from sphinx_mllm.training import fold_adapter, load_config, parse_overrides, train
from sphinx_mllm.utils import SphinxError


class ProgressBar:
    """tqdm bar on rank 0: loss, lr, input tokens/s of the last step (image placeholders included), ETA."""

    def __init__(self) -> None:
        self.bar: Any = None
        self.last_time = 0.0

    def on_start(self, start_step: int, total_steps: int) -> None:
        import time

        from tqdm.auto import tqdm

        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        self.last_time = time.perf_counter()

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        import time

        now = time.perf_counter()
        rate = metrics["input_tokens"] / max(now - self.last_time, 1e-9)
        self.last_time = now
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", tok_s=f"{rate:.0f}")
        self.bar.update(1)

    def on_end(self) -> None:
        if self.bar is not None:
            self.bar.close()


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "train",
        help="train a SPHINX model (pretrain / finetune / projector stage, LoRA, DDP / FSDP2 under torchrun)",
        description=(
            "Train from a YAML config. Any config key can be overridden as --section.key VALUE (e.g. "
            "--optim.lr 1e-4 --run.max_steps 100); --resume continues from the latest complete checkpoint. "
            "Under torchrun: torchrun --nproc_per_node N -m sphinx_mllm.cli.main train CONFIG.yaml"
        ),
    )
    parser.add_argument("config", type=Path, help="training config YAML (see configs/)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="--section.key VALUE",
                        help="config overrides; --resume resumes")
    parser.set_defaults(func=run_train)

    fold = sub.add_parser(
        "fold-adapter",
        help="merge a LoRA / bias-only adapter into its base model and save full weights",
        description="Load BASE, put the adapter on top, merge it (peft merge_and_unload) and save to OUTPUT.",
    )
    fold.add_argument("--base", type=Path, default=None,
                      help="base model folder (default: base_model_name_or_path of the adapter)")
    fold.add_argument("--adapter", type=Path, required=True, help="adapter folder (a run's final/)")
    fold.add_argument("-o", "--output", type=Path, required=True, help="output model folder")
    fold.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    fold.set_defaults(func=run_fold)


def run_train(args: argparse.Namespace) -> int:
    rest = [a for a in args.overrides if a != "--"]
    # Flags written after CONFIG land in the remainder too.
    args.print_config = args.print_config or "--print-config" in rest
    args.no_progress = args.no_progress or "--no-progress" in rest
    overrides = parse_overrides([a for a in rest if a not in ("--print-config", "--no-progress")])
    config = load_config(args.config, overrides)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    rank = int(os.environ.get("RANK", "0"))
    callbacks = [] if args.no_progress or rank != 0 else [ProgressBar()]
    result = train(config, callbacks)
    if rank == 0:
        print(f"trained {result.steps} steps; metrics: {result.metrics_path}; final: {result.final_dir}")
    return 0


def run_fold(args: argparse.Namespace) -> int:
    import json

    config_file = args.adapter / "adapter_config.json"
    if not config_file.is_file():
        raise SphinxError(f"{args.adapter} is not an adapter folder (no adapter_config.json)")
    base = args.base
    if base is None:
        recorded = json.loads(config_file.read_text()).get("base_model_name_or_path")
        if not recorded:
            raise SphinxError("the adapter does not record its base model; pass --base")
        base = Path(recorded)
    if args.output.exists() and not args.overwrite:
        raise SphinxError(f"{args.output} exists; pass --overwrite to replace it")
    out = fold_adapter(base, args.adapter, args.output, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0

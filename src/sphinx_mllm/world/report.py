"""The report of a world recipe run: `report.md`, `report.json` and PNG plots under `plots/`.

It reads what the steps left in the run folder (steps.json, each stage's metrics.jsonl, the evaluation
runs' predictions) and shows the sighted model beside its blind twin: a metrics table with the issue's
targets, the caption losses of the two specialists and the mixed model, the shuffle check, loss curves of
every stage, the encoders' pre-training curves, and example images with the predicted boxes and
keypoints drawn (`sphinx_mllm.inference.draw`).
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from sphinx_mllm.utils import atomic_write_bytes, atomic_write_text, get_logger
from sphinx_mllm.world.packing import read_records

log = get_logger(__name__)

STAGES: tuple[str, ...] = ("language", "projector", "pretrain_real", "pretrain_synthetic", "finetune")
"""The LLM stages drawn; `language` is shared by the arms (text only, in the run folder itself)."""
HEADLINE: dict[str, str] = {
    "vqa": "accuracy", "gqa": "accuracy", "rec": "accuracy", "reg": "CIDEr", "relation": "accuracy",
    "caption": "CIDEr", "grounded_caption": "phrase_recall", "detection": "AP50", "layout": "AP50",
    "keypoints": "AP", "ocr": "word_recall",
}
"""The metric shown for each task (a key of its `tasks.metrics` result)."""
EXAMPLE_TASKS: tuple[str, ...] = ("rec", "detection", "keypoints", "layout", "ocr", "grounded_caption")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The file's rows, or none when a step did not write it."""
    return read_records(path) if path.is_file() else []


def metric_value(metrics: Mapping[str, Any], key: str) -> float | None:
    """`"rec.accuracy"` -> metrics["rec"]["accuracy"] (None when absent)."""
    task, _, name = key.partition(".")
    value = metrics.get(task, {}).get(name)
    return float(value) if isinstance(value, int | float) else None


def check_targets(targets: Mapping[str, float], sighted: Mapping[str, Any], blind: Mapping[str, Any] | None
                  ) -> list[dict[str, Any]]:
    """One row per target: value reached (a difference for "x - blind" targets), bar, and whether it is met."""
    rows = []
    for key, bar in targets.items():
        if key.endswith(" - blind"):
            base = key.removesuffix(" - blind")
            s = metric_value(sighted, base)
            b = metric_value(blind or {}, base)
            value = None if s is None or b is None else s - b
        else:
            value = metric_value(sighted, key)
        rows.append({"metric": key, "target": bar, "value": value, "met": value is not None and value >= bar})
    return rows


# ----------------------------------------------------------------------------- plots


def _figure_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stage_curves(out: Path, arms: Sequence[str], path: Path) -> bool:
    """One panel per LLM stage that ran (the binding stage first, when there was one): training loss against
    step, one line per arm."""
    panels: list[tuple[str, list[tuple[str, list[float], list[float]]]]] = []
    bind = out / "bind" / "losses.json"
    if bind.is_file():  # binding: one shared stage, a loss per step, in place of the language stage
        losses = json.loads(bind.read_text())
        panels.append(("bind", [("both arms (binding)", list(range(1, len(losses) + 1)), losses)]))
    for stage in STAGES:
        lines = []
        for arm in arms if stage != "language" else ["both arms"]:
            folder = out / stage if stage == "language" else out / arm / stage
            records = [r for r in _read_jsonl(folder / "metrics.jsonl") if math.isfinite(r.get("loss", math.nan))]
            if records:
                lines.append((arm, [r["step"] for r in records], [r["loss"] for r in records]))
        if lines:
            panels.append((stage, lines))
    if not panels:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, steps, losses in lines:
            colour = {"sighted": "tab:blue", "blind": "tab:gray"}.get(label, "tab:green")
            if title == "bind":
                ax.plot(steps, losses, label=label, color=colour, linewidth=0.8)
            else:
                ax.plot(steps, losses, label=label, color=colour, marker="o", markersize=2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0][0].set_ylabel("loss per answer token")
    atomic_write_bytes(path, _figure_png(fig))
    return True


def plot_encoder_curves(out: Path, path: Path) -> bool:
    """Pre-training loss of each encoder (smoothed over 10 steps)."""
    file = out / "encoders.json"
    if not file.is_file():
        return False
    losses: dict[str, list[float]] = json.loads(file.read_text())["losses"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.2))
    axes = axes if len(losses) > 1 else [axes]
    for ax, (name, values) in zip(axes, losses.items()):
        smooth = [sum(values[max(0, i - 9): i + 1]) / len(values[max(0, i - 9): i + 1]) for i in range(len(values))]
        ax.plot(range(1, len(values) + 1), smooth, color="tab:green")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pre-training loss")
    atomic_write_bytes(path, _figure_png(fig))
    return True


def plot_metrics(rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    """Bars of the headline metric of each task, sighted beside blind."""
    if not rows:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.9), 3.4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["sighted"] or 0 for r in rows], 0.4, label="sighted", color="tab:blue")
    ax.bar([x + 0.2 for x in xs], [r["blind"] or 0 for r in rows], 0.4, label="blind twin", color="tab:gray")
    ax.set_xticks(list(xs), [f"{r['task']}\n{r['metric']}" for r in rows], fontsize=7)
    ax.set_ylim(0, 1.05 * max(1.0, *(r["sighted"] or 0 for r in rows)))
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    atomic_write_bytes(path, _figure_png(fig))
    return True


def draw_examples(out: Path, path: Path, per_task: int = 1, tile: int = 320) -> list[dict[str, str]]:
    """Held-out images of the sighted model's evaluation with its answers drawn; returns what was shown."""
    from sphinx_mllm.inference.draw import draw_answer

    shown, tiles = [], []
    for task in EXAMPLE_TASKS:
        run = out / "sighted" / "eval" / task
        requests = {r["id"]: r for r in _read_jsonl(run / "requests.jsonl")}
        for pred in _read_jsonl(run / "predictions.jsonl")[:per_task]:
            req = requests.get(pred["id"])
            if req is None or "text" not in pred:
                continue
            image = Image.open(out / "world" / req["image"]).convert("RGB")
            drawn = draw_answer(image, pred["text"])
            drawn.thumbnail((tile, tile))
            canvas = Image.new("RGB", (tile, tile + 18), "white")
            canvas.paste(drawn, (0, 18))
            ImageDraw.Draw(canvas).text((4, 3), task, fill="black")
            tiles.append(canvas)
            shown.append({"task": task, "image": req["image"], "prompt": req["prompt"], "answer": pred["text"]})
    if not tiles:
        return shown
    cols = min(3, len(tiles))
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * tile, rows * (tile + 18)), "white")
    for k, t in enumerate(tiles):
        sheet.paste(t, ((k % cols) * tile, (k // cols) * (tile + 18)))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return shown


# ----------------------------------------------------------------------------- the report


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _encoder_checks(held_out: Mapping[str, Mapping[str, float]]) -> list[str]:
    """The held-out probe of each encoder through its own heads (`encoders.probe_encoders`), per-category recalls
    apart: on the cell of each object's centre, in every view."""
    if not held_out:
        return []
    rows = []
    for name, rates in held_out.items():
        main = ", ".join(f"{k} {_fmt(v, 2)}" for k, v in rates.items() if "/" not in k)
        per = ", ".join(f"{k.split('/', 1)[1]} {_fmt(v, 2)}" for k, v in rates.items() if "/" in k)
        rows.append([name, main, per or "-"])
    return ["Held-out check through each encoder's own heads (held-out images, the cell of each object's centre, "
            "every view):", "", *_table(["encoder", "accuracies", "thing category recall by class"], rows), ""]


def _result(steps: Mapping[str, Any], name: str) -> Any:
    return (steps.get(name) or {}).get("result")


def write_report(out: str | os.PathLike, steps: Mapping[str, Any], plan: Any, targets: Mapping[str, float],
                 seconds: float) -> dict[str, Any]:
    """Write report.md, report.json and plots/ into the run folder `out`; returns the JSON summary."""
    out = Path(out)
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    sighted = _result(steps, "sighted/evaluate") or {}
    blind = _result(steps, "blind/evaluate")
    arms = ["sighted"] + (["blind"] if blind is not None else [])
    rows = []
    for task, metric in HEADLINE.items():
        s, b = metric_value(sighted, f"{task}.{metric}"), metric_value(blind or {}, f"{task}.{metric}")
        if s is not None:
            rows.append({"task": task, "metric": metric, "sighted": s, "blind": b})
    target_rows = check_targets(targets, sighted, blind)
    summary = {
        "plan": plan.name, "seconds": round(seconds, 1), "machine": {"cpus": os.cpu_count(),
                                                                      "platform": platform.platform()},
        "step_seconds": {k: v["seconds"] for k, v in steps.items()},
        "metrics": {"sighted": sighted, "blind": blind}, "headline": rows, "targets": target_rows,
        "mixing": {arm: _result(steps, f"{arm}/caption_losses") for arm in arms},
        "shuffle_check": _result(steps, "shuffle_check"), "encoders": _result(steps, "encoders"),
        "world": _result(steps, "world"), "data": _result(steps, "data"), "plan_settings": asdict(plan),
        "written": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    figures = {
        "stages": plot_stage_curves(out, arms, plots / "loss_curves.png"),
        "encoders": plot_encoder_curves(out, plots / "encoders.png"),
        "metrics": plot_metrics(rows, plots / "metrics.png"),
    }
    summary["examples"] = draw_examples(out, plots / "examples.png")
    atomic_write_text(out / "report.json", json.dumps(summary, indent=1, default=str) + "\n")
    atomic_write_text(out / "report.md", "\n".join(_markdown(summary, figures, plan)) + "\n")
    log.info("wrote %s", out / "report.md")
    return summary


def _markdown(summary: Mapping[str, Any], figures: Mapping[str, bool], plan: Any) -> list[str]:
    lines = [f"# SPHINX world recipe: {summary['plan']} run", "",
             f"`sphinx-mllm world run{' --quick' if summary['plan'] == 'quick' else ''}` on "
             f"{summary['machine']['cpus']} CPU(s), {summary['seconds'] / 60:.1f} minutes in all "
             f"(written {summary['written']}).", ""]
    if summary["targets"]:
        lines += ["## Targets", ""]
        lines += _table(["metric", "target", "reached", "met"],
                        [[r["metric"], _fmt(r["target"], 2), _fmt(r["value"]), "yes" if r["met"] else "**no**"]
                         for r in summary["targets"]])
        lines.append("")
    lines += ["## Every task: sighted model and blind twin", "",
              "The blind twin runs the same recipe with every image replaced by a blank one (zero pixels after "
              "normalisation).", ""]
    lines += _table(["task", "metric", "sighted", "blind twin"],
                    [[r["task"], r["metric"], _fmt(r["sighted"]), _fmt(r["blind"])] for r in summary["headline"]])
    lines.append("")
    if figures.get("metrics"):
        lines += ["![metrics](plots/metrics.png)", ""]
    lines += _mixing_lines(summary)
    check = summary.get("shuffle_check")
    if check:
        lines += ["## Shuffle check", "",
                  f"Held-out answer loss of the fine-tuned model: {_fmt(check['loss'])} with each item's own image, "
                  f"{_fmt(check['shuffled_loss'])} with the images swapped between items ({check['tokens']} tokens)."
                  + (f" Items answered exactly (teacher-forced): {_fmt(check['accuracy'])} and "
                     f"{_fmt(check['shuffled_accuracy'])} ({check['items']} items)." if "accuracy" in check else ""),
                  ""]
    if figures.get("stages"):
        lines += ["## Training curves", "", "![loss curves](plots/loss_curves.png)", ""]
    if figures.get("encoders"):
        enc = summary.get("encoders") or {}
        lines += ["## Encoder pre-training", "",
                  "clip: contrastive image-text (CLIP); convnext: dense supervised semantics; dinov2: masked dense "
                  "geometry. Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in (enc.get("seconds") or {}).items()),
                  "", "![encoders](plots/encoders.png)", ""]
        lines += _encoder_checks(enc.get("held_out") or {})
    if summary.get("examples"):
        lines += ["## Examples (held-out images, predictions drawn)", "", "![examples](plots/examples.png)", ""]
        lines += _table(["task", "prompt", "answer"],
                        [[e["task"], e["prompt"].replace("\n", " "), e["answer"][:160].replace("|", "/")]
                         for e in summary["examples"]])
        lines.append("")
    lines += ["## Time per step", ""]
    lines += _table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in summary["step_seconds"].items()])
    return lines


def _mixing_lines(summary: Mapping[str, Any]) -> list[str]:
    mixing = (summary.get("mixing") or {}).get("sighted")
    if not mixing:
        return []
    losses = mixing["losses"]
    rows = [[label, _fmt(v["real"]), _fmt(v["synthetic"])] for label, v in losses.items()]
    rows.append(["mean of the specialists", _fmt((losses["real"]["real"] + losses["synthetic"]["real"]) / 2),
                 _fmt((losses["real"]["synthetic"] + losses["synthetic"]["synthetic"]) / 2)])
    verdict = mixing["mixed_not_worse_than_mean"]
    beta = mixing.get("beta")
    how = ("chosen on the captions of training images that caption pre-training left out, not on these" if
           mixing.get("beta_chosen") else "the plan's")
    formula = [f"Mixed: theta = {beta:g} theta_real + {1 - beta:g} theta_synthetic (beta {how}).", ""] \
        if beta is not None else []
    return ["## Weight mixing (held-out caption loss per domain)", "", *formula,
            *_table(["model", "real-domain captions", "synthetic-domain captions"], rows), "",
            "Mixed model no worse than the specialists' mean: " + ", ".join(
                f"{d}: {'yes' if ok else '**no**'}" for d, ok in verdict.items()), ""]


__all__ = ["HEADLINE", "check_targets", "draw_examples", "metric_value", "plot_encoder_curves", "plot_metrics",
           "plot_stage_curves", "write_report"]

"""Training: tokens/s (every input token, image placeholders included), MFU and peak memory of
`sphinx-mllm train` on a small model (the `debug` encoders under a ~58M-parameter LLaMA, fp32 weights with bf16
autocast, caption pre-training stage, global batch 8 in micro-batches of 2, 1 view = 267 image tokens per
sample), with live encoders vs cached features (`sphinx-mllm cache-features`), on 1 process vs 2 (torchrun,
gloo, DDP; the same global batch, so the same optimisation). Each run is a measured child process (peak memory
summed over its processes); tokens/s is the median of the per-step records after the first two steps.

MFU = tokens/s x FLOPs per token / the bf16 matmul peak of the cores the run uses (the limit measured at the
bench's thread count, scaled by cores). FLOPs per token are counted by torch's FlopCounterMode over one
forward + backward of a training micro-batch run as the trainer runs it (logits only at label positions),
encoders included when they run. What the cache should save (the encoders' forward plus loading and
preprocessing the image, against the whole micro-batch) is measured in this process.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    GB,
    BenchContext,
    command_line,
    limits,
    main_for,
    python_exe,
    repeat,
    run_measured,
    table,
)

NAME = "training"
WORDS = ("a an the photo picture of with red green blue small large dog cat car tree house street person left "
         "right near far under over sky road window door bright dark old new two three many people animal "
         "building field water sitting standing walking parked next to in on at").split()
SMALL_LLM = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=8)


def write_tokenizer(folder: Path) -> Path:
    """A LLaMA-format SentencePiece BPE model (<unk>=0, <s>=1, </s>=2, byte fallback) trained here."""
    import sentencepiece as spm

    path = folder / "tokenizer.model"
    if path.is_file():
        return path
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(16)) for _ in range(3000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=600, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, add_dummy_prefix=True, minloglevel=2)
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.getvalue())
    return path


def write_data(folder: Path, count: int) -> Path:
    """Caption pre-training records over synthetic photos, and their mixture YAML (release META layout)."""
    from PIL import Image

    from bench.preprocessing import synthetic_photos

    photos = synthetic_photos(min(count, 16), folder / "images")
    rng = random.Random(0)
    records = []
    for i in range(count):
        photo = photos[i % len(photos)]
        with Image.open(photo) as im:
            width, height = im.size
        caption = " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 24)))
        records.append({"id": f"cap{i}", "image": photo.name, "width": width, "height": height,
                        "task": "caption_pretrain", "caption": caption, "domain": "real"})
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    mixture = folder / "captions.yaml"
    mixture.write_text("META:\n  - path: captions.jsonl\n    type: caption\n    root: images\n")
    return mixture


def write_model(folder: Path, tokenizer: Path, smoke: bool) -> Path:
    """The small model (random init, seed 0) saved with its processor; reused when already there."""
    from sphinx_mllm.config import SphinxConfig
    from sphinx_mllm.modeling import SphinxForConditionalGeneration
    from sphinx_mllm.processing import SphinxProcessor, load_tokenizer

    if (folder / "config.json").is_file():
        return folder
    config = SphinxConfig.from_preset("debug")
    if not smoke:
        config = SphinxConfig.from_preset("debug", text_config={**config.text_config.to_dict(), **SMALL_LLM})
    torch.manual_seed(0)
    model = SphinxForConditionalGeneration(config)
    processor = SphinxProcessor.from_config(config, load_tokenizer(tokenizer))
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def train_config(model: Path, mixture: Path, steps: int) -> dict[str, Any]:
    return {
        "model": {"name": str(model)},
        "data": {"mixture": str(mixture), "batch_size": 8, "micro_batch_size": 2, "max_length": 512,
                 "group_by_length": False},
        "optim": {"lr": 1e-4, "warmup_steps": 0},
        "stage": "pretrain",
        "run": {"output_dir": "", "max_steps": steps, "log_every": 1, "save_every": 0, "bf16": True, "seed": 0,
                "device": "cpu"},
    }


def _micro_batch(model_dir: Path, mixture: Path, cached: Path | None) -> tuple[Any, dict[str, Any], float]:
    """The model, one training micro-batch (2 items, the trainer's data path) and the seconds one item takes to
    build (load + preprocess the image, or read its cached features; tokenise)."""
    from sphinx_mllm.data.mixture import MixtureDataset
    from sphinx_mllm.data.sft import SFTCollator, SFTDataset
    from sphinx_mllm.modeling import SphinxForConditionalGeneration
    from sphinx_mllm.processing import SphinxProcessor
    from sphinx_mllm.training.feature_cache import FeatureCache

    model = SphinxForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    processor = SphinxProcessor.from_pretrained(model_dir)
    lookup = FeatureCache(cached).features_for_image if cached is not None else None
    dataset = SFTDataset(MixtureDataset.from_yaml(mixture), processor, 512, feature_lookup=lookup)
    item_s = repeat(lambda: [dataset[i] for i in range(4)], warmup=1, repeats=3).median / 4
    return model, SFTCollator(processor, 2)([dataset[0], dataset[1]])[0], item_s


def measure_step_parts(model_dir: Path, mixture: Path, cached: Path | None) -> dict[str, float]:
    """FLOPs per input token of a training micro-batch as the trainer runs it (bf16 autocast, logits only at
    the label positions), the seconds of its forward + backward, of the encoders alone, and of building
    one item."""
    from torch.utils.flop_counter import FlopCounterMode

    model, mb, item_s = _micro_batch(model_dir, mixture, cached)
    labels = mb["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)  # position t predicts label t + 1 (the trainer's rule)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    inputs = {k: v for k, v in mb.items() if k in ("input_ids", "attention_mask", "pixel_values", "encoder_features")}
    model.train()

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.float(), targets).backward()
        model.zero_grad(set_to_none=True)

    def encode() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            model.vision(mb["pixel_values"])

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    tokens = int(mb["attention_mask"].sum())
    return {"flops_per_token": counter.get_total_flops() / tokens, "micro_batch_s": repeat(step, 1, 3).median,
            "encoder_s": repeat(encode, 1, 5).median if "pixel_values" in mb else 0.0, "item_s": item_s,
            "tokens": tokens}


def run_training(ctx: BenchContext, cfg: dict[str, Any], out: Path, procs: int) -> dict[str, Any]:
    """One measured `sphinx-mllm train` run; returns tokens/s (median after 2 steps) and peak memory."""
    from sphinx_mllm.utils import atomic_write_text

    ctx.settle()

    shutil.rmtree(out, ignore_errors=True)
    cfg = json.loads(json.dumps(cfg))
    cfg["run"]["output_dir"] = str(out)
    cfg["run"]["parallel"] = "ddp" if procs > 1 else "none"
    path = out.with_suffix(".yaml")
    atomic_write_text(path, json.dumps(cfg))
    threads = max(1, ctx.threads // procs)
    train_args = ["train", str(path), "--no-progress"]
    if procs > 1:
        cmd = [python_exe(), "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               "-m", "sphinx_mllm.cli.main", *train_args]
    else:
        cmd = [python_exe(), "-m", "sphinx_mllm.cli.main", *train_args]
    stats = run_measured(cmd, env={"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"})
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_s"] for r in records[2:]] or [r["tokens_per_s"] for r in records]
    return {"tokens_per_s": statistics.median(steady), "steps": len(records), "wall_s": stats.seconds,
            "peak_rss_gb": stats.peak_rss_bytes / GB, "peak_anon_gb": stats.peak_anon_bytes / GB,
            "threads_per_process": threads, "per_step_tokens_per_s": [r["tokens_per_s"] for r in records]}


def build_cache(model: Path, mixture: Path, out: Path, threads: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [python_exe(), "-m", "sphinx_mllm.cli.main", "cache-features", "--model", str(model), "--mixture",
           str(mixture), "--output", str(out), "--dtype", "bfloat16", "--device", "cpu"]
    return run_measured(cmd, env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}).seconds


def run(ctx: BenchContext) -> dict[str, Any]:
    lim = limits(ctx)
    work = ctx.work_dir / "training"
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = write_tokenizer(work / "tokenizer")
    mixture = write_data(work / "data", 16 if ctx.smoke else 96)
    model = write_model(work / ("model_debug" if ctx.smoke else "model_small"), tokenizer, ctx.smoke)
    cache = work / "features"
    cache_s = build_cache(model, mixture, cache, ctx.threads)
    steps = 3 if ctx.smoke else 12
    cfg = train_config(model, mixture, steps)
    cached_cfg = json.loads(json.dumps(cfg))
    cached_cfg["data"]["feature_cache"] = str(cache)
    parts = {"live": measure_step_parts(model, mixture, None), "cached": measure_step_parts(model, mixture, cache)}
    configs = {"live": cfg, "cached": cached_cfg}
    # Smoke: one run per code path (live on 1 process, cached on 2) to keep it short.
    combos = [(1, "live"), (2, "cached")] if ctx.smoke else [(1, "live"), (1, "cached"), (2, "live"), (2, "cached")]
    rows = []
    for procs, kind in combos:
        got = [run_training(ctx, configs[kind], work / f"run_{procs}p_{kind}", procs) for _ in range(ctx.reps(full=1))]
        mid = sorted(got, key=lambda g: g["tokens_per_s"])[len(got) // 2]
        cores = min(len(os.sched_getaffinity(0)), procs * mid["threads_per_process"])
        peak = lim["bf16_gflops"] * 1e9 * cores / ctx.threads  # the limit was measured on ctx.threads cores
        rows.append({"processes": procs, "encoders": kind, "cores": cores, "tokens_per_s": mid["tokens_per_s"],
                     "samples_per_s": mid["tokens_per_s"] / (parts[kind]["tokens"] / 2),
                     "mfu": mid["tokens_per_s"] * parts[kind]["flops_per_token"] / peak,
                     "peak_rss_gb": mid["peak_rss_gb"], "peak_anon_gb": mid["peak_anon_gb"],
                     "gflop_per_token": parts[kind]["flops_per_token"] / 1e9, "runs": got})
    by = {(r["processes"], r["encoders"]): r for r in rows}
    for (procs, kind), row in by.items():
        if kind == "cached" and (procs, "live") in by:
            row["cache_speedup"] = row["tokens_per_s"] / by[(procs, "live")]["tokens_per_s"]
        if procs == 2 and (1, kind) in by:
            row["vs_1_process"] = row["tokens_per_s"] / by[(1, kind)]["tokens_per_s"]
    # What the cache removes from a step: the encoders' forward and the image loading + preprocessing.
    live, cached = parts["live"], parts["cached"]
    saved = live["encoder_s"] + 2 * (live["item_s"] - cached["item_s"])
    whole = live["micro_batch_s"] + 2 * live["item_s"]
    share = max(0.0, saved / whole)
    notes = {"cache_share_of_step": share, "predicted_cache_speedup": 1 / max(1e-9, 1 - share),
             "cache_build_s": cache_s, "steps": steps, "step_parts": parts}
    cols = ["processes", "encoders", "cores", "tokens_per_s", "samples_per_s", "mfu", "peak_rss_gb",
            "peak_anon_gb", "cache_speedup", "vs_1_process"]
    title = (f"Training, {steps} steps, global batch 8 (micro 2), bf16 autocast; encoders + image preprocessing "
             f"are {share:.1%} of a step (a cache should gain ~{notes['predicted_cache_speedup']:.2f}x)")
    return {"rows": rows, "notes": notes, "limits_used": lim, "tables": table(title, rows, cols)}


def command(ctx: BenchContext) -> str:
    return command_line("bench.training", ctx)


if __name__ == "__main__":
    raise SystemExit(main_for(__import__(__name__)))

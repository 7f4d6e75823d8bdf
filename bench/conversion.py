"""Release-folder conversion: `sphinx-mllm convert` of a multi-GB synthetic release checkpoint
(`consolidated.NN-of-02.model.pth`, bf16: the `debug` encoders under a TinyLlama-1.1B-shaped LLM, random
weights) into our Hugging Face folder, and back (`--to release --shards 2`), each as a child process: wall
seconds, seconds until the output is on disk (fsynced after the process exits), peak memory (RSS and
anonymous) and disk bytes moved as a fraction of the disk limit. The page cache is emptied of the input before
each run. There is no peer: no other tool reads these folders.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    GB,
    BenchContext,
    command_line,
    folder_bytes,
    limits,
    main_for,
    measured_write,
    python_exe,
    table,
)

NAME = "conversion"
MANIFEST = "bench_manifest.json"


def make_release(folder: Path, smoke: bool) -> Path:
    """The synthetic release folder (reused when its manifest matches)."""
    from bench.inference import _default_dtype, tinyllama_text_config
    from sphinx_mllm.config import SphinxConfig
    from sphinx_mllm.formats.writer import save_release
    from sphinx_mllm.modeling import SphinxForConditionalGeneration

    want = {"smoke": smoke, "llm": "debug" if smoke else "tinyllama", "shards": 2, "version": 1}
    manifest = folder.parent / f"{folder.name}.{MANIFEST}"
    if folder.is_dir() and manifest.is_file() and json.loads(manifest.read_text()) == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    overrides = {} if smoke else {"text_config": tinyllama_text_config()}
    config = SphinxConfig.from_preset("debug", **overrides)
    torch.manual_seed(0)
    with _default_dtype(torch.bfloat16):
        model = SphinxForConditionalGeneration(config)
    save_release(model.to(torch.bfloat16), folder, num_shards=2)
    manifest.write_text(json.dumps(want))
    return folder


def run(ctx: BenchContext) -> dict[str, Any]:
    lim = limits(ctx)
    work = ctx.work_dir / "conversion"
    work.mkdir(parents=True, exist_ok=True)
    release = make_release(work / "release", ctx.smoke)
    hf_out, back_out = work / "hf", work / "release_again"
    cli = [python_exe(), "-m", "sphinx_mllm.cli.main"]
    jobs = {
        "release -> hf": (cli + ["convert", str(release), str(hf_out), "--overwrite"], release, hf_out),
        "hf -> release (2 shards)": (cli + ["convert", "--to", "release", str(hf_out), str(back_out), "--shards", "2",
                                            "--overwrite"], hf_out, back_out),
    }
    if ctx.smoke:  # one direction is enough to check that it runs
        jobs.pop("hf -> release (2 shards)")
    reps = ctx.reps(full=2, smoke=1)
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in jobs}
    for _ in range(reps):
        for name, (cmd, src, dst) in jobs.items():  # the second reads the first's output
            ctx.settle()
            samples[name].append({**measured_write(cmd, [src], dst, ctx.threads), "in_bytes": folder_bytes(src)})
    rows = []
    for name, got in samples.items():
        mid = sorted(got, key=lambda s: s["durable_s"])[len(got) // 2]
        bound = mid["in_bytes"] / (lim["disk_read_gbps"] * GB) + mid["out_bytes"] / (lim["disk_write_gbps"] * GB)
        rows.append({"direction": name, "checkpoint_gb": mid["in_bytes"] / GB, "durable_s": mid["durable_s"],
                     "wall_s": mid["wall_s"], "gb_per_s": (mid["in_bytes"] + mid["out_bytes"]) / mid["durable_s"] / GB,
                     "frac_disk_limit": bound / mid["durable_s"],
                     "peak_rss_gb": max(s["peak_rss_gb"] for s in got),
                     "peak_anon_gb": max(s["peak_anon_gb"] for s in got), "runs": got})
    cols = ["direction", "checkpoint_gb", "durable_s", "wall_s", "gb_per_s", "frac_disk_limit", "peak_rss_gb",
            "peak_anon_gb"]
    return {"rows": rows, "limits_used": lim,
            "tables": table("Release-folder conversion (sphinx-mllm convert), bf16 synthetic checkpoint", rows, cols)}


def command(ctx: BenchContext) -> str:
    return command_line("bench.conversion", ctx)


if __name__ == "__main__":
    raise SystemExit(main_for(__import__(__name__)))

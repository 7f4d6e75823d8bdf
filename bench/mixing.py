"""Weight mixing: a linear mix (0.5 A + 0.5 B) of two multi-shard safetensors checkpoints of a few GB, by
`sphinx-mllm mix` and by mergekit's `mergekit-yaml` (linear merge) on the same files, each as a child process:
wall seconds, seconds until the output is on disk (mergekit does not fsync; its files are fsynced after it
exits, ours fsyncs as it writes), peak memory of the process (RSS, and anonymous memory = the part that
needs RAM), and the disk bytes moved (read A + B, write the result) as a fraction of the disk limit. The page
cache is emptied of the inputs before every run, so each reads them from the disk. Runs interleaved.

The checkpoints are LLaMA models (TinyLlama-1.1B's shape, bf16, 1 GB shards, random weights): a layout both
tools read (mergekit needs a known architecture). mergekit runs from `bench/.venv-peers`
(`bench/setup_peers.sh`); without it the peer rows are skipped and say so.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    GB,
    PEERS_VENV,
    BenchContext,
    command_line,
    folder_bytes,
    limits,
    main_for,
    measured_write,
    table,
)

NAME = "mixing"
MANIFEST = "bench_manifest.json"


def llama_config(smoke: bool) -> Any:
    from transformers import LlamaConfig

    from bench.inference import tinyllama_text_config

    cfg = tinyllama_text_config()
    cfg.pop("model_type")
    if smoke:
        cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=1000)
    return LlamaConfig(**cfg, architectures=["LlamaForCausalLM"], dtype="bfloat16")


def write_checkpoint(folder: Path, config: Any, seed: int, shard_bytes: int) -> Path:
    """A sharded safetensors LLaMA checkpoint with random bf16 weights (reused when already there)."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    want = {"seed": seed, "shard_bytes": shard_bytes, "config": config.to_dict()}
    manifest = folder / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()) == json.loads(json.dumps(want)):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[str]] = []  # names per shard; at most one shard of tensors is in memory
    current: dict[str, torch.Tensor] = {}
    size = 0
    for key, shape in shapes.items():
        nbytes = shape.numel() * 2
        if current and size + nbytes > shard_bytes:
            parts.append(_save_part(folder, len(parts), current, save_file))
            current, size = {}, 0
        current[key] = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        size += nbytes
    parts.append(_save_part(folder, len(parts), current, save_file))
    weight_map: dict[str, str] = {}
    for i, keys in enumerate(parts):
        name = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        (folder / f"part-{i}.safetensors").rename(folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(shapes[k].numel() * 2 for k in shapes)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    manifest.write_text(json.dumps(want))
    return folder


def _save_part(folder: Path, i: int, tensors: dict[str, torch.Tensor], save_file: Any) -> list[str]:
    save_file(tensors, str(folder / f"part-{i}.safetensors"), metadata={"format": "pt"})
    return list(tensors)


def ours_command(a: Path, b: Path, out: Path, shard: str) -> list[str]:
    from bench.common import python_exe

    return [python_exe(), "-m", "sphinx_mllm.cli.main", "mix", str(a), str(b), "--beta", "0.5", "-o", str(out),
            "--include", "*", "--max-shard-size", shard, "--no-progress", "--overwrite"]


def mergekit_command(a: Path, b: Path, out: Path, work: Path, shard_params: str) -> list[str]:
    config = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                         {"model": str(b), "parameters": {"weight": 0.5}}]}
    path = work / "mergekit_linear.yaml"
    path.write_text(json.dumps(config, indent=2))  # YAML is a superset of JSON
    return [str(PEERS_VENV / "bin" / "mergekit-yaml"), str(path), str(out), "--out-shard-size", shard_params,
            "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]


def check_same_result(ours: Path, peer: Path, smoke: bool) -> float:
    """Largest absolute difference between the two outputs over a few tensors (both are 0.5 A + 0.5 B)."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                found.update(dict.fromkeys(f.keys(), shard))
        return found

    mine, theirs = tensors(ours), tensors(peer)
    if set(mine) != set(theirs):
        raise RuntimeError(f"outputs hold different tensors: {sorted(set(mine) ^ set(theirs))[:5]}")
    worst = 0.0
    for key in sorted(mine)[: (len(mine) if smoke else 6)]:
        with safe_open(str(mine[key]), framework="pt") as f, safe_open(str(theirs[key]), framework="pt") as g:
            diff = (f.get_tensor(key).float() - g.get_tensor(key).float()).abs().max()
        worst = max(worst, float(diff))
    return worst


def run(ctx: BenchContext) -> dict[str, Any]:
    lim = limits(ctx)
    config = llama_config(ctx.smoke)
    shard_bytes = 64 * 1024 if ctx.smoke else 1 << 30
    work = ctx.work_dir / "mixing"
    a = write_checkpoint(work / "model_a", config, seed=1, shard_bytes=shard_bytes)
    b = write_checkpoint(work / "model_b", config, seed=2, shard_bytes=shard_bytes)
    in_bytes = folder_bytes(a) + folder_bytes(b)
    have_peer = (PEERS_VENV / "bin" / "mergekit-yaml").is_file()
    contenders = {"ours": ours_command(a, b, work / "out_ours", "64KB" if ctx.smoke else "1GB")}
    if have_peer:
        contenders["mergekit"] = mergekit_command(a, b, work / "out_mergekit", work, "32K" if ctx.smoke else "500M")
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in contenders}
    reps = ctx.reps(full=3, smoke=1)
    for i in range(reps):
        order = list(contenders) if i % 2 == 0 else list(reversed(contenders))
        for who in order:
            ctx.settle()
            samples[who].append(measured_write(contenders[who], [a, b], work / f"out_{who}", ctx.threads))
    rows = []
    for who, got in samples.items():
        got_sorted = sorted(got, key=lambda s: s["durable_s"])
        mid = got_sorted[len(got) // 2]
        moved = in_bytes + mid["out_bytes"]
        bound = in_bytes / (lim["disk_read_gbps"] * GB) + mid["out_bytes"] / (lim["disk_write_gbps"] * GB)
        rows.append({"tool": who, "inputs_gb": in_bytes / GB, "output_gb": mid["out_bytes"] / GB,
                     "durable_s": mid["durable_s"], "wall_s": mid["wall_s"],
                     "gb_per_s": moved / mid["durable_s"] / GB, "frac_disk_limit": bound / mid["durable_s"],
                     "peak_rss_gb": max(s["peak_rss_gb"] for s in got),
                     "peak_anon_gb": max(s["peak_anon_gb"] for s in got), "runs": got})
    if have_peer:
        rows[0]["speed_vs_peer"] = rows[1]["durable_s"] / rows[0]["durable_s"]
        rows[0]["max_abs_diff_vs_peer"] = check_same_result(work / "out_ours", work / "out_mergekit", ctx.smoke)
    cols = ["tool", "inputs_gb", "durable_s", "wall_s", "gb_per_s", "frac_disk_limit", "peak_rss_gb",
            "peak_anon_gb", "speed_vs_peer"]
    note = "" if have_peer else "\n(mergekit not installed: run bench/setup_peers.sh for the peer row)\n"
    title = "Linear mix of two sharded bf16 checkpoints (peer: mergekit-yaml linear; ratio > 1: ours faster)"
    return {"rows": rows, "limits_used": lim, "peer_available": have_peer, "tables": table(title, rows, cols) + note}


def command(ctx: BenchContext) -> str:
    return command_line("bench.mixing", ctx)


if __name__ == "__main__":
    raise SystemExit(main_for(__import__(__name__)))

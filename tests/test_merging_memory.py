"""Peak memory of a mix stays near a few copies of the largest tensor, not the model size.

A synthetic multi-shard model (fp32, in the Hugging Face shard + index layout) is mixed in a subprocess; its
peak resident memory (VmHWM) during the mix is compared with its resident memory before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

MB = 1_000_000

# One process: the peak of the mix above the memory in use after the imports, then the peak of holding one
# whole model (the control: what a mixer that keeps its output in memory costs; it shows the measure sees it).
# glibc's mmap threshold is fixed (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the system instead
# of staying in the heap, where the peak would count allocator caching rather than live tensors.
# The peak is VmHWM (Linux), reset to the current resident size by writing 5 to /proc/self/clear_refs, so the
# transient peak of the imports does not hide the mix. `ru_maxrss` is not used: in a child process it also
# carries the parent's peak from before the exec (the pytest process), which would hide everything.
SCRIPT = """
import sys
from pathlib import Path
import torch
from safetensors import safe_open
from sphinx_mllm.merging import MixConfig, mix

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))  # kB

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass

# warm-up on a two-tensor model: lazy imports, kernels' code pages and the thread pool are loaded before
mix(MixConfig(models=(sys.argv[4], sys.argv[5]), output=sys.argv[6], beta=0.5))
reset_peak()
start = peak()
mix(MixConfig(models=(sys.argv[1], sys.argv[2]), output=sys.argv[3], beta=0.5, max_shard_size="25MB"))
after_mix = peak()
reset_peak()
before_hold = peak()
held = []
for path in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(path), framework="pt") as f:
        held += [f.get_tensor(k).clone() for k in f.keys()]
print(after_mix - start, peak() - before_hold)
"""


def write_sharded(folder: Path, seed: int, shards: int, per_shard: int, numel: int) -> int:
    """`shards` files of `per_shard` fp32 tensors of `numel` elements, written one shard at a time."""
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {f"language_model.model.layers.{s * per_shard + i}.mlp.down_proj.weight":
                torch.rand(numel // 1000, 1000, generator=g) for i in range(per_shard)}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * 4 for t in part.values())
        del part
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return total


def test_peak_memory_is_bounded(tmp_path: Path) -> None:
    """~200 MB of fp32 per model in 8 shards of 25 MB, tensors of 6.25 MB, mixed in a subprocess."""
    numel = 1_562_500
    model_bytes = write_sharded(tmp_path / "A", 1, shards=8, per_shard=4, numel=numel)
    write_sharded(tmp_path / "B", 2, shards=8, per_shard=4, numel=numel)
    write_sharded(tmp_path / "wA", 3, shards=2, per_shard=1, numel=numel)
    write_sharded(tmp_path / "wB", 4, shards=2, per_shard=1, numel=numel)
    args = [str(tmp_path / n) for n in ("A", "B", "M", "wA", "wB", "wM")]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, timeout=300,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    increase, control = (int(x) for x in done.stdout.split())
    index = json.loads((tmp_path / "M" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == model_bytes and len(index["weight_map"]) == 32  # all written
    largest = numel * 4
    assert control > model_bytes / 2, (control / MB, model_bytes / MB)
    # the mix: a few copies of the largest tensor (the two inputs and the result), never the model
    assert increase < 8 * largest, (increase / MB, largest / MB, model_bytes / MB)

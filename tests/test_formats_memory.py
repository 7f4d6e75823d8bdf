"""Peak memory while loading a release folder stays near one copy of the model plus one shard.

A widened `debug` model (~180 MB in fp32) is written as a 2-shard release folder, then loaded with
`SphinxForConditionalGeneration.from_pretrained(folder)` in a subprocess, whose peak resident memory (VmHWM)
during the load is compared with its resident memory just before it.

Why the loader needs care: the shards are memory-mapped and mapped pages count as resident memory until they are
unmapped, so a loader that keeps the maps open for the whole load holds the model twice (the copy it builds and
the mapped shards); and merging a split tensor then copying it into the parameter holds it three times.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import torch

from sphinx_mllm import SphinxForConditionalGeneration
from sphinx_mllm.config import PRESETS, SphinxConfig
from sphinx_mllm.formats import save_release

MB = 1_000_000
MARGIN = 24 * MB  # Python objects of the model (modules, parameters), allocator slack, the meta-model's state

# The peak is VmHWM (Linux), reset to the current resident size by writing 5 to /proc/self/clear_refs after the
# warm-up, so the transient peak of the imports does not hide the load. The warm-up builds the same model on the
# meta device (no memory), which imports every modeling module the load needs. glibc's mmap threshold is fixed
# (MALLOC_MMAP_THRESHOLD_) so that freed tensors go back to the system instead of staying in the heap, where the
# peak would count allocator caching rather than live tensors. `ru_maxrss` is not used: in a child process it
# also carries the parent's peak from before the exec (the pytest process).
SCRIPT = """
import json
import sys
import torch
from sphinx_mllm import SphinxConfig, SphinxForConditionalGeneration

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))  # kB

with open(sys.argv[1] + "/sphinx_mllm.json") as f:
    config = SphinxConfig.from_dict(json.load(f))
with torch.device("meta"):
    SphinxForConditionalGeneration(config)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = status("VmHWM")
model = SphinxForConditionalGeneration.from_pretrained(sys.argv[1])
peak = status("VmHWM")
checksum = sum(float(t.double().sum()) for t in model.state_dict().values())
print(peak - start, status("VmRSS") - start, checksum)
"""


def _wide_debug_model() -> SphinxForConditionalGeneration:
    """The `debug` preset with a wider, deeper LLM: ~180 MB of fp32, two thirds of it the embedding and head."""
    text_config = dict(copy.deepcopy(PRESETS["debug"]["text_config"]), hidden_size=512, intermediate_size=1376,
                       num_hidden_layers=4)
    torch.manual_seed(0)
    return SphinxForConditionalGeneration(SphinxConfig.from_preset("debug", text_config=text_config)).eval()


def test_loading_a_release_folder_holds_one_model_plus_one_shard(tmp_path: Path) -> None:
    model = _wide_debug_model()
    state = model.state_dict()
    model_bytes = sum(t.numel() * t.element_size() for t in state.values())
    checksum = sum(float(t.double().sum()) for t in state.values())
    folder = save_release(model, tmp_path / "release", num_shards=2)
    del model, state
    shard_bytes = max(p.stat().st_size for p in folder.glob("consolidated.*.model.pth"))
    assert 150 * MB < model_bytes < 250 * MB and len(list(folder.glob("consolidated.*"))) == 2

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(folder)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    increase, held, loaded_checksum = (float(x) for x in done.stdout.split())
    numbers = (f"peak increase {increase / MB:.1f} MB, held after load {held / MB:.1f} MB, model {model_bytes / MB:.1f}"
               f" MB, largest shard {shard_bytes / MB:.1f} MB")
    print(numbers)
    assert abs(loaded_checksum - checksum) <= 1e-6 * max(1.0, abs(checksum))  # the load read the weights back
    assert held > 0.9 * model_bytes, numbers  # the measure sees the model it loaded
    assert increase <= model_bytes + shard_bytes + MARGIN, numbers

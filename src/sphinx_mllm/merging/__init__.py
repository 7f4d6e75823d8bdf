"""L6: weight mixing. Streaming, module-aware merges of checkpoints (SPHINX's first mixing is `linear`).

- `methods`: the merge methods as pure functions over tensors, behind the `METHODS` registry;
- `sources`: reading checkpoints one tensor at a time (safetensors folders, release `.pth` folders);
- `policy`: which tensors are mixed, which must be identical, and the checks made before writing;
- `writer`: a streaming writer of sharded safetensors;
- `mixing`: `MixConfig` (CLI and YAML options) and `mix()`, which ties them together; sweeps;
- `plot`: score against the mixing coefficient.
"""

from sphinx_mllm.merging.methods import (
    METHODS,
    MergeMethod,
    dare,
    get_method,
    linear,
    slerp,
    task_arithmetic,
    ties,
)
from sphinx_mllm.merging.mixing import MixConfig, MixReport, mix, sweep_values
from sphinx_mllm.merging.plot import plot_sweep
from sphinx_mllm.merging.policy import ModulePolicy
from sphinx_mllm.merging.sources import ReleaseSource, SafetensorsSource, TensorSource, open_source

__all__ = [
    "METHODS",
    "MergeMethod",
    "MixConfig",
    "MixReport",
    "ModulePolicy",
    "ReleaseSource",
    "SafetensorsSource",
    "TensorSource",
    "dare",
    "get_method",
    "linear",
    "mix",
    "open_source",
    "plot_sweep",
    "slerp",
    "sweep_values",
    "task_arithmetic",
    "ties",
]

"""sphinx-mllm: SPHINX multimodal LLMs (mixed weights, tasks, visual embeddings and scales).

The library is Hugging Face-native: `SphinxConfig`, `SphinxForConditionalGeneration` and
`SphinxProcessor` register with the transformers Auto classes when imported from here. Importing the
model from this package also registers the readers of the release's checkpoint folders.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SphinxConfig": "sphinx_mllm.config",
    "SphinxForConditionalGeneration": "sphinx_mllm.modeling",
    "SphinxProcessor": "sphinx_mllm.processing.processor",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'sphinx_mllm' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    if name == "SphinxForConditionalGeneration" and importlib.util.find_spec("sphinx_mllm.formats") is not None:
        importlib.import_module("sphinx_mllm.formats")  # registers the release-folder reader
    return getattr(module, name)


__all__ = ["SphinxConfig", "SphinxForConditionalGeneration", "SphinxProcessor", "__version__"]

"""The lmms-eval model class (imported by lmms-eval only, through the `lmms_eval.models` entry point).

`python -m lmms_eval --model sphinx_mllm --model_args pretrained=PATH[,device=cpu,dtype=bfloat16] ...`.
The request handling is `sphinx_mllm.evaluation.harness.LmmsAdapter`; this module needs lmms-eval installed.
"""

from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms

from sphinx_mllm.evaluation.harness import LmmsAdapter
from sphinx_mllm.inference.chat import SphinxChat


class SphinxLmms(LmmsAdapter, lmms):
    """SPHINX for lmms-eval ("simple" model type: prompts are plain text, the image comes from the doc)."""

    is_simple = True

    def __init__(self, pretrained: str, device: str = "auto", dtype: str | None = None, batch_size: int | str = 1,
                 **kwargs: Any) -> None:
        super().__init__()
        self.chat = SphinxChat.load(pretrained, device=device, dtype=dtype)
        self.batch_size_per_call = int(batch_size)

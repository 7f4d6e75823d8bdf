"""The example configs shipped in configs/ stay valid: every task they name exists."""

from __future__ import annotations

from pathlib import Path

import yaml

from sphinx_mllm.data.mixture import SOURCE_KEYS, TOP_KEYS
from sphinx_mllm.tasks import TASKS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_finetune_mixture_example_names_every_task() -> None:
    data = yaml.safe_load((CONFIGS / "mixture_finetune_example.yaml").read_text())
    assert set(data) <= set(TOP_KEYS)
    tasks = set()
    for source in data["META"]:
        assert set(source) <= set(SOURCE_KEYS), source
        assert source["task"] in TASKS, source["task"]
        tasks.add(source["task"])
    assert tasks == set(TASKS)  # the example mixes every task the project knows

"""`bench/run_all --smoke` runs every benchmark at tiny sizes and writes valid JSON results.

No timed assertion: the machine is shared and the sizes are tiny; what is checked is that every benchmark
ran (no recorded error), recorded the machine, and produced rows with finite, positive measurements.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = ("limits", "preprocessing", "inference", "mixing", "conversion", "training")
MEASURES = {  # benchmark -> fields every row must hold as positive finite numbers
    "limits": ("value",),
    "preprocessing": ("images_per_s",),
    "inference": ("ttft_ms", "decode_tok_s", "prefill_tflop"),
    "mixing": ("durable_s", "peak_rss_gb", "output_gb"),
    "conversion": ("durable_s", "peak_rss_gb", "checkpoint_gb"),
    "training": ("tokens_per_s", "mfu", "peak_rss_gb"),
}


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench_results")
    work = tmp_path_factory.mktemp("bench_work")
    env = {**os.environ, "PYTHON": sys.executable, "BENCH_PEERS_VENV": str(work / "no-peers")}
    proc = subprocess.run([str(REPO / "bench" / "run_all"), "--smoke", "--out", str(out), "--workdir", str(work)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("name", BENCHMARKS)
def test_each_benchmark_writes_valid_json_with_measured_rows(smoke_results: Path, name: str) -> None:
    data = json.loads((smoke_results / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["smoke"] is True and "error" not in data
    machine = data["machine"]
    assert machine["torch_threads"] >= 1 and machine["cores_usable"] >= 1
    assert machine["versions"]["torch"].startswith("2.")
    assert data["command"].startswith(f"python -m bench.{name}")
    assert data["rows"], f"{name} produced no rows"
    for row in data["rows"]:
        for field in MEASURES[name]:
            assert _positive(row[field]), f"{name}: {field}={row.get(field)!r} in {row}"
    assert data["tables"].startswith("### ")


def test_peer_rows_are_present_or_skipped_explicitly(smoke_results: Path) -> None:
    inference = json.loads((smoke_results / "inference.json").read_text())
    models = {(r["case"], r["batch"], r["model"]) for r in inference["rows"]}
    assert {("small 1-view", 1, "ours"), ("small 1-view", 1, "peer")} <= models
    ours = next(r for r in inference["rows"] if r["model"] == "ours" and r["batch"] == 1)
    assert ours["image_tokens"] == 267 and _positive(ours["ttft_vs_peer"])
    mixing = json.loads((smoke_results / "mixing.json").read_text())
    assert mixing["peer_available"] is False and [r["tool"] for r in mixing["rows"]] == ["ours"]
    assert "setup_peers.sh" in mixing["tables"]


def test_summary_collects_every_table(smoke_results: Path) -> None:
    summary = (smoke_results / "summary.md").read_text()
    assert summary.startswith("# Benchmark results (smoke run)")
    for name in BENCHMARKS:
        table = json.loads((smoke_results / f"{name}.json").read_text())["tables"]
        assert table.splitlines()[0] in summary
    assert not list(smoke_results.glob("*.tmp")), "a temporary file was left behind"


def test_encoder_subset_keeps_one_tower_and_cuts_its_fusion_group() -> None:
    from bench.inference import CASES, build_ours

    case = next(c for c in CASES if c.encoders == ("clip",))
    model = build_ours(case)
    assert list(model.vision.encoders) == ["clip"]
    # CLIP at 224 px / patch 14: a 16 x 16 grid + CLS, + the start/end tokens of the image.
    assert model.config.num_image_tokens == 16 * 16 + 1 + 2
    assert model.config.fusion == [{"name": "visual_proj", "encoders": ["clip"], "grid": 16}]


def test_single_row_bf16_steps_switch_onednn_off_and_restore_it() -> None:
    """The switch `bench.inference` measured (batch-1 decode): only a one-token batch-1 bf16 CPU forward runs
    with oneDNN off; the flag is back on afterwards, and the logits agree with oneDNN's within bf16 rounding."""
    import torch

    from sphinx_mllm.config import SphinxConfig
    from sphinx_mllm.modeling import SphinxForConditionalGeneration

    torch.manual_seed(0)
    model = SphinxForConditionalGeneration(SphinxConfig.from_preset("debug")).to(torch.bfloat16).eval()
    seen: list[bool] = []
    model.language_model.register_forward_pre_hook(lambda *_: seen.append(torch.backends.mkldnn.enabled))
    ids = torch.tensor([[5], [7]])
    with torch.inference_mode():
        one = model(input_ids=ids[:1]).logits.float()
        two = model(input_ids=ids).logits.float()
        one_fp32 = model.float()(input_ids=ids[:1]).logits
    assert seen == [False, True, True] and torch.backends.mkldnn.enabled
    assert torch.allclose(one[0], two[0], atol=0.05) and torch.allclose(one, one_fp32, atol=0.05)

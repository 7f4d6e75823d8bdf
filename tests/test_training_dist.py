"""Distributed training under torchrun on CPU (gloo): DDP and FSDP2 on 2 processes give the losses of 1
process with the same global batch, and a 2-process FSDP2 checkpoint resumes on 1 process.

Tolerance: 1e-5 relative per step (measured: identical to the last bit on this machine). The torchrun
runs are subprocesses (`python -m torch.distributed.run --standalone --nproc_per_node 2`) with a timeout.
"""

# ruff: noqa: F811  (pytest fixtures imported from test_training_data are redefined as parameters)
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from sphinx_mllm.training import load_config, read_metrics, train
from test_training_data import (  # noqa: F401  (fixtures)
    _one_thread,
    losses_of,
    reference_config,
    reference_run,
    train_data,
)

REL_TOL = 1e-5
TIMEOUT_S = 300


def torchrun(config: dict, tmp_path: Path, nproc: int = 2) -> Path:
    """Run `sphinx-mllm train` under torchrun; returns the run's output folder."""
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "sphinx_mllm.cli.main", "--log-level", "WARNING", "train", str(path), "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return Path(config["run"]["output_dir"])


def test_ddp_on_two_processes_equals_one_process(reference_run, train_data, sp_tokenizer_dir, tmp_path) -> None:
    cfg = reference_config(train_data, sp_tokenizer_dir, tmp_path / "ddp",
                           run={"parallel": "ddp", "max_steps": 4, "save_every": 1, "keep_last": 2})
    out = torchrun(cfg, tmp_path)
    # 1 process: 2 micro-batches of 2 per step; 2 processes: 1 micro-batch of 2 each. Same global batch of 4.
    assert losses_of(out / "metrics.jsonl") == pytest.approx(reference_run.losses[:4], rel=REL_TOL)
    records = read_metrics(out / "metrics.jsonl")
    ref_records = read_metrics(reference_run.result.metrics_path)
    assert [r["tokens"] for r in records] == [r["tokens"] for r in ref_records[:4]]  # tokens summed over ranks
    assert (out / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000003", "step_00000004"]


def test_fsdp2_on_two_processes_equals_one_process_and_resumes_on_one(
        reference_run, train_data, sp_tokenizer_dir, tmp_path) -> None:
    cfg = reference_config(train_data, sp_tokenizer_dir, tmp_path / "fsdp",
                           run={"parallel": "fsdp", "max_steps": 4, "save_every": 2})
    out = torchrun(cfg, tmp_path)
    assert losses_of(out / "metrics.jsonl") == pytest.approx(reference_run.losses[:4], rel=REL_TOL)
    # The sharded step-2 checkpoint of 2 FSDP2 ranks, resumed by 1 plain process.
    resumed_cfg = reference_config(train_data, sp_tokenizer_dir, tmp_path / "resumed",
                                   run={"max_steps": 4, "save_every": 0,
                                        "resume_from": str(out / "checkpoints" / "step_00000002")})
    resumed = train(load_config(base=resumed_cfg))
    assert resumed.losses == pytest.approx(reference_run.losses[2:4], rel=REL_TOL)
    # The FSDP2 export (gathered full state dict) equals the 1-process model after the same 4 steps.
    sharded = load_file(out / "final" / "model.safetensors")
    plain = load_file(resumed.final_dir / "model.safetensors")
    assert sharded.keys() == plain.keys()
    assert max(float((sharded[k] - plain[k]).abs().max()) for k in plain) < 1e-5

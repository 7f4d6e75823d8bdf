"""The trainer on one process: config, schedule, trainable sets, the golden loss curve, loss falling,
kill-and-resume, LoRA / bias-only adapters and their folding, the CLI.

Golden curve: tests/golden/train_debug_losses.json holds the 8 per-step losses of `reference_run` (debug
preset, fp32, 1 process, seeds 0; see test_training_data.reference_config). They are reproduced to 1e-4
relative. When the model, the processor or the tokenizer fixture change on purpose, regenerate it with

    SPHINX_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_training.py -k golden
"""

# ruff: noqa: F811  (pytest fixtures imported from test_training_data are redefined as parameters)
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from sphinx_mllm.cli.main import main
from sphinx_mllm.config import SphinxConfig
from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import SphinxProcessor
from sphinx_mllm.training import load_adapter, load_config, parse_overrides, read_metrics, train
from sphinx_mllm.training.checkpoint import list_checkpoints
from sphinx_mllm.training.config import ModelSection, OptimSection
from sphinx_mllm.training.logs import TensorBoardLog, plot_loss_curves
from sphinx_mllm.training.model_setup import (
    build_optimizer,
    enable_activation_checkpointing,
    load_model,
    lr_at,
    select_trainable,
)
from sphinx_mllm.utils import SphinxError
from test_training_data import (  # noqa: F401  (fixtures)
    _one_thread,
    caption_cache,
    losses_of,
    reference_config,
    reference_run,
    train_data,
)

GOLDEN = Path(__file__).parent / "golden" / "train_debug_losses.json"
GOLDEN_REL_TOL = 1e-4


# ----------------------------------------------------------------------------------------- config

def _minimal(**extra) -> dict:
    return {"data": {"mixture": "m.yaml"}, "run": {"output_dir": "out"}, **extra}


def test_config_rejects_unknown_keys_and_bad_values_by_name() -> None:
    with pytest.raises(SphinxError, match=r"unknown config key 'optim.lrr'"):
        load_config(base=_minimal(optim={"lrr": 1.0}))
    with pytest.raises(SphinxError, match=r"unknown config key 'bogus'"):
        load_config(base=_minimal(bogus=1))
    with pytest.raises(SphinxError, match=r"data.batch_size: expected int, got 'many'"):
        load_config(base=_minimal(), overrides={"data.batch_size": "many"})
    with pytest.raises(SphinxError, match=r"run.parallel: must be one of none, ddp, fsdp"):
        load_config(base=_minimal(), overrides={"run.parallel": "tp"})
    with pytest.raises(SphinxError, match="data.mixture is required"):
        load_config(base={"run": {"output_dir": "x"}})
    with pytest.raises(SphinxError, match=r"optim.betas must be in \[0, 1\)"):
        load_config(base=_minimal(optim={"betas": [0.9, 1.5]}))


def test_config_reads_yaml_numbers_and_typed_overrides(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data: {mixture: m.yaml}\nrun: {output_dir: o}\noptim: {lr: 1e-4}\nlora:\n")
    overrides = parse_overrides(["--optim.betas", "0.9,0.99", "--run.bf16=yes", "--resume",
                                 "--lora.target_modules", "q_proj,v_proj", "--model.init_from", "none"])
    cfg = load_config(path, overrides)
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.99)  # YAML reads "1e-4" as a string
    assert cfg.run.bf16 is True and cfg.run.resume is True and cfg.model.init_from is None
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.optim.grad_clip == 8.0 and cfg.stage == "finetune"
    assert load_config(base=yaml.safe_load(cfg.to_yaml())) == cfg  # the saved config reads back the same
    with pytest.raises(SphinxError, match="has no value"):
        parse_overrides(["--optim.lr"])
    with pytest.raises(SphinxError, match="unexpected argument 'extra'"):
        parse_overrides(["extra"])


def test_warmup_then_half_cosine_to_the_floor() -> None:
    optim = OptimSection(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_at(s, 14, optim) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 14, optim) == 1.0  # cosine starts at the peak
    assert lr_at(9, 14, optim) == pytest.approx(0.55)  # half-way: (1 + 0.1) / 2
    assert lr_at(14, 14, optim) == pytest.approx(0.1)
    assert lr_at(0, 10, OptimSection(lr=2.0, warmup_ratio=0.5)) == pytest.approx(0.4)  # 5 warm-up steps


# ----------------------------------------------------------------------------------------- trainables

@pytest.fixture(scope="module")
def debug_model() -> SphinxForConditionalGeneration:
    torch.manual_seed(0)
    return SphinxForConditionalGeneration(SphinxConfig.from_preset("debug"))


def _names(model, on: bool = True) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad == on}


def test_stage_trainable_sets_and_patterns(debug_model) -> None:
    cfg = load_config(base=_minimal(stage="projector"))
    select_trainable(debug_model, cfg)
    assert _names(debug_model) == {n for n, _ in debug_model.named_parameters() if n.startswith("fusion.")}
    assert "fusion.start_img" in _names(debug_model)
    cfg = load_config(base=_minimal(stage="finetune", frozen=["language_model.model.embed_tokens.*"]))
    select_trainable(debug_model, cfg)
    on = _names(debug_model)
    assert "language_model.lm_head.weight" in on and "fusion.projections.visual_proj.0.weight" in on
    assert "language_model.model.embed_tokens.weight" not in on
    assert not any(n.startswith("vision.") for n in on)
    with pytest.raises(SphinxError, match="pattern 'language_model.nope.*' matches no parameter"):
        select_trainable(debug_model, load_config(base=_minimal(trainable=["language_model.nope.*"])))
    with pytest.raises(SphinxError, match="belongs to a frozen encoder"):
        select_trainable(debug_model, load_config(base=_minimal(trainable=["vision.encoders.clip.*"])))


def test_init_from_replaces_every_weight_and_refuses_another_architecture(reference_run, tmp_path) -> None:
    model = load_model(ModelSection(name="debug", init_from=str(reference_run.final)), seed=123)
    trained = SphinxForConditionalGeneration.from_pretrained(reference_run.final).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    fresh = load_model(ModelSection(name="debug"), seed=123)
    assert not torch.equal(fresh.fusion.start_img, model.fusion.start_img)
    torch.manual_seed(0)
    SphinxForConditionalGeneration(SphinxConfig.from_preset("debug-moe")).save_pretrained(tmp_path / "moe")
    with pytest.raises(SphinxError, match=r"does not fit the model: missing .*mlp.*unexpected .*experts"):
        load_model(ModelSection(name="debug", init_from=str(tmp_path / "moe")), seed=0)
    with pytest.raises(SphinxError, match="neither a folder nor a preset"):
        load_model(ModelSection(name="no-such-preset"), seed=0)


def test_activation_checkpointing_is_set_per_llm_block(debug_model) -> None:
    enable_activation_checkpointing(debug_model)
    assert all(layer.gradient_checkpointing for layer in debug_model.language_model.model.layers)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in debug_model.vision.modules())
    debug_model.language_model.activation_checkpointing_disable()


def test_no_weight_decay_on_biases_norms_and_start_end(debug_model) -> None:
    select_trainable(debug_model, load_config(base=_minimal(stage="finetune")))
    optimizer = build_optimizer(debug_model, OptimSection(weight_decay=0.1))
    by_id = {id(p): n for n, p in debug_model.named_parameters()}
    decay, no_decay = ({by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    assert {"fusion.start_img", "fusion.end_img", "fusion.projections.visual_proj.0.bias",
            "fusion.projections.visual_proj.1.weight", "language_model.model.norm.weight",
            "language_model.model.layers.0.input_layernorm.weight"} <= no_decay
    assert {"fusion.projections.visual_proj.0.weight", "language_model.lm_head.weight",
            "language_model.model.layers.0.self_attn.q_proj.weight"} <= decay


# ----------------------------------------------------------------------------------------- golden, loss

def test_reference_run_reproduces_the_golden_loss_curve(reference_run) -> None:
    losses = reference_run.losses
    if os.environ.get("SPHINX_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({
            "what": "per-step training loss of tests/test_training_data.py::reference_run (debug preset, fp32, "
                    "1 process, seeds 0)",
            "regenerate": "SPHINX_REGEN_GOLDEN=1 .venv/bin/python -m pytest -q tests/test_training.py -k golden",
            "rel_tolerance": GOLDEN_REL_TOL, "torch": torch.__version__, "losses": losses}, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert len(losses) == len(golden["losses"]) == 8
    assert losses == pytest.approx(golden["losses"], rel=GOLDEN_REL_TOL)
    records = read_metrics(reference_run.result.metrics_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["task_tokens"] == {"caption_pretrain": r["tokens"]} for r in records)
    assert records[0]["lr"] == pytest.approx(5e-4) and records[1]["lr"] == pytest.approx(1e-3)  # warm-up
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in records)
    assert (reference_run.dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_few_dozen_steps_lower_the_loss_in_bf16_with_activation_checkpointing(
        train_data, sp_tokenizer_dir, tmp_path) -> None:
    cfg = reference_config(train_data, sp_tokenizer_dir, tmp_path / "run",
                           data={"micro_batch_size": 4}, optim={"lr": 3e-3, "warmup_steps": 3, "min_lr_ratio": 0.1},
                           run={"max_steps": 24, "save_every": 0, "bf16": True, "activation_checkpointing": True})
    result = train(load_config(base=cfg))
    losses = result.losses
    assert len(losses) == 24 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-4:]) / 4 < losses[0] - 1.0, losses
    model = SphinxForConditionalGeneration.from_pretrained(result.final_dir)  # the export loads
    assert model.language_model.model.embed_tokens.weight.dtype == torch.float32  # fp32 master weights
    assert SphinxProcessor.from_pretrained(result.final_dir).num_image_tokens == model.config.num_image_tokens


# ----------------------------------------------------------------------------------------- resume

class _Killed(Exception):
    pass


class _KillAt:
    def __init__(self, step: int) -> None:
        self.step = step

    def on_start(self, start_step: int, total_steps: int) -> None:
        pass

    def on_step(self, step: int, metrics: dict) -> None:
        if step == self.step:
            raise _Killed(step)

    def on_end(self) -> None:
        pass


def test_kill_and_resume_equals_the_uninterrupted_run(reference_run, train_data, sp_tokenizer_dir, tmp_path) -> None:
    out = tmp_path / "run"
    cfg = reference_config(train_data, sp_tokenizer_dir, out)
    with pytest.raises(_Killed):
        train(load_config(base=cfg), [_KillAt(6)])  # dies after step 6; the last checkpoint is step 4
    (out / "checkpoints" / ".step_00000006.partial").mkdir()  # as if killed while saving step 6
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000004"]
    assert len(read_metrics(out / "metrics.jsonl")) == 6
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--resume", "--no-progress"]) == 0
    # Steps 5-8 are redone from the step-4 checkpoint (which ends epoch 0): same data, same losses.
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))
    assert losses_of(out / "metrics.jsonl") == pytest.approx(reference_run.losses, rel=1e-6)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000004", "step_00000008"]
    with pytest.raises(SphinxError, match="already holds checkpoints of a run: pass --resume"):
        train(load_config(base=cfg))  # a fresh run never mixes with an old run's checkpoints


# ----------------------------------------------------------------------------------------- adapters

def _logits(model, processor: SphinxProcessor, image: Path) -> torch.Tensor:
    ids, _ = processor.encode_conversation([("human", "What color is the shape?"), ("gpt", "red")], True)
    pixels, _ = processor.image_processor([image])
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), pixel_values=pixels).logits


def _adapter_keys(folder: Path) -> list[str]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as f:
        return list(f.keys())


def test_lora_lowers_the_loss_and_the_folded_model_matches_base_plus_adapter(
        reference_run, train_data, caption_cache, tmp_path) -> None:
    out = tmp_path / "lora"
    cfg = reference_config(train_data, None, out, model={"name": str(reference_run.final), "tokenizer": None},
                           data={"mixture": str(train_data.tasks), "max_length": 384,
                                 "feature_cache": str(caption_cache)},
                           optim={"lr": 2e-2, "warmup_steps": 0, "min_lr_ratio": 1.0}, stage="finetune",
                           lora={"enabled": True, "r": 4, "alpha": 8}, run={"max_steps": 8, "save_every": 0})
    result = train(load_config(base=cfg))
    losses = result.losses  # 2 epochs of the same 16 records, 4 steps each
    assert sum(losses[4:]) < sum(losses[:4]) - 0.4, losses
    records = read_metrics(result.metrics_path)
    assert {t for r in records for t in r["task_loss"]} == {"vqa", "shape"}
    assert all(sum(r["task_tokens"].values()) == r["tokens"] for r in records)
    assert (out / "loss_curves.png").is_file()
    keys = _adapter_keys(result.final_dir)
    assert any("lora_A" in k for k in keys) and any("fusion" in k for k in keys)
    assert not any(k.endswith(("q_proj.weight", "embed_tokens.weight", "lm_head.weight")) for k in keys)
    folded = tmp_path / "folded"
    assert main(["fold-adapter", "--adapter", str(result.final_dir), "-o", str(folded)]) == 0
    processor = SphinxProcessor.from_pretrained(folded)
    image = train_data.images / "red_square.png"
    stacked = _logits(load_adapter(reference_run.final, result.final_dir), processor, image)
    merged = _logits(SphinxForConditionalGeneration.from_pretrained(folded).eval(), processor, image)
    base = _logits(SphinxForConditionalGeneration.from_pretrained(reference_run.final).eval(), processor, image)
    assert (stacked - base).abs().max() > 1e-3  # the adapter changed something
    assert torch.allclose(stacked, merged, atol=1e-4, rtol=1e-4), (stacked - merged).abs().max()


def test_bias_only_tunes_norm_gains_and_folds(reference_run, train_data, caption_cache, tmp_path) -> None:
    cfg = reference_config(train_data, None, tmp_path / "bias", model={"name": str(reference_run.final),
                                                                       "tokenizer": None},
                           data={"mixture": str(train_data.tasks), "max_length": 384,
                                 "feature_cache": str(caption_cache)},
                           optim={"lr": 5e-2, "warmup_steps": 0}, stage="projector",
                           lora={"enabled": True, "bias_only": True}, run={"max_steps": 2, "save_every": 0})
    result = train(load_config(base=cfg))
    keys = _adapter_keys(result.final_dir)
    assert keys and all("ln_tuning_layers" in k or k.startswith("base_model.model.fusion.") for k in keys)
    assert any("input_layernorm" in k for k in keys)
    from sphinx_mllm.training import fold_adapter

    folded = fold_adapter(reference_run.final, result.final_dir, tmp_path / "folded")
    processor = SphinxProcessor.from_pretrained(folded)
    image = train_data.images / "blue_circle.png"
    stacked = _logits(load_adapter(reference_run.final, result.final_dir), processor, image)
    merged = _logits(SphinxForConditionalGeneration.from_pretrained(folded).eval(), processor, image)
    assert torch.allclose(stacked, merged, atol=1e-5, rtol=1e-5)


def test_lora_needs_a_reloadable_base(train_data, sp_tokenizer_dir, tmp_path) -> None:
    cfg = reference_config(train_data, sp_tokenizer_dir, tmp_path / "x", lora={"enabled": True})
    with pytest.raises(SphinxError, match="lora.enabled needs model.name to be a saved model folder"):
        train(load_config(base=cfg))


# ----------------------------------------------------------------------------------------- CLI, errors

def test_cli_prints_the_config_and_reports_bad_input_in_one_line(train_data, sp_tokenizer_dir, tmp_path,
                                                                 capsys) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(reference_config(train_data, sp_tokenizer_dir, tmp_path / "o")))
    assert main(["train", str(path), "--print-config", "--optim.lr", "0.5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["optim"]["lr"] == 0.5
    assert main(["train", str(path), "--optim.lrr", "1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
    assert main(["train", str(path), "--data.batch_size", "3"]) == 2
    assert "must be a multiple of micro_batch_size x processes = 2 x 1" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2



def test_tensorboard_is_optional_and_the_plot_needs_data(tmp_path) -> None:
    board = TensorBoardLog(tmp_path / "tb")  # without the tensorboard package: a warning, then no-ops
    board.write({"step": 1, "loss": 2.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 5.0, "task_loss": {"a": 2.0}})
    board.close()
    assert not plot_loss_curves([], tmp_path / "none.png") and not (tmp_path / "none.png").exists()
    records = [{"step": s, "loss": 3.0 - s / 10, "task_loss": {"vqa": 3.0, "rec": 2.0 + s / 10}} for s in range(1, 6)]
    assert plot_loss_curves(records, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

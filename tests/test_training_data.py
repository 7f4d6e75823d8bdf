"""Training items (`sphinx_mllm.data.sft`) and the shared training fixtures of the test_training* files.

The fixtures write a tiny data set in the real formats: PNG images of coloured shapes, LLaVA-style
caption-pretraining and conversation JSONL, and mixture YAMLs (release `META` layout). `reference_run`
is one short deterministic training run (debug preset, fp32, 1 process) that the golden curve, the
resume, the distributed and the feature-cache tests all compare against.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image, ImageDraw

from sphinx_mllm.config import SphinxConfig
from sphinx_mllm.data.mixture import MixtureDataset
from sphinx_mllm.data.sft import SFTCollator, SFTDataset, answer_token_count, encode_record, truncate
from sphinx_mllm.processing import IGNORE_INDEX, SphinxProcessor
from sphinx_mllm.utils import SphinxError

COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "circle")


def write_dataset(root: Path) -> SimpleNamespace:
    """8 images (4 colours x 2 shapes), 16 caption records, 16 two-task conversations, two mixtures."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    captions, convs = [], []
    for i, (color, rgb) in enumerate(COLORS.items()):
        for j, shape in enumerate(SHAPES):
            name = f"{color}_{shape}.png"
            img = Image.new("RGB", (32, 24), (255, 255, 255))
            draw = ImageDraw.Draw(img)
            (draw.rectangle if shape == "square" else draw.ellipse)([6, 4, 26, 20], fill=rgb)
            img.save(images / name)
            k = 2 * i + j
            captions.append({"id": f"cap{k}", "image": name, "width": 32, "height": 24, "task": "caption_pretrain",
                             "caption": f"a {color} {shape} on a white image", "domain": "real"})
            convs.append({"id": f"vqa{k}", "image": name, "width": 32, "height": 24, "task": "vqa",
                          "conversations": [{"from": "human", "value": "What color is the shape?"},
                                            {"from": "gpt", "value": color}]})
            convs.append({"id": f"shape{k}", "image": name, "width": 32, "height": 24, "task": "shape",
                          "conversations": [{"from": "human", "value": "What shape is it?"},
                                            {"from": "gpt", "value": f"a {shape}"}]})
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in captions * 2))
    (root / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in convs))
    (root / "captions.yaml").write_text("META:\n  - path: captions.jsonl\n    type: caption\n    root: images\n")
    (root / "tasks.yaml").write_text("META:\n  - path: tasks.jsonl\n    type: conversation\n    root: images\n")
    return SimpleNamespace(root=root, images=images, captions=root / "captions.yaml", tasks=root / "tasks.yaml")


def reference_config(dataset: SimpleNamespace, tokenizer_dir: Path | None, output_dir: Path,
                     **sections: Any) -> dict:
    """The reference run's config as a dict: debug preset, caption pre-training, global batch 4 in
    micro-batches of 2 (accumulation 2 on one process), constant lr after a 2-step warm-up (so the
    first steps do not depend on max_steps), fp32."""
    cfg: dict[str, Any] = {
        "model": {"name": "debug", "tokenizer": str(tokenizer_dir)},
        "data": {"mixture": str(dataset.captions), "batch_size": 4, "micro_batch_size": 2, "max_length": 320},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "min_lr_ratio": 1.0},
        "stage": "pretrain",
        "run": {"output_dir": str(output_dir), "max_steps": 8, "save_every": 4, "log_every": 1, "seed": 0,
                "parallel": "none"},
    }
    for name, values in sections.items():
        cfg[name] = dict(cfg.get(name, {}), **values) if isinstance(values, dict) else values
    return cfg


def losses_of(metrics_path: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in metrics_path.read_text().splitlines()]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread: these models are tiny, and on 2 shared cores a second OpenMP thread that
    gets descheduled makes every small op wait (measured: 1.8 s vs 0.13 s per step under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return write_dataset(tmp_path_factory.mktemp("train_data"))


@pytest.fixture(scope="session")
def reference_run(train_data, sp_tokenizer_dir, tmp_path_factory) -> SimpleNamespace:
    """8 steps of the reference config (checkpoints at 4 and 8, final export)."""
    from sphinx_mllm.training import load_config, train

    out = tmp_path_factory.mktemp("reference_run")
    config = reference_config(train_data, sp_tokenizer_dir, out)
    with one_thread():
        result = train(load_config(base=config))
    return SimpleNamespace(dir=out, config=config, losses=losses_of(result.metrics_path), final=result.final_dir,
                           result=result)


@pytest.fixture(scope="session")
def caption_cache(train_data, tmp_path_factory) -> Path:
    """The feature cache of the caption mixture for the debug preset, seed 0 (built through the CLI)."""
    from sphinx_mllm.cli.main import main

    out = tmp_path_factory.mktemp("cache") / "features"
    with one_thread():
        rc = main(["cache-features", "--model", "debug", "--seed", "0", "--mixture", str(train_data.captions),
                   "--output", str(out), "--batch-size", "3"])
    assert rc == 0
    return out


# ---------------------------------------------------------------------------------------- the items

@pytest.fixture(scope="module")
def processor(tokenizer) -> SphinxProcessor:
    return SphinxProcessor.from_config(SphinxConfig.from_preset("debug"), tokenizer)


def test_caption_item_has_loss_on_caption_and_eos_only(train_data, processor) -> None:
    dataset = SFTDataset(MixtureDataset.from_yaml(train_data.captions), processor, max_length=512)
    item = dataset[0]
    n_img = processor.num_image_tokens
    assert item["task"] == "caption_pretrain"
    assert item["input_ids"][0] == 1 and item["input_ids"][1 : 1 + n_img] == [0] * n_img
    assert item["labels"][: 1 + n_img] == [IGNORE_INDEX] * (1 + n_img)
    text_ids = processor.tokenizer("a red square on a white image", add_special_tokens=False)["input_ids"]
    assert item["input_ids"][1 + n_img :] == [*text_ids, 2]
    assert item["labels"][1 + n_img :] == [*text_ids, 2]
    assert item["pixel_values"].shape == (1, 3, 224, 224)


def test_conversation_item_has_loss_on_the_answer_only(train_data, processor) -> None:
    dataset = SFTDataset(MixtureDataset.from_yaml(train_data.tasks), processor, max_length=512)
    item = dataset[0]
    assert item["task"] == "vqa"
    targets = [t for t in item["labels"] if t != IGNORE_INDEX]
    # " red\n###" is the whole loss span: the answer plus its separator (EOS excluded).
    assert processor.tokenizer.decode(targets) == "red\n###"
    record = MixtureDataset.from_yaml(train_data.tasks)[0]
    assert encode_record(record, processor) == (item["input_ids"], item["labels"])


def test_truncation_keeps_the_image_block_and_refuses_when_it_cannot(processor) -> None:
    ids, labels = list(range(10)), list(range(10))
    assert truncate(ids, labels, 6, keep=3) == (ids[:6], labels[:6])
    assert truncate(ids, labels, 20, keep=3) == (ids, labels)
    with pytest.raises(SphinxError, match="max_length 3 leaves no room"):
        truncate(ids, labels, 3, keep=3)


def test_collator_cuts_micro_batches_and_keeps_image_order(train_data, processor) -> None:
    dataset = SFTDataset(MixtureDataset.from_yaml(train_data.tasks), processor, max_length=512)
    items = [dataset[i] for i in range(4)]
    items[1] = dict(items[1])
    del items[1]["pixel_values"]  # a text-only row in the middle
    micro = SFTCollator(processor, micro_batch_size=2)(items)
    assert len(micro) == 2
    first = micro[0]
    assert first["tasks"] == ["vqa", "shape"]
    assert first["input_ids"].shape[0] == 2 and first["pixel_values"].shape == (1, 3, 224, 224)
    assert torch.equal(first["pixel_values"][0], items[0]["pixel_values"][0])
    assert first["attention_mask"][0].sum() == len(items[0]["input_ids"])  # right padding
    assert answer_token_count(first["labels"]) == sum(t != IGNORE_INDEX for it in items[:2] for t in it["labels"])
    with pytest.raises(SphinxError, match="does not split into micro-batches of 3"):
        SFTCollator(processor, micro_batch_size=3)(items)


def test_cached_features_replace_pixels(train_data, processor) -> None:
    calls: list[str] = []

    def lookup(path: str) -> dict[str, torch.Tensor]:
        calls.append(path)
        return {"clip": torch.full((1, 5, 3), float(len(calls)))}

    dataset = SFTDataset(MixtureDataset.from_yaml(train_data.captions), processor, 512, feature_lookup=lookup)
    items = [dataset[0], dataset[1]]
    assert "pixel_values" not in items[0] and calls[0].endswith("red_square.png")
    batch = SFTCollator(processor, 2)(items)[0]
    assert batch["encoder_features"]["clip"].shape == (2, 5, 3)
    assert batch["encoder_features"]["clip"][:, 0, 0].tolist() == [1.0, 2.0]  # row order

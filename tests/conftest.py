"""Shared fixtures: a small LLaMA-format SentencePiece tokenizer trained here, small models and images.

Everything is offline: HF_HUB_OFFLINE is forced before transformers is imported.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

WORDS = (
    "the a an is are what where which color colour shape red green blue yellow white black box circle square "
    "triangle person left right top bottom middle image picture describe detect all bounding coordinate region "
    "sentence this provide please answer question single word phrase human assistant chat curious artificial "
    "intelligence helpful detailed polite answers gives between and to of in on with key points text"
).split()


def train_sentencepiece(path: Path, vocab_size: int = 800) -> Path:
    """A LLaMA-style SentencePiece BPE model (<unk>=0, <s>=1, </s>=2, byte fallback, dummy prefix)."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(14)) for _ in range(4000)]
    lines += ["[0.12,0.30,0.55,0.91] [0.5,0.5] <p>red box</p> ### Human: Assistant: 0123456789."] * 200
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, split_digits=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        minloglevel=2,
    )
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.getvalue())
    return path


@pytest.fixture(scope="session")
def sp_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp_tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(sp_tokenizer_dir: Path):
    from sphinx_mllm.processing import load_tokenizer

    return load_tokenizer(sp_tokenizer_dir)


@pytest.fixture(scope="session")
def debug_model_and_processor(tokenizer):
    """A `debug` preset model (random weights, seed 0, eval mode, fp32) and its processor."""
    import torch

    from sphinx_mllm.config import SphinxConfig
    from sphinx_mllm.modeling import SphinxForConditionalGeneration
    from sphinx_mllm.processing import SphinxProcessor

    torch.manual_seed(0)
    config = SphinxConfig.from_preset("debug")
    model = SphinxForConditionalGeneration(config).eval()
    return model, SphinxProcessor.from_config(config, tokenizer)

"""A small byte-level BPE tokenizer trained on a world's text, in the LLaMA layout the project expects.

Ids 0, 1, 2 are `<unk>`, `<s>`, `</s>` (as in LLaMA, so the image placeholder id 0 and BOS/EOS match the
release's conventions). Every coordinate the world writes, "0.00" to "1.00", is one token (an added token,
matched before the BPE), so a box is nine tokens and the model picks each number in one step. The BPE is
trained with the `tokenizers` library on every human turn, answer and caption of the training split plus
the chat template's fixed text; byte-level, so any text still encodes. Saved as `tokenizer.json` +
`tokenizer_config.json`, loadable with `sphinx_mllm.processing.load_tokenizer`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from sphinx_mllm.processing.template import TEMPLATES
from sphinx_mllm.utils import SphinxError, atomic_dir, get_logger

log = get_logger(__name__)

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
COORDINATE_TOKENS: tuple[str, ...] = tuple(f"{i / 100:.2f}" for i in range(101))
PHRASE_TOKENS: tuple[str, ...] = ("<p>", "</p>")
"""The grounded-phrase markers, one token each (a byte-level BPE would split them into three)."""
DEFAULT_VOCAB_SIZE = 1024


def world_texts(world: str | os.PathLike, split: str = "train") -> Iterator[str]:
    """Every text of a world's split: human turns, answers and captions of all its JSONL files."""
    folder = Path(world) / split
    files = sorted(folder.glob("*.jsonl"))
    if not files:
        raise SphinxError(f"{folder} holds no JSONL files; is {world} a world folder?")
    for path in files:
        with path.open(encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if "caption" in record:
                    yield str(record["caption"])
                for turn in record.get("conversations", ()):
                    yield str(turn["value"])


def _template_texts() -> list[str]:
    out = []
    for t in TEMPLATES.values():
        out += [t.system + t.system_suffix, t.user_prefix, t.assistant_prefix, t.turn_suffix]
    return out


def train_tokenizer(texts: Iterable[str], output: str | os.PathLike, vocab_size: int = DEFAULT_VOCAB_SIZE,
                    overwrite: bool = False) -> Path:
    """Train the BPE on `texts` (plus the template's text) and save it to the folder `output`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < len(SPECIAL_TOKENS) + 256 + 16:
        raise SphinxError(f"vocab_size {vocab_size} is too small for a byte-level BPE (at least 275)")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [*_template_texts() * 2000, *texts]
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    tok.add_tokens([AddedToken(c, single_word=False, normalized=False) for c in (*COORDINATE_TOKENS, *PHRASE_TOKENS)])
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [0, 1, 2]:
        raise RuntimeError(f"special tokens got ids {ids}, expected [0, 1, 2]")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    with atomic_dir(output, overwrite=overwrite) as tmp:
        fast.save_pretrained(str(tmp))
    log.info("trained a %d-token BPE (%d coordinate tokens) into %s", tok.get_vocab_size(), len(COORDINATE_TOKENS),
             output)
    return Path(output)


def train_world_tokenizer(world: str | os.PathLike, output: str | os.PathLike,
                          vocab_size: int = DEFAULT_VOCAB_SIZE, overwrite: bool = False) -> Path:
    """`train_tokenizer` over the training split of a world folder."""
    return train_tokenizer(world_texts(world, "train"), output, vocab_size, overwrite)


__all__ = [
    "COORDINATE_FREQUENCIES",
    "COORDINATE_TOKENS",
    "DEFAULT_VOCAB_SIZE",
    "PHRASE_TOKENS",
    "SPECIAL_TOKENS",
    "coordinate_embeddings",
    "init_coordinate_embeddings",
    "train_tokenizer",
    "train_world_tokenizer",
    "world_texts",
]


COORDINATE_FREQUENCIES: tuple[float, ...] = (0.5, 1, 2, 3, 5, 8, 12, 16, 20, 25, 33, 50)
"""Cycles over [0, 1] of the sinusoids that embed a coordinate token (the highest resolves 0.01 steps)."""


def coordinate_embeddings(dim: int, scale: float = 0.3, seed: int = 0) -> torch.Tensor:
    """[101, dim] embeddings of the coordinate tokens "0.00".."1.00": cos/sin of `COORDINATE_FREQUENCIES`
    at the token's value, in a seeded random orthonormal 24-dim subspace of the model's `dim` dims, times
    `scale`. Neighbouring values get similar vectors and a dot product peaks at equal values, so a number
    carried by a visual feature can be read out through a linear map instead of a 101-way lookup."""
    freqs = torch.tensor(COORDINATE_FREQUENCIES, dtype=torch.float64)
    values = torch.arange(len(COORDINATE_TOKENS), dtype=torch.float64) / 100  # [101]
    angles = 2 * math.pi * values[:, None] * freqs[None]  # [101, F]
    waves = torch.cat([angles.cos(), angles.sin()], dim=1)  # [101, 2F]
    if dim < waves.shape[1]:
        raise ValueError(f"the model width {dim} is below the {waves.shape[1]} sinusoid dims of coordinates")
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, waves.shape[1], generator=gen, dtype=torch.float64))  # [dim, 2F]
    return (waves @ basis.T * scale).float()


@torch.no_grad()
def init_coordinate_embeddings(language_model: torch.nn.Module, tokenizer: Any, scale: float = 0.3,
                               seed: int = 0) -> None:
    """Set the input and output embedding rows of the coordinate tokens of a from-scratch LLM (a
    `PreTrainedModel` with `get_input_embeddings` / `get_output_embeddings`) to `coordinate_embeddings`.

    Measured on the world (REC, global view, label-derived features with only the referred object's cells
    kept, 4-layer LLM): after 200-300 steps, 81% of coordinate tokens within 0.03 of the truth with it,
    17% without (the LLM then learns a number's readout as 101 unrelated classes). A pretrained LLM keeps its own."""
    ids = tokenizer.convert_tokens_to_ids(list(COORDINATE_TOKENS))
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError("the tokenizer lacks the coordinate tokens 0.00..1.00 (train it with train_tokenizer)")
    inputs = language_model.get_input_embeddings().weight
    table = coordinate_embeddings(inputs.shape[1], scale, seed).to(inputs.dtype)
    inputs[ids] = table
    outputs = language_model.get_output_embeddings()
    if outputs is not None and outputs.weight is not inputs:
        outputs.weight[ids] = table.to(outputs.weight.dtype)

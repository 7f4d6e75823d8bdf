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
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

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


__all__ = ["COORDINATE_TOKENS", "DEFAULT_VOCAB_SIZE", "PHRASE_TOKENS", "SPECIAL_TOKENS", "train_tokenizer",
           "train_world_tokenizer", "world_texts"]

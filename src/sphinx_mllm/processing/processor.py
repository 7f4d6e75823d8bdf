"""`SphinxProcessor`: images + conversations -> model inputs, following the transformers processor conventions.

It owns the image-token arithmetic: every image becomes exactly `num_image_tokens` placeholder ids (the
value of `SphinxConfig.num_image_tokens`, stored in `processor_config.json`) right after BOS, as the release
lays them out. Text is rendered with the chat template (data, `template.py`) and tokenised once; training
labels come from the template's character spans through the tokenizer's offsets, so they cover exactly each
assistant answer plus its `"\\n###"`.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

from sphinx_mllm.config import RELEASE_LLAMA_TYPES, SphinxConfig
from sphinx_mllm.processing.image import DEFAULT_MAX_PIXELS, ImageLike, ImagePreprocessor
from sphinx_mllm.processing.template import ASSISTANT_ROLES, USER_ROLES, ChatTemplate, get_template, render, strip_stop
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.io import atomic_write_text

IGNORE_INDEX = -100
PROCESSOR_CONFIG = "processor_config.json"


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """A transformers tokenizer from a folder (`tokenizer.json` / `tokenizer_config.json`, or a bare LLaMA
    SentencePiece `tokenizer.model` as in release folders) or from a `.model` / `.json` file."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return TokenizersBackend(tokenizer_file=str(path))
        return TokenizersBackend.from_pretrained(str(path.parent), vocab_file=str(path))
    if not path.is_dir():
        raise SphinxError(f"tokenizer not found: {path}")
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(path))
    if (path / "tokenizer.model").exists():
        # A release folder: its config.json holds LLM args, not a transformers config, so bypass AutoTokenizer.
        return TokenizersBackend.from_pretrained(str(path))
    raise SphinxError(f"no tokenizer in {path}: expected tokenizer.json, tokenizer_config.json or tokenizer.model")


class SphinxProcessor:
    """Image preprocessor + tokenizer + chat template. Call conventions of transformers processors."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int,
        num_image_tokens: int,
        image_token_id: int = 0,
        chat_template_name: str = "v1",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        padding_side: str = "left",
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = ImagePreprocessor(image_size=image_size, max_pixels=max_pixels)
        self.num_image_tokens = num_image_tokens
        self.image_token_id = image_token_id
        self.template: ChatTemplate = get_template(chat_template_name)
        self.padding_side = padding_side
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise SphinxError("the tokenizer needs BOS and EOS tokens (LLaMA: <s>=1, </s>=2)")
        pad = tokenizer.pad_token_id
        # LLaMA has no pad token; pad with EOS (masked out anyway) rather than <unk>, the image placeholder.
        self.pad_token_id = pad if pad is not None and pad != image_token_id else tokenizer.eos_token_id

    @classmethod
    def from_config(cls, config: SphinxConfig, tokenizer: PreTrainedTokenizerBase, **kwargs: Any) -> SphinxProcessor:
        return cls(tokenizer, image_size=config.image_size, num_image_tokens=config.num_image_tokens,
                   image_token_id=config.image_token_id, chat_template_name=config.chat_template_name, **kwargs)

    # -- text ---------------------------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.image_token_id in ids:
            raise SphinxError("the text contains the image placeholder token (id "
                              f"{self.image_token_id}); remove it, images are placed by the processor")
        return ids

    def _prefix(self, has_image: bool, n_images: int = 1) -> list[int]:
        return [self.tokenizer.bos_token_id] + [self.image_token_id] * (self.num_image_tokens * n_images * has_image)

    def _pad(self, seqs: list[list[int]], labels: list[list[int]] | None, side: str) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        lab = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long) if labels is not None else None
        for i, seq in enumerate(seqs):
            sl = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[i, sl] = torch.tensor(seq, dtype=torch.long)
            mask[i, sl] = 1
            if lab is not None and labels is not None:
                lab[i, sl] = torch.tensor(labels[i], dtype=torch.long)
        out = {"input_ids": ids, "attention_mask": mask}
        if lab is not None:
            out["labels"] = lab
        return out

    def _images(self, images: Sequence[ImageLike | None]) -> dict[str, torch.Tensor]:
        present = [im for im in images if im is not None]
        if not present:
            return {}
        pixels, sizes = self.image_processor(present)
        return {"pixel_values": pixels, "image_sizes": torch.tensor([[h, w] for w, h in sizes], dtype=torch.long)}

    # -- transformers-style entry points --------------------------------------------------------------
    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike | None] | None = None,
        text: str | Sequence[str] | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        **_: Any,
    ) -> BatchFeature:
        """Prompts (already templated) and one optional image per prompt -> input_ids, attention_mask,
        pixel_values, image_sizes ([H, W] of the originals, for mapping boxes back).

        A literal "<image>" in a prompt is dropped: SPHINX always places the image right after BOS.
        """
        if text is None:
            text = [""] * (1 if images is None or not isinstance(images, (list, tuple)) else len(images))
        texts = [text] if isinstance(text, str) else list(text)
        if images is None:
            image_list: list[ImageLike | None] = [None] * len(texts)
        elif isinstance(images, (list, tuple)):
            image_list = list(images)
        else:
            image_list = [images]
        if len(image_list) != len(texts):
            raise SphinxError(f"got {len(texts)} prompts and {len(image_list)} images; give one image (or None) "
                              "per prompt")
        seqs = [self._prefix(im is not None) + self._text_ids(t.replace("<image>", "").lstrip("\n"))
                for t, im in zip(texts, image_list)]
        data: dict[str, Any] = self._pad(seqs, None, padding_side or self.padding_side)
        data.update(self._images(image_list))
        return BatchFeature(data=data, tensor_type=return_tensors)

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]] | list[list[dict[str, Any]]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = True,
        images: Sequence[ImageLike | None] | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = "pt",
        **_: Any,
    ) -> str | list[str] | BatchFeature:
        """HF-style messages (`{"role", "content": str | [{"type": "image"[, "image": ...]},
        {"type": "text", "text": ...}]}`) -> prompt text, or model inputs when `tokenize=True`.

        Images come from `"image"` / `"url"` / `"path"` keys of image parts (local files only), or from
        `images` (one per conversation, for parts given as a bare `{"type": "image"}`).
        """
        batched = bool(conversation) and isinstance(conversation[0], list)
        convs: list[list[dict[str, Any]]] = conversation if batched else [conversation]  # type: ignore[assignment]
        texts, found = [], []
        for conv in convs:
            turns, image, has_image = _messages_to_turns(conv)
            texts.append(render(turns, self.template, add_generation_prompt)[0])
            found.append((image, has_image))
        if not tokenize:
            return texts if batched else texts[0]
        if images is not None and len(images) != len(convs):
            raise SphinxError(f"got {len(convs)} conversations and {len(images)} images")
        image_list: list[ImageLike | None] = []
        for i, (image, has_image) in enumerate(found):
            if image is None and has_image:
                image = images[i] if images is not None else None
                if image is None:
                    raise SphinxError(f"conversation {i} has an image part but no image was given")
            image_list.append(image)
        out = self(images=image_list, text=texts, padding_side=padding_side, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    # -- training -------------------------------------------------------------------------------------
    def encode_conversation(self, turns: list[tuple[str, str]], has_image: bool) -> tuple[list[int], list[int]]:
        """One training dialog -> (input_ids, labels): [BOS] [image] dialog [EOS]; labels only on answers
        plus their "\\n###" (EOS and everything else -100)."""
        text, spans = render(turns, self.template, add_generation_prompt=False)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = enc["input_ids"]
        if self.image_token_id in ids:
            raise SphinxError(f"the conversation text contains the image placeholder token (id {self.image_token_id})")
        labels = [tok if _overlaps(off, spans) else IGNORE_INDEX for tok, off in zip(ids, enc["offset_mapping"])]
        prefix = self._prefix(has_image)
        return prefix + ids + [self.tokenizer.eos_token_id], [IGNORE_INDEX] * len(prefix) + labels + [IGNORE_INDEX]

    def encode_caption(self, caption: str, has_image: bool) -> tuple[list[int], list[int]]:
        """Caption pre-training: [BOS] [image] caption [EOS], loss on the caption and EOS."""
        ids = self._text_ids(caption) + [self.tokenizer.eos_token_id]
        prefix = self._prefix(has_image)
        return prefix + ids, [IGNORE_INDEX] * len(prefix) + ids

    def collate(
        self, examples: list[tuple[list[int], list[int]]], padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad (input_ids, labels) pairs into a batch."""
        return self._pad([e[0] for e in examples], [e[1] for e in examples], padding_side)

    # -- decoding -------------------------------------------------------------------------------------
    def batch_decode(self, ids: Any, **kwargs: Any) -> list[str]:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids: Any, **kwargs: Any) -> str:
        kwargs.setdefault("skip_special_tokens", True)
        return self.tokenizer.decode(ids, **kwargs)

    def post_process(self, text: str) -> str:
        """Cut a generated answer at the template's stop strings."""
        return strip_stop(text, self.template)

    @property
    def stop_strings(self) -> list[str]:
        return list(self.template.stop_strings)

    # -- persistence ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "processor_class": type(self).__name__,
            "image_size": self.image_processor.image_size,
            "num_image_tokens": self.num_image_tokens,
            "image_token_id": self.image_token_id,
            "chat_template_name": self.template.name,
            "max_pixels": self.image_processor.max_pixels,
            "padding_side": self.padding_side,
        }

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> None:
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(save_directory))
        atomic_write_text(save_directory / PROCESSOR_CONFIG, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kwargs: Any) -> SphinxProcessor:
        """From our saved folder (`processor_config.json`) or a release folder (`meta.json` + `tokenizer.model`:
        the config is our extra `sphinx_mllm.json` if present, else the preset of the release's `llama_type`)."""
        path = Path(path)
        cfg_file = path / PROCESSOR_CONFIG
        # Keep our own overrides; hub-loading arguments (trust_remote_code, revision...) mean nothing here.
        own = set(inspect.signature(cls.__init__).parameters) - {"self", "tokenizer"}
        overrides = {k: v for k, v in kwargs.items() if k in own}
        if not cfg_file.exists() and (path / "meta.json").is_file():
            extra = path / "sphinx_mllm.json"  # written by sphinx_mllm.formats.save_release
            if extra.is_file():
                config = SphinxConfig.from_dict(json.loads(extra.read_text()))
            else:
                llama_type = json.loads((path / "meta.json").read_text()).get("llama_type")
                presets = {t: p for p, t in RELEASE_LLAMA_TYPES.items()}
                if llama_type not in presets:
                    raise SphinxError(f"{path / 'meta.json'}: unknown llama_type {llama_type!r}; "
                                      f"SPHINX variants: {sorted(presets)}")
                config = SphinxConfig.from_preset(presets[llama_type])
            return cls.from_config(config, load_tokenizer(path), **overrides)
        if not cfg_file.exists():
            raise SphinxError(f"{path} has no {PROCESSOR_CONFIG} (nor a release meta.json)")
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("processor_class", None)
        cfg.update(overrides)
        return cls(load_tokenizer(path), **cfg)


def _overlaps(offset: tuple[int, int], spans: list[tuple[int, int]]) -> bool:
    """Does a token's character range [b, e) overlap any target span?"""
    b, e = offset
    return any(start < e and b < end for start, end in spans)


def _messages_to_turns(messages: list[dict[str, Any]]) -> tuple[list[tuple[str, str]], ImageLike | None, bool]:
    """HF messages -> (role, text) turns, the first embedded image source, and whether an image part exists."""
    turns: list[tuple[str, str]] = []
    image: ImageLike | None = None
    has_image = False
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in (*USER_ROLES, *ASSISTANT_ROLES, "system"):
            raise SphinxError(f"message {i}: unknown role {role!r}")
        content = msg.get("content", "")
        if isinstance(content, str):
            turns.append((role, content))
            continue
        texts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                texts.append(part.get("text", ""))
            elif kind == "image":
                if has_image:
                    raise SphinxError("SPHINX takes one image per conversation (placed after BOS); got several")
                has_image = True
                image = part.get("image") or part.get("path") or part.get("url")
            else:
                raise SphinxError(f"message {i}: unsupported content part type {kind!r}")
        turns.append((role, "\n".join(t for t in texts if t)))
    return turns, image, has_image


AutoProcessor.register(SphinxConfig, SphinxProcessor, exist_ok=True)

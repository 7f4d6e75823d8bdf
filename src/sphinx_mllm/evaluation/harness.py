"""Adapters so that the evaluation harnesses users already run can drive a SPHINX model.

**lmms-eval** (EvolvingLMMs-Lab/lmms-eval, >= 0.7): models register through the entry-point group
`lmms_eval.models`, whose entries are `ModelManifest`s (or callables returning them). This package declares

    [project.entry-points."lmms_eval.models"]
    sphinx_mllm = "sphinx_mllm.evaluation.harness:lmms_eval_manifest"

so `python -m lmms_eval --model sphinx_mllm --model_args pretrained=/path/to/model --tasks ...` works once
both are installed. The model class (`sphinx_mllm.evaluation.lmms_eval_model.SphinxLmms`) subclasses
lmms-eval's `lmms`; its logic lives here in `LmmsAdapter` (no lmms-eval import), following the "simple"
model request layout: `generate_until` args are `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`,
`loglikelihood` args `(context, doc_to_target, doc_to_visual, doc_id, task, split)`, visuals coming from
`task_dict[task][split][doc_id]`.

**VLMEvalKit** (open-compass/VLMEvalKit, not on PyPI): `SphinxVLMEval` follows its `BaseModel` protocol:
`generate(message, dataset=None)` / `generate_inner(message, dataset=None)` with `message` a list of
`{"type": "image" | "text", "value": path_or_text}`. Register it in VLMEvalKit's `vlmeval/config.py`:
`supported_VLM["sphinx"] = partial(SphinxVLMEval, model_path="/path/to/model")`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from sphinx_mllm.inference.chat import GenerationConfig, Message, SphinxChat
from sphinx_mllm.utils.errors import SphinxError

LMMS_EVAL_MODEL_ID = "sphinx_mllm"
LMMS_EVAL_CLASS_PATH = "sphinx_mllm.evaluation.lmms_eval_model.SphinxLmms"


def lmms_eval_manifest() -> Any:
    """The entry-point payload for lmms-eval's model registry (imported only by lmms-eval)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_ID, simple_class_path=LMMS_EVAL_CLASS_PATH, aliases=("sphinx",))


def _messages(context: str, images: Sequence[Any]) -> list[Message]:
    """SPHINX takes one image, right after BOS: the first visual is used, others are dropped."""
    content: list[dict[str, Any]] = [{"type": "text", "text": context.replace("<image>", "").strip()}]
    if images:
        content.insert(0, {"type": "image", "image": images[0]})
    return [{"role": "user", "content": content}]


def _flatten_visuals(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        out: list[Any] = []
        for v in visuals:
            out.extend(_flatten_visuals(v))
        return out
    return [visuals]


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        if stop:
            idx = text.find(stop)
            if idx != -1:
                text = text[:idx]
    return text


class LmmsAdapter:
    """The lmms-eval request handling, independent of lmms-eval itself (mixed into `SphinxLmms`)."""

    chat: SphinxChat
    task_dict: dict[str, Any]
    batch_size_per_call: int = 1

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        return _flatten_visuals(doc_to_visual(self.task_dict[task][split][doc_id]))

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """One answer per request; gen_kwargs `max_new_tokens`, `temperature`, `top_p`, `until` honoured."""
        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            config = GenerationConfig(
                max_new_tokens=int(gen_kwargs.get("max_new_tokens", 128)),
                temperature=float(gen_kwargs.get("temperature", 0.0) or 0.0),
                top_p=float(gen_kwargs.get("top_p") or 0.75),
            )
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            answer = self.chat.generate([_messages(context, visuals)], config)[0]
            out.append(_cut(answer, until))
        return out

    def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
        """Multi-round requests carry the same first six arguments; answered as single rounds."""
        return self.generate_until(requests)

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        """(log P(continuation | context, image), whether greedy decoding would produce it)."""
        out = []
        for req in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = req.args
            if callable(doc_to_target):
                continuation = doc_to_target(self.task_dict[task][split][doc_id])
            else:
                continuation = doc_to_target
            visuals = self._visuals(doc_to_visual, doc_id, task, split)
            out.append(continuation_logprob(self.chat, _messages(context, visuals), str(continuation)))
        return out


def continuation_logprob(chat: SphinxChat, messages: list[Message], continuation: str) -> tuple[float, bool]:
    """Log-probability of `continuation` as the assistant's answer to `messages`, and whether it is the
    greedy answer. The continuation's tokens are those the full text adds after the prompt's tokens."""
    proc = chat.processor
    prompt = proc.apply_chat_template(messages, tokenize=False)
    full = prompt + " " + continuation.strip()
    images = [p.get("image") for m in messages if isinstance(m["content"], list) for p in m["content"]
              if p.get("type") == "image"]
    image = images[0] if images else None
    enc_prompt = proc(images=image, text=prompt)
    enc_full = proc(images=image, text=full)
    p_ids, f_ids = enc_prompt["input_ids"][0].tolist(), enc_full["input_ids"][0].tolist()
    start = 0
    while start < min(len(p_ids), len(f_ids)) and p_ids[start] == f_ids[start]:
        start += 1
    if start >= len(f_ids):
        raise SphinxError("the continuation adds no token to the context")
    inputs = {k: v.to(chat.device) for k, v in enc_full.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(chat.model.dtype)
    with torch.inference_mode():
        logits = chat.model(**inputs).logits[0].float()  # [L, V]
    logprobs = torch.log_softmax(logits[start - 1 : len(f_ids) - 1], dim=-1)
    targets = torch.tensor(f_ids[start:], device=logprobs.device)
    total = float(logprobs.gather(-1, targets[:, None]).sum())
    greedy = bool((logprobs.argmax(-1) == targets).all())
    return total, greedy


class SphinxVLMEval:
    """A VLMEvalKit model (`BaseModel` protocol). One image per question (SPHINX's layout): `INTERLEAVE` is
    False and only the first image of a message is used."""

    INTERLEAVE = False
    allowed_types = ("text", "image")

    def __init__(self, model_path: str | os.PathLike | None = None, chat: SphinxChat | None = None,
                 max_new_tokens: int = 512, device: str = "auto", **_: Any) -> None:
        if chat is None:
            if model_path is None:
                raise SphinxError("SphinxVLMEval needs model_path (or a loaded chat)")
            chat = SphinxChat.load(model_path, device=device)
        self.chat = chat
        self.config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)
        self.dump_image_func = None

    def use_custom_prompt(self, dataset: str | None) -> bool:
        """VLMEvalKit's dataset prompts are used as they are."""
        return False

    def set_dump_image(self, dump_image_func: Any) -> None:
        self.dump_image_func = dump_image_func

    @staticmethod
    def preprocess(message: Any) -> list[dict[str, str]]:
        """A str, a list of str (image paths recognised by their file existing) or a list of typed dicts ->
        typed dicts, as VLMEvalKit's BaseModel accepts."""
        if isinstance(message, str):
            return [{"type": "text", "value": message}]
        if not isinstance(message, (list, tuple)) or not message:
            raise SphinxError("a VLMEvalKit message is a string or a non-empty list")
        out = []
        for part in message:
            if isinstance(part, dict):
                if part.get("type") not in SphinxVLMEval.allowed_types or "value" not in part:
                    raise SphinxError(f"unsupported message part {part!r}; expected type 'text' or 'image'")
                out.append({"type": part["type"], "value": part["value"]})
            elif isinstance(part, str):
                out.append({"type": "image" if os.path.isfile(part) else "text", "value": part})
            else:
                raise SphinxError(f"unsupported message part {part!r}")
        return out

    def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
        texts = [p["value"] for p in message if p["type"] == "text"]
        images = [p["value"] for p in message if p["type"] == "image"]
        return self.chat.generate([_messages("\n".join(texts), images)], self.config)[0]

    def generate(self, message: Any, dataset: str | None = None) -> str:
        return self.generate_inner(self.preprocess(message), dataset)


__all__ = ["LMMS_EVAL_CLASS_PATH", "LMMS_EVAL_MODEL_ID", "LmmsAdapter", "SphinxVLMEval", "continuation_logprob",
           "lmms_eval_manifest"]

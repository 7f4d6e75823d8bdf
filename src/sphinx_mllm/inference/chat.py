"""`SphinxChat`: load a model, generate (batched, left padding), stream tokens, and hold a multi-turn chat.

The release's sampling (SPHINX.md section 10): temperature then top-p ("nucleus": keep the smallest set of
tokens whose probability reaches `top_p`), greedy at temperature 0, answers cut at the template's stop strings
(`"\\n###"`). Sampling is done by `_SeededTopP`, a logits processor that draws each row with its own
`torch.Generator` seeded from `GenerationConfig.seed` and leaves only the drawn token open; `generate` then
runs greedily. So an item's answer for a given seed does not depend on the other items of its batch.

Streaming runs `model.generate` in a worker thread that pushes token ids into a queue; the iterator decodes
the whole answer so far and yields only text that can no longer change (it holds back a trailing partial
UTF-8 character, trailing whitespace and any tail that could start a stop string), so the concatenated deltas
equal what `generate` returns. Closing the iterator, or setting `cancel`, stops the worker at its next token
and the iterator joins it before returning.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from sphinx_mllm.modeling import SphinxForConditionalGeneration
from sphinx_mllm.processing import SphinxProcessor, load_image, load_tokenizer
from sphinx_mllm.processing.image import ImageLike
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

log = get_logger(__name__)

Message = dict[str, Any]
"""An HF-style chat message: `{"role": "user"|"assistant"|"system", "content": str | [parts]}`; parts are
`{"type": "text", "text": ...}` and at most one `{"type": "image", "image": PIL.Image | path | bytes}`."""

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}  # fmt: skip


@dataclass(frozen=True)
class GenerationConfig:
    """How to decode. `temperature=0` is greedy (the release's evaluation setting)."""

    max_new_tokens: int = 512
    temperature: float = 0.1
    top_p: float = 0.75
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise SphinxError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise SphinxError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise SphinxError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0


@dataclass(frozen=True)
class Generation:
    """One answer with its bookkeeping (what an OpenAI-style server reports as usage / finish_reason)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens reached)


# ----------------------------------------------------------------------------- generation helpers


class _SeededTopP(LogitsProcessor):
    """The release's temperature + top-p draw, one generator per row; returns logits where only the drawn
    token is finite, so greedy search picks it."""

    def __init__(self, temperature: float, top_p: float, seed: int | None, batch_size: int) -> None:
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.seed = seed
        self.batch_size = batch_size
        self.generators: list[torch.Generator] | None = None

    def _generators(self, device: torch.device) -> list[torch.Generator] | None:
        if self.seed is None:
            return None
        if self.generators is None:
            seed = int(self.seed)
            self.generators = [torch.Generator(device=device).manual_seed(seed) for _ in range(self.batch_size)]
        return self.generators

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # [B, V]
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        sorted_probs[(cumulative - sorted_probs) > self.top_p] = 0.0
        sorted_probs.div_(sorted_probs.sum(dim=-1, keepdim=True))
        generators = self._generators(scores.device)
        picks = []
        for row in range(scores.shape[0]):
            gen = generators[row] if generators is not None else None
            picks.append(torch.multinomial(sorted_probs[row], 1, generator=gen))
        chosen = torch.gather(order, -1, torch.stack(picks))  # [B, 1]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, chosen, 0.0)


class _EventStop(StoppingCriteria):
    """Stops every row once any of the events is set (a user's cancel, or the stream being closed)."""

    def __init__(self, *events: threading.Event | None) -> None:
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _TokenQueue(BaseStreamer):
    """Receives generated token ids from `generate` (the first `put` is the prompt, skipped)."""

    _END = object()

    def __init__(self) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(self._END)


def _stable_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of a growing answer that later tokens cannot change: drop a trailing replacement character
    (half a UTF-8 character), trailing whitespace (the final answer is stripped) and any tail that could be
    the start of a stop string."""
    text = text.rstrip("\ufffd").rstrip()
    for cut in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        tail = text[-cut:]
        if any(s.startswith(tail) for s in stops):
            return text[:-cut].rstrip()
    return text


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" -> cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise SphinxError(f"unknown device {device!r}: {exc}") from None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise SphinxError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[dtype]


def _is_our_folder(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "sphinx"
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- the chat object


class SphinxChat:
    """A model and its processor, ready to answer. Use one generation at a time per instance (a server
    batches requests into one `generate` call)."""

    def __init__(self, model: SphinxForConditionalGeneration, processor: SphinxProcessor) -> None:
        self.model = model.eval()
        self.processor = processor

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: str = "auto", dtype: str | torch.dtype | None = None
    ) -> SphinxChat:
        """From our Hugging Face folder (`save_pretrained`) or a release folder (`consolidated.*.pth`, read
        through `sphinx_mllm.formats`). `device="auto"` picks cuda when available. `dtype=None` keeps the
        stored one, except float16 on CPU, which becomes bfloat16 (fp16 matmuls are very slow on CPUs)."""
        path = Path(path)
        if not path.is_dir():
            raise SphinxError(f"model folder not found: {path}")
        dev = resolve_device(device)
        want = resolve_dtype(dtype)
        kwargs = {"dtype": want} if want is not None else {}
        if not _is_our_folder(path):
            _import_formats(path)
        model = SphinxForConditionalGeneration.from_pretrained(path, **kwargs)
        if dev.type == "cpu" and model.dtype == torch.float16 and want is None:
            model = model.to(torch.bfloat16)
        model = model.to(dev).eval()
        if (path / "processor_config.json").is_file() or (path / "meta.json").is_file():
            processor = SphinxProcessor.from_pretrained(path)  # ours, or a release folder's preset
        else:
            processor = SphinxProcessor.from_config(model.config, load_tokenizer(path))
        log.info("loaded %s (%s, %s)", path, dev, model.dtype)
        return cls(model, processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def max_context(self) -> int:
        return int(self.model.config.text_config.max_position_embeddings)

    # -- inputs -----------------------------------------------------------------------------------
    def prepare(self, conversations: Sequence[list[Message]]) -> dict[str, torch.Tensor]:
        """Messages -> left-padded model inputs on the model's device (pixels in the model's dtype)."""
        if not conversations:
            raise SphinxError("no conversation to answer")
        batch = self.processor.apply_chat_template(list(conversations), padding_side="left")
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def _generate_kwargs(self, inputs: dict[str, torch.Tensor], config: GenerationConfig,
                         stops: Sequence[StoppingCriteria] = ()) -> dict[str, Any]:
        prompt_len = int(inputs["input_ids"].shape[1])
        room = self.max_context - prompt_len
        if room < 1:
            raise SphinxError(f"the prompt has {prompt_len} tokens; the model's context is {self.max_context}")
        kwargs: dict[str, Any] = dict(
            inputs, max_new_tokens=min(config.max_new_tokens, room), do_sample=False,
            stop_strings=self.processor.stop_strings, tokenizer=self.processor.tokenizer,
            pad_token_id=self.processor.pad_token_id, eos_token_id=self.processor.tokenizer.eos_token_id,
            stopping_criteria=StoppingCriteriaList(stops),
        )
        if not config.greedy:
            batch = int(inputs["input_ids"].shape[0])
            kwargs["logits_processor"] = LogitsProcessorList(
                [_SeededTopP(config.temperature, config.top_p, config.seed, batch)]
            )
        return kwargs

    # -- answers ----------------------------------------------------------------------------------
    def generate_full(
        self, conversations: Sequence[list[Message]], config: GenerationConfig = GenerationConfig()
    ) -> list[Generation]:
        """Answers of a batch of conversations (each ends with a user turn), with token counts."""
        inputs = self.prepare(conversations)
        kwargs = self._generate_kwargs(inputs, config)
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        prompt_len = int(inputs["input_ids"].shape[1])
        prompt_counts = inputs["attention_mask"].sum(dim=1).tolist()
        eos = self.processor.tokenizer.eos_token_id
        results = []
        for row, n_prompt in zip(out[:, prompt_len:].tolist(), prompt_counts):
            n = row.index(eos) if eos in row else len(row)
            raw = self.processor.decode(row[:n])
            text = self.processor.post_process(raw)
            stopped = eos in row or any(s in raw for s in self.processor.stop_strings)
            results.append(Generation(text, int(n_prompt), n, "stop" if stopped else "length"))
        return results

    def generate(
        self, conversations: Sequence[list[Message]], config: GenerationConfig = GenerationConfig()
    ) -> list[str]:
        """Answers of a batch of conversations, cut at the template's stop strings."""
        return [g.text for g in self.generate_full(conversations, config)]

    def stream(
        self, messages: list[Message], config: GenerationConfig = GenerationConfig(),
        cancel: threading.Event | None = None,
    ) -> Iterator[str]:
        """Text deltas of one answer as it is generated; `"".join(...)` equals `generate([messages])[0]`.

        Setting `cancel` stops generation at the next token; closing the iterator early stops and joins
        the worker thread. Errors of the worker are raised here.
        """
        inputs = self.prepare([messages])  # bad input raises here, before any thread exists
        closed = threading.Event()
        kwargs = self._generate_kwargs(inputs, config, [_EventStop(cancel, closed)])
        return self._deltas(kwargs, closed)

    def _deltas(self, kwargs: dict[str, Any], closed: threading.Event) -> Iterator[str]:
        """The worker starts on the first `next()`, so an iterator dropped unstarted leaves no thread."""
        streamer = _TokenQueue()
        kwargs["streamer"] = streamer
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # reported to the consumer
                failure.append(exc)
            finally:
                streamer.end()

        worker = threading.Thread(target=work, name="sphinx-stream", daemon=True)
        worker.start()
        stops = self.processor.stop_strings
        eos = self.processor.tokenizer.eos_token_id
        ids: list[int] = []
        sent = ""
        try:
            while True:
                item = streamer.queue.get()
                if item is _TokenQueue._END:
                    break
                ids.extend(t for t in item if t != eos)
                if eos in item:
                    closed.set()
                text = self.processor.decode(ids).lstrip()
                hit = min((i for i in (text.find(s) for s in stops) if i != -1), default=-1)
                stable = text[:hit].rstrip() if hit != -1 else _stable_prefix(text, stops)
                if len(stable) > len(sent) and stable.startswith(sent):
                    yield stable[len(sent):]
                    sent = stable
                if hit != -1:
                    closed.set()
                    break
            if failure:
                raise failure[0]
            final = self.processor.post_process(self.processor.decode(ids))
            if final.startswith(sent) and len(final) > len(sent):
                yield final[len(sent):]
        finally:
            closed.set()
            worker.join()

    def generate_response(
        self, qas: list[list[str | None]], image: ImageLike | None, max_gen_len: int, temperature: float,
        top_p: float, seed: int | None = None,
    ) -> str:
        """The release's call: `qas = [[q1, a1], ..., [qn, None]]`, the image (or None) goes with q1."""
        messages = qas_to_messages(qas, image)
        config = GenerationConfig(max_new_tokens=max_gen_len, temperature=temperature, top_p=top_p, seed=seed)
        return self.generate([messages], config)[0]


def _import_formats(path: Path) -> None:
    """Release folders are read by `sphinx_mllm.formats`, which registers its readers with the model; a folder
    that no reader recognises is refused here with a clear message."""
    import importlib
    import importlib.util

    from sphinx_mllm.modeling import has_checkpoint_reader

    not_ours = f"{path} is not a sphinx-mllm model folder (no config.json with model_type 'sphinx')"
    if importlib.util.find_spec("sphinx_mllm.formats") is None:
        raise SphinxError(f"{not_ours} and the release-checkpoint reader (sphinx_mllm.formats) is not installed")
    importlib.import_module("sphinx_mllm.formats")
    if not has_checkpoint_reader(path):
        raise SphinxError(f"{not_ours} nor a release folder (consolidated.*.pth + meta.json)")


def qas_to_messages(qas: Sequence[Sequence[str | None]], image: ImageLike | None) -> list[Message]:
    """The release's `[[q, a], ..., [q, None]]` -> HF messages (image part in the first user turn)."""
    if not qas or qas[-1][1] is not None:
        raise SphinxError("qas must be [[q1, a1], ..., [qn, None]]: the last pair's answer is None")
    messages: list[Message] = []
    for i, pair in enumerate(qas):
        if len(pair) != 2 or not isinstance(pair[0], str):
            raise SphinxError(f"qas[{i}] must be [question, answer]")
        content: list[dict[str, Any]] = [{"type": "text", "text": pair[0]}]
        if i == 0 and image is not None:
            content.insert(0, {"type": "image", "image": image})
        messages.append({"role": "user", "content": content})
        if pair[1] is not None:
            messages.append({"role": "assistant", "content": str(pair[1])})
        elif i != len(qas) - 1:
            raise SphinxError(f"qas[{i}] has no answer; only the last pair may have None")
    return messages


# ----------------------------------------------------------------------------- a terminal conversation


@dataclass
class ChatSession:
    """A multi-turn chat about one image (or none): history kept here, each `ask` answers the next turn.

    The image is loaded once (upright RGB), so `image_size` is the frame boxes in answers refer to.
    """

    chat: SphinxChat
    config: GenerationConfig = GenerationConfig()
    image: Any = None  # PIL.Image.Image | None
    history: list[tuple[str, str]] = field(default_factory=list)

    def set_image(self, source: ImageLike | None) -> None:
        """A new image (path, bytes, PIL image) or None; the history is cleared (it was about the old one)."""
        self.image = None if source is None else load_image(source, self.chat.processor.image_processor.max_pixels)
        self.history.clear()

    def reset(self) -> None:
        self.history.clear()

    @property
    def image_size(self) -> tuple[int, int] | None:
        return None if self.image is None else self.image.size

    def messages(self, question: str) -> list[Message]:
        qas: list[list[str | None]] = [[q, a] for q, a in self.history] + [[question, None]]
        return qas_to_messages(qas, self.image)

    def ask(self, question: str, **overrides: Any) -> str:
        """Answer `question` in context; `overrides` replace GenerationConfig fields for this turn."""
        answer = self.chat.generate([self.messages(question)], replace(self.config, **overrides))[0]
        self.history.append((question, answer))
        return answer

    def ask_stream(self, question: str, cancel: threading.Event | None = None) -> Iterator[str]:
        """Like `ask`, as text deltas; the turn enters the history when the stream ends."""
        parts: list[str] = []
        for delta in self.chat.stream(self.messages(question), self.config, cancel):
            parts.append(delta)
            yield delta
        self.history.append((question, "".join(parts)))


__all__ = ["ChatSession", "Generation", "GenerationConfig", "Message", "SphinxChat", "qas_to_messages",
           "resolve_device", "resolve_dtype"]

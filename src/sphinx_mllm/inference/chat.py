"""`SphinxChat`: load a model, generate (batched, left padding), stream tokens, and hold a multi-turn chat.

The release's sampling (SPHINX.md section 10): temperature then top-p ("nucleus": keep the smallest set of
tokens whose probability reaches `top_p`), greedy at temperature 0, answers cut at the template's stop strings
(`"\\n###"`). Sampling is done by `_SeededTopP`, a logits processor that draws each row with its own
`torch.Generator` seeded from `GenerationConfig.seed` and leaves only the drawn token open; `generate` then
runs greedily. So an item's answer for a given seed does not depend on the other items of its batch.

Streaming runs `model.generate` in a worker thread that pushes token ids into a queue; the iterator decodes
the answer so far and yields only text that can no longer change, so the concatenated deltas equal what
`generate` returns. What it holds back: the trailing run of byte-fallback tokens (`<0xNN>`: the decoder turns
a run of them into its UTF-8 text, or into one U+FFFD per byte when the run is not valid UTF-8, so one more
byte can turn text already decoded into replacement characters), a trailing U+FFFD (half a character from a
byte-level tokenizer), trailing whitespace (the answer is stripped) and any tail that could start a stop
string. Once exhausted, the iterator (`TextStream`) holds the answer's `Generation` in `.result`. Closing it,
or setting `cancel`, stops the worker at its next token and the iterator joins it before returning.
"""

from __future__ import annotations

import functools
import json
import os
import queue
import re
import threading
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from sphinx_mllm.formats import is_release_folder  # importing formats registers the release-folder reader
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
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece byte-fallback pieces


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
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens reached), or, for a stream
    # only, "cancelled" (its `cancel` event stopped it first)


class TextStream(Iterator[str]):
    """The text deltas of one streamed answer. Once exhausted, `result` is the answer's `Generation` (the joined
    text, token counts, finish_reason), as `generate_full` reports it; it stays None while the stream runs, and
    when it was closed early or failed. `close()` stops the generation and joins its thread.

    Wraps a generator of deltas that returns the `Generation`. (The generator holds no reference back, so a
    stream dropped half way is closed, and its generation stopped, at once by reference counting.)"""

    def __init__(self, deltas: Generator[str, None, Generation | None]) -> None:
        self.result: Generation | None = None
        self._deltas = deltas

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        try:
            return next(self._deltas)
        except StopIteration as end:
            if end.value is not None:
                self.result = end.value
            raise

    def close(self) -> None:
        self._deltas.close()


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
    """The part of a growing answer (decoded text that later tokens only extend) that they cannot change, as
    the final answer (`post_process`: cut at the first stop string, stripped) will have it: cut at the first
    stop string or before any tail that could still start one, then drop a trailing replacement character
    (half a UTF-8 character) and the surrounding whitespace."""
    end = min((i for i in (text.find(s) for s in stops) if i != -1), default=len(text))
    longest = max((len(s) for s in stops), default=0)
    for start in range(max(0, len(text) - longest + 1), end):
        if any(s.startswith(text[start:]) for s in stops):
            end = start
            break
    return text[:end].rstrip("\ufffd").strip()


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
        if not _is_our_folder(path) and not is_release_folder(path):
            raise SphinxError(f"{path} is neither a sphinx-mllm model folder (no config.json with model_type 'sphinx') "
                              "nor a release folder (consolidated.*.pth + meta.json)")
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

    @functools.cached_property
    def _held_ids(self) -> frozenset[int]:
        """Tokens whose text can still change with the next token: byte-fallback pieces, and special tokens
        (skipped when decoding, so byte pieces on both sides of one decode as one run)."""
        tok = self.processor.tokenizer
        pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
        held = {i for i, piece in enumerate(pieces) if isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece)}
        return frozenset(held | set(tok.all_special_ids))

    def _stable_text(self, ids: Sequence[int]) -> str:
        """The part of the answer decoded from `ids` that later tokens cannot change: a prefix of the final text."""
        end = len(ids)
        while end and ids[end - 1] in self._held_ids:
            end -= 1
        return _stable_prefix(self.processor.decode(ids[:end]), self.processor.stop_strings)

    def _finish_reason(self, ids: Sequence[int], raw: str, eos_seen: bool, max_new_tokens: int,
                       cancel: threading.Event | None) -> str:
        if eos_seen or any(s in raw for s in self.processor.stop_strings):
            return "stop"
        if cancel is not None and cancel.is_set() and len(ids) < max_new_tokens:
            return "cancelled"
        return "length"

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
    ) -> TextStream:
        """Text deltas of one answer as it is generated; `"".join(...)` equals `generate([messages])[0]`, and
        once exhausted, `.result` equals `generate_full([messages])[0]` (for greedy decoding, or a seed).

        Setting `cancel` stops generation at the next token; closing the iterator early stops and joins
        the worker thread. Errors of the worker are raised here.
        """
        inputs = self.prepare([messages])  # bad input raises here, before any thread exists
        closed = threading.Event()
        kwargs = self._generate_kwargs(inputs, config, [_EventStop(cancel, closed)])
        n_prompt = int(inputs["attention_mask"][0].sum())
        return TextStream(self._deltas(kwargs, closed, cancel, n_prompt))

    def _deltas(self, kwargs: dict[str, Any], closed: threading.Event, cancel: threading.Event | None,
                n_prompt: int) -> Generator[str, None, Generation]:
        """The worker starts on the first `next()`, so an iterator dropped unstarted leaves no thread. The worker
        runs to its own end (EOS, stop string, max_new_tokens, `cancel`) so that the token count is exact."""
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
        eos = self.processor.tokenizer.eos_token_id
        ids: list[int] = []
        eos_seen = False
        sent = ""
        try:
            while (item := streamer.queue.get()) is not _TokenQueue._END:
                if eos_seen:  # generate_full also counts and decodes up to the first EOS only
                    continue
                for token in item:
                    if token == eos:
                        eos_seen = True
                        break
                    ids.append(token)
                stable = self._stable_text(ids)
                if len(stable) > len(sent) and stable.startswith(sent):
                    yield stable[len(sent):]
                    sent = stable
            if failure:
                raise failure[0]
            raw = self.processor.decode(ids)
            final = self.processor.post_process(raw)
            if not final.startswith(sent):
                log.warning("streamed text %r is not a prefix of the answer %r", sent, final)
            elif len(final) > len(sent):
                yield final[len(sent):]
            reason = self._finish_reason(ids, raw, eos_seen, int(kwargs["max_new_tokens"]), cancel)
            return Generation(final, n_prompt, len(ids), reason)
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


__all__ = ["ChatSession", "Generation", "GenerationConfig", "Message", "SphinxChat", "TextStream", "qas_to_messages",
           "resolve_device", "resolve_dtype"]

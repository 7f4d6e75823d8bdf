"""The OpenAI chat-completions wire format: request validation, responses, stream chunks and errors.

Validation follows OpenAI's semantics: an argument the API does not know is refused ("Unrecognized request
argument supplied"); an OpenAI argument this server cannot honour (tools, n > 1, logprobs, penalties...)
is refused only when it asks for something other than its default, so clients that send defaults work.
Messages are checked here (roles, order, parts, lengths); image URLs are resolved later (`images.py`).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sphinx_mllm.serving.settings import ServerSettings

# Every top-level argument of OpenAI's chat-completions endpoint.
_SUPPORTED = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
              "stream", "stream_options", "n"}
_IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier",
            "reasoning_effort", "verbosity"}
_DEFAULT_ONLY = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,),
                 "top_logprobs": (), "logit_bias": ({},), "tools": ([],), "functions": ([],),
                 "tool_choice": ("none", "auto"), "function_call": ("none", "auto"),
                 "parallel_tool_calls": (True, False),
                 "modalities": (["text"],), "audio": (), "prediction": (), "web_search_options": (),
                 "response_format": ({"type": "text"},)}
KNOWN_ARGUMENTS = _SUPPORTED | _IGNORED | set(_DEFAULT_ONLY)

MAX_CONTENT_PARTS = 256  # per message; text length is bounded separately (ServerSettings)
_MESSAGE_KEYS = {"role", "content", "name", "refusal", "tool_calls", "function_call", "audio"}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.kind = kind or _error_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    if status == 404:
        return "not_found_error"
    return "invalid_request_error"


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Message:
    """One validated message: role in {system, user, assistant}, its text and its image URL (if any)."""

    role: str
    text: str
    image_url: str | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request."""

    messages: tuple[Message, ...]
    model: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def image_url(self) -> str | None:
        return next((m.image_url for m in self.messages if m.image_url is not None), None)


def parse_chat_request(body: Any, settings: ServerSettings) -> ChatRequest:
    """Validate a decoded JSON body -> `ChatRequest`, or raise `APIError` naming the bad argument."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - KNOWN_ARGUMENTS)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    _check_default_only(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("you must provide a model parameter (a string)", param="model")
    if model not in settings.model_ids:
        raise APIError(404, f"The model {model!r} does not exist; this server serves {list(settings.model_ids)}",
                       param="model", code="model_not_found")
    if body.get("n", 1) not in (1, None):
        raise bad_request("this server generates one choice per request; n must be 1", param="n")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # only the most likely token survives: that is greedy decoding
        temperature = 0.0
    stream_options = body.get("stream_options")
    if stream_options is not None and not (isinstance(stream_options, dict) and set(stream_options) <= {
            "include_usage", "include_obfuscation"}):
        raise bad_request("stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    stream = _flag(body, "stream")
    if stream_options and not stream:
        raise bad_request("stream_options is only allowed when stream is true", param="stream_options")
    return ChatRequest(
        messages=parse_messages(body.get("messages"), settings),
        model=model,
        max_tokens=_max_tokens(body, settings),
        temperature=temperature,
        top_p=top_p if top_p > 0 else 1.0,
        seed=_seed(body),
        stop=_stop(body, settings),
        stream=stream,
        include_usage=bool(stream_options and stream_options.get("include_usage")),
    )


def _check_default_only(body: dict[str, Any]) -> None:
    for name, allowed in _DEFAULT_ONLY.items():
        value = body.get(name)
        if value is not None and value not in allowed:
            raise bad_request(f"{name}={value!r} is not supported by this server", param=name, code="unsupported_value")


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be a boolean, got {value!r}", param=name)
    return value


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad_request(f"{name} must be a number, got {value!r}", param=name)
    if not low <= value <= high:
        raise bad_request(f"{value} is out of range for {name}: expected {low} to {high}", param=name)
    return float(value)


def _max_tokens(body: dict[str, Any], settings: ServerSettings) -> int:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return settings.default_max_tokens
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {value!r}", param=name)
    if value < 1:
        raise bad_request(f"{name} must be at least 1, got {value}", param=name)
    if value > settings.max_tokens_limit:
        raise bad_request(f"{name} is too large: {value}. This server supports at most "
                          f"{settings.max_tokens_limit} completion tokens.", param=name, code="max_tokens_too_large")
    return value


def _seed(body: dict[str, Any]) -> int | None:
    value = body.get("seed")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**64:
        raise bad_request(f"seed must be a 64-bit integer, got {value!r}", param="seed")
    return value % (2**32)


def _stop(body: dict[str, Any], settings: ServerSettings) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise bad_request("stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(items) > settings.max_stop_sequences:
        raise bad_request(f"stop has {len(items)} sequences; at most {settings.max_stop_sequences} are allowed",
                          param="stop")
    return tuple(items)


# -- messages -----------------------------------------------------------------------------------
def parse_messages(raw: Any, settings: ServerSettings) -> tuple[Message, ...]:
    """Check roles, parts and lengths; merge consecutive messages of one role; one image at most."""
    if raw is None:
        raise bad_request("you must provide a messages parameter", param="messages")
    if not isinstance(raw, list) or not raw:
        raise bad_request("messages must be a non-empty array", param="messages")
    if len(raw) > settings.max_messages:
        raise bad_request(f"too many messages: {len(raw)}, at most {settings.max_messages}", param="messages")
    parsed = [_parse_message(i, m, settings) for i, m in enumerate(raw)]
    if sum(m.image_url is not None for m in parsed) > 1:
        raise bad_request("SPHINX takes one image per conversation; this request has several", param="messages")
    total = sum(len(m.text) for m in parsed)
    if total > settings.max_total_chars:
        raise bad_request(f"the messages hold {total} characters, over the limit of {settings.max_total_chars}",
                          param="messages", code="context_length_exceeded")
    return _order(parsed)


def _parse_message(i: int, msg: Any, settings: ServerSettings) -> Message:
    where = f"messages[{i}]"
    if not isinstance(msg, dict):
        raise bad_request(f"{where} must be an object", param=where)
    extra = sorted(set(msg) - _MESSAGE_KEYS)
    if extra:
        raise bad_request(f"{where}: unrecognized field {extra[0]!r}", param=f"{where}.{extra[0]}")
    role = msg.get("role")
    if role not in _ROLES:
        raise bad_request(f"{where}: role {role!r} is not supported; use system, developer, user or assistant",
                          param=f"{where}.role")
    if msg.get("tool_calls") or msg.get("function_call"):
        raise bad_request(f"{where}: tool calls are not supported by this server", param=f"{where}.tool_calls")
    text, image_url = _content(where, _ROLES[role], msg.get("content"))
    if len(text) > settings.max_message_chars:
        raise bad_request(f"{where} has {len(text)} characters, over the limit of {settings.max_message_chars}",
                          param=f"{where}.content", code="context_length_exceeded")
    return Message(_ROLES[role], text, image_url)


def _content(where: str, role: str, content: Any) -> tuple[str, str | None]:
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list) or not content:
        raise bad_request(f"{where}: content must be a string or a non-empty array of content parts",
                          param=f"{where}.content")
    if len(content) > MAX_CONTENT_PARTS:
        raise bad_request(f"{where} has {len(content)} content parts, at most {MAX_CONTENT_PARTS}",
                          param=f"{where}.content")
    texts: list[str] = []
    image_url: str | None = None
    for j, part in enumerate(content):
        pwhere = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and role == "user":
            if image_url is not None:
                raise bad_request("SPHINX takes one image per conversation; this request has several", param=pwhere)
            image_url = _image_part(pwhere, part)
        elif kind in ("text", "image_url"):
            what = "text parts need a string 'text'" if kind == "text" else f"{role} messages cannot hold images"
            raise bad_request(f"{pwhere}: {what}", param=pwhere)
        else:
            raise bad_request(f"{pwhere}: content part type {kind!r} is not supported; use text or image_url",
                              param=pwhere)
    return "\n".join(t for t in texts if t), image_url


def _image_part(where: str, part: dict[str, Any]) -> str:
    spec = part.get("image_url")
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: image_url must be an object with a string 'url'", param=f"{where}.image_url")
    detail = spec.get("detail") if isinstance(spec, dict) else None
    if detail not in (None, "auto", "low", "high"):
        raise bad_request(f"{where}: detail must be auto, low or high", param=f"{where}.image_url.detail")
    return url


def _order(parsed: list[Message]) -> tuple[Message, ...]:
    """One leading system message; then user/assistant alternating from a user turn to a final user turn
    (consecutive messages of one role are joined with a newline, as several parts of one turn)."""
    system = [m for m in parsed if m.role == "system"]
    if len(system) > 1 or (system and parsed[0].role != "system"):
        raise bad_request("only one system (or developer) message is supported, and it must come first",
                          param="messages")
    merged: list[Message] = []
    for m in parsed:
        if merged and merged[-1].role == m.role and m.role != "system":
            prev = merged[-1]
            text = "\n".join(t for t in (prev.text, m.text) if t)
            merged[-1] = Message(m.role, text, prev.image_url or m.image_url)
        else:
            merged.append(m)
    turns = merged[1:] if merged[0].role == "system" else merged
    if not turns or turns[0].role != "user":
        raise bad_request("the conversation must start with a user message (after an optional system message)",
                          param="messages")
    if turns[-1].role != "user":
        raise bad_request("the last message must come from the user", param="messages")
    return tuple(merged)


# -- responses ----------------------------------------------------------------------------------
def completion_body(req: ChatRequest, text: str, finish_reason: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": req.request_id, "object": "chat.completion", "created": req.created, "model": req.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage, "system_fingerprint": None,
    }


def chunk_body(req: ChatRequest, delta: dict[str, Any] | None, finish_reason: str | None = None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` gives the usage-only chunk (empty choices)."""
    out: dict[str, Any] = {"id": req.request_id, "object": "chat.completion.chunk", "created": req.created,
                           "model": req.model, "system_fingerprint": None}
    out["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish_reason}]
    if req.include_usage:
        out["usage"] = usage
    return out


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class StopFilter:
    """Cuts streamed text at the first of the request's stop strings, holding back any tail that could be
    the start of one, so nothing past a stop string is ever sent."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.buffer = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """Add generated text; return what can be sent now (`stopped` turns True at a stop string)."""
        if self.stopped:
            return ""
        self.buffer += delta
        if not self.stops:
            out, self.buffer = self.buffer, ""
            return out
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out, self.buffer = self.buffer[: len(self.buffer) - hold], self.buffer[len(self.buffer) - hold:]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def apply_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """-> (text cut at the first stop string, whether one was found)."""
    filt = StopFilter(stops)
    out = filt.feed(text)
    return (out, True) if filt.stopped else (out + filt.flush(), False)

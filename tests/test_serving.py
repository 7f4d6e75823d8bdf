"""The OpenAI-compatible server end to end: uvicorn on 127.0.0.1 (a free port) in a background thread, a tiny
`debug` model with random weights saved in tmp, driven by the official `openai` client and raw httpx.

Outputs of a random model are nonsense; what is checked is the plumbing: the same answer as `SphinxChat`
directly, streaming equal to non-streaming, usage, every invalid request class answered 4xx in OpenAI's
shape, the bounded queue (429), shutdown/overload (503), and cancellation freeing the worker.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from PIL import Image  # noqa: E402

from sphinx_mllm.inference.chat import Generation, GenerationConfig, SphinxChat, TextStream  # noqa: E402
from sphinx_mllm.serving import ServerSettings, create_app  # noqa: E402
from sphinx_mllm.serving.app import count_tokens  # noqa: E402

MODEL = "sphinx-test"
DEFAULT_CONFIG = GenerationConfig()
TIMEOUT = 30.0


# ----------------------------------------------------------------------------- fixtures and harness
@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `debug` preset with the test tokenizer's vocabulary (so answers decode to text), saved in tmp."""
    import torch

    from sphinx_mllm.config import PRESETS, SphinxConfig
    from sphinx_mllm.modeling import SphinxForConditionalGeneration
    from sphinx_mllm.processing import SphinxProcessor

    text_config = dict(copy.deepcopy(PRESETS["debug"]["text_config"]), vocab_size=len(tokenizer))
    config = SphinxConfig.from_preset("debug", text_config=text_config)
    torch.manual_seed(0)
    model = SphinxForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("serving_model")
    model.save_pretrained(path)
    SphinxProcessor.from_config(config, tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> SphinxChat:
    return SphinxChat.load(model_dir, device="cpu")


class GatedChat(SphinxChat):
    """The real model behind a gate: generation waits until `gate` is set (to fill the queue on purpose)."""

    def __init__(self, base: SphinxChat) -> None:
        super().__init__(base.model, base.processor)
        self.gate = threading.Event()
        self.gate.set()

    def generate_full(self, conversations: Any, config: GenerationConfig = DEFAULT_CONFIG) -> list[Generation]:
        assert self.gate.wait(TIMEOUT), "test gate never opened"
        return super().generate_full(conversations, config)


class ScriptedChat(SphinxChat):
    """Answers a fixed text (after the real processor accepted the conversation), to test text handling. Its
    answers report 10 prompt tokens and `completion_tokens` tokens; with `report=False` its streams are plain
    iterators that report no `Generation` (as a custom `SphinxChat.stream` might)."""

    def __init__(self, base: SphinxChat, answer: str, completion_tokens: int = 7, report: bool = True) -> None:
        super().__init__(base.model, base.processor)
        self.answer = answer
        self.completion_tokens = completion_tokens
        self.report = report

    def generate_full(self, conversations: Any, config: GenerationConfig = DEFAULT_CONFIG) -> list[Generation]:
        self.prepare(conversations)
        return [Generation(self.answer, 10, self.completion_tokens, "stop") for _ in conversations]

    def stream(self, messages: Any, config: GenerationConfig = DEFAULT_CONFIG, cancel: Any = None) -> Iterator[str]:
        self.prepare([messages])
        pieces = [self.answer[i:i + 3] for i in range(0, len(self.answer), 3)]
        if not self.report:
            return iter(pieces)

        def deltas() -> Generator[str, None, Generation]:
            yield from pieces
            return self.generate_full([messages], config)[0]

        return TextStream(deltas())


@contextlib.contextmanager
def serve(chat: SphinxChat, **overrides: Any) -> Iterator[tuple[str, Any]]:
    """Run the app on 127.0.0.1 on a free port in a thread; yield (base URL, app)."""
    settings = ServerSettings(model_name=MODEL, **{"batch_wait_ms": 20.0, **overrides})
    app = create_app(chat, settings)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()
        assert not thread.is_alive(), "server did not stop"


def client(base: str, **kwargs: Any) -> Any:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT,
                         http_client=openai.DefaultHttpxClient(trust_env=False), **kwargs)


def png_bytes(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str, text: str = "What color is the box?") -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def post(base: str, body: Any, **kwargs: Any) -> httpx.Response:
    content = body if isinstance(body, (bytes, str, Iterator)) else json.dumps(body)
    with httpx.Client(trust_env=False, timeout=TIMEOUT) as http:
        return http.post(f"{base}/v1/chat/completions", content=content,
                         headers={"Content-Type": "application/json"}, **kwargs)


# ----------------------------------------------------------------------------- success paths
def test_models_health_and_unknown_route(chat: SphinxChat) -> None:
    with serve(chat) as (base, _):
        models = client(base).models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert models.data[0].object == "model"
        with httpx.Client(trust_env=False, timeout=TIMEOUT) as http:
            health = http.get(f"{base}/health")
            missing = http.get(f"{base}/v1/nothing")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_non_streaming_matches_sphinxchat(chat: SphinxChat) -> None:
    png = png_bytes()
    with serve(chat) as (base, _):
        resp = client(base).chat.completions.create(
            model=MODEL, messages=image_message(data_uri(png)), max_tokens=6, temperature=0)
    direct = chat.generate_full(
        [[{"role": "user", "content": [{"type": "image", "image": png}, {"type": "text", "text":
                                                                          "What color is the box?"}]}]],
        GenerationConfig(max_new_tokens=6, temperature=0))[0]
    assert resp.object == "chat.completion" and resp.model == MODEL and resp.id.startswith("chatcmpl-")
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == direct.text
    assert choice.finish_reason == direct.finish_reason
    assert resp.usage.prompt_tokens == direct.prompt_tokens
    assert resp.usage.completion_tokens == direct.completion_tokens
    assert resp.usage.total_tokens == direct.prompt_tokens + direct.completion_tokens
    # 1 BOS + the image placeholders + the templated text
    assert direct.prompt_tokens > chat.processor.num_image_tokens + 1


def test_streaming_equals_non_streaming_and_reports_usage(chat: SphinxChat) -> None:
    messages = image_message(data_uri(png_bytes()), "Describe the image.")
    with serve(chat) as (base, _):
        api = client(base)
        full = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stream_cut_by_max_tokens_reports_length_and_exact_tokens(chat: SphinxChat) -> None:
    """The random model answers this prompt with byte pieces that decode to replacement characters: re-tokenising
    the streamed text would count other tokens; the stream reports the generation's own count."""
    messages = [{"role": "user", "content": "Describe the image."}]
    with serve(chat) as (base, _):
        api = client(base)
        full = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        chunks = list(api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                  stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "\ufffd" in full.choices[0].message.content
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason] == ["length"]
    usage = chunks[-1].usage
    assert usage.completion_tokens == full.usage.completion_tokens == 12
    assert usage.prompt_tokens == full.usage.prompt_tokens and usage.total_tokens == full.usage.total_tokens
    assert count_tokens(chat, text) != 12  # what the old re-tokenising count would have reported


def test_raw_sse_framing_ends_with_done(chat: SphinxChat) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    with serve(chat) as (base, _), httpx.Client(trust_env=False, timeout=TIMEOUT) as http, \
            http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_lmms_eval_style_payload_and_text_only_multiturn(chat: SphinxChat) -> None:
    """lmms-eval's OpenAI-compatible model sends the text part first, then a PNG data URI, temperature 0."""
    lmms_messages = [{"role": "user", "content": [
        {"type": "text", "text": "What is in the image?\nAnswer the question using a single word or phrase."},
        {"type": "image_url", "image_url": {"url": data_uri(png_bytes())}}]}]
    dialog = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"},
              {"role": "assistant", "content": "hi"}, {"role": "user", "content": "what now?"}]
    with serve(chat) as (base, _):
        api = client(base)
        a = api.chat.completions.create(model=MODEL, messages=lmms_messages, max_tokens=4, temperature=0)
        b = api.chat.completions.create(model=MODEL, messages=dialog, max_completion_tokens=4, temperature=0.7,
                                        top_p=0.9, seed=5, user="u1", frequency_penalty=0, n=1)
    assert isinstance(a.choices[0].message.content, str) and a.usage.completion_tokens <= 4
    assert isinstance(b.choices[0].message.content, str) and b.usage.completion_tokens <= 4
    assert a.usage.prompt_tokens > chat.processor.num_image_tokens > b.usage.prompt_tokens


def test_stop_sequences_cut_streamed_and_plain_answers(chat: SphinxChat) -> None:
    scripted = ScriptedChat(chat, "red box here. STOP and then more text")
    messages = [{"role": "user", "content": "go"}]
    with serve(scripted) as (base, _):
        api = client(base)
        plain = api.chat.completions.create(model=MODEL, messages=messages, stop=["STOP", "zzz"])
        streamed = api.chat.completions.create(model=MODEL, messages=messages, stop="STOP", stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        unstopped = api.chat.completions.create(model=MODEL, messages=messages)
        reported = list(api.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                    stream_options={"include_usage": True}))
    with serve(ScriptedChat(chat, scripted.answer, report=False)) as (base, _):
        unreported = list(client(base).chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                               stream_options={"include_usage": True}))
    assert plain.choices[0].message.content == "red box here. "
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens == count_tokens(chat, "red box here. ")  # cut text: counted, as streamed
    assert text == "red box here. "
    assert unstopped.choices[0].message.content == "red box here. STOP and then more text"
    # a stream reports the generation's own counts and finish_reason (the scripted 10 prompt, 7 completion tokens)
    assert "".join(c.choices[0].delta.content or "" for c in reported if c.choices) == scripted.answer
    assert reported[-1].usage.prompt_tokens == 10 and reported[-1].usage.completion_tokens == 7
    assert [c.choices[0].finish_reason for c in reported if c.choices and c.choices[0].finish_reason] == ["stop"]
    # a stream that reports nothing is counted from its text
    assert unreported[-1].usage.completion_tokens == count_tokens(chat, scripted.answer)
    assert unreported[-1].usage.prompt_tokens > 10


def test_local_paths_only_under_image_root(chat: SphinxChat, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    with serve(chat, image_root=root) as (base, _):
        ok_rel = post(base, {"model": MODEL, "messages": image_message("ok.png"), "max_tokens": 2})
        ok_file = post(base, {"model": MODEL, "messages": image_message((root / "ok.png").as_uri()), "max_tokens": 2})
        outside = [post(base, {"model": MODEL, "messages": image_message(url), "max_tokens": 2})
                   for url in ("../secret.png", str(tmp_path / "secret.png"), (tmp_path / "secret.png").as_uri(),
                               "link.png", "missing.png")]
    assert ok_rel.status_code == 200 and ok_file.status_code == 200
    assert [r.status_code for r in outside] == [400] * 5
    assert all("outside the server's image root" in r.json()["error"]["message"] for r in outside[:4])
    assert "not found" in outside[4].json()["error"]["message"]


# ----------------------------------------------------------------------------- every invalid request class
def _big_png(pixels: int) -> bytes:
    side = int(pixels**0.5) + 1
    return png_bytes((side, side))


def _truncated_png() -> bytes:
    data = png_bytes((200, 200), (10, 200, 10))
    return data[: len(data) // 2]


INVALID: list[tuple[str, Any, int, str]] = [
    ("bad_json", b'{"model": "sphinx-test", "messages": [', 400, "could not parse the JSON"),
    ("not_an_object", [1, 2], 400, "must be a JSON object"),
    ("empty_body", b"", 400, "empty"),
    ("missing_messages", {"model": MODEL}, 400, "messages"),
    ("empty_messages", {"model": MODEL, "messages": []}, 400, "non-empty"),
    ("missing_model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("unknown_model", {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "does not exist"),
    ("unknown_argument", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "foo": 1}, 400,
     "Unrecognized request argument supplied: foo"),
    ("role_tool", {"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "role 'tool'"),
    ("role_missing", {"model": MODEL, "messages": [{"content": "x"}]}, 400, "role None"),
    ("ends_with_assistant", {"model": MODEL, "messages": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}]}, 400, "last message"),
    ("starts_with_assistant", {"model": MODEL, "messages": [{"role": "assistant", "content": "a"},
                                                            {"role": "user", "content": "b"}]}, 400,
     "start with a user"),
    ("system_not_first", {"model": MODEL, "messages": [{"role": "user", "content": "a"},
                                                       {"role": "system", "content": "b"}]}, 400, "must come first"),
    ("content_wrong_type", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content must be"),
    ("unsupported_part", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]}, 400, "'input_audio'"),
    ("max_tokens_too_large", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 100000},
     400, "max_tokens is too large"),
    ("max_tokens_zero", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, 400,
     "at least 1"),
    ("max_tokens_string", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": "9"}, 400,
     "integer"),
    ("temperature_range", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "temperature": 2.5}, 400,
     "out of range for temperature"),
    ("top_p_range", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "top_p": 1.5}, 400,
     "out of range for top_p"),
    ("n_two", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "n": 2}, 400, "n must be 1"),
    ("tools", {"model": MODEL, "messages": [{"role": "user", "content": "a"}],
               "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "not supported"),
    ("stream_not_bool", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "stream": "yes"}, 400,
     "boolean"),
    ("too_many_stops", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "stop": list("abcde")}, 400,
     "at most 4"),
    ("too_many_messages", {"model": MODEL, "messages": [{"role": "user", "content": "a"}] * 7}, 400,
     "too many messages"),
    ("message_too_long", {"model": MODEL, "messages": [{"role": "user", "content": "a" * 2001}]}, 400,
     "over the limit of 2000"),
    ("two_images", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, 400, "one image"),
    ("bad_base64", {"model": MODEL, "messages": image_message("data:image/png;base64,@@not*base64@@")}, 400,
     "not valid base64"),
    ("not_base64_uri", {"model": MODEL, "messages": image_message("data:image/png,rawbytes")}, 400,
     "data:image/png;base64"),
    ("not_an_image_mime", {"model": MODEL, "messages": image_message(data_uri(b"hello", "text/plain"))}, 400,
     "expected image/*"),
    ("not_an_image", {"model": MODEL, "messages": image_message(data_uri(b"hello world, no image"))}, 400,
     "not a recognised image format"),
    ("corrupt_image", {"model": MODEL, "messages": image_message(data_uri(_truncated_png()))}, 400,
     "truncated or corrupt"),
    ("oversized_image", {"model": MODEL, "messages": image_message(data_uri(_big_png(1_000_000)))}, 400,
     "over the limit of 1000000"),
    ("remote_url", {"model": MODEL, "messages": image_message("https://example.com/cat.png")}, 400,
     "remote image URLs are not allowed"),
    ("local_path_without_root", {"model": MODEL, "messages": image_message("/etc/hostname")}, 400,
     "no image root"),
    ("ftp_url", {"model": MODEL, "messages": image_message("ftp://example.com/cat.png")}, 400, "scheme 'ftp'"),
]


def test_every_invalid_request_is_a_clear_4xx(chat: SphinxChat) -> None:
    limits = dict(max_messages=6, max_message_chars=2000, max_image_pixels=1_000_000, max_tokens_limit=64,
                  default_max_tokens=8)
    with serve(chat, **limits) as (base, app):
        answers = {name: post(base, body) for name, body, _, _ in INVALID}
        snapshot = app.state.scheduler.snapshot()
    for name, _, status, fragment in INVALID:
        resp = answers[name]
        assert resp.status_code == status, (name, resp.status_code, resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, name
        assert fragment in error["message"], (name, error["message"])
        assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error"), name
    assert snapshot.get("batches", 0) == 0  # nothing invalid reached the model


def test_body_too_big_is_refused_before_parsing(chat: SphinxChat) -> None:
    big = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a" * 5000}]})

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 512):
            yield big[i:i + 512].encode()

    with serve(chat, max_body_bytes=4096) as (base, _):
        declared = post(base, big)
        streamed = post(base, chunked())
        with pytest.raises(openai.APIStatusError) as info:
            client(base).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a" * 5000}])
    for resp in (declared, streamed):
        assert resp.status_code == 413
        assert "over the limit of 4096" in resp.json()["error"]["message"]
    assert info.value.status_code == 413


def test_openai_client_raises_typed_errors(chat: SphinxChat) -> None:
    with serve(chat, max_tokens_limit=16, default_max_tokens=8) as (base, _):
        api = client(base)
        with pytest.raises(openai.BadRequestError) as too_many:
            api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=17)
        with pytest.raises(openai.BadRequestError) as corrupt:
            api.chat.completions.create(model=MODEL, messages=image_message(data_uri(_truncated_png())))
        with pytest.raises(openai.NotFoundError):
            api.chat.completions.create(model="other", messages=[{"role": "user", "content": "a"}])
    assert too_many.value.body["param"] == "max_tokens"
    assert corrupt.value.body["code"] == "invalid_image"


# ----------------------------------------------------------------------------- load, cancellation, shutdown
def test_fifty_concurrent_requests_answered_or_refused_with_429(chat: SphinxChat) -> None:
    gated = GatedChat(chat)
    gated.gate.clear()
    with serve(gated, max_batch_size=8, max_queue=16) as (base, app):
        scheduler = app.state.scheduler
        api = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT,
                                 http_client=openai.DefaultAsyncHttpxClient(trust_env=False))

        async def one(i: int) -> str:
            try:
                r = await api.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=3, temperature=0)
            except openai.RateLimitError as exc:
                assert exc.body["code"] == "queue_full" and exc.response.headers["retry-after"] == "1"
                return "429"
            assert r.usage.completion_tokens <= 3
            return "ok"

        async def run_all() -> list[str]:
            tasks = [asyncio.create_task(one(i)) for i in range(50)]

            def all_seen() -> bool:
                s = scheduler.snapshot()
                return s.get("refused_full", 0) + s["waiting"] + s["running"] == 50

            while not all_seen():  # every request is refused, waiting or held at the closed gate
                await asyncio.sleep(0.02)
            gated.gate.set()
            return await asyncio.wait_for(asyncio.gather(*tasks), TIMEOUT)

        outcomes = asyncio.run(run_all())
        stats = scheduler.snapshot()
    assert len(outcomes) == 50 and set(outcomes) <= {"ok", "429"}
    assert outcomes.count("429") == stats["refused_full"] >= 50 - 16 - 8
    assert outcomes.count("ok") == stats["served"] >= 16
    assert stats["max_batch"] > 1  # concurrent requests were batched


def test_cancelled_stream_frees_the_worker(chat: SphinxChat) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "tell a long story"}], "max_tokens": 2000,
            "stream": True, "temperature": 0}
    with serve(chat, max_tokens_limit=2000) as (base, app):
        scheduler = app.state.scheduler
        with httpx.Client(trust_env=False, timeout=TIMEOUT) as http, \
                http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data: ")  # the role chunk: the stream is open
            wait_for(lambda: scheduler.snapshot()["running"] == 1, "the stream to start")
        # the connection is closed here, long before 2000 tokens
        wait_for(lambda: scheduler.snapshot()["running"] == 0, "the cancelled stream to free the worker", 10)
        started = time.monotonic()
        nxt = client(base).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2)
        stats = scheduler.snapshot()
    assert time.monotonic() - started < 10
    assert nxt.choices[0].finish_reason in ("stop", "length")
    assert stats["cancelled_running"] == 1 and stats.get("streams") == 1


def test_client_leaving_a_waiting_request_withdraws_it(chat: SphinxChat) -> None:
    gated = GatedChat(chat)
    gated.gate.clear()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2}
    with serve(gated, max_batch_size=1, disconnect_poll_s=0.05) as (base, app):
        scheduler = app.state.scheduler
        blocker = threading.Thread(target=post, args=(base, body), daemon=True)
        blocker.start()  # occupies the worker at the gate
        wait_for(lambda: scheduler.snapshot()["running"] == 1, "the first request to run")
        with pytest.raises(httpx.ReadTimeout):
            post(base, body, timeout=0.5)  # waits in the queue, then its client gives up
        wait_for(lambda: scheduler.snapshot().get("cancelled_waiting", 0) == 1, "the withdrawal")
        assert scheduler.snapshot()["waiting"] == 0
        gated.gate.set()
        blocker.join(TIMEOUT)
        stats = scheduler.snapshot()
    assert stats["served"] == 1  # the withdrawn request never ran


def test_overloaded_and_shutting_down_answer_503(chat: SphinxChat) -> None:
    gated = GatedChat(chat)
    gated.gate.clear()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": 2}
    results: dict[str, httpx.Response] = {}

    def send(key: str) -> None:
        results[key] = post(base, body)

    with serve(gated, max_batch_size=1, queue_timeout_s=0.2) as (base, app):
        scheduler = app.state.scheduler
        threads = [threading.Thread(target=send, args=(k,), daemon=True) for k in ("first", "late")]
        threads[0].start()
        wait_for(lambda: scheduler.snapshot()["running"] == 1, "the first request to run")
        threads[1].start()
        wait_for(lambda: scheduler.snapshot()["waiting"] == 1, "the second request to wait")
        time.sleep(0.3)  # longer than queue_timeout_s
        gated.gate.set()
        for t in threads:
            t.join(TIMEOUT)
        gated.gate.clear()
        threads = [threading.Thread(target=send, args=(k,), daemon=True) for k in ("running", "queued")]
        threads[0].start()
        wait_for(lambda: scheduler.snapshot()["running"] == 1, "a request to run")
        threads[1].start()
        wait_for(lambda: scheduler.snapshot()["waiting"] == 1, "a request to wait")
        stopper = threading.Thread(target=scheduler.stop, daemon=True)
        stopper.start()  # waits for the running batch, which waits for the gate
        wait_for(lambda: scheduler.closing, "the scheduler to close")
        results["after"] = post(base, body)
        with httpx.Client(trust_env=False, timeout=TIMEOUT) as http:
            health = http.get(f"{base}/health")
        gated.gate.set()
        stopper.join(TIMEOUT)
        threads[0].join(TIMEOUT)
        threads[1].join(TIMEOUT)
    assert results["first"].status_code == 200
    assert results["late"].status_code == 503 and results["late"].json()["error"]["code"] == "overloaded"
    assert results["queued"].status_code == 503 and results["queued"].json()["error"]["code"] == "shutting_down"
    assert results["after"].status_code == 503 and results["after"].json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503


def test_serve_cli_checks_settings_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sphinx_mllm.cli.main import main

    code = main(["serve", "--model", str(tmp_path), "--image-root", str(tmp_path / "nope")])
    assert code == 2 and "image root is not a folder" in capsys.readouterr().err
    code = main(["serve", "--model", str(tmp_path / "absent"), "--port", "0"])
    assert code == 2 and "port" in capsys.readouterr().err

"""The OpenAI-compatible HTTP API: `create_app(chat, settings) -> FastAPI`.

Routes: `POST /v1/chat/completions` (JSON or, with `stream: true`, server-sent events ending with
`data: [DONE]`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`. Every error is answered in
OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

Order of checks for a completion: body size (Content-Length, then while reading: nothing over the limit is
parsed) -> JSON -> arguments and messages (`protocol.py`) -> image (`images.py`, in a worker thread) ->
queue (429 when full, 503 when shutting down). A client that leaves while its request waits or streams
cancels it (`scheduler.py`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from sphinx_mllm.inference.chat import Generation, GenerationConfig, SphinxChat
from sphinx_mllm.serving.images import resolve_image
from sphinx_mllm.serving.protocol import (
    APIError,
    ChatRequest,
    StopFilter,
    apply_stop,
    bad_request,
    chunk_body,
    completion_body,
    parse_chat_request,
    usage_body,
)
from sphinx_mllm.serving.scheduler import STREAM_END, Job, QueueFull, Scheduler, ShuttingDown
from sphinx_mllm.serving.settings import ServerSettings
from sphinx_mllm.utils.errors import SphinxError
from sphinx_mllm.utils.logging import get_logger

logger = get_logger(__name__)


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def create_app(chat: SphinxChat, settings: ServerSettings | None = None) -> FastAPI:
    """A FastAPI app serving `chat`. The scheduler's worker starts and stops with the app's lifespan."""
    settings = settings or ServerSettings()
    scheduler = Scheduler(chat, max_batch_size=settings.max_batch_size, batch_wait_s=settings.batch_wait_ms / 1000,
                          max_queue=settings.max_queue, queue_timeout_s=settings.queue_timeout_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(scheduler.stop)  # joins the worker without blocking the loop

    app = FastAPI(title="sphinx-mllm", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.settings = settings
    app.state.scheduler = scheduler
    app.state.created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, str(exc.detail)))

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "shutting_down" if scheduler.closing else "ok"
        return JSONResponse({"status": status, "model": settings.model_name, **scheduler.snapshot()},
                            status_code=503 if scheduler.closing else 200)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(m, app.state.created) for m in settings.model_ids]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id not in settings.model_ids:
            raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")
        return _model_card(model_id, app.state.created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        if scheduler.closing:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        body = await read_json(request, settings.max_body_bytes)
        req = parse_chat_request(body, settings)
        conversation = await _conversation(req, settings)
        config = GenerationConfig(max_new_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  seed=req.seed)
        prompt_tokens = count_prompt_tokens(chat, conversation) if req.stream else 0
        job = Job.create(conversation, config, stream=req.stream)
        _submit(scheduler, job)
        if req.stream:
            return StreamingResponse(_events(request, req, job, scheduler, chat, prompt_tokens, settings),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await _wait(request, job, scheduler, settings.disconnect_poll_s)
        if result is None:  # the client left; nobody reads this
            return JSONResponse({"error": {"message": "client disconnected", "type": "invalid_request_error",
                                           "param": None, "code": "client_disconnected"}}, status_code=499)
        text, hit_stop = apply_stop(result.text, req.stop)
        finish = "stop" if hit_stop else result.finish_reason
        completion = count_tokens(chat, text) if hit_stop else result.completion_tokens
        return completion_body(req, text, finish, usage_body(result.prompt_tokens, completion))

    return app


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "sphinx-mllm"}


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 when over `limit` bytes (by Content-Length, or while reading), 400 when not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("invalid Content-Length header")
        if int(declared) > limit:
            raise APIError(413, f"the request body has {declared} bytes, over the limit of {limit}",
                           code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise bad_request("the request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"We could not parse the JSON body of your request: {exc}") from None


async def _conversation(req: ChatRequest, settings: ServerSettings) -> list[dict[str, Any]]:
    """Validated messages -> the HF-style messages `SphinxChat` takes, the image decoded in a worker thread."""
    image = None
    if req.image_url is not None:
        image = await anyio.to_thread.run_sync(resolve_image, req.image_url, settings)
    out: list[dict[str, Any]] = []
    for m in req.messages:
        if m.image_url is not None:
            parts = [{"type": "image", "image": image}, {"type": "text", "text": m.text}]
            out.append({"role": m.role, "content": parts})
        else:
            out.append({"role": m.role, "content": m.text})
    return out


def _submit(scheduler: Scheduler, job: Job) -> None:
    try:
        scheduler.submit(job)
    except QueueFull:
        raise APIError(429, "the server is busy: too many requests are waiting; retry shortly",
                       code="queue_full", headers={"Retry-After": "1"}) from None
    except ShuttingDown:
        raise APIError(503, "the server is shutting down", code="shutting_down") from None


async def _wait(request: Request, job: Job, scheduler: Scheduler, poll_s: float) -> Generation | None:
    """The job's answer; None if the client left first (the job is withdrawn, or its answer discarded)."""
    assert job.future is not None
    try:
        while True:
            done, _ = await asyncio.wait({job.future}, timeout=poll_s)
            if done:
                return job.future.result()  # raises the job's APIError
            if await request.is_disconnected():
                scheduler.withdraw(job)
                return None
    except asyncio.CancelledError:
        scheduler.withdraw(job)
        raise


def count_tokens(chat: SphinxChat, text: str) -> int:
    return len(chat.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0


def count_prompt_tokens(chat: SphinxChat, conversation: list[dict[str, Any]]) -> int:
    """BOS + image placeholders + templated text, as `SphinxChat.prepare` lays them out."""
    try:
        text = chat.processor.apply_chat_template(conversation, tokenize=False)
    except SphinxError as exc:
        raise bad_request(str(exc), param="messages") from None
    has_image = any(isinstance(m["content"], list) for m in conversation)
    return 1 + (chat.processor.num_image_tokens if has_image else 0) + count_tokens(chat, str(text))


def _stream_usage(chat: SphinxChat, req: ChatRequest, stopped: bool, text: str, result: Generation | None,
                  prompt_tokens: int) -> tuple[int, int, str]:
    """(prompt tokens, completion tokens, finish_reason) of a finished stream: the generation's exact counts,
    except when a request stop sequence cut the text, which is then counted as non-streaming answers count it.
    A stream that reported no `Generation` (a `SphinxChat` whose `stream` is a plain iterator) is counted from
    its text."""
    if result is not None and not stopped:
        return result.prompt_tokens, result.completion_tokens, result.finish_reason
    completion = count_tokens(chat, text)
    prompt = result.prompt_tokens if result is not None else prompt_tokens
    return prompt, completion, "stop" if stopped or completion < req.max_tokens else "length"


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _events(request: Request, req: ChatRequest, job: Job, scheduler: Scheduler, chat: SphinxChat,
                  prompt_tokens: int, settings: ServerSettings) -> AsyncIterator[str]:
    """SSE: a role chunk, content chunks, a finish chunk (+ usage chunk if asked), `[DONE]`. Leaving early
    (client gone, generator closed or cancelled) withdraws the job, which stops its generation."""
    assert job.deltas is not None
    stop = StopFilter(req.stop)
    pieces: list[str] = []
    result: Generation | None = None
    finished = False
    try:
        yield _sse(chunk_body(req, {"role": "assistant", "content": ""}))
        last_check = time.monotonic()
        while True:
            try:
                item = await asyncio.wait_for(job.deltas.get(), timeout=settings.disconnect_poll_s)
            except asyncio.TimeoutError:
                item = None
            if time.monotonic() - last_check >= settings.disconnect_poll_s or item is None:
                last_check = time.monotonic()
                if await request.is_disconnected():
                    return
            if item is None:
                continue
            if item is STREAM_END:
                break
            if isinstance(item, Generation):
                result = item
                continue
            if isinstance(item, APIError):
                yield _sse(item.body())
                finished = True
                return
            out = stop.feed(item)
            if out:
                pieces.append(out)
                yield _sse(chunk_body(req, {"content": out}))
            if stop.stopped:
                break
        tail = stop.flush()
        if tail:
            pieces.append(tail)
            yield _sse(chunk_body(req, {"content": tail}))
        prompt, completion, finish = _stream_usage(chat, req, stop.stopped, "".join(pieces), result, prompt_tokens)
        yield _sse(chunk_body(req, {}, finish_reason=finish))
        if req.include_usage:
            yield _sse(chunk_body(req, None, usage=usage_body(prompt, completion)))
        yield "data: [DONE]\n\n"
        finished = True
    finally:
        if not finished or stop.stopped:
            scheduler.withdraw(job)

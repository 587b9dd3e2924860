"""The HTTP server: OpenAI's chat-completions API and the chat page, on FastAPI.

    app = create_app(load_generator("runs/demo/model"), ServeConfig(model_name="demo"))
    uvicorn.run(app, host="127.0.0.1", port=8000)        # what `vlm serve` does

Routes: `POST /v1/chat/completions` (`stream: true` as server-sent events of `chat.completion.chunk` objects
ending with `data: [DONE]`), `GET /v1/models`, `GET /health` (status, queue length and the batching counters),
`GET /` (the chat page, `static/index.html`).

Design choices:
- A request is checked completely in the handler, before it queues: JSON and schema (`protocol`), model name,
  images fetched and decoded (`images`), the prompt built and its length checked (`Generator.prompt`, the
  template the model folder records). Every refusal is a 400 with OpenAI's error object; the worker thread
  (`batching`) only decodes. A full queue is a 503; an error while decoding a 500, both with the error object.
- The page is a static file using the same API (fetch + SSE): no second code path and no extra dependency
  (Gradio would add hundreds of MB and its own server stack for one page).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import queue
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlm.errors import ConfigError, UserError
from vlm.generate.decoding import GenerationSettings, StopGeneration
from vlm.serve import protocol
from vlm.serve.batching import Batcher, Completion, Job, QueueFull
from vlm.serve.images import ImagePolicy, load_image_url
from vlm.serve.protocol import RequestError, TextStream, cut_at_stop

log = logging.getLogger("vlm.serve")


@dataclass(frozen=True)
class ServeConfig:
    """What `vlm serve` is started with, beside the model (its flags, validated here once)."""

    model_name: str  # the id clients send as `model` and `/v1/models` lists
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    max_queue: int = 64
    max_request_bytes: int = 64 * 1024 * 1024  # a larger body is refused (413) before it is read into memory
    images: ImagePolicy = field(default_factory=ImagePolicy)
    # clients' text is text: `<|im_end|>` typed in a message cannot close the turn or forge a system message
    escape_special_tokens: bool = True

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("--served_model_name must not be empty")
        if self.max_batch_size < 1:
            raise ConfigError(f"--max_batch_size={self.max_batch_size} must be >= 1")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"--batch_wait_ms={self.batch_wait_ms} must be >= 0")
        if self.max_queue < 1:
            raise ConfigError(f"--max_queue={self.max_queue} must be >= 1")
        if self.max_request_bytes < 1:
            raise ConfigError(f"--max_request_bytes={self.max_request_bytes} must be >= 1")


def create_app(generator, config: ServeConfig) -> FastAPI:
    """The FastAPI app serving `generator` (a `vlm.generate.generator.Generator`; its settings are the defaults
    for requests that name none). The batching worker starts and stops with the app (its lifespan)."""
    generator = dataclasses.replace(generator, escape_special_tokens=config.escape_special_tokens)
    batcher = Batcher(generator, max_batch_size=config.max_batch_size, batch_wait_ms=config.batch_wait_ms,
                      max_queue=config.max_queue)
    created = int(time.time())
    page = resources.files("vlm.serve").joinpath("static", "index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="vlm serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    app.state.config = config

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(protocol.error_body(f"invalid request: {exc.errors()[0].get('msg')}"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(protocol.error_body(str(exc.detail), type=kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:  # logged by the server with its traceback
        return JSONResponse(protocol.error_body(f"internal error: {type(exc).__name__}: {exc}", type="server_error"),
                            status_code=500)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> str:
        return page

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, "queued": batcher.queued,
                "max_queue": config.max_queue, "max_batch_size": config.max_batch_size, **batcher.stats.as_dict()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": created,
                                            "owned_by": "vlm"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await _read_body(request, config.max_request_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError("the request body is not valid JSON", code="invalid_json") from None
        parsed = protocol.parse_request(body)
        if parsed.model != config.model_name:
            raise RequestError(f"model {parsed.model!r} is not served here; this server serves "
                               f"{config.model_name!r} (GET /v1/models)", param="model", code="model_not_found")
        settings = _settings(parsed, generator.settings)
        prompt, images = await run_in_threadpool(_prepare, generator, parsed, config.images)
        if parsed.stream:
            return _stream(batcher, parsed, Job(prompt, images, settings), config.model_name)
        job = Job(prompt, images, settings)
        completion = await _wait(batcher, job)
        text, stopped = cut_at_stop(completion.text, parsed.stop)
        return protocol.completion(protocol.completion_id(), config.model_name, text,
                                   "stop" if stopped else completion.finish_reason, completion.prompt_tokens,
                                   completion.completion_tokens)

    return app


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed `limit` bytes: from Content-Length, or
    while a chunked body arrives."""
    too_large = RequestError(f"the request body is larger than this server takes ({limit} bytes, "
                             "--max_request_bytes); send smaller images", code="request_too_large", status=413)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _settings(parsed: protocol.ParsedRequest, defaults: GenerationSettings) -> GenerationSettings:
    temperature = defaults.temperature if parsed.temperature is None else parsed.temperature
    top_p = defaults.top_p if parsed.top_p is None else parsed.top_p
    max_new = defaults.max_new_tokens if parsed.max_tokens is None else parsed.max_tokens
    return GenerationSettings(temperature=temperature, top_p=top_p if temperature > 0 else None, max_new_tokens=max_new)


def _prepare(generator, parsed: protocol.ParsedRequest, policy: ImagePolicy) -> tuple[list[int], list[Any]]:
    """The prompt ids and the decoded images of a request; RequestError (400) for anything the model cannot take."""
    images = [load_image_url(url, policy, param=param) for url, param in parsed.image_urls]
    try:
        prompt = generator.prompt(parsed.messages, len(images))
    except UserError as exc:  # roles out of order, placeholders vs images, too long for the context
        code = "context_length_exceeded" if "context" in str(exc) else "invalid_messages"
        raise RequestError(str(exc), param="messages", code=code) from None
    return prompt, images


def _submit(batcher: Batcher, job: Job):
    try:
        return batcher.submit(job)
    except QueueFull as exc:
        raise RequestError(f"the server is busy: {exc}; retry later", code="queue_full", status=503) from None


async def _wait(batcher: Batcher, job: Job) -> Completion:
    future = _submit(batcher, job)
    try:
        return await asyncio.wrap_future(future)
    except UserError as exc:  # e.g. an image the processor refuses after decoding
        raise RequestError(str(exc)) from None


_END = object()


def _stream(batcher: Batcher, parsed: protocol.ParsedRequest, job: Job, model: str) -> StreamingResponse:
    """Server-sent events: a role chunk, content chunks as the model writes, a final chunk with the finish reason,
    the usage chunk when asked, `data: [DONE]`. The queue is checked now, so a full one is still a 503."""
    pieces: queue.Queue = queue.Queue()
    text = TextStream(parsed.stop)
    left = False  # the client went away: decoding stops at the next piece

    def on_text(piece: str) -> None:
        delta = text.feed(piece)
        if delta:
            pieces.put(delta)
        if text.stopped or left:
            raise StopGeneration

    job.on_text = on_text
    future = _submit(batcher, job)
    future.add_done_callback(lambda _: pieces.put(_END))
    cid, created = protocol.completion_id(), int(time.time())

    def events() -> Iterator[str]:
        nonlocal left
        try:
            yield _sse(protocol.chunk(cid, model, {"role": "assistant", "content": ""}, created=created))
            while (piece := pieces.get()) is not _END:
                yield _sse(protocol.chunk(cid, model, {"content": piece}, created=created))
            exc = future.exception()
            if exc is not None:
                log.error("streamed request failed: %s", exc)
                yield _sse(protocol.error_body(str(exc), type="server_error"))
                return
            completion = future.result()
            final, stopped = cut_at_stop(completion.text, parsed.stop)
            rest = "" if text.stopped else text.finish(final)
            if rest:
                yield _sse(protocol.chunk(cid, model, {"content": rest}, created=created))
            reason = "stop" if stopped or text.stopped else completion.finish_reason
            yield _sse(protocol.chunk(cid, model, {}, reason, created=created))
            if parsed.include_usage:
                yield _sse(protocol.usage_chunk(cid, model, completion.prompt_tokens, completion.completion_tokens,
                                                created=created))
            yield "data: [DONE]\n\n"
        finally:
            left = True

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

    vlmkit serve --model demo --port 8000

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with "stream": true),
GET /v1/models, /health, /metrics (Prometheus text) and / (a page to chat and draw visual prompts).
Images arrive as `image_url` parts with `data:` URIs (http(s) only with allow_remote_images; local paths
never); an image part may carry `"visual_prompts": [...]` (the `draw_visual_prompts` specs), drawn here.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlmkit.serve.engine import Engine, Event, QueueFull, SamplingParams
from vlmkit.serve.engine import Request as EngineRequest

PAGE = Path(__file__).parent / "static" / "index.html"


@dataclass
class ServerLimits:
    max_body_bytes: int = 20 * 2**20
    max_images: int = 4
    max_image_pixels: int = 4096 * 4096
    max_tokens_default: int = 64
    request_timeout: float = 120.0
    allow_remote_images: bool = False
    api_key: str | None = None
    retry_after: int = 1


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# -- request schemas (OpenAI's, with extra fields ignored) ------------------------------------------


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    visual_prompts: list[dict[str, Any]] | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None
    visual_prompts: list[dict[str, Any]] | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingFields):
    prompt: str


# -- metrics ------------------------------------------------------------------------------------


class Metrics:
    def __init__(self, engine: Engine) -> None:
        disable_created_metrics()  # no *_created series: plain counters that add up
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vlmkit_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("vlmkit_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("vlmkit_completion_tokens", "generated tokens", registry=r)
        self.queue_depth = Gauge("vlmkit_queue_depth", "requests waiting to join the batch", registry=r)
        self.batch_size = Gauge("vlmkit_running_batch_size", "sequences in the running batch", registry=r)
        self.ttft = Histogram("vlmkit_time_to_first_token_seconds", "time to first token", registry=r)
        self.latency = Histogram("vlmkit_request_latency_seconds", "request latency", registry=r)
        self.cache_hits = Gauge("vlmkit_image_cache_hits", "image-feature cache hits", registry=r)
        self.queue_depth.set_function(lambda: engine.queue_depth)
        self.batch_size.set_function(lambda: engine.running)
        self.cache_hits.set_function(lambda: engine.features.hits)
        self.prefix_hits = Gauge(
            "vlmkit_prefix_cache_hit_tokens", "prompt tokens taken from the prefix cache, not run", registry=r
        )
        self.prefix_hits.set_function(lambda: engine.prefix.hit_tokens)
        self.prefix_blocks = Gauge("vlmkit_prefix_cache_blocks", "blocks in the prefix cache", registry=r)
        self.prefix_blocks.set_function(lambda: len(engine.prefix.items))


# -- the app ------------------------------------------------------------------------------------


def create_app(vlm: Any, engine: Engine, *, model_name: str, limits: ServerLimits | None = None) -> FastAPI:
    """The server for one loaded model (`vlmkit.VLM`) and its running engine."""
    limits = limits or ServerLimits()
    metrics = Metrics(engine)
    app = FastAPI(title="vlmkit", docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics, app.state.limits = engine, metrics, limits

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        route = request.url.path
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            response: Any = JSONResponse(
                error_body(
                    f"request body of {length} bytes exceeds the limit of {limits.max_body_bytes}",
                    "invalid_request_error",
                ),
                status_code=413,
            )
        elif limits.api_key and route not in ("/health", "/") and not _authorised(request, limits.api_key):
            response = JSONResponse(
                error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error"
                ),
                status_code=401,
            )
        else:
            response = await call_next(request)
        if route.startswith("/v1/"):
            metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        headers = {"Retry-After": str(limits.retry_after)} if e.status == 429 else None
        return JSONResponse(error_body(e.message, e.type, e.param), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", e))
        return JSONResponse(error_body(message, "invalid_request_error", where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        return JSONResponse(
            {"status": "ok", "model": model_name, "running": engine.running, "waiting": engine.queue_depth}
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": model_name, "object": "model", "created": int(time.time()), "owned_by": "vlmkit"}
            ],
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(
            generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4"
        )

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    async def body_of(request: Request, schema: type[BaseModel]) -> Any:
        raw = await request.body()
        if len(raw) > limits.max_body_bytes:
            raise APIError(413, f"request body exceeds the limit of {limits.max_body_bytes} bytes")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = await body_of(request, ChatRequest)
        messages = await asyncio.to_thread(convert_messages, body.messages, limits)
        try:
            inputs = await asyncio.to_thread(vlm.chat_inputs, messages)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return await run(request, body, inputs, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await body_of(request, CompletionRequest)
        try:
            inputs = await asyncio.to_thread(vlm.inputs, body.prompt)
        except ValueError as e:
            raise APIError(400, str(e)) from None
        return await run(request, body, inputs, chat=False)

    async def run(request: Request, body: SamplingFields, inputs: dict, *, chat: bool) -> Any:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = SamplingParams(
            max_tokens=body.max_completion_tokens or body.max_tokens or limits.max_tokens_default,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=stop,
            seed=body.seed,
            n=body.n,
        )
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = EngineRequest(
            inputs=inputs,
            params=params,
            emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
            deadline=time.monotonic() + limits.request_timeout,
        )
        try:
            engine.submit(job)
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", "rate_limit_error") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if body.stream:
            return StreamingResponse(
                stream(job, events, rid, created, chat=chat), media_type="text/event-stream"
            )
        texts, reasons = [""] * params.n, [None] * params.n
        try:
            while any(r is None for r in reasons):
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
                    continue
                if ev.finish_reason is None:
                    texts[ev.index] += ev.text
                else:
                    if ev.finish_reason == "error":
                        job.cancel()
                        raise APIError(
                            500 if "engine" in (ev.error or "") else 408, ev.error or "error", "server_error"
                        )
                    reasons[ev.index] = ev.finish_reason
        finally:
            finished(job)
        if chat:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": r,
                    "logprobs": None,
                }
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
        else:
            choices = [
                {"index": i, "text": t, "finish_reason": r, "logprobs": None}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
        return {
            "id": rid,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model_name,
            "choices": choices,
            "usage": usage(job),
        }

    def usage(job: EngineRequest) -> dict[str, Any]:
        return {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": job.cached_tokens},
        }

    def finished(job: EngineRequest) -> None:
        """Count a request once, when its handler is done with it (finished, failed or abandoned)."""
        metrics.prompt_tokens.inc(job.prompt_tokens)
        metrics.completion_tokens.inc(job.completion_tokens)
        if job.first_token_at is not None:
            metrics.ttft.observe(job.first_token_at - job.created)
        metrics.latency.observe(time.monotonic() - job.created)

    async def stream(job: EngineRequest, events: asyncio.Queue, rid: str, created: int, *, chat: bool) -> Any:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text:
                    delta["content"] = text
                choice: dict[str, Any] = {
                    "index": index,
                    "delta": delta,
                    "finish_reason": reason,
                    "logprobs": None,
                }
            else:
                choice = {"index": index, "text": text or "", "finish_reason": reason, "logprobs": None}
            out = {"id": rid, "object": kind, "created": created, "model": model_name, "choices": [choice]}
            return f"data: {json.dumps(out)}\n\n"

        open_ = job.params.n
        try:
            if chat:
                for i in range(job.params.n):
                    yield chunk(i, None, None, role=True)
            while open_:
                ev = await events.get()
                if ev.finish_reason is None:
                    yield chunk(ev.index, ev.text, None)
                    continue
                open_ -= 1
                if ev.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(ev.error or 'error', 'server_error'))}\n\n"
                    job.cancel()
                    break
                yield chunk(ev.index, None, ev.finish_reason)
            else:
                yield "data: [DONE]\n\n"
        finally:  # also when the client went away mid-stream: its rows stop at the next step
            job.cancel()
            finished(job)

    return app


def _authorised(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    return header.startswith("Bearer ") and header.removeprefix("Bearer ").strip() == key


def convert_messages(messages: list[Message], limits: ServerLimits) -> list[dict[str, Any]]:
    """OpenAI messages -> the processor's: images loaded (data: URIs; http(s) only when allowed), visual
    prompts drawn, counted against the limit."""
    from vlmkit.images import load_image
    from vlmkit.vipllava.visual_prompts import draw_visual_prompts

    out: list[dict[str, Any]] = []
    n_images = 0
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": [{"type": "text", "text": m.content}]})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(m.content):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                if part.text is None:
                    raise APIError(400, f"{where}: a text part needs 'text'", param=where)
                parts.append({"type": "text", "text": part.text})
                continue
            if part.image_url is None:
                raise APIError(
                    400, f"{where}: an image_url part needs 'image_url': {{'url': ...}}", param=where
                )
            n_images += 1
            if n_images > limits.max_images:
                raise APIError(400, f"more than {limits.max_images} images in one request", param=where)
            url = part.image_url.url
            remote = url[:8].lower().startswith(("http://", "https://"))
            if not (url.startswith("data:") or (remote and limits.allow_remote_images)):
                why = (
                    "remote images are off on this server (start it with --allow-remote-images)"
                    if remote
                    else "only data: URIs (or http(s) URLs when allowed) are accepted, never local paths"
                )
                raise APIError(400, f"{where}: {why}", param=where)
            try:
                image = load_image(
                    url, allow_remote=limits.allow_remote_images, max_pixels=limits.max_image_pixels
                )
                prompts = (part.image_url.visual_prompts or []) + (part.visual_prompts or [])
                if prompts:
                    image = draw_visual_prompts(image, prompts)
            except (ValueError, TypeError, OSError) as e:
                raise APIError(400, f"{where}: {e}", param=where) from None
            parts.append({"type": "image", "image": image})
        out.append({"role": m.role, "content": parts})
    return out


def serve(
    model: str = "demo",
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_queue: int = 64,
    max_seq_len: int = 1024,
    feature_cache: int = 256,
    prefix_cache_mb: float = 1024,
    limits: ServerLimits | None = None,
    dtype: str | None = None,
    device: str | None = None,
    drain_seconds: float = 30.0,
) -> None:
    """Load `model` and serve it until SIGINT/SIGTERM; in-flight requests finish first (up to
    drain_seconds)."""
    from contextlib import asynccontextmanager

    import uvicorn

    from vlmkit.vlm import VLM

    limits = limits or ServerLimits()
    vlm = VLM.load(model, dtype=dtype, device=device, progress=True)
    engine = Engine(
        vlm.model,
        vlm.tokenizer,
        max_batch=max_batch,
        max_seq_len=max_seq_len,
        max_queue=max_queue,
        max_images=limits.max_images,
        feature_cache=feature_cache,
        prefix_cache_mb=prefix_cache_mb,
    ).start()
    app = create_app(vlm, engine, model_name=model, limits=limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        yield
        await asyncio.to_thread(engine.stop, drain_seconds)

    app.router.lifespan_context = lifespan
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=int(drain_seconds), log_level="info")

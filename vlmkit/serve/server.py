"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

    vlmkit serve --model demo --port 8000

Routes: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with "stream": true),
GET /v1/models, /health, /metrics (Prometheus text) and / (a page to chat and draw visual prompts).
Images arrive as `image_url` parts with `data:` URIs (http(s) only with allow_remote_images; local paths
never); an image part may carry `"visual_prompts": [...]` (the `draw_visual_prompts` specs), drawn here.
The OpenAI side (schemas, bodies, messages) is `vlmkit.serve.protocol`. The app keeps what its handlers
share on `app.state`: vlm, engine, config, metrics, model_name.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

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
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from vlmkit.adapters import AdapterError, AdapterSet
from vlmkit.models import DEFAULT_MODEL
from vlmkit.serve.config import EngineConfig, ServerConfig
from vlmkit.serve.engine import Engine, Event
from vlmkit.serve.engine import Request as EngineRequest
from vlmkit.serve.errors import EngineError, EngineFailure, QueueFull, ShuttingDown
from vlmkit.serve.output import TokenLogprob
from vlmkit.serve.protocol import (
    APIError,
    ChatRequest,
    CompletionRequest,
    LoadAdapter,
    Reply,
    SamplingFields,
    UnloadAdapter,
    convert_messages,
    error_body,
    parse_body,
)

PAGE = Path(__file__).parent / "static" / "index.html"
log = logging.getLogger("vlmkit.serve")


def log_failure(rid: str, error: BaseException) -> None:
    """A failed request in the server's log under its id: the client's mistakes as warnings, the rest as
    errors (with the traceback when it is not one of the engine's kinds)."""
    if isinstance(error, EngineError) and error.status < 500:
        log.warning("%s failed (%d %s): %s", rid, error.status, error.type, error)
    elif isinstance(error, EngineError):
        log.error("%s failed (%d %s): %s", rid, error.status, error.type, error)
    else:
        log.error("%s failed: %r", rid, error, exc_info=error)


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
        self.prefix_bytes = Gauge(
            "vlmkit_prefix_cache_bytes", "bytes of the keys/values held in the prefix cache", registry=r
        )
        # list() copies the values in one step, while the engine's thread may add or evict blocks
        self.prefix_bytes.set_function(lambda: engine.prefix.bytes)

    def finished(self, job: EngineRequest) -> None:
        """Count a request once, when its handler is done with it (finished, failed or abandoned)."""
        self.prompt_tokens.inc(job.prompt_tokens)
        self.completion_tokens.inc(job.completion_tokens)
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.created)
        self.latency.observe(time.monotonic() - job.created)


# -- the app ------------------------------------------------------------------------------------


def create_app(vlm: Any, engine: Engine, *, model_name: str, config: ServerConfig | None = None) -> FastAPI:
    """The server for one loaded model (`vlmkit.VLM`) and its running engine."""
    app = FastAPI(title="vlmkit", docs_url=None, redoc_url=None)
    s = app.state
    s.vlm, s.engine, s.model_name, s.config = vlm, engine, model_name, config or ServerConfig()
    s.metrics = Metrics(engine)
    s.unloaded = set()  # adapters unloaded at run time: asking for one is a 404, not the base model
    s.open = {}  # id -> engine request of every request a handler still waits on (ended at the drain's end)
    s.draining = False  # set on SIGTERM/SIGINT: no new requests
    app.add_middleware(Guard)
    app.exception_handler(APIError)(api_error)
    app.exception_handler(RequestValidationError)(invalid_request)
    app.exception_handler(StarletteHTTPException)(http_error)
    app.get("/health")(health)
    app.get("/v1/models")(models)
    app.get("/metrics")(prometheus)
    app.get("/")(page)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/v1/completions")(completions)
    app.post("/v1/load_lora_adapter")(load_lora_adapter)
    app.post("/v1/unload_lora_adapter")(unload_lora_adapter)
    app.openapi = lambda: openapi_schema(app)
    return app


# the request model each POST route reads from its body (the handlers read and validate bodies themselves,
# bounded: `read_body`), for the OpenAPI schema
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "/v1/chat/completions": ChatRequest,
    "/v1/completions": CompletionRequest,
    "/v1/load_lora_adapter": LoadAdapter,
    "/v1/unload_lora_adapter": UnloadAdapter,
}
ERROR_STATUSES = {"400": "invalid request", "401": "missing or wrong API key", "404": "not found"}
ERROR_STATUSES |= {"413": "body too large", "429": "busy; retry after Retry-After seconds"}
ERROR_STATUSES |= {"499": "client went away", "503": "shutting down"}


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI schema, with each POST route's real request model as its JSON body and the OpenAI
    error body for its refusals (what schemathesis and client generators read)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    models = [(m, "validation") for m in REQUEST_MODELS.values()]
    refs, defs = models_json_schema(models, ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))
    components["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "required": ["message", "type"]}},
    }
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for route, model in REQUEST_MODELS.items():
        operation = schema["paths"][route]["post"]
        body = {"schema": refs[(model, "validation")]}
        operation["requestBody"] = {"required": True, "content": {"application/json": body}}
        responses = operation.setdefault("responses", {})
        if route.endswith("completions"):
            ok = responses.setdefault("200", {"description": "the answer"})
            ok.setdefault("content", {})["text/event-stream"] = {"schema": {"type": "string"}}
        for status, description in ERROR_STATUSES.items():
            responses[status] = {"description": description, **error}
    app.openapi_schema = schema
    return schema


class Guard:
    """Before any work: refuse an oversized body (413) or a missing API key (401). Around the work: turn an
    unexpected failure into an OpenAI-style 500 with an incident id (logged once), and count /v1/ requests by
    route template and status. Plain ASGI, not `@app.middleware("http")`, whose wrapper hides a client's
    disconnect from the route (a non-streaming request then ran to its end for nobody)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state
        config: ServerConfig = state.config
        route, headers = scope["path"], Headers(scope=scope)
        sent: dict[str, int] = {}

        async def send_and_note(message: dict) -> None:
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            await send(message)

        length = headers.get("content-length")
        refusal = None
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            message = f"request body of {length} bytes exceeds the limit of {config.max_body_bytes}"
            refusal = JSONResponse(error_body(message, "invalid_request_error"), status_code=413)
        elif config.api_key and route not in ("/health", "/") and not _authorised(headers, config.api_key):
            message = "missing or wrong API key: send 'Authorization: Bearer <key>'"
            refusal = JSONResponse(error_body(message, "authentication_error"), status_code=401)
        if refusal is not None:
            await refusal(scope, receive, send_and_note)
        else:
            try:
                await self.app(scope, receive, send_and_note)
            except Exception:  # one place turns every unexpected failure into an OpenAI-style 500 with an id
                incident = "err-" + uuid.uuid4().hex[:16]
                log.exception("%s: unexpected failure on %s %s", incident, scope.get("method"), route)
                if "status" not in sent:  # nothing sent yet: the client gets the error body
                    message = f"internal error {incident}; the server logged it under that id"
                    failed = JSONResponse(error_body(message, "server_error"), status_code=500)
                    await failed(scope, receive, send_and_note)
                else:
                    sent["status"] = 500
        if route.startswith(
            "/v1/"
        ):  # labelled by the route's template: any path a client makes up is one label
            labels = {"route": route_template(scope), "status": str(sent.get("status", 500))}
            state.metrics.requests.labels(**labels).inc()


def route_template(scope: dict) -> str:
    """The path template of the app's route that serves this request ("unmatched" for none)."""
    for candidate in scope["app"].router.routes:
        match, _ = candidate.matches(scope)
        if match == Match.FULL:
            return candidate.path
    return "unmatched"


def _authorised(headers: Headers, key: str) -> bool:
    """`Authorization: Bearer KEY` (the scheme in any case, as RFC 7235 has it), compared in constant time."""
    scheme, _, given = headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


# -- errors -------------------------------------------------------------------------------------


async def api_error(request: Request, e: APIError) -> JSONResponse:
    retry = {"Retry-After": str(request.app.state.config.retry_after)} if e.status == 429 else None
    return JSONResponse(error_body(e.message, e.type, e.param), status_code=e.status, headers=retry)


async def invalid_request(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0] if e.errors() else {}
    where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
    message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", e))
    return JSONResponse(error_body(message, "invalid_request_error", where or None), status_code=400)


async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)


# -- plain routes -------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    s = request.app.state
    if s.engine.error is not None:
        return JSONResponse({"status": "error", "error": str(s.engine.error)}, status_code=503)
    return JSONResponse(
        {"status": "ok", "model": s.model_name, "running": s.engine.running, "waiting": s.engine.queue_depth}
    )


async def models(request: Request) -> dict[str, Any]:
    s = request.app.state
    now = int(time.time())
    data = [
        {"id": s.model_name, "object": "model", "created": now, "owned_by": "vlmkit", "root": s.model_name}
    ]
    adapters = s.engine.adapters
    for name in adapters.names() if adapters is not None else []:
        data.append(
            {"id": name, "object": "model", "created": now, "owned_by": "vlmkit", "parent": s.model_name}
        )
    return {"object": "list", "data": data}


def served_adapters(request: Request) -> Any:
    adapters = request.app.state.engine.adapters
    if adapters is None:
        raise APIError(400, "this server was started without adapters support (start it with --max-loras N)")
    return adapters


async def load_lora_adapter(request: Request) -> JSONResponse:
    """Read a peft LoRA folder on the server's disk and serve it under `lora_name` (behind --api-key)."""
    body = await read_body(request, LoadAdapter)
    adapters = served_adapters(request)
    if body.lora_name == request.app.state.model_name or body.lora_name in adapters.names():
        raise APIError(400, f"the name {body.lora_name!r} is taken; unload it first", param="lora_name")
    try:
        await asyncio.to_thread(adapters.add, body.lora_name, body.lora_path)
    except AdapterError as e:
        raise APIError(400, str(e), param="lora_path") from None
    request.app.state.unloaded.discard(body.lora_name)
    log.info("loaded adapter %s from %s", body.lora_name, body.lora_path)
    return JSONResponse({"status": "ok", "lora_name": body.lora_name})


async def unload_lora_adapter(request: Request) -> JSONResponse:
    """Stop serving an adapter; requests already running with it finish with it."""
    body = await read_body(request, UnloadAdapter)
    try:
        served_adapters(request).remove(body.lora_name)
    except KeyError:
        raise APIError(404, f"adapter {body.lora_name!r} is not loaded", param="lora_name") from None
    request.app.state.unloaded.add(body.lora_name)
    log.info("unloaded adapter %s", body.lora_name)
    return JSONResponse({"status": "ok", "lora_name": body.lora_name})


def requested_adapter(request: Request, model: str | None) -> str | None:
    """The adapter a request's `model` names; None for the base model (its name, or any other name, as
    llama.cpp's server takes it); 404 for an adapter that was unloaded."""
    s = request.app.state
    adapters = s.engine.adapters
    if model is None or model == s.model_name:
        return None
    if adapters is not None and model in adapters.names():
        return model
    if model in s.unloaded:
        raise APIError(
            404,
            f"adapter {model!r} is not loaded; load it with POST /v1/load_lora_adapter",
            "invalid_request_error",
            "model",
        )
    return None


async def prometheus(request: Request) -> PlainTextResponse:
    text = generate_latest(request.app.state.metrics.registry).decode()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")


async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text())


# -- completions --------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Any:
    s = request.app.state
    deadline = time.monotonic() + s.config.request_timeout
    body = await within(deadline, "reading the body", read_body(request, ChatRequest))
    max_images = s.engine.config.max_images
    messages = await off_loop(
        deadline, "loading its pictures", convert_messages, body.messages, s.config, max_images
    )
    inputs = await processed(deadline, s.vlm.chat_inputs, messages)
    return await answer(request, body, inputs, chat=True, deadline=deadline)


async def completions(request: Request) -> Any:
    deadline = time.monotonic() + request.app.state.config.request_timeout
    body = await within(deadline, "reading the body", read_body(request, CompletionRequest))
    inputs = await processed(deadline, request.app.state.vlm.inputs, body.prompt)
    return await answer(request, body, inputs, chat=False, deadline=deadline)


async def within(deadline: float, doing: str, step: Any) -> Any:
    """Await one step of a request, cut off (408) at the request's deadline."""
    try:
        return await asyncio.wait_for(step, max(deadline - time.monotonic(), 0.0))
    except TimeoutError:
        raise APIError(408, f"the request ran past its deadline while {doing}", "timeout_error") from None


async def off_loop(deadline: float, doing: str, work: Callable[..., Any], *args: Any) -> Any:
    """CPU work of a request (picture decoding, prompt drawing, tokenization) in the worker pool, off the
    event loop, within the request's deadline (past it the answer is a 408; the worker finishes alone)."""
    return await within(deadline, doing, asyncio.to_thread(work, *args))


async def read_body(request: Request, schema: type[BaseModel]) -> Any:
    limit = request.app.state.config.max_body_bytes
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # counted as it arrives, whatever the framing (chunked or not)
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client went away before its body was complete
        raise APIError(499, "client disconnected before the request body was complete", "cancelled") from None
    raw = b"".join(chunks)
    data = parse_body(raw)
    try:
        body = schema.model_validate(data)
    except ValidationError as e:
        raise RequestValidationError(e.errors()) from None
    if isinstance(body, SamplingFields):
        body.check_fields(request.app.state.vlm.tokenizer.vocab_size if body.logit_bias else 0)
    return body


async def processed(deadline: float, process: Callable[[Any], dict], what: Any) -> dict:
    """The processor's tensors for a prompt or messages, off the event loop; what it refuses is a 400."""
    try:
        return await off_loop(deadline, "tokenizing and processing its pictures", process, what)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def failure(event: Event) -> EngineError:
    """The typed error an "error" event carries."""
    return event.error or EngineFailure("the request failed without saying why")


async def answer(request: Request, body: SamplingFields, inputs: dict, *, chat: bool, deadline: float) -> Any:
    """Submit one request to the engine and answer with its completion, whole or streamed."""
    s = request.app.state
    adapter = requested_adapter(request, body.model)
    reply = Reply(chat=chat, model=adapter or s.model_name, include_usage=body.include_usage)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = EngineRequest(
        inputs=inputs,
        params=body.params(s.config.max_tokens_default),
        emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
        deadline=deadline,
        id=reply.id,
        adapter=adapter,
    )
    try:
        if s.draining:
            raise ShuttingDown("the server is shutting down; send the request to another instance")
        s.engine.submit(job)
    except EngineError as e:
        log_failure(reply.id, e)
        busy = f"the server is busy: {e}; retry later" if isinstance(e, QueueFull) else None
        raise APIError.of(e, busy) from None
    s.open[job.id] = job
    if body.stream:
        return StreamingResponse(stream(reply, job, events, s), media_type="text/event-stream")
    try:
        got = await collect(request, job, events)
    except EngineError as e:
        log_failure(reply.id, e)
        raise APIError.of(e) from None
    except Exception as e:
        log_failure(reply.id, e)
        raise
    finally:
        job.cancel()  # a no-op once it finished; frees its rows when the client went away or it failed
        s.open.pop(job.id, None)
        s.metrics.finished(job)
    if got is None:
        log.info("%s: the client went away", reply.id)
        return JSONResponse(error_body("client disconnected", "cancelled"), status_code=499)
    texts, reasons, logprobs = got
    return reply.body(texts, reasons, job, logprobs if job.params.logprobs is not None else None)


async def collect(
    request: Request, job: EngineRequest, events: asyncio.Queue[Event]
) -> tuple[list[str], list[str], list[list[TokenLogprob]]] | None:
    """Every choice's text, finish reason and tokens' log-probabilities (when asked); None when the client
    went away first. An error event raises its error."""
    n = job.params.n
    texts, reasons, logprobs = [""] * n, [""] * n, [[] for _ in range(n)]
    loop = asyncio.get_running_loop()
    checked = loop.time()
    while not all(reasons):
        try:
            ev: Event | None = await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
            ev = None
        # every half second, also while tokens keep coming: a client that went away frees its rows
        if ev is None or loop.time() - checked >= 0.5:
            checked = loop.time()
            if await request.is_disconnected():
                return None
        if ev is None:
            continue
        logprobs[ev.index] += ev.logprobs
        if ev.finish_reason is None:
            texts[ev.index] += ev.text
        elif ev.finish_reason == "error":
            raise failure(ev)
        else:
            reasons[ev.index] = ev.finish_reason
    return texts, reasons, logprobs


async def stream(
    reply: Reply, job: EngineRequest, events: asyncio.Queue[Event], state: Any
) -> AsyncIterator[str]:
    """The server-sent events of one request: a role chunk per choice (chat), the text deltas (with their
    tokens' log-probabilities when asked), each choice's finish, the usage when asked, then [DONE]; an error
    event ends the stream with an OpenAI error body instead."""
    asked = job.params.logprobs is not None
    try:
        if reply.chat:
            for i in range(job.params.n):
                yield reply.chunk(i, None, None, role=True)
        open_ = job.params.n
        offsets = [0] * job.params.n  # characters of each choice's tokens so far (completions' text_offset)
        while open_:
            ev = await events.get()
            lps = ev.logprobs if asked else None
            if ev.finish_reason is None:
                yield reply.chunk(ev.index, ev.text, None, logprobs=lps, offset=offsets[ev.index])
                offsets[ev.index] += sum(len(t.token) for t in ev.logprobs)
                continue
            open_ -= 1
            if ev.finish_reason == "error":
                error = failure(ev)
                log_failure(reply.id, error)
                yield f"data: {json.dumps(error_body(str(error), error.type))}\n\n"
                return
            yield reply.chunk(
                ev.index,
                None,
                ev.finish_reason,
                logprobs=lps if ev.logprobs else None,
                offset=offsets[ev.index],
            )
        if reply.include_usage:
            yield reply.usage_chunk(job)
        yield "data: [DONE]\n\n"
    except Exception as e:
        log_failure(reply.id, e)
        raise
    finally:  # also when the client went away mid-stream: its rows stop at the next step
        job.cancel()
        state.open.pop(job.id, None)
        state.metrics.finished(job)


async def drain_on_exit(app: FastAPI, server: Any, seconds: float) -> None:
    """Once uvicorn is told to exit (SIGTERM/SIGINT): refuse new requests, give running ones `seconds`
    less a margin, then end those still open with a 503 error (an error event in a stream), so that each
    answer is complete before uvicorn's own graceful timeout would cancel its task mid-write."""
    s = app.state
    while not server.should_exit:
        await asyncio.sleep(0.1)
    s.draining = True
    loop = asyncio.get_running_loop()
    end = loop.time() + max(seconds - 1.0, seconds / 2)
    log.info("draining %d open request(s) for up to %.1f s", len(s.open), seconds)
    while s.open and loop.time() < end:
        await asyncio.sleep(0.05)
    left = [job for job in s.open.values() if not job.done.is_set()]
    for job in left:
        message = f"the server shut down before the request finished (it drains for {seconds:g} s)"
        job.emit(Event(0, finish_reason="error", error=ShuttingDown(message)))
    if left:
        log.warning("drain time over: ended %d unfinished request(s) with a 503 error", len(left))


# -- running it ---------------------------------------------------------------------------------


def serve(
    model: str = DEFAULT_MODEL,
    *,
    engine: EngineConfig | None = None,
    server: ServerConfig | None = None,
    dtype: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_parts: Sequence[str] = (),
    tp: int = 1,
    lora: dict[str, str] | None = None,
    max_loras: int = 4,
) -> None:
    """Load `model` (quantized: see `vlmkit.load_model`) and serve it until SIGINT/SIGTERM; in-flight requests
    finish first (up to `server.drain_seconds`). tp: the model split over this many processes, each running
    this call under torchrun: rank 0 serves HTTP and schedules, every process runs the same model steps.
    lora: {name: peft folder} adapters served from the start (more load at run time), at most `max_loras`
    in memory at once.

        serve("demo", engine=EngineConfig(max_batch=8), server=ServerConfig(port=8123))
    """
    from contextlib import asynccontextmanager

    import uvicorn

    from vlmkit.serve.executor import Executor
    from vlmkit.tensor_parallel import is_main_process
    from vlmkit.vlm import VLM

    engine_config, server_config = engine or EngineConfig(), server or ServerConfig()
    vlm = VLM.load(
        model,
        dtype=dtype,
        device=device,
        progress=is_main_process(),
        batched=engine_config.max_batch > 1,
        quantize=quantize,
        group_size=group_size,
        quantize_parts=quantize_parts,
        tp=tp,
    )
    if not is_main_process():  # a part of a split model: run rank 0's engine calls until it stops
        import signal

        # SIGTERM/SIGINT reach every process under torchrun: rank 0 drains its requests (which need us)
        # and then releases us, so here they are ignored
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        Executor(vlm.model, engine_config).follow()
        return
    adapters = None
    if tp == 1:
        adapters = AdapterSet(vlm.model, max_loaded=max_loras)
        for name, path in (lora or {}).items():
            adapters.add(name, path)
    elif lora:
        raise ValueError("LoRA adapters are not served on a model split over processes (tp > 1)")
    running = Engine(vlm.model, vlm.tokenizer, engine_config, adapters=adapters).start()
    app = create_app(vlm, running, model_name=model, config=server_config)
    drain = server_config.drain_seconds

    host, port = server_config.host, server_config.port
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=math.ceil(drain), log_level="info"
    )
    http = uvicorn.Server(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        watch = asyncio.create_task(drain_on_exit(app, http, drain))
        yield
        watch.cancel()
        await asyncio.to_thread(running.stop, drain)

    app.router.lifespan_context = lifespan
    http.run()

"""The OpenAI-compatible server against a live uvicorn on 127.0.0.1, driven by the official `openai` client:
plain, streaming, n > 1, stop, both demo models, 16 parallel streams equal to single-request greedy output,
every limit, metrics that add up, disconnects that free their rows, and SIGTERM draining."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import uvicorn
from checkpoints import build_llava_checkpoint
from PIL import Image

import vlmkit
from vlmkit.demo.shapes import QUESTION_TYPES, make_example
from vlmkit.generation import DEFAULT_MAX_NEW_TOKENS
from vlmkit.serve.config import EngineConfig, ServerConfig
from vlmkit.serve.engine import Engine, Event, Request, SamplingParams
from vlmkit.serve.errors import EngineFailure, InvalidRequest, QueueFull, RequestTimeout
from vlmkit.serve.server import create_app
from vlmkit.vlm import user_turn

NAMES = {"vipllava": "demo", "idefics": "demo-idefics"}
ENGINE = dict(max_batch=8, max_seq_len=256, max_images=2)
LIMITS = dict(max_body_bytes=1_000_000, max_image_pixels=512 * 512, request_timeout=30.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Live:
    """A server in a background thread of this process."""

    def __init__(self, vlm, *, name: str, engine_kw: dict | None = None, adapters=None, **config) -> None:
        self.vlm = vlm
        self.engine = Engine(vlm.model, vlm.tokenizer, adapters=adapters, **{**ENGINE, **(engine_kw or {})})
        self.engine.start()
        app = create_app(vlm, self.engine, model_name=name, config=ServerConfig(**{**LIMITS, **config}))
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(
            base_url=self.url + "/v1", api_key=config.get("api_key") or "none", max_retries=0
        )

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.engine.stop(10)


def data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def openai_messages(example) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_uri(im)}} for im in example.images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": example.question}]}]


def greedy(vlm, example, max_tokens: int = 24) -> str:
    return vlm.chat([user_turn(example.question, example.images)], max_new_tokens=max_tokens)


def examples(family: str, n: int, seed: int = 7) -> list:
    rng = random.Random(seed)
    kinds = QUESTION_TYPES[family]
    return [make_example(rng, kinds[i % len(kinds)]) for i in range(n)]


@pytest.fixture(scope="module", params=["vipllava", "idefics"])
def live(request):
    family = request.param
    server = Live(vlmkit.VLM.load(NAMES[family]), name=NAMES[family])
    server.family = family
    yield server
    server.close()


def metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_plain_streaming_n_and_stop(live):
    exs = examples(live.family, 3)
    for ex in exs:
        want = greedy(live.vlm, ex)
        r = live.client.chat.completions.create(
            model="x", messages=openai_messages(ex), max_tokens=24, temperature=0
        )
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 5
        chunks = list(
            live.client.chat.completions.create(
                model="x", messages=openai_messages(ex), max_tokens=24, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason == "stop"
    caption = next(
        e for e in examples(live.family, 12) if e.kind == "caption" and " and " in greedy(live.vlm, e)
    )
    r = live.client.chat.completions.create(
        model="x", messages=openai_messages(caption), max_tokens=24, temperature=0, stop=[" and"]
    )
    assert r.choices[0].message.content == greedy(live.vlm, caption).split(" and")[0]
    sampled = [
        live.client.chat.completions.create(
            model="x", messages=openai_messages(exs[0]), max_tokens=8, temperature=1.5, n=3, seed=5
        )
        for _ in range(2)
    ]
    assert [len(s.choices) for s in sampled] == [3, 3] and [c.index for c in sampled[0].choices] == [0, 1, 2]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    # vLLM's extra fields reach the same GenerationConfig as `generate`: top_k=1 samples the greedy answer
    ex = exs[1]
    r = live.client.chat.completions.create(
        model="x",
        messages=openai_messages(ex),
        max_tokens=24,
        temperature=1.5,
        seed=3,
        extra_body={"top_k": 1, "repetition_penalty": 1.5},
    )
    penalised = live.vlm.chat([user_turn(ex.question, ex.images)], max_new_tokens=24, repetition_penalty=1.5)
    assert r.choices[0].message.content == penalised
    r = live.client.completions.create(model="x", prompt="Describe the image.", max_tokens=4, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 4
    assert [m.id for m in live.client.models.list().data] == [NAMES[live.family]]


def test_sixteen_parallel_streams_equal_single_greedy(live):
    exs = examples(live.family, 16, seed=11)
    want = [greedy(live.vlm, e) for e in exs]

    def ask(ex):
        stream = live.client.chat.completions.create(
            model="x", messages=openai_messages(ex), max_tokens=24, temperature=0, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in stream)

    before = live.engine.steps
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, exs))
    assert got == want
    tokens = sum(len(live.vlm.tokenizer.encode(w, add_special_tokens=False)) + 1 for w in want)
    assert live.engine.steps - before < tokens  # rows shared decode steps


def test_a_repeated_image_is_not_encoded_again(live):
    """The second time, the picture is not encoded and the prompt's blocks come from the prefix cache."""
    ex = examples(live.family, 1, seed=3)[0]
    ask = dict(model="x", messages=openai_messages(ex), max_tokens=4, temperature=0)
    first = live.client.chat.completions.create(**ask)
    misses, reused = live.engine.features.misses, live.engine.prefix.hit_tokens
    again = live.client.chat.completions.create(**ask)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert live.engine.features.misses == misses
    block = live.engine.prefix.block
    assert live.engine.prefix.hit_tokens - reused == (first.usage.prompt_tokens - 1) // block * block
    assert again.usage.prompt_tokens_details.cached_tokens == (first.usage.prompt_tokens - 1) // block * block
    shown = httpx.get(live.url + "/metrics").text
    assert metric(shown, "vlmkit_prefix_cache_hit_tokens") == live.engine.prefix.hit_tokens > 0


def test_visual_prompts_are_drawn_server_side(live):
    if live.family != "vipllava":
        pytest.skip("visual prompts are ViP-LLaVA's")
    from vlmkit.demo.shapes import EXAMPLES

    image = Image.open(EXAMPLES / "scene1.png")
    prompt = {"type": "rectangle", "box": [106, 106, 182, 182], "color": "red"}
    part = {"type": "image_url", "image_url": {"url": data_uri(image), "visual_prompts": [prompt]}}
    text = {"type": "text", "text": "What shape is inside the red rectangle?"}
    r = live.client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": [part, text]}], max_tokens=8, temperature=0
    )
    assert r.choices[0].message.content.strip() == "star"


def test_every_limit_gives_an_openai_error_and_the_server_keeps_serving(live):
    url = live.url + "/v1/chat/completions"
    small = data_uri(Image.new("RGB", (32, 32), "white"))

    def post(body, **kw):
        return (
            httpx.post(url, json=body, timeout=30, **kw)
            if not isinstance(body, bytes)
            else httpx.post(url, content=body, timeout=30, headers={"content-type": "application/json"})
        )

    def image_part(u):
        return {"type": "image_url", "image_url": {"url": u}}

    cases = {
        "not valid JSON": (b"{nope", 400),
        "messages": ({"messages": []}, 400),
        "role": ({"messages": [{"role": "robot", "content": "hi"}]}, 400),
        "temperature": ({"messages": [{"role": "user", "content": "hi"}], "temperature": 9}, 400),
        "more than 2 images": ({"messages": [{"role": "user", "content": [image_part(small)] * 3}]}, 400),
        "never local paths": ({"messages": [{"role": "user", "content": [image_part("/etc/passwd")]}]}, 400),
        "remote images are off": (
            {"messages": [{"role": "user", "content": [image_part("https://example.com/a.png")]}]},
            400,
        ),
        "pixels": (
            {"messages": [{"role": "user", "content": [image_part(data_uri(Image.new("RGB", (600, 600))))]}]},
            400,
        ),
        "exceeds this server's limit": (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
            400,
        ),
        "bytes": ({"messages": [{"role": "user", "content": "x" * 1_100_000}]}, 413),
        "visual prompt": (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{**image_part(small), "visual_prompts": [{"type": "blob"}]}],
                    }
                ]
            },
            400,
        ),
    }
    for needle, (body, status) in cases.items():
        r = post(body)
        assert r.status_code == status, (needle, r.text)
        error = r.json()["error"]
        assert needle in error["message"] and error["type"], (needle, error)
    ex = examples(live.family, 1)[0]
    r = live.client.chat.completions.create(
        model="x", messages=openai_messages(ex), max_tokens=24, temperature=0
    )
    assert r.choices[0].message.content == greedy(live.vlm, ex)  # still serving
    assert httpx.get(live.url + "/health").json()["status"] == "ok"


def test_metrics_add_up(live):
    before = httpx.get(live.url + "/metrics").text
    used = 0
    for ex in examples(live.family, 3, seed=21):
        r = live.client.chat.completions.create(
            model="x", messages=openai_messages(ex), max_tokens=24, temperature=0
        )
        used += r.usage.completion_tokens
    after = httpx.get(live.url + "/metrics").text
    ok = 'vlmkit_requests_total{route="/v1/chat/completions",status="200"}'
    assert metric(after, ok) - metric(before, ok) == 3
    assert (
        metric(after, "vlmkit_completion_tokens_total") - metric(before, "vlmkit_completion_tokens_total")
        == used
    )
    for name in ("vlmkit_time_to_first_token_seconds_count", "vlmkit_request_latency_seconds_count"):
        assert metric(after, name) - metric(before, name) == 3
    assert "vlmkit_queue_depth 0.0" in after and "vlmkit_running_batch_size 0.0" in after


# -- with a tiny random model: long generations, queueing, keys, cancellation, SIGTERM ---------------


@pytest.fixture(scope="module")
def random_model(tmp_path_factory):
    folder, _, _ = build_llava_checkpoint(tmp_path_factory.mktemp("rand"))
    return folder


def wait_until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def long_request(vlm, n_tokens: int, events: list) -> Request:
    return Request(
        inputs=vlm.inputs("hello there"),
        params=SamplingParams(max_tokens=n_tokens),
        emit=events.append,
    )


def test_queue_full_is_429_with_retry_after_and_api_key(random_model):
    vlm = vlmkit.VLM.load(random_model)
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=2, max_seq_len=128, max_queue=1)  # never started
    app = create_app(vlm, engine, model_name="m", config=ServerConfig(api_key="sekret"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(base + "/health").status_code == 200  # no key needed
        assert httpx.get(base + "/v1/models").status_code == 401
        r = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.get(base + "/v1/models", headers=auth).status_code == 200
        engine.submit(long_request(vlm, 4, []))  # fills the queue of 1
        client = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="m", prompt="hi", max_tokens=3)
        assert e.value.response.headers["retry-after"] == "1"
        assert "busy" in e.value.response.json()["error"]["message"]
    finally:
        server.should_exit = True


def test_a_cancelled_or_disconnected_request_frees_its_row(random_model):
    vlm = vlmkit.VLM.load(random_model)
    server = Live(vlm, name="m", engine_kw={"max_seq_len": 600})
    try:
        events: list[Event] = []
        req = long_request(vlm, 500, events)
        server.engine.submit(req)
        while server.engine.running == 0:
            time.sleep(0.01)
        req.cancel()
        assert req.done.wait(10) and events[-1].finish_reason == "cancelled"
        assert wait_until(lambda: server.engine.running == 0)
        body = {"prompt": "hello there", "max_tokens": 500, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            next(r.iter_lines())  # the first token arrived; the client goes away
        assert wait_until(lambda: server.engine.running == 0)
    finally:
        server.close()


def test_sigterm_drains_in_flight_requests(random_model, tmp_path):
    """`python -m vlmkit serve` with the prefix cache off: nothing is kept or reused; SIGTERM mid-stream
    lets the stream finish, then the process exits."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmkit", "serve", "--model", str(random_model), "--port", str(port)]
        + ["--prefix-cache-mb", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        ask = {"prompt": "the same words, long enough to fill some blocks of sixteen tokens", "max_tokens": 2}
        for _ in range(2):
            usage = httpx.post(base + "/v1/completions", json=ask, timeout=60).json()["usage"]
            assert usage["prompt_tokens"] > 16 and usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert metric(httpx.get(base + "/metrics").text, "vlmkit_prefix_cache_blocks") == 0
        body = {"prompt": "hello there", "max_tokens": 200, "stream": True}
        chunks = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and len(chunks) == 1:
                    proc.send_signal(signal.SIGTERM)
                if line.startswith("data: "):
                    chunks.append(line.removeprefix("data: "))
        assert chunks[-1] == "[DONE]"
        last = json.loads(chunks[-2])
        assert last["choices"][0]["finish_reason"] in ("length", "stop")
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    finally:
        if proc.poll() is None:
            proc.kill()


class ScriptedEngine:
    """Stands in for the engine: records each request's settings and answers it with `answer`, an
    EngineError that `submit` raises or that arrives as the request's error event, or a text."""

    config = EngineConfig()
    error = None
    adapters = None
    queue_depth = running = 0
    features = SimpleNamespace(hits=0)  # what /metrics reads of the caches
    prefix = SimpleNamespace(hit_tokens=0, items={}, bytes=0)

    def __init__(self, answer, *, at_submit: bool = False) -> None:
        self.answer, self.at_submit, self.requests = answer, at_submit, []

    def submit(self, request: Request) -> None:
        if self.at_submit:
            raise self.answer
        self.requests.append(request)
        if isinstance(self.answer, str):
            request.emit(Event(0, text=self.answer))
            request.emit(Event(0, finish_reason="stop"))
        else:
            request.emit(Event(0, finish_reason="error", error=self.answer))


class NoModel:
    """Stands in for the VLM: the server only hands what its processor makes to the engine."""

    def inputs(self, prompt: str) -> dict:
        return {"prompt": prompt}

    def chat_inputs(self, messages: list) -> dict:
        return {"messages": messages}


@pytest.mark.parametrize(
    ("error", "at_submit", "status", "kind"),
    [
        (InvalidRequest("prompt too long"), True, 400, "invalid_request_error"),
        (QueueFull("1 request is already waiting"), True, 429, "rate_limit_error"),
        # the status comes from the kind: "engine" in the message no longer makes it a 500
        (RequestTimeout("the engine did not finish in time"), False, 408, "timeout_error"),
        (EngineFailure("a step failed"), False, 500, "server_error"),
    ],
)
def test_engine_errors_map_to_status_and_type_by_kind_and_are_logged(error, at_submit, status, kind, caplog):
    from fastapi.testclient import TestClient

    engine = ScriptedEngine(error, at_submit=at_submit)
    client = TestClient(create_app(NoModel(), engine, model_name="m", config=ServerConfig(retry_after=7)))
    with caplog.at_level(logging.WARNING, logger="vlmkit.serve"):
        r = client.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == status and r.json()["error"]["type"] == kind
    assert str(error) in r.json()["error"]["message"]
    assert (r.headers.get("retry-after") == "7") == (status == 429)
    logged = [rec.getMessage() for rec in caplog.records if rec.name == "vlmkit.serve"]
    assert len(logged) == 1 and logged[0].startswith("cmpl-") and str(error) in logged[0]
    if not at_submit:  # streamed, the error event ends the stream with an OpenAI error body
        r = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
        last = json.loads(r.text.strip().splitlines()[-1].removeprefix("data: "))
        assert last["error"]["type"] == kind and "[DONE]" not in r.text


def test_sampling_fields_reach_the_engine():
    from fastapi.testclient import TestClient

    engine = ScriptedEngine("ok")
    client = TestClient(create_app(NoModel(), engine, model_name="m"))
    r = client.post("/v1/completions", json={"prompt": "hi"})
    assert r.json()["choices"][0]["text"] == "ok" and r.json()["id"].startswith("cmpl-")
    assert engine.requests[0].params == SamplingParams(max_tokens=DEFAULT_MAX_NEW_TOKENS, temperature=1.0)
    assert engine.requests[0].id == r.json()["id"]
    ask = {"prompt": "hi", "top_k": 5, "repetition_penalty": 1.2, "max_tokens": 3, "stop": "x", "seed": 1}
    client.post("/v1/completions", json=ask)
    params = engine.requests[1].params
    assert (params.top_k, params.repetition_penalty, params.max_tokens, params.stop) == (5, 1.2, 3, ["x"])
    for bad in ({"top_k": -1}, {"repetition_penalty": 0}, {"top_k": 1.5}):
        r = client.post("/v1/completions", json={"prompt": "hi", **bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(bad)), r.text
    assert len(engine.requests) == 2


def test_the_page_is_served(random_model):
    vlm = vlmkit.VLM.load(random_model)
    engine = Engine(vlm.model, vlm.tokenizer, max_batch=1, max_seq_len=64)
    app = create_app(vlm, engine, model_name="m", config=ServerConfig(api_key="k"))
    from fastapi.testclient import TestClient

    page = TestClient(app).get("/")
    assert page.status_code == 200 and "<canvas" in page.text and "visual_prompts" in page.text
    assert Path(vlmkit.serve.server.PAGE).is_file()


def test_the_page_in_headless_chromium(tmp_path):
    """Load the page, upload a picture, draw a rectangle with the mouse, ask, see the streamed answer."""
    import shutil

    playwright = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    from vlmkit.demo.shapes import EXAMPLES

    server = Live(vlmkit.VLM.load("demo"), name="demo")
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 900})
            page.goto(server.url + "/")
            page.set_input_files("#file", str(EXAMPLES / "scene1.png"))
            page.wait_for_function("document.getElementById('board').height === 384")
            box = page.locator("#board").bounding_box()
            s = box["width"] / 288  # the 288-px picture is shown 384 px wide
            page.mouse.move(box["x"] + 106 * s, box["y"] + 106 * s)
            page.mouse.down()
            page.mouse.move(box["x"] + 150 * s, box["y"] + 150 * s, steps=4)
            page.mouse.move(box["x"] + 182 * s, box["y"] + 182 * s, steps=4)
            page.mouse.up()
            page.fill("#ask", "What shape is inside the red rectangle?")
            page.click("#send")
            page.wait_for_selector(".assistant[data-done='1']", timeout=30_000)
            answer = page.locator(".assistant").inner_text()
            page.screenshot(path=str(tmp_path / "chat.png"))
            browser.close()
        assert answer.strip() == "star"
        assert (tmp_path / "chat.png").stat().st_size > 10_000
    finally:
        server.close()

"""Hostile and careless input, each case a finding of the first hardening review: it gets a clear 4xx (or
ValueError) at once, never a hang, a traceback in a 500, a silent wrong answer or a new metrics series."""

from __future__ import annotations

import io
import json
import re
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from test_serve import NoModel, ScriptedEngine, data_uri, wait_until

import vlmkit
from vlmkit.cli import main as cli_main
from vlmkit.serve.config import ServerConfig
from vlmkit.serve.server import create_app
from vlmkit.visual_prompts import draw_visual_prompts


@pytest.fixture(scope="module")
def demo():
    return vlmkit.VLM.load("demo")


def client(vlm=None, engine=None, **config) -> TestClient:
    app = create_app(
        vlm or NoModel(), engine or ScriptedEngine("ok"), model_name="m", config=ServerConfig(**config)
    )
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "point", "point": [100, 100], "width": 1000000},
        {"type": "rectangle", "box": [10, 10, 200, 200], "width": 1000000000},
        {"type": "rectangle", "box": [10, 10, 200, 200], "width": 1e300},
        {"type": "rectangle", "box": [10, 10, 200, 200], "width": True},
        {"type": "rectangle", "box": [10, 10, 200, 200], "seed": 10**30},
    ],
)
def test_huge_visual_prompts_are_refused_at_once(demo, spec):
    started = time.monotonic()
    with pytest.raises(ValueError, match="'width' must be|'seed' must be"):
        draw_visual_prompts(Image.new("RGB", (224, 224), "white"), [spec])
    part = {
        "type": "image_url",
        "image_url": {"url": data_uri(Image.new("RGB", (224, 224), "white")), "visual_prompts": [spec]},
    }
    body = {
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": "what?"}]}],
        "max_tokens": 2,
    }
    r = client(demo).post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and ("width" in r.text or "seed" in r.text), r.text
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    "raw,why",
    [
        (b'{"prompt": "hi", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested"),
        (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "characters"),
        (b'{"prompt": "\\ud800 lone", "max_tokens": 2}', "surrogate"),
        (b'{"prompt": "hi", "temperature": Infinity}', "strict JSON"),
        (b'{"prompt": "hi", "temperature": NaN}', "strict JSON"),
        (b'{"prompt": "hi", "max_tokens": true}', "max_tokens"),
        (b'{"prompt": "hi", "n": "2"}', "n"),
        (b'{"prompt": "hi", "stream": "yes"}', "stream"),
    ],
)
def test_malformed_bodies_are_a_400_that_says_why(raw, why):
    r = client().post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert why in r.json()["error"]["message"] or why == r.json()["error"].get("param"), r.text


def test_an_unexpected_failure_is_an_openai_500_with_an_id_and_counted():
    class Broken(ScriptedEngine):
        def submit(self, request):
            raise RuntimeError("a bug deep inside")

    c = client(engine=Broken("x"))
    r = c.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 500 and r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == "server_error" and error["message"].startswith("internal error err-")
    assert "a bug deep inside" not in r.text  # the details go to the log, not to the client
    metrics = c.get("/metrics").text
    assert 'vlmkit_requests_total{route="/v1/completions",status="500"} 1.0' in metrics


def test_metrics_labels_are_route_templates_not_raw_paths():
    c = client(api_key="k")
    for i in range(200):
        c.get(f"/v1/no-such-path-{i}")
        c.post(f"/v1/secret-{i}")
    metrics = c.get("/metrics", headers={"Authorization": "Bearer k"}).text
    series = [line for line in metrics.splitlines() if line.startswith("vlmkit_requests_total{")]
    assert len(series) <= 3, series  # unmatched 401s; nothing per path


def test_bearer_scheme_in_any_case_and_a_wrong_key_refused():
    c = client(api_key="secret")
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert c.get("/v1/models", headers={"Authorization": f"{scheme} secret"}).status_code == 200
    assert c.get("/v1/models", headers={"Authorization": "Bearer secreT"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Basic secret"}).status_code == 401
    assert c.get("/openapi.json").status_code == 401  # the schema too, behind the key


def test_long_prompts_and_bad_settings_fail_before_any_work(demo, capsys):
    started = time.monotonic()
    with pytest.raises(ValueError, match="more than this model's context of 512"):
        demo.generate("word " * 120_000)
    assert time.monotonic() - started < 10
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        demo.generate("hi", do_sample=True, temperature=float("nan"))
    for args, message in (
        (["generate", "hi", "--device", "tpu"], "unknown device 'tpu'"),
        (["generate", "hi", "--temperature", "-1"], "--temperature must be a finite number"),
        (["generate", "hi", "--temperature", "nan"], "--temperature must be a finite number"),
        (
            ["finetune", "--data", "x.jsonl", "--output-dir", "o", "--model", "demo", "--max-steps", "-3"],
            "max_steps must be >= 1",
        ),
    ):
        assert cli_main(args) == 2
        assert message in capsys.readouterr().err


def test_the_body_limits_hold_for_valid_json():
    body = json.dumps({"prompt": "hi", "max_tokens": 2, "seed": 2**63 - 1})
    assert client().post("/v1/completions", content=body).status_code == 200


def test_training_rows_that_break_json_parsers_are_skipped_and_counted(tmp_path):
    from vlmkit.train.data import load_conversations

    Image.new("RGB", (32, 32), "white").save(tmp_path / "a.png")
    good = {
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "a circle"}],
    }
    lines = [json.dumps(good)]
    lines.append('{"conversations": ' + "[" * 5000 + "]" * 5000 + "}")
    lines.append('{"id": ' + "9" * 5000 + ', "conversations": []}')
    lines.append('{"conversations": [{"from": "human", "value": "\\ud800"}, {"from": "gpt", "value": "x"}]}')
    lines.append(json.dumps(good))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    samples, report = load_conversations(
        tmp_path / "train.jsonl", vlmkit.load_processor("demo"), max_length=256, on_bad_sample="skip"
    )
    assert len(samples) == 2 and report.total == 5 and "kept 2 of 5" in report.summary()
    assert "invalid json" in report.summary()


def test_a_chunked_body_over_the_limit_is_cut_off_while_it_streams_in():
    """The ASGI messages of a chunked upload are read one by one and the reading stops at the limit (the
    first review saw four 250 MB uploads take 2 GB before a 413)."""
    import asyncio

    from starlette.requests import Request

    from vlmkit.serve.protocol import APIError, CompletionRequest
    from vlmkit.serve.server import read_body

    app = create_app(
        NoModel(), ScriptedEngine("ok"), model_name="m", config=ServerConfig(max_body_bytes=1_000_000)
    )
    received = []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b" " * 65536, "more_body": len(received) < 1000}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "app": app}
    with pytest.raises(APIError) as e:
        asyncio.run(read_body(Request(scope, receive), CompletionRequest))
    assert e.value.status == 413 and "limit of 1000000 bytes" in e.value.message
    assert len(received) == 16  # 16 x 64 KB passes 1 MB: nothing after that was read


def test_the_chat_session_survives_a_folder_or_a_bad_prompt_as_an_image(demo):
    from vlmkit.cli import chat_loop

    lines = ["/image /tmp", "hello", "/prompt [1, 2]", "/image /nonexistent.png", "hello", "/quit"]
    out = io.StringIO()
    chat_loop(demo, {"max_new_tokens": 3}, io.StringIO("\n".join(lines) + "\n"), out)
    text = out.getvalue()
    assert text.count("error:") == 2 and text.rstrip().endswith(">")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"text_config": {"rms_norm_eps": "tiny"}}, "rms_norm_eps must be a finite number > 0, got 'tiny'"),
        (
            {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": float("nan")}}},
            "rope_theta must be a finite number > 0",
        ),
        ({"vision_config": {"layer_norm_eps": -1}}, "layer_norm_eps must be a finite number > 0"),
        ({"text_config": []}, "'text_config' must be an object of settings"),
        ({"vision_config": None}, "'vision_config' must be an object of settings"),
    ],
)
def test_configs_that_mislead_are_refused_by_name(tmp_path, change, message):
    import shutil

    from vlmkit.models import builtin_model

    folder = tmp_path / "m"
    shutil.copytree(builtin_model("demo"), folder)
    config = json.loads((folder / "config.json").read_text())
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(message)):
        vlmkit.load_model(folder)


def test_abandoned_non_streaming_requests_free_their_rows(demo):
    """Clients that close their sockets mid-answer: their rows are freed within a second, although tokens
    keep coming (the first review saw 16 such requests run for 16 s)."""
    import socket

    from test_serve import Live

    live = Live(demo, name="demo", engine_kw={"max_seq_len": 2048})
    try:
        eos = demo.tokenizer.eos_token_id
        ask = {"prompt": "Describe the picture.", "max_tokens": 1500, "logit_bias": {str(eos): -100}}
        body = json.dumps(ask).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sockets = [socket.create_connection(("127.0.0.1", live.port)) for _ in range(4)]
        for s in sockets:
            s.sendall(head.encode() + body)
        deadline = time.monotonic() + 10
        while live.engine.running < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live.engine.running == 4
        for s in sockets:
            s.close()
        closed = time.monotonic()
        while live.engine.running and time.monotonic() - closed < 10:
            time.sleep(0.05)
        assert live.engine.running == 0 and time.monotonic() - closed < 2
    finally:
        live.close()


@pytest.mark.parametrize("name", ["demo", "demo-idefics"])
def test_a_config_deeper_than_its_weights_fails_before_the_model_is_built(tmp_path, name):
    import shutil

    from vlmkit.models import builtin_model

    folder = tmp_path / "m"
    shutil.copytree(builtin_model(name), folder)
    config = json.loads((folder / "config.json").read_text())
    (config.get("text_config") or config)["num_hidden_layers"] = 100_000
    (folder / "config.json").write_text(json.dumps(config))
    started = time.monotonic()
    with pytest.raises(ValueError, match="asks for 100000 decoder layers but the weights hold 4"):
        vlmkit.load_model(folder)
    assert time.monotonic() - started < 5  # the first review saw 150 s and 4.4 GB before the error


def test_streams_outlasting_the_drain_end_with_an_error_event_and_no_traceback(demo, tmp_path):
    """SIGTERM while streams run longer than --drain-seconds: each stream ends with an OpenAI error event
    (503) before uvicorn would cancel it, the log holds no CancelledError traceback, and the process exits.
    (The first review saw streams cut off with no error event, and CancelledError tracebacks.)"""
    import os
    import signal
    import threading

    import httpx
    from test_serve import free_port

    from vlmkit.serve.launch import start_serve

    port, log_file = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    serve_args = ["--drain-seconds", "2", "--max-seq-len", "2048"]
    proc = start_serve(serve_args, port=port, log=log_file, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        eos = demo.tokenizer.eos_token_id
        ask = {"prompt": "Describe it.", "max_tokens": 1900, "logit_bias": {str(eos): -100}, "stream": True}
        streams: list[list[str]] = [[], []]
        started = threading.Barrier(3)

        def read(lines: list[str]) -> None:
            with httpx.stream("POST", base + "/v1/completions", json=ask, timeout=60) as r:
                for i, line in enumerate(r.iter_lines()):
                    if i == 0:
                        started.wait()
                    if line.startswith("data: "):
                        lines.append(line.removeprefix("data: "))

        readers = [threading.Thread(target=read, args=(lines,)) for lines in streams]
        for t in readers:
            t.start()
        started.wait(30)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for t in readers:
            t.join(30)
        ended = time.monotonic() - signalled
        proc.wait(30)
        log = log_file.read_text()
        for lines in streams:
            last = json.loads(lines[-1])
            assert last["error"]["type"] == "server_error" and "shut down" in last["error"]["message"], lines[
                -3:
            ]
        assert ended < 3, ended
        assert "Traceback" not in log and "CancelledError" not in log, log[-3000:]
        assert "ended 2 unfinished request(s)" in log
        assert proc.returncode in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_json_inside_strings_is_parsed_with_the_same_bounds(demo):
    """Found by the fuzzers: JSON that arrives inside a string (a visual prompt given as JSON text on the
    command line or to the Python API, a `guided_json` schema sent as a string) was parsed unbounded, so deep
    nesting raised RecursionError (a 500 in the server)."""
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ValueError, match="nested more than 64 levels"):
        draw_visual_prompts(Image.new("RGB", (10, 10)), deep)
    body = {"prompt": "hi", "max_tokens": 2, "guided_json": deep}
    r = client(demo).post("/v1/completions", json=body)
    assert r.status_code == 400 and "nested more than 64 levels" in r.json()["error"]["message"], r.text


def test_extreme_sampling_settings_answer_and_never_break_the_engine(demo):
    """Found by the fuzzers: temperature 1e-300 (0 in float32) or repetition_penalty 1e-300 made the
    sampler's probabilities NaN (or a NaN won a greedy argmax); the exception killed the engine thread, every later request hung, and
    /health said 503 for good. Such settings now sample from the limit of their distribution."""
    from test_serve import Live

    live = Live(demo, name="demo")
    try:
        greedy = live.client.completions.create(
            model="demo", prompt="Describe it.", max_tokens=6, temperature=0
        )
        extremes = [{"temperature": 1e-300}, {"temperature": 1e-40}, {"repetition_penalty": 1e-300}]
        # 0 in float32: a masked token the prompt holds became -inf * 0 = NaN, which won the greedy argmax
        # and broke the grammar (schemathesis, 10k campaign)
        extremes.append({"repetition_penalty": 5e-324, "temperature": 0, "guided_choice": ["\x8c\xed\x1e"]})
        for extreme in extremes:
            r = httpx_post(live.url, {"prompt": "Describe it.", "max_tokens": 6, "seed": 1, **extreme})
            assert r.status_code == 200, (extreme, r.text)
            if "temperature" in extreme and "guided_choice" not in extreme:  # vanishing temperature: greedy
                assert r.json()["choices"][0]["text"] == greedy.choices[0].text
        assert live.engine.error is None
    finally:
        live.close()


def test_a_request_whose_token_choice_fails_ends_alone(demo, monkeypatch):
    """Whatever goes wrong while choosing one request's token ends that request with an error; the rows
    beside it in the batch finish, and the engine keeps serving."""
    import threading

    import vlmkit.serve.engine as engine_module
    from vlmkit.serve.engine import Engine, Request, SamplingParams

    real_take = engine_module.take

    def take(row, logits, end, token=None):
        if row.request.id == "doomed" and row.generated == 3:
            raise RuntimeError("a bug in one row's sampling")
        real_take(row, logits, end, token)

    monkeypatch.setattr(engine_module, "take", take)
    engine = Engine(demo.model, demo.tokenizer, max_batch=4, max_seq_len=256).start()
    try:
        events: dict[str, list] = {"doomed": [], "fine": []}
        done = {name: threading.Event() for name in events}
        for name in events:
            engine.submit(
                Request(
                    inputs=demo.inputs("Describe it."),
                    params=SamplingParams(max_tokens=12, n=2 if name == "doomed" else 1),
                    emit=lambda ev, name=name: (
                        events[name].append(ev),
                        ev.finish_reason and done[name].set(),
                    ),
                    id=name,
                )
            )
        assert done["doomed"].wait(30) and done["fine"].wait(30)
        ends = [ev for ev in events["doomed"] if ev.finish_reason]
        assert sorted(ev.index for ev in ends) == [0, 1] and {ev.finish_reason for ev in ends} == {"error"}
        assert "a bug in one row's sampling" in str(ends[0].error)
        assert [ev.finish_reason for ev in events["fine"] if ev.finish_reason] in (["length"], ["stop"])
        assert "".join(ev.text for ev in events["fine"]).strip()
        assert engine.error is None
        assert engine.scheduler.running == 0 or wait_until(lambda: engine.scheduler.running == 0)
    finally:
        engine.stop(10)


def httpx_post(url: str, body: dict):
    import httpx

    return httpx.post(url + "/v1/completions", json=body, timeout=60)


def test_each_step_of_a_request_is_bounded_by_its_deadline():
    """Picture decoding, drawing and tokenization run in the worker pool within the request's own deadline:
    a step that outlasts it is a 408 at the deadline, and the server answers /health meanwhile."""
    import threading

    import httpx
    import uvicorn
    from test_serve import NoModel, free_port

    class SlowProcessor(NoModel):
        def inputs(self, prompt: str) -> dict:
            time.sleep(3)  # a huge picture, a pathological prompt: CPU work that takes long
            return {"prompt": prompt}

    app = create_app(
        SlowProcessor(), ScriptedEngine("ok"), model_name="m", config=ServerConfig(request_timeout=0.5)
    )
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port}"
    try:
        health: list[float] = []

        def poll() -> None:
            started = time.monotonic()
            assert httpx.get(url + "/health").status_code == 200
            health.append(time.monotonic() - started)

        threading.Timer(0.2, poll).start()
        started = time.monotonic()
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        took = time.monotonic() - started
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error", r.text
        assert "deadline" in r.json()["error"]["message"] and took < 1.5, took
        time.sleep(0.3)
        assert len(health) == 1 and health[0] < 1
    finally:
        server.should_exit = True


def test_idefics_chat_text_that_looks_like_a_url_stays_text(tmp_path):
    """Found by the atheris chat-template target: in an IDEFICS chat, rendered text without spaces that
    parsed as a URL (a message "//cat.png" renders as "User://cat.png...") was taken for a picture to
    fetch: a FileNotFoundError, a 500 in the server. And an image part given as a file path was taken for
    text."""
    vlm = vlmkit.VLM.load("demo-idefics")
    url_only = [{"role": "user", "content": "http://example.com/cat.png"}]
    out = vlm.chat_inputs(url_only)
    assert int((out["input_ids"] == vlm.processor.image_token_id).sum()) == 0
    assert "http://example.com/cat.png" in vlm.processor.decode(out["input_ids"][0])
    odd = [{"role": "user", "content": "//cat.png"}]  # rendered "User://cat.png<end_of_utterance>...": a URL
    assert int((vlm.chat_inputs(odd)["input_ids"] == vlm.processor.image_token_id).sum()) == 0
    path = tmp_path / "picture.png"
    Image.new("RGB", (30, 20), "red").save(path)
    parts = [
        {"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "hi"}]}
    ]
    out = vlm.chat_inputs(parts)
    assert int((out["input_ids"] == vlm.processor.image_token_id).sum()) == 1
    assert float(out["pixel_values"].abs().sum()) > 0

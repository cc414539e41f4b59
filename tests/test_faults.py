"""Faults: a server SIGKILLed mid-stream and restarted on its port answers as before; a checkpoint write that
fails (a full disk) leaves the previous checkpoint whole and says so in one line; a short run of the soak
(benchmarks/soak.py) passes, and its reconciliation of /metrics with the clients' tally catches a mismatch."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from test_finetune import write_dataset
from test_serve import data_uri, free_port

import vlmkit
from vlmkit import weights
from vlmkit.cli import main as cli_main
from vlmkit.serve.launch import ServerStartError, start_serve
from vlmkit.train.checkpoints import CheckpointWriteError
from vlmkit.train.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
EXAMPLES = ROOT / "vlmkit" / "demo" / "examples"


# -- SIGKILL and restart ------------------------------------------------------------------------


def start_server(port: int, log: Path) -> subprocess.Popen:
    return start_serve(["--max-seq-len", "2048"], port=port, log=log, env=ENV, append=True)


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    """start_serve, which the soak, the fuzz campaign and these tests start servers with, says why a server
    exited instead of waiting out its timeout."""
    log = tmp_path / "server.log"
    started = time.monotonic()
    with pytest.raises(ServerStartError, match="exited with status 2 before it answered /health") as caught:
        start_serve(["--model", str(tmp_path / "no-such-model")], port=free_port(), log=log, env=ENV)
    assert "no-such-model" in str(caught.value) and time.monotonic() - started < 60
    port = free_port()  # not healthy in time: reported, and the process is gone
    with pytest.raises(ServerStartError, match="did not answer /health within 0.5 s"):
        start_serve([], port=port, log=log, env=ENV, timeout=0.5)
    assert not [p for p in Path("/proc").glob("[0-9]*") if f"--port\0{port}\0".encode() in cmdline(p)]


def cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def known_question(base: str) -> str:
    """The greedy answer to the README's question about scene1 with a red rectangle drawn on it."""
    spec = {"type": "rectangle", "box": [106, 106, 182, 182], "color": "red"}
    image = {"url": data_uri(Image.open(EXAMPLES / "scene1.png")), "visual_prompts": [spec]}
    content = [
        {"type": "image_url", "image_url": image},
        {"type": "text", "text": "What shape is inside the red rectangle?"},
    ]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 16, "temperature": 0}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_sigkill_mid_stream_then_a_restart_on_the_same_port_answers_as_before(tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    base = f"http://127.0.0.1:{port}"
    proc = start_server(port, log)
    try:
        before = known_question(base)
        assert before.strip() == "star", before  # the README's answer
        ask = {"prompt": "Describe it.", "max_tokens": 1500, "logit_bias": {"2": -100}, "stream": True}
        streams = [{"chunks": 0, "done": False, "error": None, "going": threading.Event()} for _ in range(4)]

        def read(got: dict) -> None:
            try:
                with httpx.stream("POST", base + "/v1/completions", json=ask, timeout=30) as r:
                    for line in r.iter_lines():
                        got["chunks"] += line.startswith("data: ")
                        got["done"] |= line == "data: [DONE]"
                        if got["chunks"] >= 5:
                            got["going"].set()
            except httpx.TransportError as e:
                got["error"] = e

        readers = [threading.Thread(target=read, args=(got,)) for got in streams]
        for t in readers:
            t.start()
        assert all(got["going"].wait(30) for got in streams), streams  # every stream is under way
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        assert proc.wait(10) == -signal.SIGKILL
        for t in readers:
            t.join(10)
        assert not any(t.is_alive() for t in readers) and time.monotonic() - killed < 5
        for got in streams:  # each stream ends with an error at once, none with [DONE]
            assert isinstance(got["error"], httpx.RemoteProtocolError | httpx.ReadError), got
            assert not got["done"], got

        proc = start_server(port, log)  # the same port at once: no "address already in use"
        health = httpx.get(base + "/health", timeout=5).json()
        assert health["status"] == "ok" and health["running"] == 0 and health["waiting"] == 0, health
        assert known_question(base) == before
    finally:
        proc.kill()
        proc.wait()


# -- a checkpoint write that fails --------------------------------------------------------------


def no_space(path: object) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def torch_save_failing(real, *, how: str):
    """torch.save that fails on its second call the way a full disk makes it fail, after writing part of
    the file: an OSError, or torch's zip writer's RuntimeError raised while the OSError is handled."""
    calls = Counter()

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < 2:
            return real(obj, f, *args, **kwargs)
        if isinstance(f, str | os.PathLike):
            Path(f).write_bytes(b"PK\x03\x04 part of a zip")
        else:
            f.write(b"PK\x03\x04 part of a zip")
        if how == "oserror":
            raise no_space(getattr(f, "name", f))
        try:
            raise no_space(getattr(f, "name", f))
        except OSError:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
            ) from None

    return save


def safetensors_failing(real):
    """safetensors' save_file, whose full-disk error is its own kind with the OS error in its text."""
    calls = Counter()

    def save_file(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] < 2:
            return real(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(b"\x00" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    return save_file


def finetune_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    common = ["--model", "demo", "--data", str(data), "--output-dir", str(out), "--batch-size", "2"]
    return ["finetune", *common, "--max-steps", str(steps), "--save-every", "1", "--no-progress", *extra]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=4)


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole")
    assert cli_main(finetune_args(dataset, out, 3)) == 0
    return out


@pytest.mark.parametrize("how", ["oserror", "torch zip writer", "safetensors"])
def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole_and_says_why(
    how, dataset, uninterrupted, tmp_path, monkeypatch, capsys
):
    """The second of three checkpoints fails to write (ENOSPC simulated in the writer of the trainer state
    or of the weights): the run stops with one line naming that checkpoint and the cause, the first
    checkpoint is whole and loadable, nothing half-written is left, and --resume from it ends exactly as a
    run that never failed."""
    out = tmp_path / "run"
    capsys.readouterr()
    with monkeypatch.context() as m:
        if how == "safetensors":
            m.setattr(weights, "save_file", safetensors_failing(weights.save_file))
        else:
            m.setattr(torch, "save", torch_save_failing(torch.save, how=how))
        assert cli_main(finetune_args(dataset, out, 3)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert (
        f"could not write checkpoint {out / 'checkpoint-2'}: " in err and "No space left on device" in err
    ), err

    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-1", "metrics.jsonl"]  # no temporary folders
    first = out / "checkpoint-1"
    assert sorted(p.name for p in first.iterdir()) == sorted(
        p.name for p in (uninterrupted / "checkpoint-1").iterdir()
    )
    vlmkit.load_model(first)
    assert torch.load(first / "trainer_state.pt", weights_only=True)["step"] == 1
    assert cli_main(finetune_args(dataset, out, 3, "--resume")) == 0
    a = load_file(str(uninterrupted / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_python_api_raises_the_error_with_its_errno(dataset, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", torch_save_failing(torch.save, how="torch zip writer"))
    config = FinetuneConfig(
        data=str(dataset),
        output_dir=str(tmp_path),
        model="demo",
        max_steps=2,
        save_every=1,
        batch_size=2,
        progress=False,
    )
    with pytest.raises(CheckpointWriteError, match="No space left on device") as e:
        finetune(config)
    assert e.value.errno == errno.ENOSPC and e.value.folder == tmp_path / "checkpoint-2"
    assert (tmp_path / "checkpoint-1" / "trainer_state.pt").is_file()


# -- the soak -----------------------------------------------------------------------------------


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_short_soak_passes(tmp_path):
    """20 s of the soak's traffic (about 2000 requests on 2 cores): exit status 0, no 5xx, /metrics
    reconciled with the clients' tally, /health fast throughout."""
    report = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--duration", "20", "--warmup", "8"]
    cmd += ["--log", str(tmp_path / "server.log")]
    run = subprocess.run([*cmd, "--json", str(report)], env=ENV, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    r = json.loads(report.read_text())
    assert r["reconciled"] and r["failures"] == [], r["failures"]
    assert not any(s.startswith("5") for c in r["server_statuses"].values() for s in c), r["server_statuses"]
    assert r["health"]["worst_s"] < 1.0 and r["server_log_tracebacks"] == 0
    for kind in ("chat_picture", "stream_chat", "cancelled_stream", "abandoned", "oversized", "bad_json"):
        assert r["requests"].get(kind, 0) > 0, r["requests"]


def test_the_soak_reconciliation_counts_abandoned_requests_and_catches_a_mismatch():
    soak = load_soak()
    route = "/v1/completions"
    clients = {route: Counter({"200": 10, "400": 2, soak.ABANDONED: 3})}
    for server, as_499 in (
        (Counter({"200": 10, "400": 2, "499": 3}), 3),
        (Counter({"200": 12, "400": 2, "499": 1}), 1),
    ):
        problems, abandoned = soak.reconcile(clients, {route: server})
        assert problems == [] and abandoned == {
            route: {"sent": 3, "server_499": as_499, "server_200": 3 - as_499}
        }
    for server in (
        {route: Counter({"200": 10, "400": 2, "499": 2})},  # an abandoned request the server never counted
        {route: Counter({"200": 10, "400": 2, "499": 2, "500": 1})},  # ... or counted as a 500
        {route: Counter({"200": 9, "400": 2, "499": 4})},  # a 200 the client saw, counted as a 499
        {route: Counter({"200": 10, "400": 3, "499": 3})},  # one 400 too many
        {route: Counter({"200": 10, "400": 2, "499": 3}), "/v1/models": Counter({"200": 1})},  # a route more
    ):
        assert soak.reconcile(clients, server)[0], server


def test_a_client_that_closes_mid_body_is_counted_as_499_without_a_traceback(tmp_path):
    """A request whose socket closes before its body is complete is counted as a 499 (client went away),
    not an unexpected 500 with a logged traceback (found by the soak)."""
    port, log = free_port(), tmp_path / "server.log"
    proc = start_server(port, log)
    try:
        body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(head.encode() + body[:5])
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        text = ""
        while "/v1/completions" not in text and time.monotonic() < deadline:
            text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
            time.sleep(0.1)
        assert 'vlmkit_requests_total{route="/v1/completions",status="499"} 1.0' in text, text
        assert "Traceback" not in log.read_text()
    finally:
        proc.kill()
        proc.wait()

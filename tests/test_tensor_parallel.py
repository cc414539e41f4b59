"""Tensor parallelism on the CPU with gloo: every registered family split over 2 processes gives what it
gives in one (logits within 1e-4, greedy, beam and seeded-sampling tokens identical, on a left-padded batch
with pictures), each process holds its share of the weights, the server and `generate` run split, and wrong
process counts fail before anything is read."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from checkpoints import build_llava_checkpoint
from families import CHECKPOINTS, registered
from test_quant import IDEFICS_80B
from test_serve import data_uri, free_port
from tp_worker import checks, picture

import vlmkit
from vlmkit.cli import main as cli_main
from vlmkit.plan import memory_plan
from vlmkit.serve.launch import start_serve

TOL = 1e-4
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
WORKER = str(Path(__file__).parent / "tp_worker.py")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    """The tiny checkpoint of every registered family, and a LLaVA with grouped-query attention."""
    out = []
    for key in registered():
        folder = tmp_path_factory.mktemp("-".join(key))
        CHECKPOINTS[key].build(folder)
        out.append(folder)
    gqa = tmp_path_factory.mktemp("llava-gqa")
    build_llava_checkpoint(gqa, text={"num_key_value_heads": 2})
    return [*out, gqa]


def test_two_processes_equal_one(folders, tmp_path):
    out = tmp_path / "two.pt"
    done = subprocess.run(
        [*TORCHRUN, WORKER, str(out), *map(str, folders)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    split = torch.load(out)
    for folder in folders:
        one = checks(vlmkit.VLM.load(folder, dtype=torch.float32))
        two = split[str(folder)]
        assert (one["logits"] - two["logits"]).abs().max() < TOL, folder.name
        for key in ("greedy", "beams", "sampled"):
            assert torch.equal(one[key], two[key]), (folder.name, key, one[key], two[key])
        # each process holds exactly its planned share: half of every split tensor, the rest whole
        whole = memory_plan(folder, dtype="float32").weight_bytes
        share = memory_plan(folder, dtype="float32", tp=2).weight_bytes
        assert two["rank_bytes"].tolist() == [share, share], folder.name
        language = sum(
            p.numel() * 4 for n, p in vlmkit.load_model(folder).named_parameters() if "language_model" in n
        )
        if language:  # LLaVA: the language model's half is gone from each process
            assert share < whole - language // 2 + 4096


def test_wrong_process_counts_fail_before_any_loading(tmp_path):
    """Only config.json is there: the errors come from the head counts, not from a missing file."""
    folder, *_ = build_llava_checkpoint(tmp_path / "m")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ValueError, match=r"4 heads .* cannot be split evenly over tp=3 .* \[1, 2, 4\]"):
        vlmkit.load_model(folder, tp=3)
    with pytest.raises(ValueError, match="tp=8 is larger than the model's 4 heads"):
        vlmkit.load_model(folder, tp=8)
    with pytest.raises(ValueError, match="tp must be >= 1"):
        vlmkit.load_model(folder, tp=0)
    with pytest.raises(RuntimeError, match="torchrun --nproc-per-node 2"):
        vlmkit.load_model(folder, tp=2)  # no process group, no torchrun
    with pytest.raises(ValueError, match="cannot be split evenly over tp=3"):
        memory_plan(folder, tp=3)


def test_memory_plan_per_process_shows_80b_over_four_gpus(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(IDEFICS_80B))
    whole = memory_plan(tmp_path, length=2048)
    four = memory_plan(tmp_path, length=2048, tp=4)
    assert whole.total_bytes > 80e9 > four.total_bytes  # bf16: too big for one 80 GB GPU, fits on 4
    assert four.kv_cache_bytes * 4 == whole.kv_cache_bytes
    vision = whole.parts["model.vision_model"] + whole.parts["model.perceiver_resampler"]
    assert four.weight_bytes < whole.weight_bytes / 4 + vision  # all but the replicated parts split
    with pytest.raises(ValueError, match="quantized"):
        memory_plan(tmp_path, tp=4, quantize="int4")
    assert cli_main(["info", str(tmp_path), "--tp", "4", "--length", "2048", "--device-memory", "80"]) == 0
    shown = capsys.readouterr().out
    assert "per process of tp=4" in shown and "on 4 x 80 GB: fits" in shown
    assert cli_main(["info", str(tmp_path), "--length", "2048", "--device-memory", "80"]) == 0
    assert "on 80 GB: does not fit" in capsys.readouterr().out


def ask(base: str) -> list[str]:
    """A picture question twice (the second from the prefix and feature caches), a text one, and two at once."""
    pic = data_uri(picture(3, (40, 52)))
    chat = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": pic}},
                    {"type": "text", "text": "What is in this picture? Say it in a long sentence."},
                ],
            }
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    text = {"prompt": "a few words to go on with", "max_tokens": 8, "temperature": 0, "n": 2}
    sampled = {**text, "temperature": 1.0, "seed": 11}
    out = []
    for body, path in ((chat, "chat/completions"), (chat, "chat/completions"), (text, "completions")):
        reply = httpx.post(f"{base}/v1/{path}", json=body, timeout=120).json()
        out += [c.get("message", {}).get("content") or c.get("text") for c in reply["choices"]]
    reply = httpx.post(f"{base}/v1/completions", json=sampled, timeout=120).json()
    return out + [c["text"] for c in reply["choices"]]


def test_split_server_and_generate_equal_one_process(folders, tmp_path):
    folder = folders[0]
    answers = {}
    for name, launcher in (("one", [sys.executable, "-m", "vlmkit"]), ("two", [*TORCHRUN, "-m", "vlmkit"])):
        port, log = free_port(), tmp_path / f"serve-{name}.log"
        tp = ["--tp", "2"] if name == "two" else []
        serve_args = ["--model", str(folder), "--dtype", "float32", *tp]
        proc = start_serve(serve_args, port=port, log=log, launcher=launcher, env=ENV, new_session=True)
        try:
            answers[name] = ask(f"http://127.0.0.1:{port}")
            # as a terminal's Ctrl-C or a supervisor reaches every process: rank 0 drains, then releases rank 1
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
            text = log.read_text()
            assert "Application shutdown complete" in text, text[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert answers["one"] == answers["two"]
    assert answers["one"][0] == answers["one"][1] and all(answers["one"])
    generate = [
        "generate",
        "Describe it.",
        "--model",
        str(folder),
        "--dtype",
        "float32",
        "--max-new-tokens",
        "6",
    ]
    runs = [
        subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
        for cmd in (
            [sys.executable, "-m", "vlmkit", *generate],
            [*TORCHRUN, "-m", "vlmkit", *generate, "--tp", "2"],
        )
    ]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr[-3000:]
    assert runs[0].stdout == runs[1].stdout != ""  # printed once, by rank 0

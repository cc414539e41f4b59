"""The `vlmkit` command line: generate (with visual prompts), chat, info, convert, and its errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from checkpoints import build_llava_checkpoint
from PIL import Image

import vlmkit
import vlmkit.cli
from vlmkit.cli import bench_command, chat_loop, convert_command, generate_command, info_command, main
from vlmkit.visual_prompts import draw_visual_prompts

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
BOX = '{"type": "rectangle", "box": [4, 4, 28, 28], "color": "red"}'


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder, _, _ = build_llava_checkpoint(tmp_path_factory.mktemp("m"))
    image = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(image)
    return folder, image


def test_generate_draws_the_visual_prompt_and_answers(checkpoint):
    folder, image = checkpoint
    answer = generate_command(
        "What is inside the red box?",
        str(folder),
        images=[str(image)],
        visual_prompts=[BOX],
        max_new_tokens=6,
    )
    vlm = vlmkit.VLM.load(folder)
    drawn = draw_visual_prompts(Image.open(image), BOX)

    def turn(picture):
        content = [
            {"type": "image", "image": picture},
            {"type": "text", "text": "What is inside the red box?"},
        ]
        return [{"role": "user", "content": content}]

    assert answer == vlm.chat(turn(drawn), max_new_tokens=6)  # through the chat template
    assert answer != vlm.chat(turn(Image.open(image)), max_new_tokens=6)
    raw = generate_command(
        "<image>\nWhat is inside?", str(folder), images=[str(image)], raw=True, max_new_tokens=6
    )
    assert raw == vlm.generate("<image>\nWhat is inside?", images=[Image.open(image)], max_new_tokens=6)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vlmkit.cli",
            "generate",
            "--model",
            str(folder),
            "--image",
            str(image),
            "--visual-prompt",
            BOX,
            "--max-new-tokens",
            "6",
            "What is inside the red box?",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.rstrip("\n") == answer.strip()


def test_chat_streams_and_keeps_the_conversation(checkpoint):
    folder, image = checkpoint
    vlm = vlmkit.VLM.load(folder)
    stdin = io.StringIO(
        f"/image {image}\n/prompt {BOX}\nWhat shape?\nAnd now?\n/image /no/such.png\nhi\n/quit\n"
    )
    stdout = io.StringIO()
    chat_loop(vlm, {"max_new_tokens": 4}, stdin, stdout)
    text = stdout.getvalue()
    drawn = draw_visual_prompts(Image.open(image), BOX)
    first = vlm.chat(
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": drawn}, {"type": "text", "text": "What shape?"}],
            }
        ],
        max_new_tokens=4,
    )
    assert text.startswith(
        f"> > > {first}\n> "
    )  # a prompt after each line; /image and /prompt answer nothing
    assert "error:" in text and "no/such.png" in text  # a bad image is reported, the chat goes on
    assert text.count("> ") == 7


def test_info_and_convert(checkpoint, tmp_path):
    folder, image = checkpoint
    info = info_command(str(folder))
    assert info["model_type"] == "llava" and info["dtype"] == "float32"
    assert info["parameters"] == sum(info["parts"].values()) and "tokenizer.json" in info["files"]
    out = convert_command(str(folder), str(tmp_path / "bf16"), dtype="bfloat16")
    model = vlmkit.load_model(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert vlmkit.load_processor(out) is not None
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"


def test_errors_are_one_line_with_a_non_zero_exit(checkpoint, capsys):
    folder, _ = checkpoint
    assert main(["generate", "--model", str(folder), "--image", "/no/such.png", "hi"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vlmkit generate: error:" in err and "/no/such.png" in err
    assert main(["generate", "--model", str(folder), "--visual-prompt", '{"type": "blob"}', "hi"]) == 2
    assert "needs an --image" in capsys.readouterr().err
    assert main(["info", "/no/such/folder"]) == 2
    with pytest.raises(FileNotFoundError):
        main(["--debug", "info", "/no/such/folder"])


def test_bench_reports_what_it_measured(checkpoint, capsys):
    folder, image = checkpoint
    r = bench_command(str(folder), batch_size=2, new_tokens=4, image=str(image), repeats=1)
    assert r["model_type"] == "llava" and r["batch_size"] == 2 and r["new_tokens"] == 4
    assert r["prompt_tokens"] > 4 and r["ttft_s"] > 0 and r["decode_tok_s"] > 0 and r["peak_rss_gb"] > 0
    assert r["parameters"] == info_command(str(folder))["parameters"] and r["peak_cuda_gb"] is None
    assert main(["bench", "--model", str(folder), "--new-tokens", "3", "--repeats", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["new_tokens"] == 3 and out["batch_size"] == 1
    assert main(["bench", "--model", str(folder), "--new-tokens", "1"]) == 2
    assert "new_tokens >= 2" in capsys.readouterr().err


def test_serve_flags_are_the_config_fields(monkeypatch):
    """`vlmkit serve` builds its flags from EngineConfig and ServerConfig: the same defaults, the old names."""
    import vlmkit.serve.server
    from vlmkit.serve.config import EngineConfig, ServerConfig

    calls = []
    monkeypatch.setattr(vlmkit.serve.server, "serve", lambda model, **kw: calls.append((model, kw)))
    assert main(["serve"]) == 0
    no_quantization = dict(quantize=None, group_size=None, quantize_parts=())
    assert calls[-1] == (
        "demo",
        dict(
            engine=EngineConfig(),
            server=ServerConfig(),
            dtype=None,
            device=None,
            tp=1,
            lora={},
            max_loras=4,
            **no_quantization,
        ),
    )
    flags = "--max-batch 3 --max-queue 5 --max-seq-len 99 --max-images 1 --max-image-pixels 100 --timeout 2.5"
    flags += " --max-body-bytes 1000 --feature-cache 7 --prefix-cache-mb 0 --api-key k --allow-remote-images"
    flags += " --host 0.0.0.0 --port 9 --model m --dtype bfloat16 --device cpu"
    flags += " --quantize int4 --group-size 32 --quantize-parts vision --tp 2 --lora a=/x --lora b=/y --max-loras 2"
    assert main(["serve", *flags.split()]) == 0
    engine = EngineConfig(
        max_batch=3, max_queue=5, max_seq_len=99, max_images=1, feature_cache=7, prefix_cache_mb=0
    )
    server = ServerConfig(
        host="0.0.0.0",
        port=9,
        api_key="k",
        allow_remote_images=True,
        max_body_bytes=1000,
        max_image_pixels=100,
        request_timeout=2.5,
    )
    quantization = dict(quantize="int4", group_size=32, quantize_parts=("vision",))
    assert calls[-1] == (
        "m",
        dict(
            engine=engine,
            server=server,
            dtype="bfloat16",
            device="cpu",
            tp=2,
            lora={"a": "/x", "b": "/y"},
            max_loras=2,
            **quantization,
        ),
    )


def test_sampling_flags(monkeypatch):
    from vlmkit.generation import DEFAULT_MAX_NEW_TOKENS

    calls = []
    monkeypatch.setattr(vlmkit.cli, "generate_command", lambda *a, **kw: calls.append(kw) or "")
    assert main(["generate", "hi"]) == 0
    assert calls[-1]["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS and calls[-1]["repetition_penalty"] == 1.0
    assert "do_sample" not in calls[-1]  # greedy: top-k and top-p do not apply
    assert (
        main(["generate", "hi", "--temperature", "0.7", "--top-k", "5", "--repetition-penalty", "1.3"]) == 0
    )
    got = calls[-1]
    assert (got["do_sample"], got["temperature"], got["top_k"], got["repetition_penalty"]) == (
        True,
        0.7,
        5,
        1.3,
    )

"""Fine-tuning: what trains, LoRA, kill-and-resume, two processes, bad data, merge, random init."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import build_idefics_checkpoint, build_llava_checkpoint
from PIL import Image
from safetensors.torch import load_file

import vlmkit
from vlmkit.train.finetune import FinetuneConfig, finetune, merge_lora, param_groups, select_trainable

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}


def write_dataset(folder: Path, n: int = 8, *, bad_rows: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
        rows.append(
            {
                "id": i,
                "image": name,
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat shape is it?"},
                    {"from": "gpt", "value": ["a circle", "a square", "a star", "a triangle"][i % 4]},
                ],
            }
        )
    if bad_rows:
        rows.append(
            {
                "image": "missing.png",
                "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}],
            }
        )
        rows.append({"conversations": []})
    path = folder / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    folder, hf, proc = build_llava_checkpoint(tmp_path_factory.mktemp("llava"))
    data = write_dataset(tmp_path_factory.mktemp("data"))
    return folder, data


def run(config: FinetuneConfig):
    return finetune(config)


def test_lora_lowers_the_loss_and_merges(llava, tmp_path):
    folder, _ = llava
    data = write_dataset(tmp_path / "fixed", n=4)  # one batch of 4: the same batch every step
    result = run(
        FinetuneConfig(
            data=str(data),
            output_dir=str(tmp_path / "lora"),
            model=str(folder),
            train="lora",
            max_steps=10,
            batch_size=4,
            lr=3e-2,
            lora_r=4,
            progress=False,
        )
    )
    assert result.losses[-1] < result.losses[0] * 0.85, result.losses
    final = tmp_path / "lora" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    merged = merge_lora(final, folder, tmp_path / "merged")
    model = vlmkit.load_model(merged)
    from transformers import AutoModelForImageTextToText

    ref = AutoModelForImageTextToText.from_pretrained(merged).eval()
    proc = vlmkit.load_processor(merged)
    inputs = proc(text=["USER: <image>\nWhat shape is it? ASSISTANT:"], images=[Image.new("RGB", (32, 32))])
    with torch.no_grad():
        assert (model(**inputs).logits - ref(**inputs).logits).abs().max() < 1e-4
    base = vlmkit.load_model(folder)
    with torch.no_grad():
        assert (
            model(**inputs).logits - base(**inputs).logits
        ).abs().max() > 1e-4  # the adapter did something


def test_what_trains(llava, tmp_path):
    folder, _ = llava
    model = vlmkit.load_model(folder)
    trained = {
        n
        for n, p in select_trainable(
            model, FinetuneConfig(data="", output_dir="", model="x", train="projector")
        ).named_parameters()
        if p.requires_grad
    }
    assert trained and all(n.startswith("multi_modal_projector.") for n in trained)
    idefics, _, _ = build_idefics_checkpoint(tmp_path / "idefics", additional_vocab_size=2)
    model = vlmkit.load_model(idefics)
    trained = {
        n
        for n, p in select_trainable(
            model, FinetuneConfig(data="", output_dir="", model="x", train="projector")
        ).named_parameters()
        if p.requires_grad
    }
    assert any(n.startswith("model.perceiver_resampler.") for n in trained)
    assert any(n.startswith("model.gated_cross_attn_layers.") for n in trained)
    assert (
        "model.embed_tokens.additional_embedding.weight" in trained
        and "lm_head.additional_fc.weight" in trained
    )
    assert not any(n.startswith(("model.layers.", "model.vision_model.")) for n in trained)


def test_gradient_checkpointing_gives_the_same_steps(llava, tmp_path):
    folder, data = llava
    runs = [
        run(
            FinetuneConfig(
                data=str(data),
                output_dir=str(tmp_path / f"gc{gc}"),
                model=str(folder),
                train="full",
                max_steps=3,
                batch_size=2,
                lr=1e-3,
                gradient_checkpointing=gc,
                progress=False,
            )
        )
        for gc in (False, True)
    ]
    assert np.allclose(runs[0].losses, runs[1].losses, atol=1e-6)


def final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "final" / "model.safetensors"))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlmkit.cli", "finetune", *args, "--no-progress"]


def test_kill_and_resume_equals_an_uninterrupted_run(llava, tmp_path):
    folder, data = llava
    args = [
        "--data",
        str(data),
        "--model",
        str(folder),
        "--train",
        "full",
        "--max-steps",
        "30",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "3",
        "--save-every",
        "2",
    ]
    subprocess.run(
        cli(*args, "--output-dir", str(tmp_path / "whole")), check=True, env=ENV, capture_output=True
    )
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        cli(*args, "--output-dir", str(out)), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (out / "checkpoint-4").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    subprocess.run(cli(*args, "--output-dir", str(out), "--resume"), check=True, env=ENV, capture_output=True)
    a, b = final_weights(tmp_path / "whole"), final_weights(out)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0
    whole = [json.loads(x)["loss"] for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    resumed = {
        json.loads(x)["step"]: json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()
    }
    assert [resumed[s] for s in range(1, 31)] == whole


def test_two_gloo_processes_equal_one(llava, tmp_path):
    folder, data = llava
    common = [
        "--data",
        str(data),
        "--model",
        str(folder),
        "--train",
        "full",
        "--max-steps",
        "3",
        "--lr",
        "1e-3",
    ]
    subprocess.run(
        cli(*common, "--batch-size", "4", "--output-dir", str(tmp_path / "one")),
        check=True,
        env=ENV,
        capture_output=True,
    )
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "vlmkit.cli",
        "finetune",
        *common,
        "--batch-size",
        "2",
        "--output-dir",
        str(tmp_path / "two"),
        "--no-progress",
    ]
    done = subprocess.run(torchrun, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    one = [json.loads(x)["loss"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 3
    assert np.allclose(one, two, atol=1e-4), (one, two)
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_bad_rows_are_skipped_or_stop_the_run(llava, tmp_path):
    folder, _ = llava
    data = write_dataset(tmp_path / "bad", n=4, bad_rows=True)
    result = run(
        FinetuneConfig(
            data=str(data), output_dir=str(tmp_path / "skip"), model=str(folder), max_steps=1, progress=False
        )
    )
    assert "kept 4 of 6" in result.data_summary and "missing image" in result.data_summary
    with pytest.raises(ValueError, match="row 5"):
        run(
            FinetuneConfig(
                data=str(data),
                output_dir=str(tmp_path / "error"),
                model=str(folder),
                max_steps=1,
                on_bad_sample="error",
                progress=False,
            )
        )
    assert not (tmp_path / "error" / "metrics.jsonl").exists()  # stopped before the first step


def test_idefics_and_random_init(tmp_path):
    folder, _, _ = build_idefics_checkpoint(tmp_path / "idefics", additional_vocab_size=2)
    data = write_dataset(tmp_path / "data", n=4)
    result = run(
        FinetuneConfig(
            data=str(data),
            output_dir=str(tmp_path / "out"),
            model=str(folder),
            max_steps=4,
            batch_size=2,
            lr=5e-3,
            progress=False,
        )
    )
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    scratch = run(
        FinetuneConfig(
            data=str(data),
            output_dir=str(tmp_path / "scratch"),
            init_config=str(folder / "config.json"),
            processor=str(folder),
            train="full",
            max_steps=6,
            batch_size=4,
            lr=1e-2,
            progress=False,
        )
    )
    assert scratch.losses[-1] < scratch.losses[0]
    model = vlmkit.load_model(tmp_path / "scratch" / "final")
    assert isinstance(model, vlmkit.idefics.IdeficsModel)
    shutil.rmtree(tmp_path / "scratch")


def test_config_errors():
    with pytest.raises(ValueError, match="exactly one of model"):
        FinetuneConfig(data="d", output_dir="o").validate()
    with pytest.raises(ValueError, match="train must be one of"):
        FinetuneConfig(data="d", output_dir="o", model="m", train="half").validate()
    with pytest.raises(ValueError, match="on_bad_sample"):
        FinetuneConfig(data="d", output_dir="o", model="m", on_bad_sample="ignore").validate()


def test_accumulation_equals_a_bigger_batch_and_eval_is_logged(llava, tmp_path):
    folder, data = llava
    big = run(
        FinetuneConfig(
            data=str(data),
            output_dir=str(tmp_path / "big"),
            model=str(folder),
            train="full",
            max_steps=2,
            batch_size=4,
            lr=1e-3,
            progress=False,
        )
    )
    accum = run(
        FinetuneConfig(
            data=str(data),
            output_dir=str(tmp_path / "accum"),
            model=str(folder),
            train="full",
            max_steps=2,
            batch_size=2,
            grad_accum=2,
            lr=1e-3,
            eval_data=str(data),
            eval_every=1,
            progress=False,
        )
    )
    assert np.allclose(big.losses, accum.losses, atol=1e-5)
    records = [json.loads(x) for x in (tmp_path / "accum" / "metrics.jsonl").read_text().splitlines()]
    assert all("eval_loss" in r and np.isfinite(r["eval_loss"]) and r["tokens_per_s"] > 0 for r in records)


def test_vision_lr_sets_the_towers_own_rate(llava, tmp_path):
    folder, data = llava
    model = vlmkit.load_model(folder)
    config = FinetuneConfig(data="", output_dir="", model="x", train="full", lr=1e-3, vision_lr=1e-4)
    groups = param_groups(select_trainable(model, config), config)
    tower = {id(p) for p in model.vision_tower.parameters()}
    assert [len(g["params"]) for g in groups] == [
        sum(1 for p in model.parameters() if id(p) not in tower),
        len(tower),
    ]
    assert groups[1]["lr"] == 1e-4 and all(id(p) in tower for p in groups[1]["params"])
    frozen = FinetuneConfig(data="", output_dir="", model="x", train="full", vision_lr=0.0)
    groups = param_groups(select_trainable(model, frozen), frozen)
    assert len(groups) == 1 and not any(p.requires_grad for p in model.vision_tower.parameters())
    run(
        FinetuneConfig(
            data=str(data),
            output_dir=str(tmp_path / "run"),
            model=str(folder),
            train="full",
            max_steps=2,
            batch_size=2,
            lr=1e-2,
            vision_lr=0.0,
            progress=False,
        )
    )
    after = vlmkit.load_model(tmp_path / "run" / "final").state_dict()
    before = vlmkit.load_model(folder).state_dict()
    moved = {k for k in after if not torch.equal(after[k], before[k])}
    assert moved and not any(k.startswith("vision_tower.") for k in moved)
    assert any(k.startswith("multi_modal_projector.") for k in moved)
    with pytest.raises(ValueError, match="vision_lr"):
        FinetuneConfig(data="", output_dir="", model="x", vision_lr=-1.0).validate()
    with pytest.raises(ValueError, match="no vision-tower parameter"):
        projector = FinetuneConfig(data="", output_dir="", model="x", train="projector", vision_lr=1e-4)
        param_groups(select_trainable(vlmkit.load_model(folder), projector), projector)

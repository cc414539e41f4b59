"""FSDP2 fine-tuning: one process equals two, sharded checkpoints that survive a kill and resume on another
number of processes, the exported checkpoint against transformers, LoRA, IDEFICS's sharded units."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import test_finetune
import torch
import torch.distributed as dist
from checkpoints import build_idefics_checkpoint
from PIL import Image
from safetensors.torch import load_file
from test_finetune import ENV, cli, final_weights, write_dataset

import vlmkit
from vlmkit.cli import main as cli_main
from vlmkit.train import fsdp
from vlmkit.train.checkpoints import CheckpointWriteError, latest_checkpoint
from vlmkit.train.finetune import FinetuneConfig, finetune, merge_lora
from vlmkit.train.fsdp import check_same_parts_run, export_checkpoint, shard_units

llava = test_finetune.llava  # the fixture: a tiny LLaVA checkpoint and 8 rows of data
TIMEOUT = 300  # seconds for one training command; they take a few


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run(
        [*command, "-m", "vlmkit.cli", "finetune", *args, "--no-progress"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def one_process(*args: str) -> None:
    done = subprocess.run(cli(*args), env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(output_dir: Path, metric: str = "loss") -> list[float]:
    """The loss (or another metric) of every step in metrics.jsonl, in step order (a resumed run logs its
    steps again: the last line of a step counts)."""
    by_step = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        by_step[record["step"]] = record[metric]
    return [by_step[s] for s in sorted(by_step)]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def resume_from(checkpoint: Path, output_dir: Path) -> Path:
    """An output folder holding only `checkpoint`, for a run to resume from."""
    output_dir.mkdir(parents=True)
    shutil.copytree(checkpoint, output_dir / checkpoint.name)
    return output_dir


STEPS = 12


@pytest.fixture(scope="module")
def runs(llava, tmp_path_factory):
    """The same 12 steps (global batch 4, a checkpoint every 2) with --fsdp on one process and on two."""
    folder, data = llava
    root = tmp_path_factory.mktemp("fsdp")
    args = [
        *("--data", str(data), "--model", str(folder), "--train", "full", "--lr", "1e-3"),
        *("--max-steps", str(STEPS), "--save-every", "2", "--warmup-steps", "2", "--fsdp"),
    ]
    one_process(*args, "--batch-size", "4", "--output-dir", str(root / "one"))
    torchrun(*args, "--batch-size", "2", "--output-dir", str(root / "two"))
    return SimpleNamespace(args=args, one=root / "one", two=root / "two", folder=folder, data=data)


def test_two_processes_equal_one_and_the_export_loads_in_transformers(runs, tmp_path):
    assert len(losses(runs.one)) == STEPS
    assert np.allclose(losses(runs.one), losses(runs.two), atol=1e-4), (losses(runs.one), losses(runs.two))
    # clipping is at work, on the norm of the whole model's gradient (not of one process's shards)
    norms = [losses(out, "grad_norm") for out in (runs.one, runs.two)]
    assert min(norms[0]) > 1.0 and np.allclose(norms[0], norms[1], rtol=1e-4), norms
    assert sorted(p.name for p in (runs.two / "checkpoint-2").glob("*.distcp")) == [
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    final = runs.two / "final"  # gathered from two processes' shards
    assert max_difference(final_weights(runs.one), final_weights(runs.two)) < 1e-4
    from transformers import AutoModelForImageTextToText

    ours, ref = vlmkit.load_model(final), AutoModelForImageTextToText.from_pretrained(final).eval()
    proc = vlmkit.load_processor(final)
    inputs = proc(text=["USER: <image>\nWhat shape is it? ASSISTANT:"], images=[Image.new("RGB", (32, 32))])
    with torch.no_grad():
        assert (ours(**inputs).logits - ref(**inputs).logits).abs().max() < 1e-4
        assert (ours(**inputs).logits - vlmkit.load_model(runs.folder)(**inputs).logits).abs().max() > 1e-3
    # offline, one process: the last sharded checkpoint is the final one (the function, and the command)
    exported = export_checkpoint(runs.two / f"checkpoint-{STEPS}", tmp_path / "exported")
    again = tmp_path / "again"
    assert (
        cli_main(
            [
                "export-checkpoint",
                "--checkpoint",
                str(runs.two / f"checkpoint-{STEPS}"),
                "--output-dir",
                str(again),
            ]
        )
        == 0
    )
    assert max_difference(load_file(str(again / "model.safetensors")), final_weights(runs.two)) == 0.0
    assert max_difference(load_file(str(exported / "model.safetensors")), final_weights(runs.two)) == 0.0
    assert (exported / "tokenizer.json").is_file() and (exported / "config.json").is_file()


def test_kill_and_resume_is_exact(runs, tmp_path):
    out = tmp_path / "killed"
    command = cli(*runs.args, "--batch-size", "4", "--output-dir", str(out))
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + TIMEOUT
    while not (out / "checkpoint-4").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run finished before it could be killed"
    for ckpt in out.glob("checkpoint-*"):  # whatever the kill interrupted is not one of them
        assert {"trainer_state.pt", ".metadata", "__0_0.distcp", "rng-0.pt"} <= {
            p.name for p in ckpt.iterdir()
        }
    assert latest_checkpoint(out) is not None
    one_process(*runs.args, "--batch-size", "4", "--output-dir", str(out), "--resume")
    assert max_difference(final_weights(runs.one), final_weights(out)) == 0.0
    assert losses(out) == losses(runs.one)


def test_resume_on_another_number_of_processes(runs, tmp_path):
    # two processes' checkpoint, resumed on one (in this process: a group of one)
    two_to_one = resume_from(runs.two / "checkpoint-4", tmp_path / "two_to_one")
    result = finetune(
        FinetuneConfig(
            data=str(runs.data),
            output_dir=str(two_to_one),
            model=str(runs.folder),
            train="full",
            lr=1e-3,
            max_steps=STEPS,
            save_every=2,
            warmup_steps=2,
            batch_size=4,
            fsdp=True,
            resume=True,
            progress=False,
        )
    )
    assert np.allclose(result.losses, losses(runs.one), atol=1e-4)
    assert max_difference(final_weights(runs.one), final_weights(two_to_one)) < 1e-4
    # one process's checkpoint, resumed on two
    one_to_two = resume_from(runs.one / "checkpoint-6", tmp_path / "one_to_two")
    torchrun(*runs.args, "--batch-size", "2", "--output-dir", str(one_to_two), "--resume")
    assert np.allclose(losses(one_to_two), losses(runs.one)[6:], atol=1e-4)
    assert max_difference(final_weights(runs.two), final_weights(one_to_two)) < 1e-4


def test_a_checkpoint_resumes_only_the_way_it_was_written(runs, tmp_path):
    plain = dict(data=str(runs.data), model=str(runs.folder), train="full", max_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="sharded checkpoint"):
        finetune(FinetuneConfig(output_dir=str(runs.one), resume=True, **plain))
    ddp = tmp_path / "ddp"
    finetune(FinetuneConfig(output_dir=str(ddp), **{**plain, "max_steps": 1}))
    with pytest.raises(ValueError, match="written without --fsdp"):
        finetune(FinetuneConfig(output_dir=str(ddp), resume=True, fsdp=True, **{**plain, "max_steps": 2}))


def test_lora_with_gradient_checkpointing_and_accumulation(llava, tmp_path):
    folder, data = llava
    args = [
        *("--data", str(data), "--model", str(folder), "--train", "lora", "--lora-r", "4"),
        *("--lr", "1e-2", "--max-steps", "3", "--fsdp"),
    ]
    one = finetune(
        FinetuneConfig(
            data=str(data),
            output_dir=str(tmp_path / "one"),
            model=str(folder),
            train="lora",
            lora_r=4,
            lr=1e-2,
            max_steps=3,
            batch_size=4,
            fsdp=True,
            progress=False,
        )
    )
    two = tmp_path / "two"
    torchrun(
        *args,
        *("--batch-size", "1", "--grad-accum", "2", "--gradient-checkpointing"),
        *("--eval-data", str(data), "--eval-every", "3", "--output-dir", str(two)),
    )
    assert np.allclose(one.losses, losses(two), atol=1e-4), (one.losses, losses(two))
    last = json.loads((two / "metrics.jsonl").read_text().splitlines()[-1])
    assert np.isfinite(last["eval_loss"])
    a = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    b = load_file(str(two / "final" / "adapter_model.safetensors"))
    assert len(a) > 0 and max_difference(a, b) < 1e-4
    merged = vlmkit.load_model(merge_lora(two / "final", folder, tmp_path / "merged"))
    assert max_difference(merged.state_dict(), vlmkit.load_model(folder).state_dict()) > 1e-4


def test_idefics_cross_attention_blocks_are_sharded_units(tmp_path):
    folder, _, _ = build_idefics_checkpoint(
        tmp_path / "idefics", additional_vocab_size=2, qk_layer_norms=True
    )
    units = shard_units(vlmkit.load_model(folder))
    assert {"model.layers.0", "model.gated_cross_attn_layers.0", "model.gated_cross_attn_layers.1"} <= set(
        units
    )
    # the image keys/values are computed outside the block's forward: their projections gather on their own
    assert {
        "model.gated_cross_attn_layers.0.cross_attn.k_proj",
        "model.gated_cross_attn_layers.0.cross_attn.k_layer_norm",
    } <= set(units)
    assert units.index("model.gated_cross_attn_layers.0.cross_attn.k_proj") < units.index(
        "model.gated_cross_attn_layers.0"
    )
    data = write_dataset(tmp_path / "data", n=4)
    common = dict(data=str(data), model=str(folder), train="full", max_steps=3, lr=5e-3, progress=False)
    plain = finetune(FinetuneConfig(output_dir=str(tmp_path / "plain"), batch_size=4, **common))
    two = tmp_path / "two"
    torchrun(
        *("--data", str(data), "--model", str(folder), "--train", "full", "--max-steps", "3", "--lr", "5e-3"),
        *("--batch-size", "2", "--fsdp", "--output-dir", str(two)),
    )
    assert np.allclose(plain.losses, losses(two), atol=1e-4), (plain.losses, losses(two))
    assert max_difference(final_weights(tmp_path / "plain"), final_weights(two)) < 1e-4
    from transformers import IdeficsForVisionText2Text

    ours, ref = (
        vlmkit.load_model(two / "final"),
        IdeficsForVisionText2Text.from_pretrained(two / "final").eval(),
    )
    proc = vlmkit.load_processor(two / "final")
    inputs = proc(text=[["User:", Image.new("RGB", (28, 28)), "What shape is it?"]])
    with torch.no_grad():
        assert (ours(**inputs).logits - ref(**inputs).logits).abs().max() < 1e-4


def test_errors():
    with pytest.raises(ValueError, match="fsdp shards parameters"):
        FinetuneConfig(
            data="d", output_dir="o", model="m", train="lora", quantize="int4", fsdp=True
        ).validate()
    image = torch.zeros(1, 3, 4, 4)
    check_same_parts_run([SimpleNamespace(pixel_values=image)] * 2)
    check_same_parts_run([SimpleNamespace(pixel_values=None)] * 2)
    with pytest.raises(ValueError, match="1 of 2 have one"):
        check_same_parts_run([SimpleNamespace(pixel_values=image), SimpleNamespace(pixel_values=None)])


def sharded_saver(model: torch.nn.Module, folder: Path):
    """`model` sharded over the process group with an optimizer and a scheduler, and save(step), which
    writes folder/checkpoint-{step} with `fsdp.save_sharded`."""
    groups = fsdp.shard_model(
        model, [{"params": list(model.parameters())}], device=torch.device("cpu"), bf16=False
    )
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    def save(step: int) -> None:
        state = {"step": step, "losses": [1.0] * step}
        fsdp.save_sharded(folder / f"checkpoint-{step}", model, optimizer, scheduler, state, None)

    return save


def test_a_failed_save_leaves_the_last_whole_checkpoint(tmp_path, monkeypatch):
    fsdp.join_process_group()  # a group of one
    try:
        save = sharded_saver(torch.nn.Linear(4, 4), tmp_path)

        def disk_full() -> None:
            raise OSError("No space left on device")

        save(1)
        with monkeypatch.context() as m:  # the shards are written, then the disk fills up
            m.setattr(fsdp, "rng_state", disk_full)
            with pytest.raises(CheckpointWriteError) as e:
                save(2)
        assert str(e.value) == (
            f"could not write checkpoint {tmp_path / 'checkpoint-2'}: No space left on device (the checkpoints "
            "before it are intact)"
        )
        assert (
            not (tmp_path / "checkpoint-2").exists()
            and latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
        )
        save(2)  # the next save clears what the failed one left
        assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoint-2"]
    finally:
        dist.destroy_process_group()


def _disk_full() -> dict:
    raise OSError(28, "No space left on device")  # ENOSPC


def _save_where_one_process_fails(rank: int, world: int, port: int, folder: str, results) -> None:
    """A process of `test_a_save_that_fails_on_one_process_fails_on_all`."""
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        save = sharded_saver(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)), Path(folder))
        save(1)
        if rank == 1:  # only this process finds the disk full, after its shards are written
            fsdp.rng_state = _disk_full
        try:
            save(2)
            results[rank] = "saved"
        except CheckpointWriteError as e:
            results[rank] = str(e)
    finally:
        dist.destroy_process_group()


def test_a_save_that_fails_on_one_process_fails_on_all(tmp_path):
    """A write that fails on one process only (its disk is full) is agreed on: every process raises the
    one-line error instead of waiting forever at a barrier for the one that failed, and the last whole
    checkpoint is the one before."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    ctx = mp.spawn(
        _save_where_one_process_fails, args=(2, port, str(tmp_path), results), nprocs=2, join=False
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=5):
        assert time.monotonic() < deadline, "a process is still waiting: the failure was not agreed on"
    assert results[1] == (
        f"could not write checkpoint {tmp_path / 'checkpoint-2'}: No space left on device (the checkpoints "
        "before it are intact)"
    )
    assert results[0] == (
        f"could not write checkpoint {tmp_path / 'checkpoint-2'}: another process could not write its part "
        f"of {tmp_path / 'checkpoint-2'} (the checkpoints before it are intact)"
    )
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]

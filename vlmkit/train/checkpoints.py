"""Training checkpoints that survive a kill: weights (or a peft adapter), optimizer, scheduler, RNG state and
data position, with the processor files beside them, written to a temporary folder and renamed into place.
(With --fsdp the weights and optimizer state are sharded instead: vlmkit.train.fsdp.)
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.weights import read_tensors, weight_files

PROCESSOR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)


def save_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    processor_dir: Path | None,
) -> None:
    """Write weights (safetensors, or a peft adapter), optimizer/scheduler/RNG/data position, and the
    processor files into a temporary folder, fsync, then rename it into place: a kill at any moment leaves
    either the previous checkpoint or this one, never half of one. A write that fails (a full disk) raises
    `CheckpointWriteError` and leaves the checkpoints written before it untouched."""
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        model.save_pretrained(tmp)
        copy_processor_files(processor_dir, tmp)
        trainer = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **state,
            "rng": rng_state(),
        }
        # through a Python file, so that a failed write's OSError (errno) is kept as the context of the
        # RuntimeError torch's zip writer raises ("unexpected pos ...")
        with open(tmp / "trainer_state.pt", "wb") as f:
            torch.save(trainer, f)
        publish(tmp, folder)
    except Exception as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(folder, e) from e
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


class CheckpointWriteError(OSError):
    """A checkpoint that could not be written, in one line naming it and the cause ("No space left on
    device"); the checkpoints written before it are untouched. `errno` is the cause's, when it had one."""

    def __init__(self, folder: Path, cause: BaseException) -> None:
        # safetensors and torch's zip writer raise their own kinds, with the OSError as context or in the text
        os_error = next((e for e in _chain(cause) if isinstance(e, OSError)), None)
        reason = os_error.strerror if os_error is not None and os_error.strerror else str(cause)
        reason = " ".join(reason.split()) or type(cause).__name__
        super().__init__(
            f"could not write checkpoint {folder}: {reason} (the checkpoints before it are intact)"
        )
        # strerror stays None, so that str() is the line above
        self.errno = os_error.errno if os_error is not None else None
        self.folder = folder


def _chain(error: BaseException) -> list[BaseException]:
    """An exception and those it was raised from or during, outermost first."""
    out: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def publish(tmp: Path, folder: Path) -> None:
    """Put a finished temporary folder in the place of `folder`: fsync its files, move any old `folder`
    aside, rename, and fsync the parent so the rename itself survives a crash; the old one is deleted only
    once the new one is in place (and put back if the rename fails)."""
    for path in tmp.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    old = folder.parent / f".{folder.name}.old"
    replacing = folder.exists()
    if replacing:
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except OSError:
        if replacing:
            os.replace(old, folder)
        raise
    fd = os.open(folder.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.rmtree(old, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """This process's random number generators (torch CPU and Python), as `restore_rng` takes them back."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["python"])


def copy_processor_files(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in PROCESSOR_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(
        (int(p.name.split("-")[1]), p)
        for p in output_dir.glob("checkpoint-*")
        if p.name.split("-")[1].isdigit() and (p / "trainer_state.pt").is_file()
    )
    return found[-1][1] if found else None


def is_sharded(ckpt: Path) -> bool:
    """Whether `ckpt` was written by `vlmkit.train.fsdp.save_sharded` (torch.distributed.checkpoint's
    .metadata, written after every shard) rather than `save_checkpoint`."""
    return (ckpt / ".metadata").is_file()


def restore_checkpoint(
    ckpt: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    lora: bool,
    device: torch.device,
) -> tuple[int, list[float]]:
    """Load what `save_checkpoint` wrote back into the model (the adapter with lora), optimizer, scheduler
    and RNGs; returns the step and the losses so far."""
    if is_sharded(ckpt):
        raise ValueError(f"{ckpt} is a sharded checkpoint (written with --fsdp): resume it with --fsdp")
    state = torch.load(ckpt / "trainer_state.pt", map_location=device, weights_only=True)
    if lora:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(ckpt / "adapter_model.safetensors")))
    else:
        tensors = read_tensors(weight_files(ckpt))
        own = model.state_dict()
        with torch.no_grad():
            for name, ref in tensors.items():
                if name in own:
                    own[name].copy_(ref.load(device=device))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_rng(state["rng"])
    return int(state["step"]), list(state["losses"])

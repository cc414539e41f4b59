"""Fully sharded training (FSDP2): which modules are sharded units, checkpoints that every process writes its
own shards of and that resume on any number of processes, and the full checkpoint exported at the end.

`vlmkit finetune --fsdp` under `torchrun --nproc_per_node=N` (or as one plain process, a group of one) calls
these: `shard_model` after the trainable parts are chosen (after peft for LoRA), `save_sharded` /
`restore_sharded` for `checkpoint-N`, and `export_pretrained` for `final`. `export_checkpoint` turns a
sharded `checkpoint-N` into the same full checkpoint offline, on one process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from vlmkit.train.checkpoints import (
    CheckpointWriteError,
    copy_processor_files,
    is_sharded,
    publish,
    restore_rng,
    rng_state,
)
from vlmkit.train.data import Sample
from vlmkit.weights import save_checkpoint as save_weights

# Frozen parameters never change: a resumed run rebuilds them from its starting checkpoint, as LoRA always did
SHARDED = StateDictOptions(ignore_frozen_params=True)


def join_process_group() -> None:
    """Join torchrun's process group (nccl on GPU, gloo on CPU); outside torchrun (no WORLD_SIZE), make a
    group of this one process over an in-memory store (no port to pick), so one process runs the same
    sharded code and writes the same checkpoints as N."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend)
    else:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


# ---------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------


def shard_units(model: nn.Module) -> list[str]:
    """The names of the modules that become FSDP units below the root, innermost first (fully_shard goes
    bottom-up): every transformer block (a module with an `mlp` and a `self_attn` or `cross_attn`: the
    decoder layers, the vision encoder's layers, IDEFICS's gated cross-attention blocks), and each child of
    a cross-attention that computes image keys/values (`image_kv`): that runs once per batch, outside the
    block's forward, so its projections must gather their own weights.

        >>> "model.gated_cross_attn_layers.0" in shard_units(idefics_model)
        True
    """
    units = []
    for name, module in model.named_modules():
        if hasattr(module, "mlp") and (hasattr(module, "self_attn") or hasattr(module, "cross_attn")):
            units.append(name)
        if callable(getattr(module, "image_kv", None)):
            units += [f"{name}.{child}" for child, _ in module.named_children()]
    return sorted(units, key=lambda n: -n.count("."))


def shard_model(
    model: nn.Module, groups: list[dict[str, Any]], *, device: torch.device, bf16: bool
) -> list[dict[str, Any]]:
    """Shard `model` in place over every process (fully_shard on each of `shard_units`, then the root) and
    return the optimizer groups over the sharded parameters (fully_shard replaces every parameter). bf16:
    compute in bf16 and reduce gradients in fp32 (where the hardware runs bf16 fast); else fp32 throughout.

        >>> groups = shard_model(model, param_groups(model, config), device=device, bf16=False)
        >>> optimizer = torch.optim.AdamW(groups, lr=config.lr)
    """
    names = {id(p): n for n, p in model.named_parameters()}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16
        else MixedPrecisionPolicy()
    )
    for name in shard_units(model):
        fully_shard(model.get_submodule(name), mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    sharded = dict(model.named_parameters())
    return [{**g, "params": [sharded[names[id(p)]] for p in g["params"]]} for g in groups]


@contextmanager
def no_gradient_sync(model: FSDPModule) -> Iterator[None]:
    """Backward passes inside keep their gradients unsharded and summed on each process (accumulation
    micro-batches); the first backward after it reduce-scatters the sum."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def check_same_parts_run(samples: list[Sample]) -> None:
    """A sharded unit gathers its weights only on the processes that run it, so every process must run the
    same modules in each micro-batch: a text-only micro-batch (no vision tower) on one process beside one
    with images on another would hang. Refuse a dataset that mixes rows with and without images."""
    with_images = sum(s.pixel_values is not None for s in samples)
    if 0 < with_images < len(samples):
        raise ValueError(
            f"fsdp on several processes needs every training row to have an image, or none to: {with_images} "
            f"of {len(samples)} have one (a process whose micro-batch has no image would skip the vision "
            "tower, whose sharded weights the others gather); drop the text-only rows or train without --fsdp"
        )


# ---------------------------------------------------------------------------------------------
# Sharded checkpoints
# ---------------------------------------------------------------------------------------------


def save_sharded(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    processor_dir: Path | None,
) -> None:
    """Every process writes its shards of the trainable weights and the optimizer state
    (torch.distributed.checkpoint) and its RNG state into a temporary folder beside `folder`; rank 0 adds
    the scheduler, `state` (step, losses, config) and the processor files, then, once all have written,
    fsyncs and renames the folder into place: a kill at any moment leaves the previous checkpoint whole.
    A write that fails on any process (a full disk) makes every process raise `CheckpointWriteError`
    (none is left waiting for the others), and the earlier checkpoints stay as they were. Called by every
    process."""
    rank = dist.get_rank()
    tmp = folder.parent / f".{folder.name}.partial"  # one name every process knows
    error: Exception | None = None
    if rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    if not any_failed(error):
        try:  # torch.distributed.checkpoint raises on every process when one fails
            model_state, optimizer_state = get_state_dict(model, optimizer, options=SHARDED)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
            torch.save(rng_state(), tmp / f"rng-{rank}.pt")
            if rank == 0:
                trainer = {"scheduler": scheduler.state_dict(), **state, "world_size": dist.get_world_size()}
                torch.save(trainer, tmp / "trainer_state.pt")
                copy_processor_files(processor_dir, tmp)
        except Exception as e:  # noqa: BLE001 - agreed on below, then raised on every process
            error = e
        if not any_failed(error) and rank == 0:
            try:
                publish(tmp, folder)
            except OSError as e:
                error = e
    if any_failed(error):  # nobody reads `folder` (a resume, the next save) before this agreement either
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        cause = error or OSError(f"another process could not write its part of {folder}")
        raise CheckpointWriteError(folder, cause) from error


def any_failed(error: BaseException | None) -> bool:
    """Whether `error` is set on any process of the group (every process calls this at the same point)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    flag = torch.tensor([0 if error is None else 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def restore_sharded(
    ckpt: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> tuple[int, list[float]]:
    """Load what `save_sharded` wrote, on any number of processes (the shards are re-cut to this run's);
    each process takes back its RNG state where the checkpoint has one for its rank. Returns the step and
    the losses so far. Called by every process."""
    if not is_sharded(ckpt):
        raise ValueError(
            f"{ckpt} was written without --fsdp (not a sharded checkpoint): resume it without --fsdp"
        )
    model_state, optimizer_state = get_state_dict(model, optimizer, options=SHARDED)
    # get_state_dict gives every parameter a blank optimizer state; one that never had a gradient (tower
    # layers past the deepest tap) has none in the checkpoint, and keeps none, as in an unbroken run
    stored = _stored_keys(ckpt)
    optimizer_state["state"] = {
        fqn: kept
        for fqn, per_param in optimizer_state["state"].items()
        if (kept := {k: v for k, v in per_param.items() if f"optimizer.state.{fqn}.{k}" in stored})
    }
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(  # not strict: dcp.load has found every key asked for, and the missing states are meant
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(ignore_frozen_params=True, strict=False),
    )
    trainer = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    scheduler.load_state_dict(trainer["scheduler"])
    rng = ckpt / f"rng-{dist.get_rank()}.pt"
    if rng.is_file():
        restore_rng(torch.load(rng, weights_only=True))
    return int(trainer["step"]), list(trainer["losses"])


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_pretrained(model: nn.Module, folder: Path, processor_dir: Path | None) -> None:
    """Gather the full weights into rank 0's CPU memory and write there what `write_pretrained` writes.
    Called by every process."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        write_pretrained(model, folder, full, processor_dir)
    dist.barrier()


def write_pretrained(
    model: nn.Module, folder: Path, state: dict[str, torch.Tensor], processor_dir: Path | None
) -> None:
    """From a full state dict, a checkpoint that `vlmkit.load_model` and transformers load: the peft adapter
    for a LoRA model (`vlmkit merge-lora` folds it into its base), else config.json and safetensors; with the
    processor files, written to a temporary folder and renamed into place."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        if hasattr(model, "peft_config"):
            model.save_pretrained(tmp, state_dict=state)
        else:
            save_weights(model, tmp, model.config.to_hf(), state=state)
        copy_processor_files(processor_dir, tmp)
        publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_checkpoint(checkpoint: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Turn a sharded training checkpoint (`checkpoint-N` of a --fsdp run, written by any number of
    processes) into what the run's `final` is: a full safetensors checkpoint, or the peft adapter for LoRA.
    Runs on one process without a process group. Parts the run kept frozen are not in the checkpoint: they
    come from the run's starting point (its model= or init_config=), which must still be there.

        >>> export_checkpoint("out/checkpoint-200", "out/step-200")
    """
    from vlmkit.train.finetune import FinetuneConfig, _build_model  # finetune imports this module

    ckpt = Path(checkpoint)
    if not is_sharded(ckpt):
        raise ValueError(f"{ckpt} is not a sharded checkpoint (one written with --fsdp)")
    trainer = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    model = _build_model(FinetuneConfig(**trainer["config"]), torch.device("cpu"))
    stored = _stored_keys(ckpt)
    own = model.state_dict()  # shares storage with the parameters: dcp.load writes into them
    state = {"model": {k: v for k, v in own.items() if f"model.{k}" in stored}}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    out = Path(output_dir)
    write_pretrained(model, out, model.state_dict(), ckpt)
    return out


def _stored_keys(ckpt: Path) -> set[str]:
    """The flat keys a sharded checkpoint holds ("model.<parameter>", "optimizer.state.<parameter>.exp_avg")."""
    return set(dcp.FileSystemReader(ckpt).read_metadata().state_dict_metadata)

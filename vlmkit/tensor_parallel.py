"""Tensor parallelism with torch.distributed: one model split over N processes, each holding 1/N of the
language model's weights and of its KV cache.

The split is Megatron's, expressed with PyTorch's own styles (`torch.distributed.tensor.parallel`): in every
attention block q/k/v are split by output (whole heads per process) and o by input, in every MLP gate/up by
output and down by input, so each block needs one all-reduce; the token embedding and the LM head are split
over the vocabulary. IDEFICS's gated cross-attention blocks are split the same way. The vision tower, the
resampler and the projector stay whole on every process (a few percent of the weights).

A family says where its blocks are in a `TensorParallelPlan` (data in the registry); `parallelize` applies
it to a model still on the meta device, and `vlmkit.weights.load_weights` then reads each process's part of
each tensor straight from the memory-mapped file (`shard_range`), so no process ever holds the whole model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    parallelize_module,
)

from vlmkit.models import TensorParallelPlan

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output features
ROW = ("o_proj", "down_proj")  # split by input features, then summed over the processes


class VocabShard(ParallelStyle):
    """Splits a module's `weight` (vocab, dim) over the vocabulary, for token tables that are neither
    nn.Embedding nor nn.Linear (IDEFICS's decoupled embedding and LM head, whose extra rows stay whole).
    The module's forward runs on DTensors (its input made a replicated DTensor) and its output is made whole
    again; DTensor's own rules do the masked lookup, the partial sums and the gather."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, sub: nn.Module, mesh: DeviceMesh) -> None:
            if sub is module:
                weight = sub.weight
                sub.weight = nn.Parameter(
                    distribute_tensor(weight, mesh, [Shard(0)]), requires_grad=weight.requires_grad
                )

        def inputs(mod: nn.Module, args: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
            return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False) for a in args)

        def output(mod: nn.Module, out: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
            return out.redistribute(mesh, [Replicate()]).to_local()

        return distribute_module(module, device_mesh, partition, inputs, output)


def split_modules(model: nn.Module, plan: TensorParallelPlan) -> dict[str, str]:
    """{module path: how it splits} for every splittable module of `model` under `plan`: "column" (by
    output features), "row" (by input features) or "vocab" (a token table or LM head, by vocabulary row)."""
    kinds: dict[str, str] = {}
    for container in plan.blocks:
        for index, block in enumerate(model.get_submodule(container)):
            for child in (*plan.attention, "mlp"):
                part = getattr(block, child, None)
                for names, kind in ((COLUMN, "column"), (ROW, "row")):
                    for name in names:
                        if part is not None and hasattr(part, name):
                            kinds[f"{container}.{index}.{child}.{name}"] = kind
    return kinds | {path: "vocab" for path in plan.vocab}


def split_parameters(model: nn.Module, plan: TensorParallelPlan) -> dict[str, int]:
    """{parameter name: the dimension it is split along}; parameters not named stay whole on every process
    (a row-split layer's bias is added once, after the sum)."""
    dims = {"column": 0, "vocab": 0, "row": 1}
    out = {}
    for path, kind in split_modules(model, plan).items():
        for name, _ in model.get_submodule(path).named_parameters(recurse=False):
            if name == "weight" or (name == "bias" and kind == "column"):
                out[f"{path}.{name}"] = dims[kind] if name == "weight" else 0
    return out


def tp_styles(model: nn.Module, plan: TensorParallelPlan) -> dict[str, ParallelStyle]:
    """{module path: PyTorch parallel style} for `split_modules`."""
    styles: dict[str, ParallelStyle] = {}
    for path, kind in split_modules(model, plan).items():
        module = model.get_submodule(path)
        if kind == "column":
            styles[path] = ColwiseParallel()
        elif kind == "row":
            styles[path] = RowwiseParallel()
        elif type(module) is nn.Embedding:
            styles[path] = RowwiseParallel(input_layouts=Replicate())
        elif type(module) is nn.Linear:
            styles[path] = ColwiseParallel(output_layouts=Replicate())
        else:
            styles[path] = VocabShard()
    return styles


def attention_modules(model: nn.Module, plan: TensorParallelPlan) -> list[nn.Module]:
    return [
        getattr(block, child)
        for container in plan.blocks
        for block in model.get_submodule(container)
        for child in plan.attention
        if hasattr(block, child)
    ]


def check_tp_size(model: nn.Module, plan: TensorParallelPlan, tp: int, source: str) -> None:
    """Raise before any loading when the model's heads cannot be split over `tp` processes."""
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    for attn in attention_modules(model, plan):
        for attr in ("n_heads", "n_kv_heads"):
            heads = getattr(attn, attr, None)
            if heads is None:
                continue
            if tp > heads:
                raise ValueError(
                    f"{source}: tp={tp} is larger than the model's {heads} {attr.replace('n_', '')} "
                    f"({type(attn).__name__}); each process needs at least one whole head: use tp <= {heads}"
                )
            if heads % tp:
                divisors = [d for d in range(1, heads + 1) if heads % d == 0]
                raise ValueError(
                    f"{source}: {heads} {attr.replace('n_', '')} ({type(attn).__name__}) cannot be split "
                    f"evenly over tp={tp} processes; use one of {divisors}"
                )


def parallelize(model: nn.Module, plan: TensorParallelPlan, mesh: DeviceMesh) -> nn.Module:
    """Split `model` (best still on the meta device) over `mesh` in place: attention and MLP blocks, vocab
    tables; each attention module's head counts become this process's share, so its KV cache holds only
    its own heads."""
    tp = mesh.size()
    check_tp_size(model, plan, tp, type(model).__name__)
    parallelize_module(model, mesh, tp_styles(model, plan))
    for attn in attention_modules(model, plan):
        attn.n_heads //= tp
        if hasattr(attn, "n_kv_heads"):
            attn.n_kv_heads //= tp
    model.tp_mesh = mesh
    return model


def process_mesh(tp: int, device: torch.device) -> DeviceMesh:
    """A 1-D mesh over the `tp` processes of the current group (started here from torchrun's environment
    when none is running yet)."""
    if not dist.is_available():
        raise RuntimeError("tensor parallelism needs torch.distributed, which this PyTorch build lacks")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise RuntimeError(
                f"tp={tp} runs the model over {tp} processes: start them with "
                f"`torchrun --nproc-per-node {tp} -m vlmkit ...` (or init a process group first)"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size()
    if world != tp:
        raise ValueError(
            f"tp={tp} but {world} processes are running; start exactly {tp} (torchrun --nproc-per-node {tp})"
        )
    return init_device_mesh(device.type, (tp,))


def tp_device(device: torch.device | str | None) -> torch.device:
    """The device of this process: its own GPU (LOCAL_RANK) when CUDA is asked for or present, else CPU."""
    if device is not None and torch.device(device).type == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device is not None:
        raise ValueError(f"device {device} is not available on this machine")
    return torch.device("cpu")


def shard_range(meta: torch.Tensor) -> tuple[int, int, int] | None:
    """(dim, start, stop) of this process's piece of a tensor split with Shard(dim) (DTensor's chunking:
    ceil(n / N) rows per process, the last ones shorter); None for a whole (replicated) tensor."""
    if not isinstance(meta, DTensor):
        return None
    (placement,) = meta.placements
    if not isinstance(placement, Shard):
        return None
    dim, mesh = placement.dim, meta.device_mesh
    n, size = meta.shape[dim], mesh.size()
    chunk = -(-n // size)
    start = min(n, chunk * mesh.get_local_rank())
    return dim, start, min(n, start + chunk)


def as_local_part(meta: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """This process's piece `local` as the DTensor the meta parameter stands for (a plain tensor stays)."""
    if not isinstance(meta, DTensor):
        return local
    return DTensor.from_local(
        local, meta.device_mesh, meta.placements, run_check=False, shape=meta.shape, stride=meta.stride()
    )


def local_bytes(model: nn.Module) -> int:
    """Bytes of the weights this process holds (its pieces of split tensors, whole replicated ones)."""
    total, seen = 0, set()
    for t in [*model.parameters(), *model.buffers()]:
        local = t.to_local() if isinstance(t, DTensor) else t
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += local.numel() * local.element_size()
    return total


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the process that prints and serves."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

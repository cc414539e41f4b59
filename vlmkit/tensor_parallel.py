"""Tensor parallelism with torch.distributed: one model split over N processes, each holding 1/N of the
language model's weights and of its KV cache.

The split is Megatron's: in every attention block q/k/v are split by output (whole heads per process) and o
by input, in every MLP gate/up by output and down by input, so each block needs one all-reduce; the token
embedding and the LM head are split over the vocabulary (a masked lookup summed over the processes, and
logits gathered). IDEFICS's gated cross-attention blocks are split the same way. The vision tower, the
resampler and the projector stay whole on every process (a few percent of the weights).

A family says where its blocks are in a `TensorParallelPlan` (data in the registry). `parallelize` turns the
split parameters of a model still on the meta device into DTensors (`Shard(dim)` over the process mesh), so
`vlmkit.weights.load_weights` checks every tensor against its whole shape and then reads only this
process's part of it from the memory-mapped file (`shard_range`): no process ever holds the whole model.
`localize` then keeps each process's part as a plain tensor, and the split layers talk through
`torch.distributed` collectives themselves: running the forward on DTensors costs about 6 ms of dispatch per
decoder layer and token on a CPU (measured, `benchmarks/distributed.py`), more than the layer's arithmetic.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from vlmkit.models import TensorParallelPlan

COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # split by output features
ROW = ("o_proj", "down_proj")  # split by input features, then summed over the processes


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
    """Split `model` (on the meta device, before loading) over `mesh` in place: its split parameters become
    DTensors sharded over the processes, its split layers run on their parts (see `localize`), and each
    attention module's head counts become this process's share, so its KV cache holds only its own heads."""
    tp = mesh.size()
    check_tp_size(model, plan, tp, type(model).__name__)
    for name, dim in split_parameters(model, plan).items():
        owner, _, leaf = name.rpartition(".")
        module, param = model.get_submodule(owner), model.get_parameter(name)
        split = nn.Parameter(distribute_tensor(param, mesh, [Shard(dim)]), requires_grad=param.requires_grad)
        setattr(module, leaf, split)
    group = mesh.get_group()
    for path, kind in split_modules(model, plan).items():
        split_layer(model.get_submodule(path), kind, group)
    for attn in attention_modules(model, plan):
        attn.n_heads //= tp
        if hasattr(attn, "n_kv_heads"):
            attn.n_kv_heads //= tp
    model.tp_mesh = mesh
    return model


def localize(model: nn.Module) -> None:
    """After loading: keep each split parameter's part on this process as a plain tensor."""
    for module in model.modules():
        for leaf, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                setattr(module, leaf, nn.Parameter(param.to_local(), requires_grad=param.requires_grad))


# ---------------------------------------------------------------------------------------------
# The split layers: plain tensors, explicit collectives
# ---------------------------------------------------------------------------------------------


def row_start(total: int, group: Any) -> int:
    """The first row of this process's part of `total` rows (DTensor's chunking, as `shard_range`)."""
    chunk = -(-total // dist.get_world_size(group))
    return min(total, chunk * dist.get_rank(group))


def split_lookup(ids: torch.Tensor, weight: torch.Tensor, *, start: int, group: Any) -> torch.Tensor:
    """Rows `ids` of a table split by row over the processes (`weight`: rows start.. of it here): each
    process looks up the ids it holds, zeros for the others, and the sum over the processes is the lookup."""
    inside = (ids >= start) & (ids < start + weight.shape[0])
    out = F.embedding((ids - start).masked_fill(~inside, 0), weight).masked_fill(~inside[..., None], 0.0)
    dist.all_reduce(out, group=group)
    return out


def gathered_logits(x: torch.Tensor, weight: torch.Tensor, *, total: int, group: Any) -> torch.Tensor:
    """x @ weight.T over a weight split by output row: each process's columns, gathered in order (parts of
    uneven length padded to the longest for the gather, cut after)."""
    local = F.linear(x, weight)
    chunk = -(-total // dist.get_world_size(group))
    if local.shape[-1] < chunk:
        local = F.pad(local, (0, chunk - local.shape[-1]))
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :total]


class RowSplitLinear(nn.Linear):
    """A linear layer holding some input features: the partial products are summed over the processes,
    then the (whole) bias is added once."""

    tp_group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        dist.all_reduce(y, group=self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabSplitEmbedding(nn.Embedding):
    tp_group: Any = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        start = row_start(self.num_embeddings, self.tp_group)
        return split_lookup(ids, self.weight, start=start, group=self.tp_group)


class VocabSplitLinear(nn.Linear):
    tp_group: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gathered_logits(x, self.weight, total=self.out_features, group=self.tp_group)


def split_layer(module: nn.Module, kind: str, group: Any) -> None:
    """Make `module` run on its part: a column-split linear needs nothing (its input is whole, its output
    this process's features); a row-split linear sums over the processes; a vocabulary table looks up or
    gathers. A table that is neither nn.Embedding nor nn.Linear (IDEFICS's decoupled ones) offers the seam
    `embedding_fn` or `linear_fn` for its base rows."""
    if kind == "column":
        return
    if kind == "row" and type(module) is nn.Linear:
        module.__class__ = RowSplitLinear
    elif type(module) is nn.Embedding:
        module.__class__ = VocabSplitEmbedding
    elif type(module) is nn.Linear:
        module.__class__ = VocabSplitLinear
    elif hasattr(module, "embedding_fn"):
        total = module.weight.shape[0]

        def lookup(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return split_lookup(ids, weight, start=row_start(total, group), group=group)

        module.embedding_fn = lookup
    elif hasattr(module, "linear_fn"):
        total = module.weight.shape[0]

        def logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
            return gathered_logits(x, weight, total=total, group=group)

        module.linear_fn = logits
    else:
        raise TypeError(f"cannot split {type(module).__name__} ({kind}): no nn.Linear/nn.Embedding or seam")
    module.tp_group = group


def process_mesh(tp: int, device: torch.device) -> DeviceMesh:
    """A 1-D mesh over the `tp` processes of the current group (started here from torchrun's environment
    when none is running yet)."""
    if not dist.is_available():
        raise RuntimeError("tensor parallelism needs torch.distributed, which this PyTorch build lacks")
    if device.type == "cuda":  # NCCL's collectives (and broadcast_object_list) run on the current device
        torch.cuda.set_device(device)
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
        if id(t) in seen:  # a tied weight counts once
            continue
        seen.add(id(t))
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def is_main_process() -> bool:
    """True on rank 0 (and without a process group): the process that prints and serves."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

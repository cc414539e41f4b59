"""Memory plans: the bytes a checkpoint's weights take at a precision or quantization, and its KV cache at a
batch size and length, computed from config.json alone (the model is built on the meta device; no weight is
read), so a user sees before downloading whether idefics-80b in int4 fits one 80 GB GPU.

    memory_plan("HuggingFaceM4/idefics-80b", quantize="int4", batch_size=4, length=2048)["total_bytes"]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.quant import QuantConfig, parse_quantize, resolve, stored_bytes, stored_quantization, targets


@dataclass(frozen=True)
class MemoryPlan:
    model_type: str
    dtype: str
    quantization: str | None
    parameters: int
    parts: dict[str, int]  # weight bytes per top-level part
    weight_bytes: int
    batch_size: int
    length: int
    kv_cache_bytes: int  # the decoder's self-attention keys and values for batch_size rows of `length` tokens
    tp: int = 1  # processes the model is split over (tensor parallel): every byte figure is per process

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "total_bytes": self.total_bytes}


def meta_model(config: dict[str, Any], source: str) -> tuple[nn.Module, Any]:
    """The model of a config.json built on the meta device (no memory), and its family."""
    from vlmkit.models import family_for

    family = family_for(config, source)
    with torch.device("meta"):
        return family.model_cls(family.config_cls.from_hf(config)), family


def _part(name: str) -> str:
    head, _, rest = name.partition(".")
    return f"{head}.{rest.partition('.')[0]}" if head in ("model", "language_model") and rest else head


def weight_bytes(
    model: nn.Module, family: Any, quantization: QuantConfig | None, dtype: torch.dtype, tp: int = 1
) -> tuple[int, dict[str, int]]:
    """Total and per-part bytes of the weights, floating tensors in `dtype`, quantized layers as stored; with
    tp > 1, those of the process holding the most (rank 0: split tensors give it ceil(n / tp) rows)."""
    split = {}
    if tp > 1:
        from vlmkit.tensor_parallel import split_parameters

        split = split_parameters(model, family.tensor_parallel)
    found = {t.path: t for t in targets(model, family.quant_parts, quantization)} if quantization else {}
    parts: dict[str, int] = {}
    seen: set[int] = set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        owner = name.rpartition(".")[0]
        if owner in found and name.endswith(".weight"):
            size = stored_bytes(found[owner], quantization)
        else:
            size = tensor.numel() * (dtype.itemsize if tensor.is_floating_point() else tensor.element_size())
            if name in split:
                rows = tensor.shape[split[name]]
                size = size // rows * -(-rows // tp)
        parts[_part(name)] = parts.get(_part(name), 0) + size
    return sum(parts.values()), parts


def kv_cache_bytes(model: nn.Module, batch_size: int, length: int, dtype: torch.dtype) -> int:
    """Keys and values of every self-attention layer of the decoder for `batch_size` rows of `length`."""
    per_token = sum(
        2 * m.n_kv_heads * m.head_dim
        for name, m in model.named_modules()
        if name.endswith("self_attn") and hasattr(m, "n_kv_heads")
    )
    return per_token * batch_size * length * dtype.itemsize


def stored_dtype(folder: Path, config: dict[str, Any]) -> torch.dtype:
    """What dtype "auto" loads: config.json's, else the first floating tensor's (headers only), else float32."""
    from vlmkit.weights import checkpoint_dtype, parse_dtype, read_tensors, weight_files

    named = parse_dtype(config.get("dtype") or config.get("torch_dtype"))
    if named is not None:
        return named
    try:
        return checkpoint_dtype(read_tensors(weight_files(folder)), config)
    except FileNotFoundError:
        return torch.float32


def memory_plan(
    path_or_repo_id: str | os.PathLike,
    *,
    quantize: str | QuantConfig | None = None,
    group_size: int | None = None,
    quantize_parts: tuple[str, ...] | list[str] = (),
    dtype: torch.dtype | str | None = None,
    batch_size: int = 1,
    length: int | None = None,
    tp: int = 1,
) -> MemoryPlan:
    """The memory a checkpoint needs, from its config.json only. dtype: the unquantized tensors' (default
    config.json's, else float32); length: tokens per row (default the text model's max_position_embeddings);
    tp: split over this many processes (tensor parallel), the figures then being each process's."""
    from vlmkit.models import resolve_model
    from vlmkit.weights import parse_dtype, read_config

    if batch_size < 1 or (length is not None and length < 1):
        raise ValueError(f"batch_size and length must be >= 1, got {batch_size} and {length}")
    folder = resolve_model(path_or_repo_id)
    raw = read_config(folder)
    source = str(folder / "config.json")
    quantization = resolve(
        parse_quantize(quantize, group_size=group_size, parts=quantize_parts),
        stored_quantization(raw, source),
        source,
    )
    model, family = meta_model(raw, source)
    if tp != 1:
        from vlmkit.tensor_parallel import check_tp_size

        check_tp_size(model, family.tensor_parallel, tp, source)
        if quantization is not None:
            raise ValueError(f"tp={tp} with quantized weights is not supported; plan one or the other")
    dtype = parse_dtype(dtype) or stored_dtype(folder, raw)
    text = model.config.to_hf().get("text_config", model.config.to_hf())
    length = length or int(text.get("max_position_embeddings") or 2048)
    total, parts = weight_bytes(model, family, quantization, dtype, tp)
    return MemoryPlan(
        model_type=raw["model_type"],
        dtype=str(dtype).removeprefix("torch."),
        quantization=quantization.describe() if quantization else None,
        parameters=sum(p.numel() for p in model.parameters()),
        parts=parts,
        weight_bytes=total,
        batch_size=batch_size,
        length=length,
        kv_cache_bytes=kv_cache_bytes(model, batch_size, length, dtype) // tp,  # heads split evenly
        tp=tp,
    )

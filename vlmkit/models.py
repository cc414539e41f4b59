"""The model families vlmkit knows, and `load_model`, which picks one from a checkpoint's `model_type`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmkit.modules import RMSNorm, optimize_for_cpu_inference
from vlmkit.weights import (
    KeyMap,
    checkpoint_dtype,
    load_weights,
    parse_dtype,
    read_config,
    read_config_file,
    read_tensors,
    remap_keys,
    resolve_checkpoint,
    weight_files,
)


@dataclass(frozen=True)
class Family:
    config_cls: type
    model_cls: type[nn.Module]
    key_map: KeyMap
    ignore: tuple[str, ...]
    processor_cls: type


def families() -> dict[str, Family]:
    from vlmkit import idefics, vipllava
    from vlmkit.idefics.processor import IdeficsProcessor
    from vlmkit.vipllava.processor import LlavaProcessor

    llava = Family(
        vipllava.VipLlavaConfig, vipllava.VipLlavaModel, vipllava.KEY_MAP, vipllava.KEY_IGNORE, LlavaProcessor
    )
    return {
        "vipllava": llava,
        "llava": llava,
        "idefics": Family(
            idefics.IdeficsConfig, idefics.IdeficsModel, idefics.KEY_MAP, idefics.KEY_IGNORE, IdeficsProcessor
        ),
    }


def family_for(config: dict[str, Any], source: str) -> Family:
    table = families()
    model_type = config.get("model_type")
    if model_type not in table:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported by vlmkit; supported: {sorted(table)}"
        )
    return table[model_type]


def load_model(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    progress: bool = False,
) -> nn.Module:
    """Load a published (or transformers-saved, or vlmkit-saved) checkpoint.

    dtype: None or "auto" is config.json's dtype, else the stored one; device: where the weights go (default CPU);
    progress: a loading bar on stderr when it is a terminal.
    The model is built on the meta device and the tensors are assigned, so nothing is allocated twice.
    """
    folder = resolve_checkpoint(path_or_repo_id, revision=revision)
    raw = read_config(folder)
    family = family_for(raw, str(folder / "config.json"))
    config = family.config_cls.from_hf(raw)
    tensors = remap_keys(read_tensors(weight_files(folder)), family.key_map, family.ignore)
    dtype = parse_dtype(dtype) or checkpoint_dtype(tensors, raw)
    with torch.device("meta"):
        model = family.model_cls(config)
    load_weights(model, tensors, dtype=dtype, device=device, source=str(folder), progress=progress)
    del tensors  # the model holds the tensors now; relayout below must not keep a second copy alive
    if next(model.parameters()).device.type == "cpu":
        optimize_for_cpu_inference(model)
    return model.eval()


PROCESSOR_CLASSES = {"LlavaProcessor": "llava", "IdeficsProcessor": "idefics"}


def load_processor(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Any:
    """The processor (tokenizer, image preprocessing, prompt building, chat template) of a checkpoint, in the
    published layout or the one transformers 5 writes. The family comes from config.json's model_type or,
    without a config.json, from the processor class named in the processor files."""
    folder = resolve_checkpoint(path_or_repo_id, revision=revision)
    if (folder / "config.json").is_file():
        family = family_for(read_config(folder), str(folder / "config.json"))
        return family.processor_cls.from_folder(folder)
    named = None
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            named = named or read_config_file(folder / name).get("processor_class")
    if named not in PROCESSOR_CLASSES:
        raise ValueError(
            f"{folder}: cannot tell which processor to build (no config.json, processor_class {named!r}); "
            f"supported: {sorted(PROCESSOR_CLASSES)}"
        )
    return families()[PROCESSOR_CLASSES[named]].processor_cls.from_folder(folder)


def init_model(config: dict[str, Any], *, seed: int = 0, std: float = 0.02) -> nn.Module:
    """A model of the given config.json contents with fresh random weights, for training small models from
    scratch: normal(0, std) matrices and embeddings, unit norms, zero biases, IDEFICS gates as its
    `alpha_initializer` says, normal(0, 1) perceiver latents."""
    family = family_for(config, "config")
    parsed = family.config_cls.from_hf(config)
    model = family.model_cls(parsed)
    g = torch.Generator().manual_seed(seed)
    alpha_init = getattr(parsed, "alpha_initializer", "zeros")
    alpha_std = getattr(parsed, "alphas_initializer_range", 0.0)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, (nn.LayerNorm, RMSNorm))}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("alpha_cross_attn", "alpha_dense")):
                if alpha_init == "ones":
                    p.fill_(1.0)
                elif alpha_init in ("normal", "gaussian", "random"):
                    p.copy_(torch.randn(p.shape, generator=g) * alpha_std)
                else:
                    p.zero_()
            elif id(p) in norms:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("latents"):
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model

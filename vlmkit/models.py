"""The model families vlmkit knows, each in one registry entry, and the loaders that pick one.

A family is a package (config, model, processor, and `policy.py` with what the generic layers need from it)
plus one `Family` entry in `registry()`. Generation, the server engine, training and the CLI never name a
family: they ask the entry of a checkpoint (`family_for`), of a model or processor in hand (`family_of`), or
of a sample (`family_named`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmkit.fastpath import optimize_for_cpu_inference
from vlmkit.modules import RMSNorm
from vlmkit.quant import QuantConfig, QuantParts, load_quantized, parse_quantize, resolve, stored_quantization
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

# The small models trained on the shapes world that ship inside the package (`make demo-models` rebuilds
# them), one folder per family, named after the family.
BUILTIN_DIR = Path(__file__).parent / "demo" / "models"
DEFAULT_MODEL = "demo"  # what every command runs without --model: the built-in ViP-LLaVA


@dataclass(frozen=True)
class TrainableParts:
    """Which parts train in each `--train` mode, by module or parameter name (data the trainer reads, not
    branches)."""

    # train="projector": these modules and parameters (a name matches itself or a ".name" tail)
    projector: tuple[str, ...]
    lora_scope: tuple[str, ...]  # train="lora": adapters go on target linears under these module paths
    vision: tuple[str, ...]  # parameters whose names hold one of these belong to the vision tower (vision_lr)


@dataclass(frozen=True)
class TensorParallelPlan:
    """Where a family's parts split over processes are, by module path (vlmkit.tensor_parallel applies it).

    blocks: containers of decoder-style blocks, each with an attention child (a name in `attention`) that has
    q/k/v/o projections and head counts `n_heads` (and `n_kv_heads`), and an `mlp` with gate/up/down;
    vocab: the token embedding and the LM head, split over the vocabulary. Everything else stays whole."""

    blocks: tuple[str, ...]
    vocab: tuple[str, ...]
    attention: tuple[str, ...] = ("self_attn", "cross_attn")


@dataclass(frozen=True)
class Family:
    name: str  # the registry name: a model_type, and the built-in demo folder's name
    title: str  # for people ("LLaVA")
    model_types: tuple[str, ...]  # the config.json model_types this entry loads
    config_cls: type
    model_cls: type[nn.Module]
    key_map: KeyMap
    ignore: tuple[str, ...]
    processor_cls: type
    # (processor, prompt with <image> markers or none, images, *, allow_remote) -> the processor's outputs
    prompt_inputs: Callable[..., dict[str, torch.Tensor]]
    # (processor, rendered conversation, learned-character mask, the row's pictures as the processor's
    # `image_inputs` ({} without pictures), row) -> train.data.Sample
    training_sample: Callable[..., Any]
    # (samples, padded length T) -> the batch's image entries ({} without images)
    collate_images: Callable[[list[Any], int], dict[str, torch.Tensor]]
    trainable: TrainableParts
    quant_parts: QuantParts  # which modules `quantize=` may swap (language; vision and projector on request)
    tensor_parallel: TensorParallelPlan  # what `tp=N` splits over N processes
    stop_tokens: tuple[str, ...] = ()  # tokens besides eos that end a turn, where the tokenizer has them
    # (name, parameter, parsed config, generator) -> True when it initialised a parameter of its own
    init_parameter: Callable[[str, nn.Parameter, Any, torch.Generator], bool] | None = None
    builtin_names: tuple[str, ...] = ()  # built-in demo model names ("demo"): BUILTIN_DIR / name


@cache
def registry() -> tuple[Family, ...]:
    """Every family vlmkit knows, one entry each (imported on first use: the packages import torch models)."""
    from vlmkit import idefics, llava_next, vipllava
    from vlmkit.idefics import policy as idefics_policy
    from vlmkit.idefics.processor import END_OF_UTTERANCE, IdeficsProcessor
    from vlmkit.llava_next import policy as llava_next_policy
    from vlmkit.llava_next.processor import LlavaNextProcessor
    from vlmkit.vipllava import policy as llava_policy
    from vlmkit.vipllava.processor import LlavaProcessor

    return (
        Family(
            name="vipllava",
            title="LLaVA",
            model_types=("vipllava", "llava"),
            config_cls=vipllava.VipLlavaConfig,
            model_cls=vipllava.VipLlavaModel,
            key_map=vipllava.KEY_MAP,
            ignore=vipllava.KEY_IGNORE,
            processor_cls=LlavaProcessor,
            prompt_inputs=llava_policy.prompt_inputs,
            training_sample=llava_policy.training_sample,
            collate_images=llava_policy.collate_images,
            trainable=TrainableParts(
                projector=("multi_modal_projector",),
                lora_scope=("language_model",),
                vision=("vision_tower.",),
            ),
            quant_parts=QuantParts(
                language=("language_model",),
                vision=("vision_tower",),
                projector=("multi_modal_projector",),
            ),
            tensor_parallel=TensorParallelPlan(
                blocks=("language_model.model.layers",),
                vocab=("language_model.model.embed_tokens", "language_model.lm_head"),
            ),
            builtin_names=("demo", "demo-vipllava"),
        ),
        Family(
            name="idefics",
            title="IDEFICS",
            model_types=("idefics",),
            config_cls=idefics.IdeficsConfig,
            model_cls=idefics.IdeficsModel,
            key_map=idefics.KEY_MAP,
            ignore=idefics.KEY_IGNORE,
            processor_cls=IdeficsProcessor,
            prompt_inputs=idefics_policy.prompt_inputs,
            training_sample=idefics_policy.training_sample,
            collate_images=idefics_policy.collate_images,
            trainable=TrainableParts(  # the new-token rows (additional_*) always train with the projector
                projector=(
                    "model.perceiver_resampler",
                    "model.gated_cross_attn_layers",
                    "additional_embedding",
                    "additional_fc",
                ),
                lora_scope=("model.layers", "model.gated_cross_attn_layers"),
                vision=("vision_model.",),
            ),
            quant_parts=QuantParts(
                language=("model.layers", "model.gated_cross_attn_layers", "lm_head"),
                vision=("model.vision_model",),
                projector=("model.perceiver_resampler",),
                skip=("lm_head.additional_fc",),  # the new tokens' few rows, which train
            ),
            tensor_parallel=TensorParallelPlan(
                blocks=("model.layers", "model.gated_cross_attn_layers"),
                vocab=("model.embed_tokens", "lm_head"),
            ),
            stop_tokens=(END_OF_UTTERANCE,),  # IDEFICS-instruct ends each turn with it
            init_parameter=idefics_policy.init_parameter,
            builtin_names=("demo-idefics",),
        ),
        Family(
            name="llava_next",
            title="LLaVA-NeXT",
            model_types=("llava_next",),
            config_cls=llava_next.LlavaNextConfig,
            model_cls=llava_next.LlavaNextModel,
            key_map=llava_next.KEY_MAP,
            ignore=llava_next.KEY_IGNORE,
            processor_cls=LlavaNextProcessor,
            prompt_inputs=llava_next_policy.prompt_inputs,
            training_sample=llava_next_policy.training_sample,
            collate_images=llava_next_policy.collate_images,
            trainable=TrainableParts(  # the newline vector is a parameter of the model itself
                projector=("multi_modal_projector", "image_newline"),
                lora_scope=("language_model",),
                vision=("vision_tower.",),
            ),
            quant_parts=QuantParts(
                language=("language_model",),
                vision=("vision_tower",),
                projector=("multi_modal_projector",),
            ),
            tensor_parallel=TensorParallelPlan(
                blocks=("language_model.model.layers",),
                vocab=("language_model.model.embed_tokens", "language_model.lm_head"),
            ),
            init_parameter=llava_next_policy.init_parameter,
        ),
    )


def families() -> dict[str, Family]:
    """The registry by config.json model_type."""
    return {model_type: family for family in registry() for model_type in family.model_types}


def family_for(config: dict[str, Any], source: str) -> Family:
    table = families()
    model_type = config.get("model_type")
    if model_type not in table:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported by vlmkit; supported: {sorted(table)}"
        )
    return table[model_type]


def family_named(name: str) -> Family:
    for family in registry():
        if family.name == name:
            return family
    raise ValueError(f"no family named {name!r}; known: {[f.name for f in registry()]}")


def family_of(obj: Any) -> Family:
    """The family of a model (peft-wrapped or not) or a processor, by its class."""
    base = obj.get_base_model() if hasattr(obj, "get_base_model") else obj
    for family in registry():
        if isinstance(base, (family.model_cls, family.processor_cls)):
            return family
    known = [c.__name__ for f in registry() for c in (f.model_cls, f.processor_cls)]
    raise TypeError(f"{type(obj).__name__} belongs to no family vlmkit knows (known classes: {known})")


def stop_token_ids(tokenizer: Any, family: Family) -> list[int]:
    """The ids that end a reply: eos, then the family's end-of-turn tokens that this tokenizer has."""
    ids = [tokenizer.eos_token_id, *(tokenizer.token_to_id(token) for token in family.stop_tokens)]
    return [i for i in ids if i is not None]


def lora_target_regex(family: Family, targets: list[str]) -> str:
    """peft's target_modules: the `targets` linears under the family's LoRA scope."""
    scope = "|".join(re.escape(path) for path in family.trainable.lora_scope)
    return rf".*({scope}).*\.({'|'.join(targets)})$"


# ---------------------------------------------------------------------------------------------
# Names: built-in demo models first, then a folder or a hub id
# ---------------------------------------------------------------------------------------------


def builtin_model(name: str) -> Path:
    """The folder of a built-in demo model ("demo" is the ViP-LLaVA one)."""
    owner = {n: family for family in registry() for n in family.builtin_names}
    if name not in owner:
        raise ValueError(f"unknown built-in model {name!r}; built-in: {', '.join(owner)}")
    folder = BUILTIN_DIR / owner[name].name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"built-in model {name!r} is missing from this install ({folder}); rebuild it with `make demo-models`"
        )
    return folder


def resolve_model(name_or_path: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The checkpoint folder of a local folder (as it is), a built-in demo model's name ("demo",
    "demo-idefics"), or a hub repo id (see `weights.resolve_checkpoint`)."""
    text = str(name_or_path)
    builtin = any(text in family.builtin_names for family in registry())
    if builtin and not Path(text).expanduser().is_dir():
        return builtin_model(text)
    return resolve_checkpoint(name_or_path, revision=revision)


# ---------------------------------------------------------------------------------------------
# Loading and building
# ---------------------------------------------------------------------------------------------


def load_model(
    path_or_repo_id: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    revision: str | None = None,
    progress: bool = False,
    batched: bool = False,
    quantize: str | QuantConfig | None = None,
    group_size: int | None = None,
    quantize_parts: tuple[str, ...] | list[str] = (),
    inference: bool = True,
    tp: int = 1,
) -> nn.Module:
    """Load a published (or transformers-saved, or vlmkit-saved) checkpoint, or a built-in demo model.

    dtype: None or "auto" is config.json's dtype, else the stored one; device: where the weights go (default CPU);
    progress: a loading bar on stderr when it is a terminal; batched: on the CPU, lay the weights out for many
    rows at a time (a server) rather than one.
    quantize: "int8" (per output channel) or "int4" (groups of `group_size` inputs) weight-only quantization
    of the language model's linear layers and LM head, done layer by layer as the file is read;
    quantize_parts adds "vision" and/or "projector". A checkpoint saved quantized (`vlmkit convert
    --quantize`) loads as it was saved. inference=False keeps the layout training reads (no CPU relayout).
    tp: split the language model over this many processes (tensor parallel, vlmkit.tensor_parallel), each
    running this same call under torchrun; each reads only its part of the file, onto its own GPU (or CPU).
    The model is built on the meta device and the tensors are assigned, so nothing is allocated twice.

        >>> model = load_model("demo-idefics", quantize="int8")
    """
    device = parse_device(device)
    folder = resolve_model(path_or_repo_id, revision=revision)
    raw = read_config(folder)
    family = family_for(raw, str(folder / "config.json"))
    config = family.config_cls.from_hf(raw)
    stored = stored_quantization(raw, str(folder / "config.json"))
    requested = parse_quantize(quantize, group_size=group_size, parts=quantize_parts)
    quantization = resolve(requested, stored, str(folder))
    tensors = None
    if (
        tp == 1
    ):  # headers only; a config deeper than its weights fails before building (100000 layers: minutes)
        tensors = remap_keys(read_tensors(weight_files(folder)), family.key_map, family.ignore)
        check_decoder_depth(tensors, family, config, str(folder))
    with torch.device("meta"):
        model = family.model_cls(config)
    if tp != 1:  # a process count the heads do not divide fails here, before any file is opened
        device = split_over_processes(model, family, tp, quantization, device, str(folder))
    if tensors is None:
        tensors = remap_keys(read_tensors(weight_files(folder)), family.key_map, family.ignore)
    dtype = parse_dtype(dtype) or checkpoint_dtype(tensors, raw)
    if quantization is not None:
        load_quantized(
            model,
            tensors,
            family.quant_parts,
            quantization,
            quantized_file=stored is not None,
            dtype=dtype,
            device=device,
            source=str(folder),
        )
    model.quantization = quantization  # what `save_pretrained` records in config.json
    load_weights(model, tensors, dtype=dtype, device=device, source=str(folder), progress=progress)
    if tp != 1:
        from vlmkit.tensor_parallel import localize

        localize(model)
    del tensors  # the model holds the tensors now; relayout below must not keep a second copy alive
    if inference and tp == 1 and next(model.parameters()).device.type == "cpu":
        optimize_for_cpu_inference(model, batched=batched)
    return model.eval()


def check_decoder_depth(tensors: dict[str, Any], family: Family, config: Any, source: str) -> None:
    """CheckpointError when config.json asks for more decoder layers than the checkpoint holds (counted from
    the tensor names under the family's decoder container), before a model of that depth is built."""
    from vlmkit.weights import CheckpointError

    container = family.tensor_parallel.blocks[0] + "."
    held = {key[len(container) :].partition(".")[0] for key in tensors if key.startswith(container)}
    layers = len({i for i in held if i.isdigit()})
    wanted = config.text_config.num_hidden_layers
    if layers and wanted > layers:
        raise CheckpointError(
            f"{source}: config.json asks for {wanted} decoder layers but the weights hold {layers}; "
            "check that config.json belongs to these weights"
        )


def parse_device(device: torch.device | str | None) -> torch.device | None:
    """A device name checked before anything is read: unknown kinds and absent GPUs are named as such."""
    if device is None:
        return None
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU (use cpu)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for, but MPS is not available here (use cpu)")
    return parsed


def split_over_processes(
    model: nn.Module,
    family: Family,
    tp: int,
    quantization: QuantConfig | None,
    device: torch.device | str | None,
    source: str,
) -> torch.device:
    """Check that `model` (on the meta device) splits over `tp` processes, before anything is read, and
    split it; returns this process's device."""
    from vlmkit.tensor_parallel import check_tp_size, parallelize, process_mesh, tp_device

    check_tp_size(model, family.tensor_parallel, tp, source)
    if quantization is not None:
        raise ValueError(
            f"tp={tp} with {quantization.scheme} weights is not supported: quantized layers do not split "
            f"over processes. Use tp with bf16/fp32 weights, or a quantized model on one device"
        )
    device = tp_device(device)
    parallelize(model, family.tensor_parallel, process_mesh(tp, device))
    return device


def load_processor(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Any:
    """The processor (tokenizer, image preprocessing, prompt building, chat template) of a checkpoint, in the
    published layout or the one transformers 5 writes. The family comes from config.json's model_type or,
    without a config.json, from the processor class named in the processor files."""
    folder = resolve_model(path_or_repo_id, revision=revision)
    if (folder / "config.json").is_file():
        family = family_for(read_config(folder), str(folder / "config.json"))
        return family.processor_cls.from_folder(folder)
    named = None
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            named = named or read_config_file(folder / name).get("processor_class")
    by_class = {family.processor_cls.__name__: family for family in registry()}
    if named not in by_class:
        raise ValueError(
            f"{folder}: cannot tell which processor to build (no config.json, processor_class {named!r}); "
            f"supported: {sorted(by_class)}"
        )
    return by_class[named].processor_cls.from_folder(folder)


def init_model(config: dict[str, Any], *, seed: int = 0, std: float = 0.02) -> nn.Module:
    """A model of the given config.json contents with fresh random weights, for training small models from
    scratch: normal(0, std) matrices and embeddings, unit norms, zero biases, and the family's own parameters
    (IDEFICS: gates, perceiver latents) as its `init_parameter` says."""
    family = family_for(config, "config")
    parsed = family.config_cls.from_hf(config)
    model = family.model_cls(parsed)
    g = torch.Generator().manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, (nn.LayerNorm, RMSNorm))}
    with torch.no_grad():
        for name, p in model.named_parameters():  # one generator, in parameter order: a seed is a model
            if family.init_parameter is not None and family.init_parameter(name, p, parsed, g):
                continue
            if id(p) in norms:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model

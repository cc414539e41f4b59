"""Checkpoint discovery, safetensors reading, key maps, loading onto meta-built models, and saving.

A key map is data: an ordered list of (source prefix, our prefix) pairs; the first pair whose source prefix
starts a checkpoint key renames it. Keys that match an `ignore` pattern (buffers older writers persisted)
are dropped. Everything else must line up with the model exactly, or one error lists every problem.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

CONFIG_NAME = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

KeyMap = Sequence[tuple[str, str]]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model as it is."""


# ---------------------------------------------------------------------------------------------
# Finding a checkpoint
# ---------------------------------------------------------------------------------------------

HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]


def resolve_checkpoint(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder as it is, or a hub repo id fetched through `huggingface_hub` (its cache; offline mode
    via `HF_HUB_OFFLINE=1` is respected). Built-in demo model names are the registry's:
    `vlmkit.models.resolve_model` takes those too."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo_id)
    looks_local = (
        path.exists() or text.startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text)
    )
    if looks_local:
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise FileNotFoundError(
            f"checkpoint path {text!r} {what}; pass a folder holding config.json and "
            f"the weights, or a Hugging Face repo id such as 'llava-hf/vip-llava-7b-hf'"
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        folder = Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
        if not any(folder.glob("*.safetensors")):  # an old repo with only pickled weights
            folder = Path(
                snapshot_download(
                    text, revision=revision, allow_patterns=[*HUB_PATTERNS, "pytorch_model*.bin"]
                )
            )
    except HFValidationError as e:
        raise FileNotFoundError(
            f"{text!r} is neither a local folder nor a valid Hugging Face repo id: {e}"
        ) from e
    except Exception as e:  # offline, not cached, gated, network down: say which and how to fix it
        raise FileNotFoundError(
            f"could not get checkpoint {text!r} from the Hugging Face hub or its local cache "
            f"({type(e).__name__}: {e}). Download it once with `huggingface-cli download {text}` "
            f"(or unset HF_HUB_OFFLINE), or pass a local folder."
        ) from e
    return folder


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a checkpoint folder needs config.json")
    return read_config_file(path)


def read_config_file(path: Path) -> dict[str, Any]:
    """A JSON object from a config file, with an error that names the file."""
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-download or re-save the checkpoint") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------
# Reading tensors
# ---------------------------------------------------------------------------------------------


def weight_files(folder: Path) -> list[Path]:
    """The files holding the weights: safetensors (single or sharded) first, else pickled torch files."""
    for index_name, single in ((SAFE_INDEX, SAFE_WEIGHTS), (TORCH_INDEX, TORCH_WEIGHTS)):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e!r})") from e
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(
                    f"{index} names shards that are not in {folder}: {missing}; the download is incomplete"
                )
            return files
        if (folder / single).is_file():
            return [folder / single]
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(
        f"no weights in {folder} (looked for {SAFE_WEIGHTS}, {SAFE_INDEX}, {TORCH_WEIGHTS}, "
        f"{TORCH_INDEX}); the folder holds {found}"
    )


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint, read when it is assigned. A safetensors file is memory-mapped only for
    the time it takes to copy one tensor out, so file pages never pile up in the process's memory next to
    the loaded weights (peak RSS stays the size of the model)."""

    path: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: torch.Tensor | None = None  # .bin files: torch.load has mapped them already

    def load(
        self,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        part: tuple[int, int, int] | None = None,
    ) -> torch.Tensor:
        """The tensor on `device` in `dtype`; part (dim, start, stop): only that range along dim, read
        from the file without reading the rest (one process's share of a split tensor)."""
        target = dtype if (dtype is not None and self.dtype.is_floating_point) else self.dtype
        if self.tensor is not None:
            t = self.tensor if part is None else self.tensor.narrow(part[0], part[1], part[2] - part[1])
            return t.to(device=device or "cpu", dtype=target, copy=True)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                if part is None:
                    t = f.get_tensor(self.key)
                else:
                    dim, start, stop = part
                    t = f.get_slice(self.key)[(slice(None),) * dim + (slice(start, stop),)]
                return t.to(device=device or "cpu", dtype=target, copy=True)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot read tensor {self.key!r} from {self.path}: {e}. The file is corrupt or truncated; "
                f"re-download it"
            ) from e


def read_tensors(files: Iterable[Path]) -> dict[str, TensorRef]:
    """Every tensor of the given files, by name, as a reference to read later. safetensors headers are
    read now (a corrupt file fails here); `.bin` files are read with `torch.load(weights_only=True)`, so
    nothing but tensors is ever unpickled."""
    tensors: dict[str, TensorRef] = {}
    for path in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    part = {}
                    for k in f.keys():
                        piece = f.get_slice(k)
                        kind = piece.get_dtype()
                        if kind not in SAFETENSORS_DTYPES:
                            raise CheckpointError(f"{path}: tensor {k!r} has unsupported dtype {kind}")
                        part[k] = TensorRef(path, k, tuple(piece.get_shape()), SAFETENSORS_DTYPES[kind])
            except (SafetensorError, OSError, ValueError) as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(
                    f"cannot read {path}: {e}. The file is corrupt or truncated; re-download it"
                ) from e
        else:
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(
                    f"cannot read {path} as a weights-only torch file ({e}). vlmkit never "
                    f"unpickles arbitrary objects; convert it to safetensors"
                ) from e
            if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
                raise CheckpointError(f"{path} does not hold a state dict of tensors")
            part = {k: TensorRef(path, k, tuple(t.shape), t.dtype, t) for k, t in loaded.items()}
        dup = tensors.keys() & part.keys()
        if dup:
            raise CheckpointError(
                f"{path} repeats tensors already read from another shard: {sorted(dup)[:5]}"
            )
        tensors.update(part)
    return tensors


def remap_keys(tensors: dict[str, Any], key_map: KeyMap, ignore: Sequence[str] = ()) -> dict[str, Any]:
    """Rename checkpoint keys to our module names with an ordered prefix table."""
    ignore_re = [re.compile(p) for p in ignore]
    out: dict[str, Any] = {}
    for key, tensor in tensors.items():
        if any(p.search(key) for p in ignore_re):
            continue
        new = key
        for src, dst in key_map:
            if key.startswith(src):
                new = dst + key[len(src) :]
                break
        if new in out:
            raise CheckpointError(
                f"checkpoint holds two tensors for {new!r} (one under {key!r}); it mixes two key layouts"
            )
        out[new] = tensor
    return out


# ---------------------------------------------------------------------------------------------
# Loading into a model built on the meta device
# ---------------------------------------------------------------------------------------------


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """{alias: owner} for parameters that share one tensor (a tied LM head)."""
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            aliases[name] = seen[id(p)]
        else:
            seen[id(p)] = name
    return aliases


def load_weights(
    model: nn.Module,
    tensors: dict[str, TensorRef],
    *,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    source: str = "checkpoint",
    progress: bool = False,
) -> None:
    """Read `tensors` (already in our key names) into a meta-built `model`. Missing, unexpected and
    wrong-shaped tensors are reported together in one CheckpointError, before anything is read.
    progress: a bar on stderr (when it is a terminal) counting the bytes read."""
    aliases = tied_parameters(model)
    # what is still on the meta device (quantized layers, swapped in before, are loaded already)
    expected = {k: v for k, v in model.state_dict().items() if k not in aliases and v.is_meta}
    for alias, owner in aliases.items():  # a tied head stored explicitly is the same tensor: accept it once
        if alias in tensors and owner not in tensors:
            tensors[owner] = tensors[alias]
        tensors.pop(alias, None)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    wrong = sorted(
        f"{k}: checkpoint {tuple(tensors[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    )
    if missing or unexpected or wrong:
        parts = [f"{source} does not match the model built from its config.json:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                shown = "\n    ".join(items[:50]) + (
                    f"\n    ... and {len(items) - 50} more" if len(items) > 50 else ""
                )
                parts.append(f"  {len(items)} {title}:\n    {shown}")
        parts.append("Check that config.json belongs to these weights (same model size and type).")
        raise CheckpointError("\n".join(parts))
    from tqdm.auto import tqdm

    split = getattr(model, "tp_mesh", None) is not None
    if split:
        from vlmkit.tensor_parallel import as_local_part, shard_range
    total = sum(math.prod(r.shape) * r.dtype.itemsize for r in tensors.values())
    state = {}
    with tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="loading",
        disable=None if progress else True,
        leave=False,
    ) as bar:
        for k, ref in tensors.items():
            if split:  # split over processes (tensor parallel): read this process's part only
                meta = expected[k]
                state[k] = as_local_part(meta, ref.load(device=device, dtype=dtype, part=shard_range(meta)))
            else:
                state[k] = ref.load(device=device, dtype=dtype)
            bar.update(math.prod(ref.shape) * ref.dtype.itemsize)
    model.load_state_dict(state, assign=True, strict=False)
    for alias, owner in aliases.items():  # assign=True replaced the owner; point the alias at it again
        parent, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(owner))
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: tensors left unset after loading: {still_meta[:10]}")


def checkpoint_dtype(tensors: dict[str, TensorRef], config: dict[str, Any] | None = None) -> torch.dtype:
    """The dtype "auto" means, as the reference reads it: config.json's `dtype` (or older `torch_dtype`)
    when it names a floating dtype, else the first floating tensor's dtype. (A checkpoint may be stored in
    half precision to save space and still be meant to run in float32.)"""
    named = (config or {}).get("dtype") or (config or {}).get("torch_dtype")
    if isinstance(named, str) and DTYPES.get(named.removeprefix("torch.")) is not None:
        return DTYPES[named.removeprefix("torch.")]
    for t in tensors.values():
        if t.dtype.is_floating_point:
            return t.dtype
    return torch.float32


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)} or a torch.dtype") from None


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _umask_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask); mkstemp's own is 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write_json(path: Path, obj: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.chmod(tmp, _umask_mode())
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.chmod(tmp, _umask_mode())  # safetensors writes 0o600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SavePretrainedMixin:
    """`save_pretrained` for models with a `config` that has `to_hf()`."""

    def save_pretrained(
        self,
        folder: str | os.PathLike,
        *,
        max_shard_bytes: int = 5 * 2**30,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        """Write safetensors + config.json that both vlmkit and transformers load back.
        storage_dtype: store floating tensors in this dtype (e.g. float16 to halve the files) while
        config.json keeps the model's dtype, which loading with dtype "auto" restores.
        A quantized model (loaded with inference=False) is written as vlmkit's quantized checkpoint: its
        integers, scales and zeros, and a `quantization_config` in config.json."""
        from vlmkit.quant import quantized_state_dict

        config = self.config.to_hf()  # type: ignore[attr-defined]
        quantization = getattr(self, "quantization", None)
        if quantization is not None:
            if storage_dtype is not None:
                raise ValueError("storage_dtype does not apply to a quantized model")
            config["quantization_config"] = quantization.to_hf()
            # transformers warns on an unknown quant_method and then loads garbage; pointing its
            # `transformers_weights` at a file that does not exist makes it stop, naming the reason
            config["transformers_weights"] = quantization.transformers_refusal
        save_checkpoint(
            self,
            folder,
            config,
            max_shard_bytes=max_shard_bytes,
            storage_dtype=storage_dtype,
            state=quantized_state_dict(self) if quantization is not None else None,
        )


def save_checkpoint(
    model: nn.Module,
    folder: str | os.PathLike,
    config: dict[str, Any],
    *,
    max_shard_bytes: int = 5 * 2**30,
    storage_dtype: torch.dtype | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write config.json and the weights (`state`, default the model's state dict) (one safetensors file, or shards plus an index) atomically.

    Tied aliases are left out, as transformers writes them. Keys are our module names, which are the
    published checkpoint names.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    aliases = tied_parameters(model)
    state = state if state is not None else model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in state.items() if k not in aliases}
    dtype = checkpoint_dtype(state)
    if storage_dtype is not None:
        state = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += nbytes
    for stale in [*folder.glob("model-*-of-*.safetensors"), folder / SAFE_INDEX, folder / SAFE_WEIGHTS]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        _atomic_save_file(shards[0], folder / SAFE_WEIGHTS)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_save_file(shard, folder / name)
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in state.values())
        _atomic_write_json(folder / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    _atomic_write_json(folder / CONFIG_NAME, {**config, "dtype": str(dtype).removeprefix("torch.")})

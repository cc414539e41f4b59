"""Weight-only quantization of linear layers, applied while a checkpoint loads.

    model = vlmkit.load_model("llava-hf/vip-llava-7b-hf", dtype="bfloat16", quantize="int4")

Schemes:
- int8: one scale per output channel, w = q * scale, q in [-127, 127];
- int4: one scale and one zero per group of `group_size` inputs, w = (q - 8) * scale + zero, q in [0, 15].

Scales and zeros are rounded to bfloat16 *before* the integers are chosen, so every kernel that reads them
(PyTorch's packed CPU kernels take bf16 scales) multiplies by exactly the weight `dequantize` gives.

Which layers: the family's `QuantParts` name them by module path. By default the language model's linear
layers, the LM head and IDEFICS's gated cross-attention blocks; the vision tower and the projector /
resampler only when `parts` asks for them (quantizing a vision tower is known to cost accuracy).

A `QuantLinear` replaces an `nn.Linear` (or, for a module that projects through `linear_fn`, its `weight`)
in the model built on the meta device, one layer at a time from the memory-mapped file, so a 7B checkpoint
is never held in full precision. The model code does not change. It has two layouts:
- "plain" (what files store): int8 rows, or two int4 values per byte (low nibble first) with (N, K/group)
  scales and zeros. The product dequantizes the weight and runs F.linear; gradients flow to the input
  (QLoRA), and it runs on any device.
- "cpu": the layout of `aten._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu`, set by
  `vlmkit.fastpath.optimize_for_cpu_inference` for inference. Activations go in as bf16 (both kernels
  read fp32 activations 5-20x slower) and come back in the caller's dtype.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the packed int4 CPU kernel accepts
DEFAULT_GROUP_SIZE = 64
PARTS = ("language", "vision", "projector")
QUANT_METHOD = "vlmkit"  # config.json's quantization_config.quant_method (transformers refuses it by name)
FORMAT_VERSION = 1
SCALE_DTYPE = torch.bfloat16
ROW_CHUNK = 2048  # rows quantized at a time: bounds the fp32 scratch for a vocab-sized LM head
DENSE_ROWS = (8, 16, 32, 64, 128, 256, 512)  # the row counts `dense_rows` tries


@functools.cache
def cpu_int4_block_rows() -> int:
    """Output rows per block of PyTorch's int4 CPU packing on this CPU: 64 with AVX-512, 32 with AVX2. In a
    block of B rows, input column k holds B/2 bytes, byte j carrying row j in its low nibble and row j + B/2
    in its high one. Found by packing a probe whose rows hold 1 + row // 16, then checked in full."""
    n, k = 128, 32
    rows = torch.arange(n)
    probe = (1 + rows // 16)[:, None].expand(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe.to(torch.int32).contiguous(), 1)
    block = 32 * (int(packed.reshape(-1)[0]) >> 4) - 32
    if block not in (16, 32, 64, 128) or not torch.equal(
        unpack_cpu_int4(packed.reshape(n, -1), block), probe
    ):
        raise RuntimeError(
            "PyTorch's int4 CPU packing has a layout vlmkit does not know on this machine; load without "
            "--quantize int4 (or with int8)"
        )
    return block


def unpack_cpu_int4(packed: torch.Tensor, block: int) -> torch.Tensor:
    """The int4 CPU packing (rows padded to whole blocks of `block`, K/2 bytes per row) -> (N, K) uint8."""
    n_pad, k = packed.shape[0], packed.shape[1] * 2
    half = block // 2
    blocks = packed.reshape(n_pad // block, k, half).transpose(1, 2).contiguous()  # (blocks, B/2, K)
    q = torch.empty(n_pad // block, 2, half, k, dtype=torch.uint8)  # rows in order
    torch.bitwise_and(blocks, 0xF, out=q[:, 0])
    torch.bitwise_right_shift(blocks, 4, out=q[:, 1])
    return q.view(n_pad, k)


@dataclass(frozen=True)
class QuantParts:
    """Module paths (a path matches itself and everything under it) of each part a family can quantize."""

    language: tuple[str, ...]
    vision: tuple[str, ...]
    projector: tuple[str, ...]
    skip: tuple[str, ...] = ()  # never quantized (IDEFICS's few new-token rows, which train)


@dataclass(frozen=True)
class QuantConfig:
    scheme: str  # "int8" | "int4"
    group_size: int | None = None  # int4 only (default DEFAULT_GROUP_SIZE)
    parts: tuple[str, ...] = ("language",)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {self.scheme!r}; choose one of {SCHEMES}")
        if self.scheme == "int4":
            group = DEFAULT_GROUP_SIZE if self.group_size is None else self.group_size
            if group not in GROUP_SIZES:
                raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")
            object.__setattr__(self, "group_size", group)
        elif self.group_size is not None:
            raise ValueError("group_size applies to int4 only (int8 has one scale per output channel)")
        parts = tuple(dict.fromkeys(("language", *self.parts)))
        unknown = [p for p in parts if p not in PARTS]
        if unknown:
            raise ValueError(f"unknown parts to quantize {unknown}; choose from {PARTS}")
        object.__setattr__(self, "parts", parts)

    def to_hf(self) -> dict[str, Any]:
        """The `quantization_config` section of config.json."""
        return {
            "quant_method": QUANT_METHOD,
            "version": FORMAT_VERSION,
            "scheme": self.scheme,
            "group_size": self.group_size,
            "parts": list(self.parts),
        }

    @classmethod
    def from_hf(cls, section: dict[str, Any], source: str = "config.json") -> QuantConfig:
        method = section.get("quant_method")
        if method != QUANT_METHOD:
            raise ValueError(
                f"{source} is quantized with {method!r}, which vlmkit does not read. Load the full-precision "
                f"checkpoint instead and quantize at load (quantize='int8' or 'int4')"
            )
        if section.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source}: vlmkit quantization format version {section.get('version')!r} is unknown"
            )
        return cls(section["scheme"], section.get("group_size"), tuple(section.get("parts", ("language",))))

    @property
    def transformers_refusal(self) -> str:
        """A weights file name that does not exist, for config.json's `transformers_weights`: transformers
        stops on it with an error that names it."""
        return f"vlmkit-{self.scheme}-quantized--transformers-cannot-read-this-checkpoint--load-it-with-vlmkit.safetensors"

    def describe(self) -> str:
        group = f", groups of {self.group_size}" if self.group_size else ""
        return f"{self.scheme}{group} ({', '.join(self.parts)})"


def parse_quantize(
    quantize: str | QuantConfig | None,
    *,
    group_size: int | None = None,
    parts: tuple[str, ...] | list[str] = (),
) -> QuantConfig | None:
    """A QuantConfig from the user's arguments (None, "int8", "int4" or a QuantConfig)."""
    if quantize is None or isinstance(quantize, QuantConfig):
        if quantize is None and (group_size is not None or parts):
            raise ValueError("group_size and parts need quantize='int8' or 'int4'")
        return quantize
    if not isinstance(quantize, str):
        raise ValueError(f"quantize must be 'int8', 'int4' or None, got {quantize!r}")
    return QuantConfig(quantize.lower(), group_size, tuple(parts))


def stored_quantization(config: dict[str, Any], source: str = "config.json") -> QuantConfig | None:
    """The quantization a checkpoint was saved with, from its config.json (None: full precision)."""
    section = config.get("quantization_config")
    return None if section is None else QuantConfig.from_hf(section, source)


def resolve(requested: QuantConfig | None, stored: QuantConfig | None, source: str) -> QuantConfig | None:
    """What to load: the stored quantization, or the requested one for a full-precision checkpoint. Asking a
    quantized checkpoint for a different quantization is an error (its full-precision weights are gone)."""
    if stored is not None and requested is not None and requested != stored:
        raise ValueError(
            f"{source} is already quantized ({stored.describe()}); it cannot be quantized again as "
            f"{requested.describe()}. Load it without quantize=, or quantize the full-precision checkpoint"
        )
    return stored or requested


# ---------------------------------------------------------------------------------------------
# The formats
# ---------------------------------------------------------------------------------------------


def _row_chunks(w: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, w.shape[0], ROW_CHUNK):
        yield w[start : start + ROW_CHUNK].float()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (N, K), scale bf16 (N,)) with w ~= q * scale, symmetric per output channel."""
    qs, scales = [], []
    for chunk in _row_chunks(w):
        scale = (chunk.abs().amax(dim=1) / 127).clamp(min=1e-10).to(SCALE_DTYPE)
        qs.append(torch.round(chunk / scale.float()[:, None]).clamp(-127, 127).to(torch.int8))
        scales.append(scale)
    return torch.cat(qs), torch.cat(scales)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K/2), scale bf16 (N, K/g), zero bf16 (N, K/g)): two 4-bit values per byte, the even
    column in the low nibble; w ~= (q - 8) * scale + zero over each group of `group_size` inputs, the
    group's min and max mapped to the ends of [0, 15]."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"int4 group_size {group_size} does not divide the layer's {k} inputs")
    qs, scales, zeros = [], [], []
    for chunk in _row_chunks(w):
        groups = chunk.reshape(chunk.shape[0], k // group_size, group_size)
        low, high = groups.amin(dim=-1), groups.amax(dim=-1)
        scale = ((high - low) / 15).clamp(min=1e-10).to(SCALE_DTYPE)
        zero = (low + 8 * scale.float()).to(SCALE_DTYPE)
        q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
        qs.append(pack_int4(q.reshape(chunk.shape[0], k).to(torch.uint8)))
        scales.append(scale)
        zeros.append(zero)
    return torch.cat(qs), torch.cat(scales), torch.cat(zeros)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) bytes, the even column in the low nibble."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) bytes -> (N, K) uint8 values in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize(
    scheme: str,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The weight a plain-layout quantized layer stands for, in `dtype`."""
    if scheme == "int8":
        return (qweight.to(torch.float32) * scale.float()[:, None]).to(dtype)
    return int4_weight(unpack_int4(qweight), scale.float(), zero.float(), torch.float32).to(dtype)


def int4_weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) int4 values as uint8, (N, K/g) float32 scales and zeros -> the (N, K) weight in `dtype`.
    float32 is exact; a 16-bit dtype is computed in that dtype, in place, in fewer passes (what a prefill
    can afford per layer)."""
    groups = q.view(q.shape[0], scale.shape[1], -1)
    if dtype == torch.float32:
        return ((groups.float() - 8) * scale[..., None] + zero[..., None]).view(q.shape)
    shift = (zero - 8 * scale).to(dtype)[..., None]
    return groups.to(dtype).mul_(scale.to(dtype)[..., None]).add_(shift).view(q.shape)


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------


def best_time(fn: Callable[[], object], rounds: int = 3) -> float:
    """The shortest of `rounds` timed calls of fn, in seconds: how the kernel choices here and in
    `vlmkit.fastpath` are measured on this CPU."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@functools.cache
def dense_rows(scheme: str, dtype: torch.dtype) -> int:
    """From how many activation rows (in `dtype`) a packed CPU kernel loses to dequantizing the weight once
    and running one dense GEMM (a long prompt's prefill), measured once per process on this CPU (under a
    second): a 1024 x 2048 layer, the best of three runs at 8 ... 512 rows."""
    g = torch.Generator().manual_seed(0)  # the caller's random state stays untouched
    layer = QuantLinear.from_weight(torch.randn(1024, 2048, generator=g) * 0.02, None, QuantConfig(scheme))
    layer.to_cpu_kernels()
    with torch.no_grad():
        for rows in DENSE_ROWS:
            x = torch.randn(rows, 2048, generator=g).to(dtype)
            packed = best_time(lambda x=x: layer._packed(x.to(SCALE_DTYPE)).to(dtype))
            dense = best_time(lambda x=x: F.linear(x, layer.dequantize(dtype)))
            if dense < packed:
                return rows
    return 1 << 62


class _DequantMatmul(torch.autograd.Function):
    """x @ W.T for a frozen quantized W: the backward dequantizes W again instead of saving it, so training
    (QLoRA) holds one layer's full-precision weight at a time, never the model's."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantize(grad.dtype), None


class QuantLinear(nn.Module):
    """A frozen linear layer with int8 or int4 weights (see the module docstring for the layouts).

    `infeatures` / `outfeatures` mirror in/out_features under the names peft reads from quantized layers,
    so LoRA adapters wrap it (QLoRA)."""

    def __init__(
        self,
        scheme: str,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        in_features: int,
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.layout = "plain"
        self.in_features = self.infeatures = in_features
        self.out_features = self.outfeatures = qweight.shape[0]
        self.group_size = in_features // scale.shape[1] if scheme == "int4" else None
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scale)
        self.register_buffer("zeros", zero)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig) -> QuantLinear:
        if config.scheme == "int8":
            q, scale = quantize_int8(weight)
            return cls("int8", q, scale, None, bias, in_features=weight.shape[1])
        q, scale, zero = quantize_int4(weight, config.group_size)
        return cls("int4", q, scale, zero, bias, in_features=weight.shape[1])

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme}{group}, "
            f"layout={self.layout}, bias={self.bias is not None}"
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight this layer stands for, in `dtype`, from either layout. float32 is exact; a
        16-bit dtype is computed in that dtype in fewer passes (a long prompt's prefill dequantizes every
        layer once)."""
        if self.scheme == "int8":
            if dtype == torch.float32:
                return dequantize("int8", self.qweight, self.scales)
            return self.qweight.to(dtype).mul_(self.scales.to(dtype)[:, None])
        if self.layout == "plain":
            return dequantize(self.scheme, self.qweight, self.scales, self.zeros, dtype=dtype)
        q = unpack_cpu_int4(self.qweight, cpu_int4_block_rows())  # see `to_cpu_kernels`
        scale, zero = self.scales.permute(2, 1, 0).float()  # (N, K/g) each
        return int4_weight(q, scale, zero, dtype)[: self.out_features]

    def to_cpu_kernels(self) -> None:
        """Re-lay the weight for PyTorch's packed CPU kernels (once; inference only). The int4 packing
        (PyTorch 2.13) takes blocks of output rows whose size depends on the CPU (`cpu_int4_block_rows`).
        Rows are padded to whole blocks so that `dequantize` can read the layout back (tests check it
        against the packing op)."""
        if self.layout == "cpu" or self.qweight.device.type != "cpu":
            return
        if self.scheme == "int4":
            pad = -self.out_features % cpu_int4_block_rows()
            q = unpack_int4(self.qweight)
            scale_zero = torch.stack([self.scales, self.zeros], dim=-1)  # (N, K/g, 2)
            if pad:
                q = F.pad(q, (0, 0, 0, pad))
                scale_zero = F.pad(scale_zero, (0, 0, 0, 0, 0, pad))
            # packed a few blocks at a time: the op takes int32, 8x the packed bytes
            self.qweight = torch.cat(
                [
                    torch.ops.aten._convert_weight_to_int4pack_for_cpu(part.to(torch.int32), 1)
                    for part in q.split(ROW_CHUNK)
                ]
            )
            self.scales = scale_zero.transpose(0, 1).contiguous()  # (K/g, N, 2), the kernel's order
            self.zeros = None
        self.layout = "cpu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        grad = torch.is_grad_enabled() and x.requires_grad
        if grad:
            y = _DequantMatmul.apply(x, self)
        elif self.layout == "plain" or (rows >= DENSE_ROWS[0] and rows >= dense_rows(self.scheme, x.dtype)):
            # any device, or enough rows that one dequantized GEMM beats the packed kernel
            y = F.linear(x, self.dequantize(x.dtype))
        else:
            flat = (
                x.reshape(rows, self.in_features).to(SCALE_DTYPE).contiguous()
            )  # the kernels read rows densely
            y = self._packed(flat)
            y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _packed(self, flat: torch.Tensor) -> torch.Tensor:
        """(rows, in) contiguous bf16 -> (rows, out) bf16 through PyTorch's packed CPU kernel."""
        if self.scheme == "int8":
            return torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scales)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales)
        return y[:, : self.out_features]

    def stored(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors a quantized checkpoint holds for this layer (plain layout), under `prefix`."""
        if self.layout != "plain":
            raise RuntimeError("only a plain-layout quantized layer can be saved (load with inference=False)")
        out = {f"{prefix}.qweight": self.qweight, f"{prefix}.scales": self.scales}
        if self.zeros is not None:
            out[f"{prefix}.zeros"] = self.zeros
        if self.bias is not None:
            out[f"{prefix}.bias"] = self.bias
        return out


def project(x: torch.Tensor, weight: torch.Tensor | QuantLinear) -> torch.Tensor:
    """`linear_fn` for modules whose `weight` may have been quantized (IDEFICS's decoupled LM head)."""
    if isinstance(weight, QuantLinear):
        return weight(x)
    from vlmkit.fastpath import dense

    return dense(x, weight)


# ---------------------------------------------------------------------------------------------
# Which layers, and swapping them in
# ---------------------------------------------------------------------------------------------


@dataclass
class Target:
    """One layer to quantize: `path` is the module (an nn.Linear) or the owner of a `linear_fn` weight."""

    path: str
    shape: tuple[int, int]  # (out, in)
    bias: bool
    owner_weight: bool = False  # True: path's `weight` (a linear_fn module), not the module itself


def _under(name: str, paths: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in paths)


def targets(model: nn.Module, parts: QuantParts, config: QuantConfig) -> list[Target]:
    """The layers `config` quantizes in `model` (built on the meta device or not)."""
    scope = tuple(p for part in config.parts for p in getattr(parts, part))
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    found = []
    for name, module in model.named_modules():
        if not _under(name, scope) or _under(name, parts.skip):
            continue
        if counts.get(id(getattr(module, "weight", None)), 0) > 1:
            continue  # a head tied to the embeddings stays as it is (the table is not a linear layer)
        if isinstance(module, nn.Linear):
            found.append(Target(name, tuple(module.weight.shape), module.bias is not None))
        elif hasattr(type(module), "linear_fn") and isinstance(getattr(module, "weight", None), torch.Tensor):
            found.append(Target(name, tuple(module.weight.shape), False, owner_weight=True))
    if config.scheme == "int4":
        bad = [f"{t.path} ({t.shape[1]} inputs)" for t in found if t.shape[1] % config.group_size]
        if bad:
            raise ValueError(
                f"int4 group_size {config.group_size} does not divide the inputs of {len(bad)} layers: "
                f"{bad[:5]}; choose a group size from {GROUP_SIZES} that divides them"
            )
    return found


def install(model: nn.Module, target: Target, layer: QuantLinear) -> None:
    """Put `layer` where `target` is: in place of the nn.Linear, or as its owner's `weight`."""
    parent_name, _, leaf = target.path.rpartition(".")
    if target.owner_weight:
        owner = model.get_submodule(target.path)
        del owner._parameters["weight"]
        owner.weight = layer  # registered as a child module named "weight"; `linear_fn` is `project`
        owner.linear_fn = project
    else:
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer)


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(checkpoint prefix, layer): a linear_fn owner's weight is stored under the owner's name."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name.removesuffix(".weight") if name.endswith(".weight") else name, module


def quantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as a quantized checkpoint stores them."""
    layers = dict(quantized_layers(model))
    inside = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    state = {k: v for k, v in model.state_dict().items() if not any(k.startswith(p + ".") for p in inside)}
    for prefix, layer in layers.items():
        state.update(layer.stored(prefix))
    return state


def stored_bytes(target: Target, config: QuantConfig) -> int:
    """Bytes of the quantized weight (integers, scales, zeros) of one layer."""
    n, k = target.shape
    if config.scheme == "int8":
        return n * k + 2 * n
    return n * k // 2 + 2 * 2 * n * (k // config.group_size)


def _stored_names(target: Target, config: QuantConfig, quantized_file: bool) -> list[str]:
    names = (
        [f"{target.path}.{n}" for n in ("qweight", "scales")] if quantized_file else [f"{target.path}.weight"]
    )
    if quantized_file and config.scheme == "int4":
        names.append(f"{target.path}.zeros")
    return names + ([f"{target.path}.bias"] if target.bias else [])


def load_quantized(
    model: nn.Module,
    tensors: dict[str, Any],
    parts: QuantParts,
    config: QuantConfig,
    *,
    quantized_file: bool,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
    source: str,
) -> list[Target]:
    """Swap a QuantLinear in for every layer `config` names, in the meta-built `model`, one layer at a time:
    its full-precision weight is read from the (memory-mapped) checkpoint and quantized, or, for a
    `quantized_file`, its stored integers are read. The references used are removed from `tensors`, so the
    caller loads the rest as usual."""
    from vlmkit.weights import CheckpointError

    found = targets(model, parts, config)
    missing = [n for t in found for n in _stored_names(t, config, quantized_file) if n not in tensors]
    if missing:
        raise CheckpointError(
            f"{source} lacks {len(missing)} tensors of the layers to quantize ({config.describe()}): "
            f"{missing[:10]}. Check that config.json belongs to these weights"
        )
    for t in found:
        refs = [tensors.pop(n) for n in _stored_names(t, config, quantized_file)]
        bias = refs.pop().load(dtype=dtype) if t.bias else None
        if quantized_file:
            q, scale, *zero = (r.load() for r in refs)
            expect = (t.shape[0], t.shape[1] // 2 if config.scheme == "int4" else t.shape[1])
            if tuple(q.shape) != expect or scale.shape[0] != t.shape[0]:
                raise CheckpointError(
                    f"{source}: {t.path}.qweight is {tuple(q.shape)}, the model needs {expect} "
                    f"for {config.describe()}"
                )
            layer = QuantLinear(
                config.scheme, q, scale, zero[0] if zero else None, bias, in_features=t.shape[1]
            )
        else:
            (ref,) = refs
            if tuple(ref.shape) != t.shape:
                raise CheckpointError(
                    f"{source}: {t.path}.weight is {tuple(ref.shape)}, the model built from config.json needs "
                    f"{t.shape}. Check that config.json belongs to these weights"
                )
            layer = QuantLinear.from_weight(ref.load(), bias, config)
        install(model, t, layer.to(device) if device is not None else layer)
    return found

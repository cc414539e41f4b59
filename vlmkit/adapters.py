"""LoRA adapters served beside their base model: several at once, each row of a batch with its own (or none),
never merged into the shared weights.

An adapter is a folder in peft's format (`adapter_config.json` + `adapter_model.safetensors`), as
`vlmkit finetune --train lora` writes it. `AdapterSet` holds the adapters of one model, at most `max_loaded`
of them read into memory (least recently used dropped first, read again from their folder when asked for),
and adds each targeted layer's low-rank update through a forward hook: the pairs of the adapters in the call
are stacked once, each row with an adapter gathers its own A and B, and two batched products give every
row's scale * (x @ A.T) @ B.T (one pair of thin products when a single adapter serves every row). Which rows
use which adapter is set per call (`AdapterSet.rows`), by `generate` and by the serving engine.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# one layer's stacked A.T and B.T; None: no adapter changes it
Stack = tuple[torch.Tensor, torch.Tensor] | None
STACKS_KEPT = 1024  # layers' stacks remembered over the sets of adapters in use
PREFIX = "base_model.model."  # peft's name for the model it wraps, in front of every key
REFUSED = {  # adapter_config.json settings whose weights are more than low-rank pairs on linear layers
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (fully trained copies of layers)",
    "trainable_token_indices": "trainable token rows",
    "target_parameters": "target_parameters",
    "lora_bias": "LoRA biases",
}


class AdapterError(ValueError):
    """An adapter that does not fit this model or cannot be read; the message says which and why."""


@dataclass
class Adapter:
    """One adapter's low-rank pairs by module path: A (r, in), B (out, r) and the update's scale; `digest`
    names its content (the prefix cache keys its blocks by it)."""

    name: str
    path: Path
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    digest: bytes = b""


def _alpha(config: dict[str, Any], path: str) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.search(pattern, path):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def read_adapter(name: str, path: str | Path, model: nn.Module, scope: tuple[str, ...] = ()) -> Adapter:
    """Read a peft LoRA folder for `model`; AdapterError when it targets layers the model does not have or
    outside `scope` (module path prefixes), its shapes belong to another base model, or it holds more than
    low-rank pairs on linear layers."""
    from safetensors.torch import load_file

    folder = Path(path)
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterError(
            f"adapter {name!r}: {folder} needs adapter_config.json and adapter_model.safetensors (peft's format, "
            "as `vlmkit finetune --train lora` writes)"
        )
    try:
        config = json.loads(config_file.read_text())
        tensors = load_file(str(weights_file))
        digest = hashlib.sha256(config_file.read_bytes() + weights_file.read_bytes()).digest()
    except (OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: cannot read {folder}: {e}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r} is a {config.get('peft_type')} adapter; only LoRA is served")
    for key, what in REFUSED.items():
        if config.get(key):
            raise AdapterError(
                f"adapter {name!r} uses {what}, which vlmkit does not serve; merge it with merge-lora"
            )
    if config.get("bias", "none") != "none" or config.get("fan_in_fan_out"):
        raise AdapterError(
            f"adapter {name!r}: bias training and fan_in_fan_out are not served; merge it instead"
        )
    modules = dict(model.named_modules())
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key.removeprefix(PREFIX))
        if match is None:
            raise AdapterError(f"adapter {name!r}: unexpected tensor {key!r} (only lora_A / lora_B weights)")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    layers = {}
    for module_path, pair in pairs.items():
        layer = modules.get(module_path)
        if layer is None:
            raise AdapterError(
                f"adapter {name!r} targets {module_path!r}, which this model does not have: it was trained on "
                "another base model (or family)"
            )
        if scope and not any(module_path == p or module_path.startswith(p + ".") for p in scope):
            raise AdapterError(
                f"adapter {name!r} changes {module_path!r}, outside the language model ({', '.join(scope)}): "
                "picture features are computed once and shared by every adapter, so such adapters are not served"
            )
        if set(pair) != {"A", "B"}:
            raise AdapterError(
                f"adapter {name!r}: {module_path} lacks its lora_{'B' if 'A' in pair else 'A'}"
            )
        a, b = pair["A"], pair["B"]
        in_features, out_features = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if a.shape[0] != b.shape[1] or (in_features, out_features) != (a.shape[1], b.shape[0]):
            raise AdapterError(
                f"adapter {name!r}: {module_path} is {out_features} x {in_features} in this model but the adapter's "
                f"update is {b.shape[0]} x {a.shape[1]}: it was trained on another base model"
            )
        r = a.shape[0]
        alpha = _alpha(config, module_path)
        scale = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
        layers[module_path] = (a.to(device, dtype).contiguous(), b.to(device, dtype).contiguous(), scale)
    if not layers:
        raise AdapterError(f"adapter {name!r} in {folder} holds no LoRA weights")
    return Adapter(name, folder, layers, digest)


class AdapterSet:
    """The adapters of one model by name, at most `max_loaded` in memory (LRU; a dropped one is read again from
    its folder when asked for). Thread-safe registry; the per-call row assignment (`rows`) belongs to the
    thread that runs the model."""

    def __init__(self, model: nn.Module, *, max_loaded: int = 4) -> None:
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        if getattr(model, "tp_mesh", None) is not None:
            raise ValueError("LoRA adapters are not served on a model split over processes (tp); use tp=1")
        from vlmkit.models import family_of

        self.model, self.max_loaded = model, max_loaded
        self.scope = family_of(model).trainable.lora_scope
        self.paths: dict[str, Path] = {}
        self.loaded: OrderedDict[str, Adapter] = OrderedDict()
        self.hooked: dict[nn.Module, str] = {}
        self.call: Call | None = None
        # per set of adapters in use (by identity, the set itself kept so no id is reused while cached): each
        # hooked layer's stacked pairs, filled as the layers run
        self.stacks: dict[tuple[int, ...], tuple[tuple[Adapter, ...], dict[Any, Any]]] = {}
        self.lock = threading.Lock()

    # -- the registry ---------------------------------------------------------------------------

    def add(self, name: str, path: str | Path) -> Adapter:
        """Register and read an adapter (AdapterError when it does not fit the model)."""
        if not name or name != name.strip():
            raise AdapterError(f"give the adapter a name without surrounding spaces, got {name!r}")
        adapter = read_adapter(name, path, self.model, self.scope)
        with self.lock:
            self.paths[name] = Path(path)
            self._keep(adapter)
        return adapter

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.paths:
                raise KeyError(name)
            del self.paths[name]
            self.loaded.pop(name, None)

    def names(self) -> list[str]:
        with self.lock:
            return list(self.paths)

    def get(self, name: str) -> Adapter:
        """The adapter, read again from its folder if it was dropped (KeyError when not registered)."""
        with self.lock:
            if name not in self.paths:
                raise KeyError(name)
            adapter = self.loaded.get(name)
            if adapter is not None:
                self.loaded.move_to_end(name)
                return adapter
            path = self.paths[name]
        adapter = read_adapter(name, path, self.model, self.scope)
        with self.lock:
            self._keep(adapter)
        return adapter

    def _keep(self, adapter: Adapter) -> None:
        self.loaded[adapter.name] = adapter
        self.loaded.move_to_end(adapter.name)
        while (
            len(self.loaded) > self.max_loaded
        ):  # rows still running with a dropped one keep their reference
            self.loaded.popitem(last=False)
        modules = dict(self.model.named_modules())
        for path in adapter.layers:
            module = modules[path]
            if module not in self.hooked:  # known before its hook can run (the engine may be running)
                self.hooked[module] = path
                module.register_forward_hook(self._hook)

    # -- applying them --------------------------------------------------------------------------

    @contextmanager
    def rows(self, adapters: list[Adapter | None]) -> Iterator[None]:
        """Within: row i of each model call uses adapters[i] (None: the base model). One entry stands for
        every row (a prompt, or generate's batch with one adapter)."""
        # in a fixed order (by name), so the stacks of a set of adapters are built once, whatever the rows' order
        present = sorted(
            {id(a): a for a in adapters if a is not None}.values(), key=lambda a: (a.name, id(a))
        )
        call = None
        if present:
            which = None  # one adapter for every row
            if not (len(adapters) == 1 or all(a is present[0] for a in adapters)):
                slot = {id(a): k for k, a in enumerate(present)}
                which = torch.zeros(len(adapters), len(present))
                for i, a in enumerate(adapters):
                    if a is not None:
                        which[i, slot[id(a)]] = 1.0
            call = Call(tuple(present), which, self._stacks_of(tuple(present)))
        previous, self.call = self.call, call
        try:
            yield
        finally:
            self.call = previous

    def _stacks_of(self, present: tuple[Adapter, ...]) -> dict[Any, Stack | Joint]:
        """The stacked pairs of each layer for this set of adapters, kept while the same set is in use (filled by
        the hooks). At most STACKS_KEPT layers' stacks are remembered over all sets: past that, every set's
        are dropped (each set's take about the bytes of its adapters)."""
        key = tuple(id(a) for a in present)
        cached = self.stacks.get(key)  # its set is held with it, so those ids are still these adapters
        if cached is not None:
            return cached[1]
        if sum(layers_in(kept) for _, kept in self.stacks.values()) > STACKS_KEPT:
            self.stacks.clear()
        stacks: dict[Any, Stack | Joint] = {}
        self.stacks[key] = (present, stacks)
        return stacks

    def _stack(self, path: str, present: tuple[Adapter, ...]) -> Stack:
        """The adapters' pairs of one layer side by side, transposed for the products: A.T (in, k * r) and B.T
        (k * r, out), B scaled, each rank padded to the largest with zeros (which add nothing); None when none
        of them changes this layer."""
        pairs = [a.layers.get(path) for a in present]
        if all(p is None for p in pairs):
            return None
        some = next(p for p in pairs if p is not None)
        rank = max(p[0].shape[0] for p in pairs if p is not None)
        A = some[0].new_zeros(some[0].shape[1], len(present) * rank)
        B = some[1].new_zeros(len(present) * rank, some[1].shape[0])
        for k, pair in enumerate(pairs):
            if pair is not None:
                a, b, scale = pair
                A[:, k * rank : k * rank + a.shape[0]] = a.t()
                B[k * rank : k * rank + b.shape[1]] = (b * scale).t()
        return A, B

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        call = self.call
        if call is None:
            return output
        stacks = call.stacks
        if module in stacks:
            stack = stacks[module]
        else:
            stack = stacks[module] = self._stack(self.hooked[module], call.adapters)
        if stack is None:
            return output
        A, B = stack  # (in, k * r) and (k * r, out), laid out for the two products
        low = self._low(call, A, (A.shape[1] // len(call.adapters),), inputs[0])
        if low.dtype != output.dtype:
            low, B = low.to(output.dtype), B.to(output.dtype)
        return torch.addmm(output.reshape(-1, output.shape[-1]), low, B).view(output.shape)

    def fused_hook(self, linears: list[nn.Module], x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """What `_hook` adds to each of `linears`, added in place to their joint output (the layers side by
        side, as `fastpath.FusedLinears` computes them from the same input): one product with all their A
        stacks side by side, then each layer's B into its own columns."""
        call = self.call
        if call is None:
            return output
        key = tuple(linears)
        stacks = call.stacks
        if key in stacks:
            joint = stacks[key]
        else:
            joint = stacks[key] = self._joint(linears, call.adapters)
        if joint is None:
            return output
        low = self._low(call, joint.A, joint.ranks, x)
        flat = output.view(-1, output.shape[-1])
        if low.dtype != flat.dtype:
            low = low.to(flat.dtype)
        for columns, lows, B in joint.blocks:
            flat[:, columns].addmm_(low[:, lows], B if B.dtype == flat.dtype else B.to(flat.dtype))
        return output

    def _joint(self, linears: list[nn.Module], present: tuple[Adapter, ...]) -> Joint | None:
        """The stacks of a fused group for these adapters (None when none of them changes any of its layers)."""
        parts = [self._stack(self.hooked[lin], present) if lin in self.hooked else None for lin in linears]
        if all(p is None for p in parts):
            return None
        blocks, ranks, low, column = [], [], 0, 0
        for part, lin in zip(parts, linears, strict=True):
            if part is not None:
                width = part[0].shape[1]
                blocks.append((slice(column, column + lin.out_features), slice(low, low + width), part[1]))
                ranks.append(width // len(present))
                low += width
            column += lin.out_features
        A = torch.cat([p[0] for p in parts if p is not None], dim=1)
        return Joint(A, tuple(blocks), tuple(ranks))

    @staticmethod
    def _low(call: Call, A: torch.Tensor, ranks: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        """x @ A (every row through every adapter's A: one product), each row keeping its own adapter's
        columns (rows without one keep none)."""
        flat = x.reshape(-1, x.shape[-1])
        low = (flat if flat.dtype == A.dtype else flat.to(A.dtype)) @ A
        if call.which is not None:
            low.mul_(call.columns(ranks, A, x.shape[-2] if x.dim() == 3 else 1))
        return low


def layers_in(stacks: dict[Any, Any]) -> int:
    """How many layers' stacks a set keeps (a fused group's count each)."""
    return sum(len(v.blocks) if isinstance(v, Joint) else 1 for v in stacks.values())


@dataclass(frozen=True)
class Joint:
    """The stacks of fused layers (one product from the same input): their A stacks side by side, and per
    changed layer its output columns, its columns of x @ A, and its B stack; each changed layer's rank."""

    A: torch.Tensor
    blocks: tuple[tuple[slice, slice, torch.Tensor], ...]
    ranks: tuple[int, ...]


@dataclass
class Call:
    """The adapters of one model call: in a fixed order, and which row uses which (n, k) one-hot rows, None
    when one adapter serves every row."""

    adapters: tuple[Adapter, ...]
    which: torch.Tensor | None
    stacks: dict[Any, Any]  # per layer (or fused group): its Stack (or Joint)
    _columns: dict[tuple[tuple[int, ...], int], torch.Tensor] = field(default_factory=dict)

    def columns(self, ranks: tuple[int, ...], like: torch.Tensor, tokens: int) -> torch.Tensor:
        """(n * tokens, k * sum(ranks)): 1 on the columns of each row's own adapter, for stacks of these ranks
        side by side (one per layer) and calls of `tokens` positions per row."""
        mask = self._columns.get((ranks, tokens))
        if mask is None:
            mask = torch.cat([self.which.repeat_interleave(r, dim=1) for r in ranks], dim=1)
            mask = mask.repeat_interleave(tokens, dim=0).to(like.device, like.dtype)
            self._columns[(ranks, tokens)] = mask
        return mask

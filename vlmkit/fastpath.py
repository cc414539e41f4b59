"""CPU fast paths, applied to a loaded model from outside, so the model files keep one plain code path.

The model code calls `self.q_proj(x)`, `self.project_qkv(x)`, `self.linear_fn(x, w)`; this module relays
those after loading:
- every `nn.Linear` becomes a `DenseLinear`, whose kernel suits a few activation rows on the CPU;
- q/k/v and gate/up are fused into one product each (`FusedLinears` in place of `project_qkv` /
  `project_gate_up`);
- modules that project by hand (`linear_fn`) get `dense`;
- the weights get the layout the expected batch reads fastest.
- quantized linear layers (`vlmkit.quant.QuantLinear`, swapped in while loading) take the layout of
  PyTorch's packed int8 / int4 CPU kernels;
- a vision tower's patch embedding runs as one matrix product where that measured faster than its
  convolution (`PatchEmbedding`).
Outputs do not change beyond fp32 rounding (the patch embedding's product sums in another order than the
convolution, with or without gradients); the linear paths fall back to the plain one by themselves for
anything that needs gradients, a wrapper such as peft's LoRA, or a re-assigned weight.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlmkit.quant import QuantLinear, best_time, project

SMALL_BATCH_ROWS = range(2, 65)
# (out, in, dtype) of a row-major weight -> whether `weight @ x.T` beat `x @ weight.T` for a few rows on this
# CPU (`measure_small_batches`); a shape not measured takes F.linear
TRANSPOSED_FASTER: dict[tuple[int, int, torch.dtype], bool] = {}

# module method -> the linear layers it applies to the same input
FUSIBLE = {"project_qkv": ("q_proj", "k_proj", "v_proj"), "project_gate_up": ("gate_proj", "up_proj")}


def dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), with the kernel chosen for a few activation rows on the CPU.

    Between 2 and 64 rows (a batched decode step, a short prompt) and a row-major weight whose shape
    `measure_small_batches` found faster that way on this CPU, the product runs as `weight @ x.T` (1.5-3x
    faster than `x @ weight.T` on one 2-core Zen 3, whose MKL small-M path was slow; slower on another
    EPYC); everything else, and anything that needs gradients, takes F.linear.
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        rows in SMALL_BATCH_ROWS
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
        and TRANSPOSED_FASTER.get((weight.shape[0], weight.shape[1], weight.dtype), False)
    ):
        y = torch.mm(weight, x.reshape(rows, -1).t()).t()
        if bias is not None:
            y = y + bias
        return y.contiguous().view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class DenseLinear(nn.Linear):
    """An nn.Linear that multiplies through `dense`; state dicts, peft and training see an nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dense(x, self.weight, self.bias)


class FusedLinears:
    """Linear layers of one module that read the same input (q/k/v; gate/up), their weights moved into one
    buffer (sum of outs, in), column-major unless `row_major`, so that one product serves them all. Each
    layer's `weight` stays its own Parameter, a view into the buffer, so checkpoints, state dicts and
    training see nothing different.

    Called in place of the module's `project_*` method: fused while no gradient is needed and every layer
    is still the module's and holds its slice, else each layer on its own (a dtype or device change, a
    re-assigned weight or a LoRA wrapper turns fusion off by itself)."""

    def __init__(self, owner: nn.Module, names: tuple[str, ...], *, row_major: bool = False) -> None:
        linears = [getattr(owner, n) for n in names]
        first = linears[0].weight
        sizes = [lin.out_features for lin in linears]
        if row_major:  # (out, in): the layout small batches read fastest
            weight = torch.empty(sum(sizes), first.shape[1], dtype=first.dtype, device=first.device)
        else:  # (out, in) view of an (in, out) buffer, strides (1, out): x @ buffer, fastest for one row
            weight = torch.empty(first.shape[1], sum(sizes), dtype=first.dtype, device=first.device).t()
        start = 0
        for lin, n in zip(linears, sizes, strict=True):
            weight[start : start + n].copy_(lin.weight.detach())
            lin.weight.data = weight[start : start + n]
            start += n
        self.owner = weakref.ref(owner)  # the owner holds this object: no strong cycle
        self.names, self.linears, self.weight, self.sizes = names, linears, weight, sizes
        self.ptrs = [lin.weight.data_ptr() for lin in linears]

    def usable(self) -> bool:
        owner = self.owner()
        return (
            owner is not None
            and not torch.is_grad_enabled()
            and all(
                getattr(owner, n) is lin
                and lin.weight.data_ptr() == ptr
                and lin.weight.dtype == self.weight.dtype
                for n, lin, ptr in zip(self.names, self.linears, self.ptrs, strict=True)
            )
        )

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if self.usable():
            out = dense(x, self.weight)
            hooks = [list(lin._forward_hooks.values()) for lin in self.linears]
            if not any(hooks):
                return list(out.split(self.sizes, dim=-1))
            # what the layers' forward hooks add (LoRA adapters) still applies: at once to the joint output
            # where one object hooks every layer it changes and offers `fused_hook`, else layer by layer
            first = next(h for h in hooks if h)
            owner = getattr(first[0], "__self__", None)
            if hasattr(owner, "fused_hook") and all(
                not h or (len(h) == 1 and getattr(h[0], "__self__", None) is owner) for h in hooks
            ):
                return list(owner.fused_hook(self.linears, x, out).split(self.sizes, dim=-1))
            outs = list(out.split(self.sizes, dim=-1))
            for i, lin in enumerate(self.linears):
                for hook in hooks[i]:
                    result = hook(lin, (x,), outs[i])
                    outs[i] = outs[i] if result is None else result
            return outs
        owner = self.owner()
        return [getattr(owner, n)(x) for n in self.names]


@functools.cache
def column_major_reads_faster(dtype: torch.dtype) -> bool:
    """Whether one activation row times a wide weight (out > in) runs faster with the weight stored
    column-major than row-major, in `dtype`, measured once per process on this CPU (about 0.2 s): six
    4096 x 2048 weights, more bytes together than the caches hold, the best of three rounds each. (A 2-core
    Zen 3 read fp32 column-major at 20-25 GB/s against 16-18 row-major; a 2-core Zen 4 reads bf16
    row-major faster, 20 against 16 GB/s.)"""
    x = torch.full((1, 2048), 0.01, dtype=dtype)
    rows = [torch.full((4096, 2048), 0.01, dtype=dtype) for _ in range(6)]
    cols = [w.t().contiguous().t() for w in rows]

    def best(weights: list[torch.Tensor]) -> float:
        return best_time(lambda: [F.linear(x, w) for w in weights])

    with torch.no_grad():
        best(rows)  # warm-up
        return best(cols) < best(rows)


def warm_best_time(fn: Callable[[], object]) -> float:
    """The shorter of two timed calls of fn after an untimed one (which pays for a new shape's set-up)."""
    fn()
    return best_time(fn, rounds=2)


def measure_small_batches(weights: list[torch.Tensor], rows: tuple[int, ...] = (4, 16, 48)) -> None:
    """Time both kernels of `dense` on each new shape (out, in, dtype) among the row-major CPU `weights`, for
    a few activation rows (`rows`, best of two after a warm-up), and note in TRANSPOSED_FASTER whether
    `weight @ x.T` took less time in all. Once per shape and process: a few ms for a small model, about a
    second for the seven distinct shapes of a 7B one."""

    with torch.no_grad():
        for w in weights:
            key = (w.shape[0], w.shape[1], w.dtype)
            usable = w.device.type == "cpu" and w.dim() == 2 and w.is_floating_point() and w.is_contiguous()
            if key in TRANSPOSED_FASTER or not usable:
                continue
            plain = transposed = 0.0
            for n in rows:
                x = torch.full((n, w.shape[1]), 0.01, dtype=w.dtype)
                plain += warm_best_time(lambda x=x, w=w: F.linear(x, w))
                transposed += warm_best_time(lambda x=x, w=w: torch.mm(w, x.t()).t().contiguous())
            TRANSPOSED_FASTER[key] = transposed < plain


class PatchEmbedding(nn.Conv2d):
    """A Conv2d whose stride is its kernel (a vision transformer's patch embedding) that, on the CPU, flattens
    each patch and multiplies all of them by the flattened kernel in one matrix product: the convolution's
    sums, up to fp32 rounding, with or without gradients (so both give the same features). State dicts see an
    nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4:
            return super().forward(x)
        B, C, H, W = x.shape
        kh, kw = self.kernel_size
        h, w = H // kh, W // kw
        patches = x[:, :, : h * kh, : w * kw].reshape(B, C, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5)
        y = F.linear(
            patches.reshape(B, h * w, C * kh * kw), self.weight.reshape(self.out_channels, -1), self.bias
        )
        return y.transpose(1, 2).reshape(B, self.out_channels, h, w)  # a view: (B, out, h, w) as Conv2d gives


# (out, in, kernel, image side, dtype) of a patch embedding -> whether one matrix product beat the convolution
# on this CPU (`measure_patch_embeddings`)
PATCHES_AS_PRODUCT: dict[tuple[int, int, tuple[int, int], int, torch.dtype], bool] = {}


def is_patch_embedding(conv: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.stride == conv.kernel_size
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def measure_patch_embeddings(model: nn.Module, pictures: tuple[int, ...] = (1, 4)) -> None:
    """For each vision transformer's patch embedding in `model` (a module with `patch_embedding` and a
    config's `image_size`), time the convolution and `PatchEmbedding`'s matrix product on `pictures` images
    of that size (best of two after a warm-up) and make it a PatchEmbedding where the product took less time
    in all.
    Once per shape and process: a few ms for the demo models, under a second for CLIP-L at 336 px (where the
    convolution won on one 2-core EPYC, and the product won at 96 px)."""

    with torch.no_grad():
        for module in model.modules():
            conv = getattr(module, "patch_embedding", None)
            side = getattr(getattr(module, "config", None), "image_size", None)
            if conv is None or not isinstance(side, int) or not is_patch_embedding(conv):
                continue
            w = conv.weight
            key = (conv.out_channels, conv.in_channels, conv.kernel_size, side, w.dtype)
            if key not in PATCHES_AS_PRODUCT:
                plain = fused = 0.0
                for n in pictures:
                    x = torch.full((n, conv.in_channels, side, side), 0.01, dtype=w.dtype, device=w.device)
                    plain += warm_best_time(lambda x=x, c=conv: nn.Conv2d.forward(c, x))
                    fused += warm_best_time(lambda x=x, c=conv: PatchEmbedding.forward(c, x))
                PATCHES_AS_PRODUCT[key] = fused < plain
            if PATCHES_AS_PRODUCT[key]:
                conv.__class__ = PatchEmbedding


def optimize_for_cpu_inference(model: nn.Module, *, batched: bool = False) -> None:
    """Relay the model's projections to the CPU kernels and lay its weights out for decoding.

    For one sequence (one activation row per matrix), the fused and other wide projections (out > in, the
    LM head among them) are stored column-major when that reads faster on this CPU in the model's dtype
    (`column_major_reads_faster`), and narrow ones (down, o) stay row-major. For batched decoding
    (`batched`, a server's 2-64 rows per step) every weight is row-major, and `dense` multiplies each shape
    with the kernel measured fastest for a few rows (`measure_small_batches`). Calling it again switches
    between the two layouts."""
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    columns = not batched and bool(floating) and column_major_reads_faster(floating[0])
    fused: set[int] = set()
    for module in model.modules():
        for method, names in FUSIBLE.items():
            if not hasattr(type(module), method):
                continue
            linears = [getattr(module, n) for n in names]
            if all(isinstance(lin, nn.Linear) and lin.bias is None for lin in linears):
                setattr(module, method, FusedLinears(module, names, row_major=not columns))
                fused.update(id(lin) for lin in linears)
        if hasattr(type(module), "linear_fn"):
            module.linear_fn = project
        if isinstance(module, QuantLinear):
            module.to_cpu_kernels()
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DenseLinear
        if isinstance(module, nn.Linear) and id(module) not in fused:
            w = module.weight
            if not columns:
                module.weight.data = w.data.contiguous()
            elif w.shape[0] > w.shape[1] and w.is_contiguous():
                module.weight.data = w.data.t().contiguous().t()
    products = [f.weight for m in model.modules() for f in vars(m).values() if isinstance(f, FusedLinears)]
    products += [m.weight for m in model.modules() if type(m) is DenseLinear]
    measure_small_batches(products)  # which kernel `dense` uses for a few rows of each row-major weight
    measure_patch_embeddings(model)  # and whether the pictures' patches are one product or a convolution

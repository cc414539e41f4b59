"""The shared primitives' fast forms give what the reference's formulas give, bit for bit."""

from __future__ import annotations

import pytest
import torch

from vlmkit.modules import RMSNorm, apply_rotary, signed_sin


@pytest.mark.parametrize("shape", [(1, 5, 32), (3, 17, 64), (16, 24, 192), (16, 1, 192), (4, 7, 13)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_rms_norm_in_fp32_equals_the_reference_formula(shape, scale):
    """fp32 goes through PyTorch's rms_norm kernel: equal to weight * x * rsqrt(mean(x^2) + eps)."""
    g = torch.Generator().manual_seed(shape[-1])
    x = torch.randn(*shape, generator=g) * scale
    norm = RMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
        formula = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
        assert torch.equal(norm(x), formula)


def test_rms_norm_in_bf16_computes_in_fp32_and_scales_in_bf16():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=g).to(torch.bfloat16)
    norm = RMSNorm(64).to(torch.bfloat16)
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + norm.eps)
    assert torch.equal(norm(x), norm.weight * h.to(torch.bfloat16))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """The reference's rotation: (x1, x2) -> (-x2, x1) over the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@pytest.mark.parametrize("shape", [(2, 5, 4, 8), (16, 24, 4, 48), (1, 1, 32, 128)])
def test_rotary_equals_the_rotate_half_form(shape):
    """x * cos + rotate_half(x) * sin (the reference's form, heads before positions) equals apply_rotary on x
    with heads after positions and the signed sine, bit for bit, also on a strided view of x."""
    B, T, H, D = shape
    g = torch.Generator().manual_seed(D)
    fused = torch.randn(B, T, 3 * H * D, generator=g)  # q of a fused q/k/v product: a strided view
    x = fused[..., : H * D].view(B, T, H, D)
    angles = torch.randn(B, T, D // 2, generator=g)
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos(), angles.sin()
    heads_first = x.transpose(1, 2)
    reference = heads_first * cos[:, None] + rotate_half(heads_first) * sin[:, None]
    assert torch.equal(apply_rotary(x, cos, signed_sin(sin)).transpose(1, 2), reference)


@pytest.mark.parametrize(
    ("channels", "out", "kernel", "height", "width", "bias"),
    [(3, 16, 4, 12, 12, False), (3, 32, 14, 28, 31, False), (3, 8, (2, 3), 9, 10, True)],
)
def test_patch_embedding_as_one_product_equals_the_convolution(channels, out, kernel, height, width, bias):
    """The patches flattened and multiplied by the flattened kernel give the convolution's output (fp32
    rounding apart), an edge the kernel does not fill dropped as the convolution drops it; the same with
    gradients, which match the convolution's."""
    from torch import nn

    from vlmkit.fastpath import PatchEmbedding

    torch.manual_seed(0)
    conv = nn.Conv2d(channels, out, kernel, stride=kernel, bias=bias)
    x = torch.randn(2, channels, height, width)
    want = conv(x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), conv.weight)
    conv.__class__ = PatchEmbedding
    with torch.no_grad():
        got = conv(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)
    with_grad = conv(x)
    assert torch.equal(with_grad.detach(), got)  # the same features whether gradients are recorded or not
    (grad,) = torch.autograd.grad(with_grad.square().sum(), conv.weight)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-4)


def test_patch_embeddings_take_the_kernel_measured_faster():
    from torch import nn

    from vlmkit import fastpath

    class Embeddings(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = type("Config", (), {"image_size": 40})()
            self.patch_embedding = nn.Conv2d(3, 24, 8, stride=8, bias=False)
            self.other = nn.Conv2d(3, 24, 3, padding=1)  # not a patch embedding: never touched

    model = Embeddings()
    fastpath.measure_patch_embeddings(model)
    faster = fastpath.PATCHES_AS_PRODUCT[(24, 3, (8, 8), 40, torch.float32)]
    assert isinstance(model.patch_embedding, fastpath.PatchEmbedding) == faster
    assert type(model.other) is nn.Conv2d


@pytest.mark.parametrize("cached", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_the_final_layer_at_kept_positions_equals_the_full_forward(cached, window):
    """A prefill that needs only each row's last hidden state (`last`) runs the final layer's queries,
    output projection and MLP on those positions alone: equal to the full forward read there, with grouped
    heads, right padding (rows of different lengths), a sliding window, with and without a KV cache."""
    from vlmkit.llama import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, model_type="mistral" if window else "llama", sliding_window=window,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    B, T = 3, 7
    x = torch.randn(B, T, 32)
    lengths = torch.tensor([7, 4, 6])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    last = lengths - 1
    with torch.no_grad():
        if cached:
            model.setup_cache(B, 16)
            kw = {"attention_mask": mask, "input_pos": torch.arange(T), "key_len": T}
            full = model(x, **kw)
            model.setup_cache(B, 16)
            kept = model(x, last=last, **kw)
        else:
            full = model(x, attention_mask=mask)
            kept = model(x, attention_mask=mask, last=last)
            unpadded = model(x)  # no mask at all: each kept query still sees no key after it
            torch.testing.assert_close(
                model(x, last=last)[:, 0], unpadded[torch.arange(B), last], atol=1e-6, rtol=1e-5
            )
    assert kept.shape == (B, 1, 32)
    torch.testing.assert_close(kept[:, 0], full[torch.arange(B), last], atol=1e-6, rtol=1e-5)

"""The shared primitives' fast forms give what the reference's formulas give, bit for bit."""

from __future__ import annotations

import pytest
import torch

from vlmkit.modules import RMSNorm, apply_rotary, rotate_half, signed_sin


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

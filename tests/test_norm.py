"""RMSNorm's fused path (torch's rms_norm) equals the plain formula, values and gradients, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch

from dscoder.model.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rmsnorm_equals_reference(dtype):
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(48, generator=g))
    x = (4 * torch.randn(3, 5, 48, generator=g)).to(dtype).requires_grad_()
    fast, ref = norm(x), norm.forward_reference(x)
    assert fast.dtype == ref.dtype
    torch.testing.assert_close(fast, ref, atol=1e-6, rtol=1e-5)
    grads = [torch.autograd.grad(y.float().square().sum(), (x, norm.weight)) for y in (fast, ref)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

"""RMSNorm as the DeepSeek-V2 checkpoints were trained with it: normalize in fp32, cast back, then scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's fused kernel (one pass forward and backward; the plain formula is six elementwise ops, each a pass
        # over the activations): it normalizes in fp32 and, for fp32 inputs, scales in the same pass
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The plain formula, for tests."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

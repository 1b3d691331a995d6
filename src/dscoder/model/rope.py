"""Rotary position embedding for MLA's decoupled rope dims, with YaRN.

The checkpoint stores the rope dims of q and k_pe as interleaved pairs (x0, x1), (x2, x3), ...; pair i turns with
frequency i. We rotate them in that layout, in fp32, and cast back (as transformers and DeepSeek-V3's reference do),
so no permutation of the weights is needed.
"""

from __future__ import annotations

import math

import torch

from dscoder.config import ModelConfig, yarn_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dr/2]`` (fp32) and the cos/sin magnitude (``_mscale``, 1.0 for official configs)."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freq_extra = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = config.rope_scaling
    if rs is None:
        return freq_extra, 1.0
    factor = float(rs["factor"])
    if rs["type"] == "linear":
        return freq_extra / factor, 1.0
    # YaRN: keep high frequencies, divide low ones by `factor`, blend linearly in between.
    orig = rs["original_max_position_embeddings"]
    low = max(math.floor(_correction_dim(rs.get("beta_fast") or 32, dim, base, orig)), 0)
    high = min(math.ceil(_correction_dim(rs.get("beta_slow") or 1, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp
    inv_freq = freq_extra / factor * (1 - keep) + freq_extra * keep
    magnitude = yarn_mscale(factor, rs.get("mscale", 1.0)) / yarn_mscale(factor, rs.get("mscale_all_dim", 0.0))
    return inv_freq, magnitude


class RotaryEmbedding(torch.nn.Module):
    """Turns positions ``[B, T]`` into ``(cos, sin)`` of shape ``[B, T, dr/2]`` in fp32."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.magnitude = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions_BT[..., None].float() * self.inv_freq.float()
        return angles.cos() * self.magnitude, angles.sin() * self.magnitude


def apply_rope(x: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of ``x [B, T, ..., dr]``; cos/sin ``[B, T, dr/2]`` broadcast over middle dims."""
    extra = x.dim() - 3
    cos = cos_BTR.view(*cos_BTR.shape[:2], *([1] * extra), cos_BTR.shape[-1])
    sin = sin_BTR.view(*sin_BTR.shape[:2], *([1] * extra), sin_BTR.shape[-1])
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)

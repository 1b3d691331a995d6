"""Multi-head Latent Attention (DeepSeek-V2 §2.1), both paths side by side.

Shape legend: B batch, T query tokens, S key tokens, D hidden, H heads, C kv_lora_rank (latent),
R qk_rope_head_dim, N qk_nope_head_dim, V v_head_dim, Q = N + R.

- expanded path (training, prefill): the latent is up-projected to per-head keys and values, then SDPA.
- absorbed path (decode over a cache): W_UK is folded into the query and W_UV into the output, so attention runs
  directly against the cached latents; the cache holds only ``kv_a_layernorm(c_kv)`` and the rotated rope key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dscoder.config import ModelConfig
from dscoder.model.norm import RMSNorm
from dscoder.model.rope import apply_rope


class MLACache:
    """Preallocated latent cache: per layer and token, the normalized latent (C) and the rotated rope key (R).

    ``kv[layer]`` is ``[B, max_len, C + R]``: columns ``:C`` the latent, ``C:`` the rope key. No expanded
    per-head key or value is ever stored.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.kv_lora_rank = config.kv_lora_rank
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv = torch.zeros(config.num_hidden_layers, batch_size, max_len, width, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.kv.shape[2]

    def write(self, layer: int, start: int, latent_BTC: torch.Tensor, rope_BTR: torch.Tensor) -> None:
        end = start + latent_BTC.shape[1]
        if end > self.max_len:
            raise ValueError(f"cache holds {self.max_len} tokens; writing up to position {end}")
        self.kv[layer, :, start:end, : self.kv_lora_rank] = latent_BTC
        self.kv[layer, :, start:end, self.kv_lora_rank :] = rope_BTR

    def read(self, layer: int, end: int) -> torch.Tensor:
        """``[B, end, C + R]`` view of the first ``end`` positions."""
        return self.kv[layer, :, :end]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def rows(self, n: int) -> MLACache:
        """A view over the first ``n`` batch rows (writes land in this cache), e.g. to skip empty engine slots."""
        if n == self.kv.shape[1]:
            return self
        view = object.__new__(MLACache)
        view.kv_lora_rank, view.kv = self.kv_lora_rank, self.kv[:, :n]
        return view


class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled RoPE. Module names follow the HF checkpoint keys."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.softmax_scale = config.softmax_scale
        self.dropout = config.attention_dropout
        D, H, Q = config.hidden_size, self.n_heads, config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * Q, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank)  # eps 1e-6 always, as in the hub code
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * Q, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=False)

    def _query(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        return q.unflatten(-1, (self.n_heads, -1))  # [B, T, H, Q]

    def forward(self, x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: MLACache | None = None, start_pos: int = 0) -> torch.Tensor:
        """``mask`` is ``[B, 1, T, S]`` bool (True = attend) or None for plain causal attention."""
        q_BTHQ = self._query(x_BTD)
        q_nope, q_rope = q_BTHQ.split([self.nope_dim, self.rope_dim], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        latent, k_rope = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent_BTC = self.kv_a_layernorm(latent)
        k_rope_BTR = apply_rope(k_rope, cos, sin)
        T = x_BTD.shape[1]
        if cache is not None:
            cache.write(self.layer_idx, start_pos, latent_BTC, k_rope_BTR)
        if cache is None or (start_pos == 0 and T > 1):
            out_BTHV = self.expanded(q_nope, q_rope, latent_BTC, k_rope_BTR, mask)
        else:
            out_BTHV = self.absorbed(q_nope, q_rope, cache.read(self.layer_idx, start_pos + T), mask)
        return self.o_proj(out_BTHV.flatten(2))

    def expanded(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent_BSC: torch.Tensor,
                 k_rope_BSR: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Per-head keys ``[k_nope | k_rope]`` and values from the latent; returns ``[B, T, H, V]``."""
        kv = self.kv_b_proj(latent_BSC).unflatten(-1, (self.n_heads, -1))  # [B, S, H, N+V]
        k_nope, v_BSHV = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_BSHQ = torch.cat([k_nope, k_rope_BSR[:, :, None, :].expand(-1, -1, self.n_heads, -1)], dim=-1)
        q_BTHQ = torch.cat([q_nope, q_rope], dim=-1)
        q_dim = q_BTHQ.shape[-1]
        if self.v_dim < q_dim:  # fused SDPA kernels want one head size: pad V with zeros, slice them off after
            v_BSHV = F.pad(v_BSHV, (0, q_dim - self.v_dim))
        out = F.scaled_dot_product_attention(
            q_BTHQ.transpose(1, 2), k_BSHQ.transpose(1, 2), v_BSHV.transpose(1, 2), attn_mask=mask,
            is_causal=mask is None and q_BTHQ.shape[1] > 1, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0)
        return out.transpose(1, 2)[..., : self.v_dim]

    def absorbed(self, q_nope: torch.Tensor, q_rope: torch.Tensor, kv_BSE: torch.Tensor,
                 mask: torch.Tensor | None) -> torch.Tensor:
        """Attention straight against cached latents ``kv_BSE = [latent | rope key]``; returns ``[B, T, H, V]``.

        score = (q_nope W_UK) . latent + q_rope . k_rope, and out = (softmax . latent) W_UV^T, with
        kv_b_proj's weight viewed as ``[H, N + V, C]``. All heads share one key, so heads fold into the query
        length and attention is a single-head SDPA over ``H * T`` queries.
        """
        B, T, H, _ = q_nope.shape
        w_HXC = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HXC.split([self.nope_dim, self.v_dim], dim=1)
        q_lat_BHTC = torch.einsum("bthn,hnc->bhtc", q_nope, w_uk_HNC)
        q_BHTE = torch.cat([q_lat_BHTC, q_rope.transpose(1, 2)], dim=-1)
        if mask is not None:
            mask = mask.expand(B, H, T, mask.shape[-1]).reshape(B, 1, H * T, -1)
        o_lat = F.scaled_dot_product_attention(
            q_BHTE.reshape(B, 1, H * T, -1), kv_BSE[:, None], kv_BSE[:, None, :, : self.kv_lora_rank],
            attn_mask=mask, scale=self.softmax_scale)  # [B, 1, H*T, C]
        return torch.einsum("bhtc,hvc->bthv", o_lat.view(B, H, T, -1), w_uv_HVC)

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
        write_latents(self.kv, layer, start, latent_BTC, rope_BTR)

    def read(self, layer: int, end: int) -> torch.Tensor:
        """``[B, end, C + R]`` view of the first ``end`` positions."""
        return self.kv[layer, :, :end]

    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def rows(self, n: int, start: int = 0) -> MLACache:
        """A view over batch rows ``start .. start + n - 1`` (writes land in this cache), e.g. to skip empty engine
        slots."""
        if start == 0 and n == self.kv.shape[1]:
            return self
        view = object.__new__(MLACache)
        view.kv_lora_rank, view.kv = self.kv_lora_rank, self.kv[:, start:start + n]
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
        if cache is None:
            out_BTHV = self.expanded(q_nope, q_rope, latent_BTC, k_rope_BTR, mask)
        else:
            out_BTHV = self.cached(q_nope, q_rope, latent_BTC, k_rope_BTR, mask, cache, start_pos)
        return self.o_proj(out_BTHV.flatten(2))

    def cached(self, q_nope, q_rope, latent_BTC, k_rope_BTR, mask, cache: MLACache, start_pos: int) -> torch.Tensor:
        """Write this chunk's latents into the cache and attend: a prefill from position 0 takes the expanded path;
        a chunk after cached entries takes whichever of the two costs fewer FLOPs (:meth:`expanded_is_cheaper`), the
        expanded one over every cached entry up to it; one token (decode) takes the absorbed path."""
        T = latent_BTC.shape[1]
        if T > 1 and (start_pos == 0 or self.expanded_is_cheaper(T)):
            cache.write(self.layer_idx, start_pos, latent_BTC, k_rope_BTR)
            if start_pos == 0:
                return self.expanded(q_nope, q_rope, latent_BTC, k_rope_BTR, mask)
            kv_BSE = cache.read(self.layer_idx, start_pos + T)
            return self.expanded(q_nope, q_rope, kv_BSE[..., : self.kv_lora_rank], kv_BSE[..., self.kv_lora_rank:],
                                 mask)
        args = (absorbed_query(q_nope, q_rope, self.kv_b_proj.weight), latent_BTC, k_rope_BTR, cache.kv,
                self.layer_idx, start_pos, mask, self.softmax_scale)
        # Under torch.compile, an op that declares its cache write: graphs update the cache in place, not a copy.
        attend = _mla_cached_attention_op if torch.compiler.is_compiling() else mla_cached_attention
        o_BHTE = attend(*args)
        return absorbed_output(o_BHTE[..., : self.kv_lora_rank], self.kv_b_proj.weight, self.nope_dim)

    def expanded_is_cheaper(self, T: int) -> bool:
        """Per cached key and head, T queries cost ``T (2C + R)`` multiply-adds absorbed (scores against C + R
        columns, values over C) and ``C (N + V) + T (Q + V)`` expanded (``kv_b_proj`` up-projects the key first):
        expanded wins from T = C (N + V) / (2C + R - Q - V) on, about 170 tokens for Lite shapes."""
        C, R, N, V = self.kv_lora_rank, self.rope_dim, self.nope_dim, self.v_dim
        return T * (2 * C + R - (N + R) - V) >= C * (N + V)

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



def absorbed_query(q_nope: torch.Tensor, q_rope: torch.Tensor, w_kv_b: torch.Tensor) -> torch.Tensor:
    """``[q_nope W_UK | q_rope]`` per head: ``[B, H, T, C + R]``."""
    B, T, H, N = q_nope.shape
    w_uk_HNC = w_kv_b.view(H, -1, w_kv_b.shape[-1])[:, :N]
    return torch.cat([torch.einsum("bthn,hnc->bhtc", q_nope, w_uk_HNC), q_rope.transpose(1, 2)], dim=-1)


def absorbed_output(o_BHTC: torch.Tensor, w_kv_b: torch.Tensor, nope_dim: int) -> torch.Tensor:
    """The latent attention output through W_UV: ``[B, T, H, V]``."""
    H = o_BHTC.shape[1]
    w_uv_HVC = w_kv_b.view(H, -1, w_kv_b.shape[-1])[:, nope_dim:]
    return torch.einsum("bhtc,hvc->bthv", o_BHTC, w_uv_HVC)


def latent_attention(q_BHTE: torch.Tensor, kv_BSE: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    """Softmax attention of absorbed queries over the latent cache: ``[B, H, T, C + R]``, whose first C columns are
    the output (the softmax-weighted latents).

    All heads share one key, so heads fold into the query length: a single-head SDPA over ``H * T`` queries. The
    values are the latent columns; passing all C + R columns (one head size for q, k and v) lets CPU SDPA take its
    fused kernel instead of the math path (callers drop the R extra output columns).
    """
    B, H, T, E = q_BHTE.shape
    if mask is not None:
        mask = mask.expand(B, H, T, mask.shape[-1]).reshape(B, 1, H * T, -1)
    o = F.scaled_dot_product_attention(q_BHTE.reshape(B, 1, H * T, E), kv_BSE[:, None], kv_BSE[:, None],
                                       attn_mask=mask, scale=scale)
    return o.view(B, H, T, E)


def write_latents(kv_LBSE: torch.Tensor, layer: int, start: int, latent_BTC: torch.Tensor,
                  rope_BTR: torch.Tensor) -> None:
    end, C = start + latent_BTC.shape[1], latent_BTC.shape[-1]
    if end > kv_LBSE.shape[2]:
        raise ValueError(f"cache holds {kv_LBSE.shape[2]} tokens; writing up to position {end}")
    kv_LBSE[layer, :, start:end, :C] = latent_BTC
    kv_LBSE[layer, :, start:end, C:] = rope_BTR


def mla_cached_attention(q_BHTE: torch.Tensor, latent_BTC: torch.Tensor, k_rope_BTR: torch.Tensor,
                         kv_LBSE: torch.Tensor, layer: int, start_pos: int, mask: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
    """One layer's cache step: write the chunk's latent and rope key at ``start_pos`` of ``kv_LBSE`` (all layers),
    then :func:`latent_attention` over positions ``:start_pos + T``; returns ``[B, H, T, C + R]`` (see there)."""
    write_latents(kv_LBSE, layer, start_pos, latent_BTC, k_rope_BTR)
    return latent_attention(q_BHTE, kv_LBSE[layer, :, : start_pos + latent_BTC.shape[1]], mask, scale)


# The same function as an op that declares its cache write, for torch.compile (called directly in eager mode, where
# the dispatcher would only add overhead).
_mla_cached_attention_op = torch.library.custom_op("dscoder::mla_cached_attention", mla_cached_attention,
                                                   mutates_args=("kv_LBSE",))


@_mla_cached_attention_op.register_fake
def _(q_BHTE, latent_BTC, k_rope_BTR, kv_LBSE, layer, start_pos, mask, scale):
    return torch.empty_like(q_BHTE)

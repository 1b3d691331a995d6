"""The DeepSeek-V2 decoder: embeddings, pre-norm blocks of MLA + (dense MLP | DeepSeekMoE), final norm, LM head.

Module names follow the HF checkpoint keys (``model.layers.{i}.self_attn.kv_b_proj`` ...); routed experts are
stacked (``model.layers.{i}.mlp.experts.gate_up_proj``), and ``dscoder.model.checkpoint`` maps them to the
hub's per-expert keys and back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dscoder.config import ModelConfig
from dscoder.model.attention import MLA, MLACache
from dscoder.model.moe import MLP, Gate, MoE, RoutedExperts
from dscoder.model.norm import RMSNorm
from dscoder.model.rope import RotaryEmbedding, rope_inv_freq


@dataclass
class ModelOutput:
    """``logits [B, T, V]`` in the model's dtype. In training mode only: ``aux_loss`` the summed MoE balance loss
    and ``expert_counts [L_moe, E]`` (fp32) the tokens each MoE layer routed to each expert (its expert load)."""

    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = MLA(config, layer_idx)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = MoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, h_BTD, cos, sin, mask, cache, start_pos):
        """``(h_BTD, balance loss | None, expert counts [E] | None)``: the last two in training mode, MoE layers."""
        h_BTD = h_BTD + self.self_attn(self.input_layernorm(h_BTD), cos, sin, mask, cache, start_pos)
        x = self.post_attention_layernorm(h_BTD)
        if self.is_moe:
            y, aux, counts = self.mlp(x)
        else:
            y, aux, counts = self.mlp(x), None, None
        return h_BTD + y, aux, counts


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


class DeepseekV2(nn.Module):
    """DeepSeek-V2 / DeepSeek-Coder-V2 causal LM.

    ``model(input_ids [B, T], attention_mask [B, S] | None, position_ids [B, T] | None, cache, start_pos)``
    returns a :class:`ModelOutput`. Without a cache, ``S == T``. With an :class:`MLACache`, the tokens occupy
    positions ``start_pos .. start_pos+T-1`` of the cache and ``attention_mask`` (if given) covers all
    ``S = start_pos + T`` cached positions; a ``[B, 1, T, S]`` bool mask is used as given. A prefill from position
    0 runs the expanded attention path, decoding the absorbed path over the latent cache, and a chunk after cached
    entries whichever costs fewer FLOPs (``MLA.expanded_is_cheaper``).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ----- forward -------------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: MLACache | None = None, start_pos: int = 0,
                logits_to_keep: int = 0) -> ModelOutput:
        h, aux_total, counts = self._trunk(input_ids, attention_mask, position_ids, cache, start_pos)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return ModelOutput(logits=self.lm_head(h), aux_loss=aux_total, expert_counts=counts)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, cache: MLACache | None = None,
               start_pos: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The trunk: final-norm hidden states ``[B, T, D]`` and the summed balance loss (training), no LM head.

        ``attention_mask`` is a ``[B, S]`` padding mask, or a full ``[B, 1, T, S]`` bool mask (True = attend) used
        as given, e.g. block-diagonal masks of packed documents."""
        h, aux_total, _ = self._trunk(input_ids, attention_mask, position_ids, cache, start_pos)
        return h, aux_total

    def _trunk(self, input_ids, attention_mask, position_ids, cache, start_pos):
        """``(hidden [B, T, D], summed balance loss | None, expert counts [L_moe, E] | None)``."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(start_pos, start_pos + T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rotary(position_ids)
        mask = self._mask(attention_mask, B, T, start_pos, input_ids.device)
        h = self.model.embed_tokens(input_ids)
        aux_total, counts = None, []
        for layer in self.model.layers:
            h, aux, counts_E = layer(h, cos, sin, mask, cache, start_pos)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
            if counts_E is not None:
                counts.append(counts_E)
        return self.model.norm(h), aux_total, torch.stack(counts) if counts else None

    @staticmethod
    def _mask(attention_mask, B, T, start_pos, device) -> torch.Tensor | None:
        """``[B, 1, T, S]`` bool (True = attend), or None where SDPA's own causal flag (or nothing) suffices."""
        S = start_pos + T
        if attention_mask is not None and attention_mask.dim() == 4:
            if attention_mask.shape != (B, 1, T, S) or attention_mask.dtype != torch.bool:
                raise ValueError(f"a 4-D attention_mask must be bool {(B, 1, T, S)}; got {attention_mask.dtype} "
                                 f"{tuple(attention_mask.shape)}")
            return attention_mask
        if attention_mask is None and (T == 1 or start_pos == 0):
            return None
        q_pos = torch.arange(start_pos, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        allowed = (k_pos <= q_pos)[None, None].expand(B, 1, T, S)
        if attention_mask is not None:
            if attention_mask.shape != (B, S):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; expected {(B, S)}")
            # A padded query still sees itself, so no softmax row is empty (its output is never used).
            allowed = allowed & attention_mask.bool()[:, None, None, :] | (k_pos == q_pos)[None, None]
        return allowed

    # ----- weights -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for matrices, ones for norms; the rope buffers recomputed."""
        for module in self.modules():
            self._init_module(module)
        self.reset_buffers()

    def _init_module(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RoutedExperts):
            module.gate_up_proj.normal_(0.0, std)
            module.down_proj.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, Gate):
            module.weight.normal_(0.0, std)

    @classmethod
    @torch.no_grad()
    def from_state_dict(cls, config: ModelConfig, state: dict[str, torch.Tensor], *, device="cpu",
                        strict: bool = True):
        """A model of ``config`` (this class) that takes ``state``'s tensors as its own, without copying them: built
        on the meta device, then ``load_state_dict(assign=True)``. Returns ``(model, missing_keys,
        unexpected_keys)``; with ``strict=False`` the missing parameters (e.g. a new head) are created on ``device``
        and initialised as :meth:`init_weights` would. Raises RuntimeError on shape mismatches."""
        with torch.device("meta"):
            model = cls(config)
        missing, unexpected = model.load_state_dict(state, strict=strict, assign=True)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
            missing = [k for k in missing if k != "lm_head.weight"]
        owners = {}
        for key in missing:
            owner_name, _, pname = key.rpartition(".")
            owner = model.get_submodule(owner_name)
            old = getattr(owner, pname)
            setattr(owner, pname, nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device=device),
                                               requires_grad=old.requires_grad))
            owners[owner_name] = owner
        for owner in owners.values():
            model._init_module(owner)
        model.reset_buffers()
        return model, list(missing), list(unexpected)

    def reset_buffers(self) -> None:
        """Recompute the non-persistent rope buffers (after building on the meta device)."""
        device = self.model.embed_tokens.weight.device
        self.model.rotary = RotaryEmbedding(self.config).to(device)

    def set_rope_factor(self, factor: float) -> None:
        """Change the YaRN factor in place (long-context stages): the config (:meth:`ModelConfig.with_rope_factor`),
        rope frequencies and every attention's softmax scale follow. Raises ConfigError without YaRN."""
        self.config = self.config.with_rope_factor(factor)
        inv_freq, magnitude = rope_inv_freq(self.config)
        self.model.rotary.inv_freq.copy_(inv_freq)
        self.model.rotary.magnitude = magnitude
        for module in self.modules():  # found through any wrapper a trainer put around the layers
            if isinstance(module, MLA):
                module.softmax_scale = self.config.softmax_scale

    # ----- costs ---------------------------------------------------------------------------------------------
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def num_activated_parameters(self) -> int:
        """Parameters one token touches: all, minus the ``E - K`` routed experts it skips in each MoE layer.

        ``activated = total - n_moe_layers * (E - K) * 3 * D * I`` (embedding and LM head included).
        """
        c = self.config
        n_moe = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
        skipped = n_moe * (c.n_routed_experts - c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size \
            if c.is_moe else 0
        return self.num_parameters() - skipped

    def kv_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16, expanded: bool = False) -> int:
        """Cache bytes per token over all layers: the latent + rope key (``C + R``), or, ``expanded``, the
        per-head keys and values a conventional cache would hold (``H * (Q + V)``)."""
        c = self.config
        width = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) if expanded else c.kv_lora_rank + c.qk_rope_head_dim
        return width * c.num_hidden_layers * torch.empty(0, dtype=dtype).element_size()

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), for MFU: ``6 * N_act + 6 * L * H * (Q + V) * seq_len``,
        with ``N_act`` the activated parameters without the embedding table (a lookup, not a matmul); the second
        term is attention scores and values at full (non-causal) length, as nanoGPT's estimate counts them."""
        c = self.config
        n_act = self.num_activated_parameters() - c.vocab_size * c.hidden_size
        attn = 6 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len
        return 6 * n_act + attn

"""The absorbed path over the latent cache reproduces the expanded path's logits (fp32, <= 1e-4)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from dscoder import MLACache, ModelConfig

CONFIGS = {
    "tiny": ModelConfig.preset("tiny"),
    "q_lora+groups": ModelConfig.preset("tiny").replace(
        q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.0),
}


def _model(config):
    return tiny_model(config)  # weights big enough for O(1) logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_token_at_a_time_matches_full_sequence(name):
    model = _model(CONFIGS[name])
    ids = torch.randint(0, model.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
        cache = MLACache(model.config, batch_size=2, max_len=32)
        steps = [model(ids[:, t:t + 1], cache=cache, start_pos=t).logits for t in range(ids.shape[1])]
    stepped = torch.cat(steps, dim=1)
    assert full.abs().max() > 1.0
    assert (stepped - full).abs().max().item() <= 1e-4


def test_prefill_then_chunks_then_decode():
    model = _model(CONFIGS["tiny"])
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = MLACache(model.config, batch_size=3, max_len=20)
        parts = [model(ids[:, :8], cache=cache).logits,  # prefill: expanded path
                 model(ids[:, 8:15], cache=cache, start_pos=8).logits,  # chunk after cached entries, causal mask
                 *[model(ids[:, t:t + 1], cache=cache, start_pos=t).logits for t in range(15, 20)]]
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-4
    # the same chunk through the other path (forced), both ways equal the full pass
    attn = model.model.layers[0].self_attn
    took_expanded = attn.expanded_is_cheaper(7)
    for layer in model.model.layers:
        layer.self_attn.expanded_is_cheaper = lambda T, flip=took_expanded: not flip
    with torch.no_grad():
        cache = MLACache(model.config, batch_size=3, max_len=20)
        model(ids[:, :8], cache=cache)
        chunk = model(ids[:, 8:15], cache=cache, start_pos=8).logits
    assert (chunk - full[:, 8:15]).abs().max().item() <= 1e-4


def test_left_padded_decode_matches_padded_full_pass():
    model = _model(CONFIGS["tiny"])
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        cache = MLACache(model.config, batch_size=2, max_len=12)
        parts = [model(ids[:, :6], attention_mask=mask[:, :6], cache=cache).logits]
        for t in range(6, 12):
            parts.append(model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], cache=cache, start_pos=t).logits)
    valid = mask.bool()
    assert (torch.cat(parts, dim=1)[valid] - full[valid]).abs().max().item() <= 1e-4


def test_cache_holds_only_latent_and_rope_key():
    config = ModelConfig.preset("deepseek-coder-v2-lite")
    cache = MLACache(config, batch_size=1, max_len=4, dtype=torch.bfloat16, device="meta")
    assert cache.kv.shape == (27, 1, 4, 512 + 64)
    assert cache.nbytes() == 4 * 31104
    with pytest.raises(ValueError, match="cache holds 4 tokens"):
        cache.write(0, 3, torch.zeros(1, 2, 512, device="meta"), torch.zeros(1, 2, 64, device="meta"))

"""Logit parity with transformers' DeepseekV2ForCausalLM (the oracle), both load directions, fp32."""

from __future__ import annotations

import pytest
import torch

import dscoder
from dscoder import ModelConfig

transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}

BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
            num_attention_heads=4, kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
            max_position_embeddings=128, q_lora_rank=None, rope_scaling=YARN, bos_token_id=0, eos_token_id=1,
            routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1)

VARIANTS = {
    "lite-like": {},
    "q_lora": {"q_lora_rank": 16},
    "group_limited+scaling": {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
                              "routed_scaling_factor": 2.5, "q_lora_rank": 16},
    "dense0": {"first_k_dense_replace": 0},
    "dense2": {"first_k_dense_replace": 2, "num_hidden_layers": 3},
    "no_yarn": {"rope_scaling": None},
    "yarn_mscale1": {"rope_scaling": {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
    "one_shared": {"n_shared_experts": 1, "routed_scaling_factor": 16.0},
}


def hf_model(overrides: dict, seed: int = 0):
    cfg = ModelConfig(**{**BASE, **overrides})
    hf_cfg = transformers.DeepseekV2Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                              if k not in ("architectures", "model_type")})
    torch.manual_seed(seed)
    model = transformers.DeepseekV2ForCausalLM(hf_cfg).eval()
    randomize_(model)
    return model


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Weights large enough that logits are O(1), and norms away from 1, so a wrong formula shows."""
    for name, p in model.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)


def inputs(batch=3, length=13, vocab=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_their_save_our_load(tmp_path, variant):
    ref = hf_model(VARIANTS[variant])
    ref.save_pretrained(tmp_path)
    ours = dscoder.load_model(tmp_path).eval()
    ids = inputs()
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids).logits
    assert expected.abs().max() > 1.0  # logits are not trivially small
    assert _max_diff(got, expected) <= 1e-4


@pytest.mark.parametrize("variant", ["lite-like", "group_limited+scaling", "dense2"])
def test_our_save_their_load(tmp_path, variant):
    ours = dscoder.build_model(ModelConfig(**{**BASE, **VARIANTS[variant]}), seed=3).eval()
    randomize_(ours)
    dscoder.save_model(ours, tmp_path, max_shard_bytes=40_000)  # several shards + index
    assert (tmp_path / "model.safetensors.index.json").exists()
    ref = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path).eval()
    ids = inputs(seed=2)
    with torch.no_grad():
        assert _max_diff(ours(ids).logits, ref(ids).logits) <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch(tmp_path, side):
    ref = hf_model({"q_lora_rank": 16})
    ref.save_pretrained(tmp_path)
    ours = dscoder.load_model(tmp_path).eval()
    ids = inputs(batch=3, length=11)
    mask = torch.ones_like(ids)
    for row, n_pad in enumerate([0, 3, 6]):
        if n_pad:
            if side == "left":
                mask[row, :n_pad] = 0
            else:
                mask[row, -n_pad:] = 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert _max_diff(got[valid], expected[valid]) <= 1e-4
    # left padding must be masked out (valid tokens see pad keys otherwise); right padding is never seen (causal)
    with torch.no_grad():
        unpadded = ours(ids).logits
    if side == "left":
        assert _max_diff(unpadded[valid], got[valid]) > 1e-3
    else:
        assert _max_diff(unpadded[valid], got[valid]) <= 1e-5


def test_bf16_load_close(tmp_path):
    ref = hf_model({})
    ref.save_pretrained(tmp_path)
    ours = dscoder.load_model(tmp_path, dtype="bfloat16").eval()
    assert ours.lm_head.weight.dtype == torch.bfloat16
    ids = inputs()
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids).logits.float()
    assert _max_diff(got, expected) <= 0.05 * expected.abs().max().item()

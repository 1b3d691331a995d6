"""ModelConfig: presets, both HF config styles, validation messages, YaRN numbers, parameter counts."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dscoder
from dscoder import ConfigError, ModelConfig
from dscoder.model.rope import rope_inv_freq

# The official DeepSeek-Coder-V2-Lite-Base config.json (hub style).
LITE_HUB = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 100000, "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1408,
    "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
    "pretraining_tp": 1, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}


def test_hub_config_equals_lite_preset():
    assert ModelConfig.from_hf_dict(LITE_HUB) == ModelConfig.preset("deepseek-coder-v2-lite")


def test_transformers5_rope_parameters_style():
    d = dict(LITE_HUB)
    rs = d.pop("rope_scaling")
    d.pop("rope_theta")
    d["rope_parameters"] = {**rs, "rope_type": "yarn", "rope_theta": 10000.0}
    assert ModelConfig.from_hf_dict(d) == ModelConfig.preset("deepseek-coder-v2-lite")
    plain = dict(LITE_HUB, rope_scaling=None)
    plain.pop("rope_theta")
    plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    cfg = ModelConfig.from_hf_dict(plain)
    assert cfg.rope_scaling is None and cfg.rope_theta == 5000.0


def test_round_trip_through_config_json(tmp_path):
    cfg = ModelConfig.preset("deepseek-coder-v2")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert ModelConfig.from_json_file(tmp_path / "config.json") == cfg


def test_transformers_accepts_our_config_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.preset("deepseek-coder-v2")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype="bfloat16")))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "DeepseekV2Config"
    assert (theirs.q_lora_rank, theirs.n_group, theirs.topk_group, theirs.routed_scaling_factor) == (1536, 8, 3, 16.0)
    assert theirs.rope_parameters["factor"] == 40 and theirs.rope_parameters["mscale_all_dim"] == 0.707


@pytest.mark.parametrize("change, needle", [
    ({"sliding_window": 4096}, "unknown config key 'sliding_window'"),
    ({"topk_method": "noaux_tc"}, "topk_method"),
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"num_experts_per_tok": 65}, "num_experts_per_tok"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"model_type": "llama"}, "model_type"),
    ({"rope_scaling": {"type": "yarn", "factor": 40}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2}}, "rope_scaling.type"),
    ({"rope_scaling": {**LITE_HUB["rope_scaling"], "foo": 1}}, "rope_scaling.foo"),
    ({"topk_method": "group_limited_greedy", "n_group": 5, "topk_group": 1}, "n_group"),
])
def test_bad_configs_name_the_field(change, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")) as err:
        ModelConfig.from_hf_dict({**LITE_HUB, **change}, source="x/config.json")
    assert "\n" not in str(err.value) and "x/config.json" in str(err.value)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("gpt-5")


def test_yarn_numbers_from_the_reference():
    cfg = ModelConfig.preset("deepseek-coder-v2-lite")
    assert cfg.softmax_scale == pytest.approx(0.11472139, rel=1e-7)
    inv_freq, magnitude = rope_inv_freq(cfg)
    assert magnitude == 1.0  # mscale == mscale_all_dim
    base = 1 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    assert torch.allclose(inv_freq[:11].double(), base[:11])  # indices <= low (10) keep their frequency
    assert torch.allclose(inv_freq[23:].double(), base[23:] / 40)  # indices >= high (23) are divided by 40
    assert inv_freq[31].item() == pytest.approx(3.334e-6, rel=1e-3)
    v25 = cfg.replace(rope_scaling={**cfg.rope_scaling, "mscale": 1.0, "mscale_all_dim": 1.0})
    assert v25.softmax_scale == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert cfg.replace(rope_scaling=None).softmax_scale == pytest.approx(192**-0.5)


def test_parameter_counts_on_meta_device():
    lite = dscoder.load_model("deepseek-coder-v2-lite", device="meta")
    big = dscoder.load_model("deepseek-coder-v2", device="meta")
    assert round(lite.num_parameters() / 1e9, 2) == 15.71
    assert round(big.num_parameters() / 1e9, 1) == 235.7
    # activated = total - n_moe_layers * (E - K) * 3 * D * I
    assert lite.num_activated_parameters() == lite.num_parameters() - 26 * (64 - 6) * 3 * 2048 * 1408
    assert round(big.num_activated_parameters() / 1e9, 2) == 21.38
    assert lite.kv_bytes_per_token(torch.bfloat16) == 31104
    assert lite.kv_bytes_per_token(torch.bfloat16, expanded=True) == 276480
    assert big.kv_bytes_per_token(torch.bfloat16) == 576 * 60 * 2
    assert lite.flops_per_token(4096) > 6 * 2.4e9


def test_layer_kinds_follow_first_k_dense_and_freq():
    cfg = ModelConfig.preset("tiny").replace(num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
    assert [cfg.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    model = dscoder.build_model(cfg, device="meta")
    assert [layer.is_moe for layer in model.model.layers] == [False, False, True, False, True, False]


def test_with_rope_factor_is_the_one_yarn_change():
    """The config rule (factor and context), and the model following it through a trainer's layer wrappers."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from dscoder.model.attention import MLA

    cfg = ModelConfig.preset("tiny")
    longer = cfg.with_rope_factor(16)
    assert longer.rope_scaling == {**cfg.rope_scaling, "factor": 16} and longer.max_position_embeddings == 16 * 256
    assert cfg.rope_scaling["factor"] == 4 and cfg.max_position_embeddings == 1024  # a new config, not a change
    assert longer.softmax_scale > cfg.softmax_scale  # the YaRN temperature grows with the factor
    model = dscoder.build_model(cfg, seed=0)
    layers = model.model.layers
    for i, layer in enumerate(layers):
        layers[i] = checkpoint_wrapper(layer)  # as training's activation checkpointing wraps them
    model.set_rope_factor(16)
    fresh = dscoder.build_model(longer, seed=0)
    assert model.config == longer
    assert torch.equal(model.model.rotary.inv_freq, fresh.model.rotary.inv_freq)
    assert model.model.rotary.magnitude == fresh.model.rotary.magnitude
    scales = [m.softmax_scale for m in model.modules() if isinstance(m, MLA)]
    assert len(scales) == cfg.num_hidden_layers and set(scales) == {longer.softmax_scale}
    with pytest.raises(ConfigError, match="needs a model with YaRN"):
        cfg.replace(rope_scaling=None).with_rope_factor(2)
    with pytest.raises(ConfigError, match="expected a positive number"):
        cfg.with_rope_factor(0)


def test_model_code_names_no_training_wrappers():
    """Unwrapping DDP / FSDP / torch.compile / activation checkpointing belongs to train/, not to the model."""
    from pathlib import Path

    model_dir = Path(dscoder.__file__).parent / "model"
    for path in sorted(model_dir.glob("*.py")):
        text = path.read_text()
        for name in ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", ".module."):
            assert name not in text, f"{path.name} names the wrapper attribute {name}"

"""ModelConfig: every field of the DeepSeek-V2 family's HF ``config.json``, presets, validation, and the round trip.

Reads both the hub style (``rope_theta`` + ``rope_scaling``) and the transformers-5 style (``rope_parameters``);
writes the hub style, which every DeepSeek-V2 loader (hub remote code, transformers 4 and 5, vLLM, SGLang) accepts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from dscoder.errors import ConfigError

# Keys a config.json may carry that describe the file rather than the architecture: accepted and not kept.
_METADATA_KEYS = {
    "architectures", "model_type", "auto_map", "transformers_version", "_name_or_path", "torch_dtype", "dtype",
    "head_dim", "qk_head_dim", "output_router_logits", "num_experts", "_attn_implementation_autoset",
    "_experts_implementation", "return_dict", "output_hidden_states", "output_attentions", "use_return_dict",
    "generation_config", "chunk_size_feed_forward", "is_encoder_decoder", "tie_encoder_decoder",
    "problem_type", "id2label", "label2id", "sep_token_id", "decoder_start_token_id", "max_length",
    "quantization_config",  # a quantized checkpoint's scheme: read by dscoder.quant when loading its weights
}
_ROPE_SCALING_KEYS = {
    "type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
    "mscale", "mscale_all_dim", "rope_theta", "attention_factor", "truncate",
}
_TOPK_METHODS = ("greedy", "group_limited_greedy")


@dataclass
class ModelConfig:
    """Architecture of a DeepSeek-V2-family model. Field names and meanings are those of the HF ``config.json``.

    The last four fields are dscoder's own training options (the paper's device- and communication-level balance
    losses); they are not written to ``config.json``.
    """

    vocab_size: int = 102400
    hidden_size: int = 2048
    intermediate_size: int = 10944
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    n_shared_experts: int | None = 2
    n_routed_experts: int | None = 64
    ep_size: int = 1
    routed_scaling_factor: float = 1.0
    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    topk_method: str = "greedy"
    n_group: int | None = 1
    topk_group: int | None = 1
    num_experts_per_tok: int | None = 6
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    pretraining_tp: int = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False
    # dscoder-only training options (paper eq. 26-31); 0 disables.
    device_aux_loss_alpha: float = 0.0
    comm_aux_loss_alpha: float = 0.0
    balance_devices: int = 1  # D: experts are split into D contiguous groups ("devices")
    balance_max_devices: int = 1  # M: devices a token may be sent to

    _DSCODER_ONLY = ("device_aux_loss_alpha", "comm_aux_loss_alpha", "balance_devices", "balance_max_devices")

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = _normalize_rope_scaling(self.rope_scaling)
        self.validate()

    # ----- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_moe(self) -> bool:
        return bool(self.n_routed_experts)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """The hub rule: MoE from ``first_k_dense_replace`` on, every ``moe_layer_freq``-th layer."""
        return self.is_moe and layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def yarn(self) -> dict[str, Any] | None:
        rs = self.rope_scaling
        return rs if rs is not None and rs["type"] == "yarn" else None

    @property
    def softmax_scale(self) -> float:
        """``qk_head_dim**-0.5``, times ``mscale(factor, mscale_all_dim)**2`` under YaRN (the hub rule)."""
        scale = self.qk_head_dim**-0.5
        yarn = self.yarn
        if yarn is not None and yarn.get("mscale_all_dim"):
            m = yarn_mscale(yarn["factor"], yarn["mscale_all_dim"])
            scale *= m * m
        return scale

    # ----- validation ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"config field '{name}' = {getattr(self, name, None)!r}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "max_position_embeddings",
                     "moe_layer_freq", "intermediate_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "expected a positive integer")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "expected an even number (rotation pairs)")
        need(self.q_lora_rank is None or (isinstance(self.q_lora_rank, int) and self.q_lora_rank > 0),
             "q_lora_rank", "expected null or a positive integer")
        need(self.num_key_value_heads == self.num_attention_heads, "num_key_value_heads",
             "MLA has one latent for all heads; expected num_key_value_heads == num_attention_heads")
        need(self.hidden_act == "silu", "hidden_act", "only 'silu' is supported")
        need(isinstance(self.first_k_dense_replace, int) and self.first_k_dense_replace >= 0,
             "first_k_dense_replace", "expected an integer >= 0")
        need(self.rms_norm_eps > 0, "rms_norm_eps", "expected a positive number")
        need(not self.attention_bias, "attention_bias", "biases in attention are not supported")
        need(not self.mlp_bias, "mlp_bias", "biases in MLPs are not supported")
        if self.is_moe:
            need(isinstance(self.n_routed_experts, int) and self.n_routed_experts > 0, "n_routed_experts",
                 "expected a positive integer or null")
            k = self.num_experts_per_tok
            need(isinstance(k, int) and 0 < k <= self.n_routed_experts, "num_experts_per_tok",
                 f"expected an integer in 1..n_routed_experts ({self.n_routed_experts})")
            need(isinstance(self.moe_intermediate_size, int) and self.moe_intermediate_size > 0,
                 "moe_intermediate_size", "expected a positive integer")
            need(self.scoring_func == "softmax", "scoring_func", "only 'softmax' is supported (DeepSeek-V2)")
            need(self.topk_method in _TOPK_METHODS, "topk_method", f"expected one of {_TOPK_METHODS}")
            need(self.n_shared_experts is None or self.n_shared_experts >= 0, "n_shared_experts",
                 "expected null or an integer >= 0")
            if self.topk_method == "group_limited_greedy":
                need(isinstance(self.n_group, int) and self.n_group > 0 and self.n_routed_experts % self.n_group == 0,
                     "n_group", "expected a positive divisor of n_routed_experts")
                need(isinstance(self.topk_group, int) and 0 < self.topk_group <= self.n_group, "topk_group",
                     "expected an integer in 1..n_group")
                need(self.topk_group * (self.n_routed_experts // self.n_group) >= k, "topk_group",
                     "the selected groups hold fewer experts than num_experts_per_tok")
            need(self.n_routed_experts % self.balance_devices == 0, "balance_devices",
                 "expected a divisor of n_routed_experts")
            need(0 < self.balance_max_devices <= self.balance_devices, "balance_max_devices",
                 "expected an integer in 1..balance_devices")
        for name in ("aux_loss_alpha", "device_aux_loss_alpha", "comm_aux_loss_alpha", "attention_dropout"):
            need(getattr(self, name) >= 0, name, "expected a number >= 0")
        need(self.routed_scaling_factor > 0, "routed_scaling_factor", "expected a positive number")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if rs["type"] not in ("yarn", "linear"):
                raise ConfigError(f"config field 'rope_scaling.type' = {rs['type']!r}: expected 'yarn' or 'linear'")
            if not (isinstance(rs.get("factor"), (int, float)) and rs["factor"] > 0):
                raise ConfigError(f"config field 'rope_scaling.factor' = {rs.get('factor')!r}: expected a positive number")
            if rs["type"] == "yarn" and not rs.get("original_max_position_embeddings"):
                raise ConfigError("config field 'rope_scaling.original_max_position_embeddings' is required for yarn")

    # ----- HF config.json in and out -------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a parsed ``config.json``; unknown keys are an error naming the key and the source."""
        d = dict(d)
        model_type = d.get("model_type", "deepseek_v2")
        if model_type not in ("deepseek_v2", "deepseek"):
            raise ConfigError(f"{source}: model_type {model_type!r} is not a DeepSeek-V2 model ('deepseek_v2')")
        rope_parameters = d.pop("rope_parameters", None)
        if rope_parameters is not None:
            rp = dict(rope_parameters)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            kind = rp.get("rope_type", rp.get("type", "default"))
            if kind != "default" and d.get("rope_scaling") is None:
                d["rope_scaling"] = rp
        known = {f.name for f in fields(cls)} - set(cls._DSCODER_ONLY)
        kwargs = {}
        for key, value in d.items():
            if key in known:
                kwargs[key] = value
            elif key not in _METADATA_KEYS:
                raise ConfigError(f"{source}: unknown config key '{key}'")
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except (TypeError, KeyError) as e:  # e.g. a string where a number belongs
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self, dtype: str | None = None) -> dict[str, Any]:
        """The hub-style ``config.json`` content (what released DeepSeek-Coder-V2 checkpoints carry)."""
        d: dict[str, Any] = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2"}
        for f in fields(self):
            if f.name not in self._DSCODER_ONLY:
                d[f.name] = getattr(self, f.name)
        if d["rope_scaling"] is not None:
            d["rope_scaling"] = dict(d["rope_scaling"])
        if dtype is not None:
            d["torch_dtype"] = dtype
        return d

    def replace(self, **changes: Any) -> ModelConfig:
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ConfigError(f"unknown config key '{sorted(unknown)[0]}'")
        if "num_attention_heads" in changes and "num_key_value_heads" not in changes:
            changes["num_key_value_heads"] = changes["num_attention_heads"]  # MLA: always equal
        return dataclasses.replace(self, **changes)

    def with_rope_factor(self, factor: float) -> ModelConfig:
        """This config with the YaRN ``factor`` changed (long-context extension) and the context it implies,
        ``max_position_embeddings = factor * original_max_position_embeddings``. The one place that rule lives:
        the model's :meth:`~dscoder.model.DeepseekV2.set_rope_factor` and the training stages both use it."""
        yarn = self.yarn
        if yarn is None:
            raise ConfigError("a rope factor change needs a model with YaRN rope_scaling "
                              f"(this one has {self.rope_scaling['type'] if self.rope_scaling else 'plain'} rope)")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
            raise ConfigError(f"rope factor {factor!r}: expected a positive number")
        return self.replace(rope_scaling={**yarn, "factor": factor},
                            max_position_embeddings=int(factor * yarn["original_max_position_embeddings"]))

    # ----- presets -------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        try:
            return cls(**PRESETS[name])
        except KeyError:
            raise ConfigError(f"unknown preset '{name}' (known: {', '.join(PRESETS)})") from None


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: ``0.1 * mscale * ln(factor) + 1`` (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _normalize_rope_scaling(rs: Any) -> dict[str, Any]:
    if not isinstance(rs, dict):
        raise ConfigError(f"config field 'rope_scaling' = {rs!r}: expected an object or null")
    unknown = set(rs) - _ROPE_SCALING_KEYS
    if unknown:
        raise ConfigError(f"unknown config key 'rope_scaling.{sorted(unknown)[0]}'")
    out = {k: v for k, v in rs.items() if k not in ("rope_type", "rope_theta")}
    out["type"] = rs.get("type", rs.get("rope_type"))
    if out.get("attention_factor") is not None:
        raise ConfigError("config field 'rope_scaling.attention_factor' is not supported (DeepSeek uses mscale)")
    out.pop("attention_factor", None)
    if out.get("truncate", True) is not True:
        raise ConfigError("config field 'rope_scaling.truncate' = false is not supported")
    out.pop("truncate", None)
    return out


_LITE_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
              "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

PRESETS: dict[str, dict[str, Any]] = {
    # Runs in well under a second on a CPU, yet has a dense first layer, MoE layers with shared experts, and YaRN.
    "tiny": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=192, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, kv_lora_rank=32,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, first_k_dense_replace=1,
        max_position_embeddings=1024, bos_token_id=0, eos_token_id=1,
        rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 256, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    ),
    # deepseek-ai/DeepSeek-Coder-V2-Lite-{Base,Instruct} config.json
    "deepseek-coder-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1,
        max_position_embeddings=163840, rope_scaling=dict(_LITE_YARN),
    ),
    # deepseek-ai/DeepSeek-Coder-V2-{Base,Instruct} (236B) config.json
    "deepseek-coder-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, n_shared_experts=2, n_routed_experts=160,
        num_experts_per_tok=6, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128,
        v_head_dim=128, topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
        first_k_dense_replace=1, max_position_embeddings=163840, rope_scaling=dict(_LITE_YARN),
    ),
}

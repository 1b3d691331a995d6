"""The DeepSeek-V2 model: config-driven, single-device; parallelism is applied from outside."""

from dscoder.model.attention import MLA, MLACache
from dscoder.model.transformer import DeepseekV2, ModelOutput

__all__ = ["DeepseekV2", "MLA", "MLACache", "ModelOutput"]

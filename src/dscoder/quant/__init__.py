"""Weight-only quantization for CPU inference: symmetric per-channel int8 and group-wise int4.

``dscoder quantize SRC --out DIR --bits 8|4`` writes a checkpoint whose linear layers and stacked routed experts hold
integer weights and scales (norms, router, embeddings and ``kv_b_proj`` stay in high precision); ``config.json``
records the scheme under ``quantization_config``, and :func:`dscoder.load_model` maps it back into memory.
"""

from dscoder.model.checkpoint import register_checkpoint_format
from dscoder.quant.checkpoint import decode_bytes_per_token, is_quantized, load_quantized, quantize_checkpoint
from dscoder.quant.modules import QuantExperts, QuantLinear, quantize_model

register_checkpoint_format(is_quantized, load_quantized)  # load_model / Engine / serve read quantized directories

__all__ = ["QuantExperts", "QuantLinear", "decode_bytes_per_token", "is_quantized", "load_quantized",
           "quantize_checkpoint", "quantize_model"]

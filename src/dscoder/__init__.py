"""dscoder: an open implementation of the DeepSeek-Coder-V2 system in PyTorch.

The small public API::

    model = dscoder.load_model("tiny")                     # a preset, randomly initialised
    model = dscoder.load_model("path/to/hf-checkpoint", dtype="bfloat16", device="cuda")
    logits = model(input_ids).logits                        # [B, T, V]
    dscoder.save_model(model, "out/dir")                    # HF format: transformers, vLLM, SGLang load it
"""

from __future__ import annotations

from dscoder.config import ModelConfig
from dscoder.errors import CheckpointError, ConfigError, DscoderError
from dscoder.model import DeepseekV2, MLACache, ModelOutput
from dscoder.model.build import build_model, load_model, save_model
from dscoder import quant as _quant  # noqa: F401  (registers quantized checkpoints with load_model)

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DeepseekV2", "DscoderError", "Engine", "MLACache", "ModelConfig",
           "ModelOutput", "build_model", "load_model", "save_model"]


def __getattr__(name: str):
    # The engine is imported on first use: it builds on the model package, never the other way round, and
    # `import dscoder` stays light for code that only needs the model.
    if name == "Engine":
        from dscoder.engine import Engine

        return Engine
    raise AttributeError(f"module 'dscoder' has no attribute {name!r}")

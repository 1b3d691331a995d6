"""Models from a preset name, a :class:`ModelConfig` or an HF checkpoint directory, and saving one (the public
``dscoder.build_model`` / ``load_model`` / ``save_model``)."""

from __future__ import annotations

from pathlib import Path

import torch

from dscoder.config import PRESETS, ModelConfig
from dscoder.errors import DscoderError
from dscoder.model.checkpoint import load_checkpoint, parse_dtype, save_checkpoint
from dscoder.model.transformer import DeepseekV2


def build_model(config: ModelConfig, dtype: torch.dtype | str | None = None, device: torch.device | str = "cpu",
                seed: int | None = None) -> DeepseekV2:
    """A randomly initialised model (``device="meta"`` builds it without memory, for counting). With ``seed`` the
    weights are drawn from that seed without touching the caller's random state (a library call has no global
    side effects); without it, from the global generator as it stands."""
    dtype = parse_dtype(dtype) or torch.float32
    cuda = torch.device(device).type == "cuda"
    with torch.random.fork_rng(devices=[torch.device(device)] if cuda else [], enabled=seed is not None):
        with torch.device(device):
            model = DeepseekV2(config)  # the modules' own initialisers draw too
        if str(device) != "meta":
            if seed is not None:
                torch.manual_seed(seed)
            model.init_weights()
    return model.to(dtype)


def load_model(source: str | Path | ModelConfig, dtype: torch.dtype | str | None = None,
               device: torch.device | str = "cpu", seed: int | None = 0) -> DeepseekV2:
    """A preset name (random weights), a ``ModelConfig``, or an HF checkpoint directory, in eval mode."""
    return _load(source, dtype, device, seed).eval()


def _load(source, dtype, device, seed) -> DeepseekV2:
    if isinstance(source, ModelConfig):
        return build_model(source, dtype, device, seed)
    if isinstance(source, str) and source in PRESETS:
        return build_model(ModelConfig.preset(source), dtype, device, seed)
    path = Path(source)
    if not path.exists():
        raise DscoderError(f"{source}: no such checkpoint directory or preset (presets: {', '.join(PRESETS)})")
    if (path / "checkpoints").is_dir() or (path / "meta.json").is_file():
        raise DscoderError(f"{source}: a training run or checkpoint, not an HF checkpoint; export it first "
                           f"(dscoder export {source} --out DIR)")
    if str(device) == "meta":
        return build_model(ModelConfig.from_json_file(path / "config.json"), dtype, "meta")
    return load_checkpoint(path, dtype=dtype, device=device)


def save_model(model: DeepseekV2, directory: str | Path, dtype: torch.dtype | str | None = None,
               max_shard_bytes: int = 5 * 1024**3) -> Path:
    """Write ``model`` as an HF checkpoint directory (hub key layout, sharded safetensors)."""
    if getattr(model, "quantization", None):
        raise DscoderError("this model is quantized: save the float model and run `dscoder quantize` on it")
    return save_checkpoint(model, directory, dtype=dtype, max_shard_bytes=max_shard_bytes)

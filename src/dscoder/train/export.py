"""``dscoder export``: a training checkpoint → an HF checkpoint directory (config, safetensors, tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from dscoder.config import ModelConfig
from dscoder.errors import CheckpointError
from dscoder.train import checkpoint as ckpt


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its latest complete checkpoint)."""
    path = Path(path)
    if (path / "meta.json").exists():
        return path
    found = ckpt.checkpoints(path)
    if not found:
        raise CheckpointError(f"{path}: no complete checkpoint (expected a run directory or checkpoints/step-N)")
    return found[-1]


def export(source: str | Path, out: str | Path, dtype: str | None = None) -> Path:
    import dscoder
    from dscoder.tokenizer import Tokenizer

    path = resolve_checkpoint(source)
    meta = ckpt.read_meta(path)
    config = ModelConfig.from_hf_dict(meta["model"], source=str(path / "meta.json"))
    model = dscoder.build_model(config, dtype=torch.float32)
    ckpt.load_model_weights(path, model)
    out = Path(out)
    dscoder.save_model(model, out, dtype=dtype)
    tokenizer_dir = meta.get("tokenizer")
    if tokenizer_dir and Path(tokenizer_dir).is_dir():
        Tokenizer.load(tokenizer_dir).save(out)
    shutil.copy(path / "meta.json", out / "dscoder_training_meta.json")
    return out

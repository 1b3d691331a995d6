"""``dscoder export``: a training checkpoint → an HF checkpoint directory (config, safetensors, tokenizer).

The checkpoint is verified against its manifest first (a run directory exports its newest intact checkpoint). The
output may not be a file, the run directory itself or a place inside its checkpoints, another run, or a directory
holding files an export does not write: an export never writes over a run's files or anything else a user made.
The run's tokenizer (``RUN/tokenizer``, or the directory its checkpoint names) is exported with the weights; a run
without one, or non-finite weights, get a one-line warning.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from dscoder.config import ModelConfig
from dscoder.errors import CheckpointError, DscoderError
from dscoder.io import write_json
from dscoder.train import checkpoint as ckpt


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (verified), or a run directory (its newest intact checkpoint)."""
    path = Path(path)
    if (path / "meta.json").exists() or (path / ckpt.MANIFEST).exists():
        problem = ckpt.verify(path)
        if problem:
            raise CheckpointError(f"{path}: damaged checkpoint ({problem})")
        return path
    found = ckpt.latest_intact(path)
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (expected a run directory or checkpoints/step-N)")
    return found


def run_dir_of(checkpoint: Path) -> Path:
    """``RUN`` for ``RUN/checkpoints/step-N``."""
    return checkpoint.resolve().parent.parent


def check_out(out: Path, run: Path) -> None:
    """Refuse an ``--out`` that is a file, the run directory, inside its checkpoints, or another run's directory."""
    if out.exists() and not out.is_dir():
        raise DscoderError(f"{out}: --out is an existing file; give a directory for the HF checkpoint")
    target, run = out.resolve(), run.resolve()
    if target == run:
        raise DscoderError(f"{out}: --out is the run directory itself (its config.json would be overwritten); "
                           f"give a new directory, e.g. {out / 'hf'}")
    if target.is_relative_to(run / "checkpoints") or target.is_relative_to(run / "tokenizer"):
        raise DscoderError(f"{out}: --out is inside the run's {target.relative_to(run).parts[0]}/; give a new "
                           f"directory")
    if (target / "checkpoints").is_dir() or (target / "metrics.jsonl").is_file():
        raise DscoderError(f"{out}: --out holds a training run; give a new directory")
    if target.is_dir():
        other = sorted(p.name for p in target.iterdir() if not _EXPORT_NAME.fullmatch(p.name))
        if other:
            raise DscoderError(f"{out}: --out holds files an export does not write ({', '.join(other[:3])}); give a "
                               f"new or empty directory, or an earlier export to replace")


# what an export writes (weights, config, tokenizer, the run's meta) and the temporary names of an interrupted one:
# only a directory holding nothing else may be written over
_EXPORT_NAME = re.compile(r"\.?(config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|"
                          r"model\.safetensors\.index\.json|tokenizer\.json|tokenizer_config\.json|"
                          r"special_tokens_map\.json|dscoder_training_meta\.json)(\..+\.tmp)?")


def run_tokenizer(checkpoint: Path, meta: dict) -> Path | None:
    """The tokenizer a run trained with: ``RUN/tokenizer``, else the directory named in the checkpoint's meta."""
    run = run_dir_of(checkpoint)
    candidates = [run / "tokenizer"]
    if meta.get("tokenizer"):
        candidates.append(run / meta["tokenizer"])  # a relative name is the run's; an absolute one stays as it is
    return next((where for where in candidates if (where / "tokenizer.json").is_file()), None)


def nonfinite_tensors(model: torch.nn.Module) -> list[str]:
    return [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]


def export(source: str | Path, out: str | Path, dtype: str | None = None, merge_lora: bool = False) -> Path:
    from dscoder.model.build import save_model
    from dscoder.tokenizer import Tokenizer

    path = resolve_checkpoint(source)
    out = Path(out)
    check_out(out, run_dir_of(path))
    meta = ckpt.read_meta(path)
    model = _load_weights(path, meta, merge_lora)
    save_model(model, out, dtype=dtype)
    tokenizer_dir = run_tokenizer(path, meta)
    if tokenizer_dir is not None:
        Tokenizer.load(tokenizer_dir).save(out)
    elif meta.get("tokenizer"):
        ckpt.warn(f"{path}: the run's tokenizer ({meta['tokenizer']}) is gone; exported without a tokenizer")
    else:
        ckpt.warn(f"{path}: the run has no tokenizer; exported without one")
    write_json(out / "dscoder_training_meta.json", meta)
    return out


def load_run_model(source: str | Path, merge_lora: bool = False) -> tuple[torch.nn.Module, Path | None, str]:
    """A run's (or checkpoint's) model as :func:`export` writes it (verified, LoRA merged on request), the
    directory of its tokenizer (None without one) and the checkpoint's name for messages."""
    path = resolve_checkpoint(source)
    meta = ckpt.read_meta(path)
    return _load_weights(path, meta, merge_lora), run_tokenizer(path, meta), str(path)


def _load_weights(path: Path, meta: dict, merge_lora: bool) -> torch.nn.Module:
    from dscoder.model.build import build_model

    config = ModelConfig.from_hf_dict(meta["model"], source=str(path / "meta.json"))
    model = build_model(config, dtype=torch.float32)
    lora = meta.get("lora")
    if lora and not merge_lora:
        raise DscoderError(f"{path}: a LoRA run (its base is frozen); pass --merge-lora to export the merged model "
                           f"(the adapter alone is in {run_dir_of(path) / 'adapter'})")
    if merge_lora and not lora:
        raise DscoderError(f"{path}: not a LoRA run (no adapter to merge); export it without --merge-lora")
    if lora:
        from dscoder.train.lora import apply_lora, lora_section

        apply_lora(model, lora_section(lora, str(path / "meta.json")))
    ckpt.load_model_weights(path, model)
    if lora:
        from dscoder.train.lora import merge_lora as merge

        merge(model)
    bad = nonfinite_tensors(model)
    if bad:
        ckpt.warn(f"{path}: {len(bad)} tensors hold NaN or infinite values (first: {bad[0]}); exported as they are")
    return model

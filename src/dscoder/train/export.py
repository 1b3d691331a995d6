"""``dscoder export``: a training checkpoint → an HF checkpoint directory (config, safetensors, tokenizer).

The checkpoint is verified against its manifest first (a run directory exports its newest intact checkpoint). The
output may not be a file, the run directory itself or a place inside its checkpoints, another run, or a directory
holding files an export does not write: an export never writes over a run's files or anything else a user made.
The run's tokenizer (``RUN/tokenizer``, or the directory its checkpoint names) is exported with the weights; a run
without one, or non-finite weights, get a one-line warning. ``average=N`` exports the mean of the weights of that
checkpoint and the N-1 checkpoints before it in its run (checkpoint averaging: the mean of the last stretch of a
run is smoother than its last step, which follows the last few batches).
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


def export(source: str | Path, out: str | Path, dtype: str | None = None, merge_lora: bool = False,
           average: int = 1) -> Path:
    from dscoder.model.build import save_model
    from dscoder.tokenizer import Tokenizer

    path = resolve_checkpoint(source)
    out = Path(out)
    check_out(out, run_dir_of(path))
    meta = ckpt.read_meta(path)
    if average == 1:
        model = _load_weights(path, meta, merge_lora)
    else:
        chosen = averaged_checkpoints(path, average)
        model = average_weights(chosen, merge_lora)
        meta = {**meta, "averaged": [p.name for p in chosen]}
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


def averaged_checkpoints(path: Path, n: int) -> list[Path]:
    """``path`` (verified already, by :func:`resolve_checkpoint`) and the ``n - 1`` checkpoints before it in its
    run, oldest first, those verified here."""
    if not isinstance(n, int) or n < 1:
        raise DscoderError(f"--average {n}: expected a whole number of checkpoints, at least 1")
    found = [p.resolve() for p in ckpt.checkpoints(run_dir_of(path))]
    if path.resolve() not in found:
        raise DscoderError(f"{path}: --average needs a checkpoint inside a run (RUN/checkpoints/step-N)")
    chosen = found[:found.index(path.resolve()) + 1][-n:]
    if len(chosen) < n:
        raise DscoderError(f"{path}: --average {n} needs {n} checkpoints up to {path.name}; the run keeps "
                           f"{len(chosen)} (train.keep_checkpoints sets how many are kept)")
    for p in chosen[:-1]:
        problem = ckpt.verify(p)
        if problem:
            raise CheckpointError(f"{p}: damaged checkpoint ({problem}); average fewer checkpoints")
    return chosen


def average_weights(paths: list[Path], merge_lora: bool = False) -> torch.nn.Module:
    """The model whose floating-point weights are the mean of those of the checkpoints ``paths`` (one model config;
    other tensors, if any, from the last), accumulated in fp32 one checkpoint at a time."""
    metas = [ckpt.read_meta(p) for p in paths]
    for p, meta in zip(paths, metas):
        if meta["model"] != metas[-1]["model"]:
            raise DscoderError(f"{p}: another model config than {paths[-1].name}; checkpoints to average must share one")
    total: dict[str, torch.Tensor] = {}
    for p, meta in zip(paths, metas):
        model = _load_weights(p, meta, merge_lora)
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                total[name] = total[name] + t.float() if name in total else t.float().clone()
    state = model.state_dict()
    model.load_state_dict({name: (total[name] / len(paths)).to(t.dtype) if name in total else t
                           for name, t in state.items()})
    return model


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

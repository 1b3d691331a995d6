"""The training-run layer shared by pre-training and alignment.

A run is a directory ``RUN/`` with ``config.json`` (the recipe as run), ``tokenizer/`` (a copy of the tokenizer
it trains with, so an export never depends on the data build still being there), ``metrics.jsonl`` (one line per
logged step) and ``checkpoints/step-N/`` (:mod:`dscoder.train.checkpoint`). This module holds what every training
loop does with it, in one place:

- recipe → model: :func:`model_config` (a preset or an ``init`` checkpoint, the recipe's overrides, the
  tokenizer's vocabulary) and :func:`build_model` (random weights, or the init checkpoint's tensors under a new
  config without a second copy, a head the checkpoint lacks initialised);
- :func:`check_context`: a sequence length past the model's context is refused before any work;
- :class:`Run`: start or ``--resume`` (the newest intact checkpoint, the model config checked), metrics, saves;
- :func:`optimizer_step`: clip, schedule, step, after refusing a non-finite loss or gradient;
- :func:`autocast`: the ``train.dtype`` setting.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from dscoder.config import ModelConfig
from dscoder.errors import CheckpointError, ConfigError, DscoderError
from dscoder.io import iter_jsonl, write_json, write_jsonl
from dscoder.train import checkpoint as ckpt

TOKENIZER_DIR = "tokenizer"


# ----- recipe → model --------------------------------------------------------------------------------------------
def model_config(section, tokenizer) -> ModelConfig:
    """The preset (or ``section.init``'s config) with the recipe's overrides; without ``init`` the vocabulary and
    bos/eos follow ``tokenizer`` (when given) unless the recipe sets them. ``section`` is a ``ModelSection``."""
    if section.init:
        if not (Path(section.init) / "config.json").is_file():
            raise ConfigError(f"model.init = {section.init!r}: not an HF checkpoint directory (no config.json)")
        base = ModelConfig.from_json_file(Path(section.init) / "config.json")
        if tokenizer is not None and base.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.init has vocab_size {base.vocab_size} < the tokenizer's "
                              f"{tokenizer.vocab_size}")
    else:
        base = ModelConfig.preset(section.preset)
    changes = dict(section.overrides)
    if not section.init and tokenizer is not None:
        changes.setdefault("vocab_size", tokenizer.vocab_size)
        changes.setdefault("bos_token_id", tokenizer.bos_id)
        changes.setdefault("eos_token_id", tokenizer.eos_id)
    return base.replace(**changes)


def build_model(section, mcfg: ModelConfig, seed: int, device: torch.device | str = "cpu", model_cls=None):
    """The fp32 model to train (train mode): ``model_cls`` (default ``DeepseekV2``; a subclass such as the reward
    model adds heads) with random weights from ``seed``, or over ``section.init``'s tensors (see :func:`rebuild`)."""
    from dscoder.model import DeepseekV2
    from dscoder.model.build import load_model

    model_cls = model_cls or DeepseekV2
    torch.manual_seed(seed)  # identical initial weights on every rank
    if not section.init:
        with torch.device(device):
            model = model_cls(mcfg)
        torch.manual_seed(seed)  # the weights do not depend on what building the modules drew
        model.init_weights()
        return model.float().train()
    loaded = load_model(section.init, dtype=torch.float32, device=device)
    if model_cls is DeepseekV2 and loaded.config == mcfg:
        return loaded.train()
    return rebuild(loaded, mcfg, model_cls).train()


def rebuild(model, mcfg: ModelConfig, model_cls=None):
    """``model``'s tensors under a new config (e.g. an overridden ``aux_loss_alpha``) and class: the new modules take
    the tensors as they are (``from_state_dict``), so the weights are never held twice; a head the class adds and
    the tensors lack (``score``) is initialised. An override that changes a weight's shape or name is refused."""
    from dscoder.model import DeepseekV2

    model_cls = model_cls or DeepseekV2
    device = next(model.parameters()).device
    try:
        fresh, missing, unexpected = model_cls.from_state_dict(mcfg, model.state_dict(), device=device, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"model overrides change the shapes of model.init's weights: {str(e).splitlines()[0]}") \
            from None
    own = {name for name, _ in fresh.named_parameters()} - {name for name, _ in model.named_parameters()}
    if unexpected or any(k not in own for k in missing):
        raise ConfigError(f"model overrides change the names of model.init's weights ({(unexpected or missing)[0]})")
    return fresh.float()


def check_context(seq_len: int, mcfg: ModelConfig, field: str) -> None:
    """Refuse a training length past the model's context (``max_position_embeddings``; with YaRN the scaled one)."""
    if seq_len > mcfg.max_position_embeddings:
        yarn = " (YaRN-scaled)" if mcfg.rope_scaling and mcfg.rope_scaling.get("type") == "yarn" else ""
        raise ConfigError(f"{field} = {seq_len}: longer than the model's context, max_position_embeddings = "
                          f"{mcfg.max_position_embeddings}{yarn}")


def autocast(dtype: str, device: torch.device | str):
    """The forward-pass context for ``train.dtype``: ``auto`` is bf16 on a CUDA device that supports it, else fp32
    (the weights and optimizer state stay fp32 either way)."""
    device = torch.device(device)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ----- the optimizer step ----------------------------------------------------------------------------------------
def check_finite(step: int, **values: float) -> None:
    """Stop the run (one line naming the step) when a loss or the gradient norm is NaN or infinite: the optimizer
    step would write non-finite weights, and every later checkpoint would hold them."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        what = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise DscoderError(f"step {step}: {what}; the run stopped before this optimizer step (no checkpoint of it "
                           f"was written). Lower train.lr or check the data, then --resume from the last checkpoint")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def optimizer_step(model, optimizer, lr: float, grad_clip: float, step: int, clip=None, **losses: float) -> float:
    """Clip to ``grad_clip`` (``clip(model, grad_clip)``, default ``clip_grad_norm_`` over the parameters), refuse
    non-finite ``losses`` or gradients (:func:`check_finite`; ``step`` is the 1-based step being taken), set ``lr``,
    step and zero the gradients; returns the gradient norm before clipping."""
    if clip is None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = clip(model, grad_clip)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    grad_norm = float(grad_norm)
    check_finite(step, **losses, grad_norm=grad_norm)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ----- the run directory -----------------------------------------------------------------------------------------
class Run:
    """A run directory: ``start`` it, ``resume`` the model and optimizer from its newest intact checkpoint, ``log``
    metrics, ``save`` checkpoints. Only rank 0 (``main``) writes files other than the checkpoints' shards."""

    def __init__(self, out: str | Path, main: bool = True):
        self.out = Path(out)
        self.main = main
        self.metrics = self.out / "metrics.jsonl"

    def start(self, config: dict[str, Any], resume: bool, tokenizer=None) -> None:
        """Refuse a directory that holds checkpoints unless ``resume``; write ``config.json`` and the tokenizer."""
        if self.out.exists() and not self.out.is_dir():
            raise DscoderError(f"{self.out}: --out is a file, expected a run directory")
        if ckpt.checkpoints(self.out) and not resume:
            raise DscoderError(f"{self.out}: already holds checkpoints; pass --resume to continue, or choose another "
                               f"--out")
        if (self.out / "build.json").is_file():
            raise DscoderError(f"{self.out}: holds a data build (its tokenizer/ would be replaced); choose another "
                               f"--out")
        if (self.out / "config.json").is_file() and not _is_recipe(self.out / "config.json"):
            raise DscoderError(f"{self.out}: holds a config.json that is not a training run's (an HF checkpoint?); "
                               f"choose another --out")
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(self.out / "config.json", config)
        if tokenizer is not None:
            tokenizer.save(self.out / TOKENIZER_DIR)

    @property
    def tokenizer_dir(self) -> Path | None:
        path = self.out / TOKENIZER_DIR
        return path if (path / "tokenizer.json").is_file() else None

    def checkpoint_to_resume(self) -> Path | None:
        """The newest intact checkpoint (collectively; warnings for damaged newer ones), or None."""
        return ckpt.latest_intact(self.out)

    def resume(self, model, optimizer, expected=None) -> dict[str, Any] | None:
        """Load the newest intact checkpoint into ``model`` and ``optimizer`` after checking that it was saved with
        the model config ``expected(meta)`` (a function of the checkpoint's ``meta.json``; default: the model's own
        config); drop the metrics logged after it. Returns the checkpoint's extra state (``step``, ...), or None
        when there is no checkpoint."""
        path = self.checkpoint_to_resume()
        if path is None:
            return None
        meta = ckpt.read_meta(path)
        theirs = meta.get("model") or {}
        mine = expected(meta) if expected is not None else unwrap(model).config.to_hf_dict()
        if theirs != mine:
            diff = sorted(k for k in set(theirs) | set(mine) if theirs.get(k) != mine.get(k))
            raise CheckpointError(f"{path}: saved with another model config ({', '.join(diff[:4])}); start a new "
                                  f"--out")
        extra = ckpt.load(path, model, optimizer)
        if self.main:
            self.truncate_metrics(extra["step"])
        return extra

    def restore(self, model, optimizer, resume: bool, expected=None) -> dict[str, Any] | None:
        """With ``resume``, :meth:`resume` (None when there is no checkpoint yet); the metrics start afresh when
        nothing is restored. ``expected``: the model config the checkpoint must have (see :meth:`resume`)."""
        extra = self.resume(model, optimizer, expected) if resume else None
        if extra is None:
            self.reset_metrics()
        return extra

    def truncate_metrics(self, step: int) -> None:
        """Keep the metrics of steps up to ``step`` (those after a checkpoint are logged again when resumed)."""
        if not self.metrics.exists():
            return
        keep = [row for _, row in self.read_metrics() if row["step"] <= step]
        write_jsonl(self.metrics, keep)

    def read_metrics(self) -> list[tuple[int, dict]]:
        """The rows of ``metrics.jsonl``; a line that is not a JSON object with an integer ``step`` is one error."""
        rows = []
        try:
            for n, row in iter_jsonl(self.metrics, "metrics"):
                if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"),
                                                                                                    int):
                    raise DscoderError(f"{self.metrics}:{n}: expected a metrics row with an integer 'step'")
                rows.append((n, row))
        except DscoderError as e:
            raise DscoderError(f"{e}; fix or delete that line to resume") from None
        return rows

    def reset_metrics(self) -> None:
        if self.main and self.metrics.exists():
            self.metrics.unlink()

    def log(self, row: dict[str, Any]) -> None:
        if self.main:
            with open(self.metrics, "a") as f:
                f.write(_json_line(row))

    def end_step(self, step: int, stop: int, t, row: dict[str, Any], model, optimizer,
                 extra: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> None:
        """After optimizer step ``step`` (of a run stopping at ``stop``): log ``row`` every ``t.log_every`` steps
        and save a checkpoint every ``t.ckpt_every`` steps (``t``: a ``[train]`` section), and at the last step."""
        if step % t.log_every == 0 or step == stop:
            self.log(row)
        if step % t.ckpt_every == 0 or step == stop:
            self.save(step, model, optimizer, extra or {}, meta or {}, t.keep_checkpoints)

    def progress(self, name: str, total: int, initial: int) -> Progress:
        return Progress(name, total, initial, enabled=self.main)

    def export(self, out: str | Path | None = None) -> Path:
        """An HF checkpoint (``RUN/hf`` by default) of the newest intact checkpoint, with the run's tokenizer."""
        from dscoder.train.export import export

        return export(self.out, out or self.out / "hf")

    def save(self, step: int, model, optimizer, extra: dict[str, Any], meta: dict[str, Any], keep: int) -> Path:
        """A checkpoint of ``model`` and ``optimizer`` at ``step`` (collectively); ``meta`` gains the tokenizer."""
        meta = {"model": unwrap(model).config.to_hf_dict(), **meta}
        if self.tokenizer_dir is not None:
            meta.setdefault("tokenizer", TOKENIZER_DIR)  # relative: the run directory can move
        return ckpt.save(self.out, step, model, optimizer, extra={"step": step, **extra}, meta=meta, keep=keep)


class Progress:
    """A progress bar on rank 0 (``update(**postfix)``), closed however the loop ends so an error line that
    follows starts on a line of its own."""

    def __init__(self, name: str, total: int, initial: int, enabled: bool = True):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=name, unit="step", dynamic_ncols=True)

    def update(self, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update()
            self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()})

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _is_recipe(path: Path) -> bool:
    """Whether ``path`` is a run's ``config.json`` (a recipe with a ``train`` table), which a new start may replace."""
    try:
        return isinstance(json.loads(path.read_text()).get("train"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``torch.compile`` and DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def _json_line(row: dict[str, Any]) -> str:
    return json.dumps(row) + "\n"

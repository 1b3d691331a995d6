"""Alignment recipes: TOML with the tables ``[model]`` (``preset`` or ``init`` = an HF checkpoint, ``tokenizer``,
ModelConfig overrides), ``[data]``, ``[train]`` (pre-training's table with alignment defaults, plus ``export``) and
one table named after the method (``[sft]``, ``[reward]``, ``[grpo]``), with dotted ``key=value`` overrides.

The model, the run directory, resume, metrics and the optimizer step come from :mod:`dscoder.train.run`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dscoder.errors import ConfigError
from dscoder.train import run as runlib
from dscoder.train.config import ModelSection, TrainSection, model_section, parse_section, read_recipe


@dataclass
class AlignTrainSection(TrainSection):
    """Pre-training's ``[train]`` with the alignment defaults (the paper's SFT: lr 5e-6, 100 warmup steps)."""

    lr: float = 5e-6
    warmup_steps: int = 100
    export: bool = True  # write OUT/hf (an HF checkpoint) at the end


@dataclass
class AlignConfig:
    """A parsed alignment recipe: ``model``, ``tokenizer`` (a directory or None), ``data``, ``train``, ``method``."""

    model: ModelSection
    tokenizer: str | None
    data: Any
    train: AlignTrainSection
    method: Any
    name: str = "sft"
    lora: Any = None  # sft's [lora] table (dscoder.align.lora.LoRASection), None for the other methods

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict(tokenizer=self.tokenizer), "data": asdict(self.data),
               "train": asdict(self.train), self.name: asdict(self.method)}
        if self.lora is not None:
            out["lora"] = self.lora.to_dict()
        return out


def load_recipe(path: str | Path | None, overrides: list[str], name: str, data_cls, method_cls,
                train_defaults: dict[str, Any] | None = None) -> AlignConfig:
    """Read a TOML recipe (tables model, data, train and ``name``) with dotted ``key=value`` overrides."""
    source = str(path) if path else "config"
    raw = read_recipe(path, overrides)
    tables = {"model", "data", "train", name} | ({"lora"} if name == "sft" else set())
    unknown = set(raw) - tables
    if unknown:
        raise ConfigError(f"{source}: unknown config table '{sorted(unknown)[0]}' (a {name} recipe has "
                          f"{', '.join(sorted(tables))})")
    model = model_section(raw.get("model", {}), source, extra=("tokenizer",))
    tokenizer = raw.get("model", {}).get("tokenizer")
    train = parse_section(AlignTrainSection, {**(train_defaults or {}), **raw.get("train", {})}, "train", source)
    train.validate(source)
    # one process on the CPU, no compiled or checkpointed modules yet: said rather than silently ignored
    for key in ("compile", "activation_checkpointing"):
        if getattr(train, key):
            raise ConfigError(f"{source}: train.{key} = true: not supported by the alignment recipes yet (sft, "
                              f"reward, grpo); set it to false")
    lora = None
    if name == "sft":
        from dscoder.align.lora import lora_section

        lora = lora_section(raw.get("lora", {}), source)
    return AlignConfig(model=model, tokenizer=tokenizer,
                       data=parse_section(data_cls, raw.get("data", {}), "data", source), train=train,
                       method=parse_section(method_cls, raw.get(name, {}), name, source), name=name, lora=lora)


def load_tokenizer(config: AlignConfig, required: bool = True):
    """``model.tokenizer``, else the tokenizer stored with ``model.init``; None if neither and not ``required``."""
    from dscoder.tokenizer import Tokenizer

    where = config.tokenizer or (config.model.init if config.model.init and
                                 (Path(config.model.init) / "tokenizer.json").is_file() else None)
    if where is None:
        if required:
            raise ConfigError("model.tokenizer: this recipe needs a tokenizer (a directory with tokenizer.json, e.g. "
                              "runs/data/tokenizer) or a model.init checkpoint that has one")
        return None
    if not (Path(where) / "tokenizer.json").is_file():
        raise ConfigError(f"model.tokenizer = {where!r}: no tokenizer.json there")
    return Tokenizer.load(where)


def policy_config(config: AlignConfig, tokenizer):
    """The ModelConfig of the policy: the preset or ``model.init``'s, the overrides, the tokenizer's vocabulary."""
    return runlib.model_config(config.model, tokenizer)


def build_policy(config: AlignConfig, tokenizer, model_cls=None, device="cpu", mcfg=None):
    """The model to fine-tune: ``model.init`` (an HF checkpoint) or a preset with random weights whose vocabulary,
    bos and eos follow the tokenizer; ``model_cls`` (a DeepseekV2 subclass, e.g. the reward model) gets the weights."""
    mcfg = mcfg or policy_config(config, tokenizer)
    return runlib.build_model(config.model, mcfg, config.train.seed, device, model_cls)


def open_run(config: AlignConfig, out: str | Path, resume: bool, tokenizer=None) -> runlib.Run:
    """The run directory of an alignment recipe, checked, with ``config.json`` and the tokenizer written."""
    run = runlib.Run(out)
    run.start(config.to_dict(), resume, tokenizer)
    return run

"""Alignment recipes: TOML with the tables ``[model]`` (``preset`` or ``init`` = an HF checkpoint, ``tokenizer``,
ModelConfig overrides), ``[data]``, ``[train]`` (pre-training's table with alignment defaults, plus ``export``) and
one table named after the method (``[sft]``, ``[reward]``, ``[grpo]``), with dotted ``key=value`` overrides.

The model, the run directory, resume, metrics and the optimizer step come from :mod:`dscoder.train.run`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dscoder.errors import ConfigError
from dscoder.train import run as runlib
from dscoder.train.config import (ModelSection, ParallelSection, TrainSection, model_section, parse_section,
                                  read_recipe)


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
    lora: Any = None  # sft's [lora] table (dscoder.train.lora.LoRASection), None for the other methods
    parallel: ParallelSection = field(default_factory=ParallelSection)  # torchrun: ddp | fsdp, ep

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict(tokenizer=self.tokenizer), "data": asdict(self.data),
               "train": asdict(self.train), "parallel": asdict(self.parallel), self.name: asdict(self.method)}
        if self.lora is not None:
            out["lora"] = self.lora.to_dict()
        return out


def load_recipe(path: str | Path | None, overrides: list[str], name: str, data_cls, method_cls,
                train_defaults: dict[str, Any] | None = None) -> AlignConfig:
    """Read a TOML recipe (tables model, data, train and ``name``) with dotted ``key=value`` overrides."""
    source = str(path) if path else "config"
    raw = read_recipe(path, overrides)
    tables = {"model", "data", "train", "parallel", name} | ({"lora"} if name == "sft" else set())
    unknown = set(raw) - tables
    if unknown:
        raise ConfigError(f"{source}: unknown config table '{sorted(unknown)[0]}' (a {name} recipe has "
                          f"{', '.join(sorted(tables))})")
    model = model_section(raw.get("model", {}), source, extra=("tokenizer",))
    tokenizer = raw.get("model", {}).get("tokenizer")
    train = parse_section(AlignTrainSection, {**(train_defaults or {}), **raw.get("train", {})}, "train", source)
    train.validate(source)
    # no compiled or checkpointed modules yet: said rather than silently ignored
    for key in ("compile", "activation_checkpointing"):
        if getattr(train, key):
            raise ConfigError(f"{source}: train.{key} = true: not supported by the alignment recipes yet (sft, "
                              f"reward, grpo); set it to false")
    lora = None
    if name == "sft":
        from dscoder.train.lora import lora_section

        lora = lora_section(raw.get("lora", {}), source)
    parallel = parse_section(ParallelSection, raw.get("parallel", {}), "parallel", source)
    if parallel.strategy not in ("none", "ddp", "fsdp"):
        raise ConfigError(f"{source}: parallel.strategy: expected none, ddp or fsdp")
    if not (isinstance(parallel.ep, int) and parallel.ep >= 1):
        raise ConfigError(f"{source}: parallel.ep: expected a positive integer")
    return AlignConfig(model=model, tokenizer=tokenizer,
                       data=parse_section(data_cls, raw.get("data", {}), "data", source), train=train,
                       method=parse_section(method_cls, raw.get(name, {}), name, source), name=name, lora=lora,
                       parallel=parallel)


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


def open_run(config: AlignConfig, out: str | Path, resume: bool, tokenizer=None, main: bool = True) -> runlib.Run:
    """The run directory of an alignment recipe, checked, with ``config.json`` and the tokenizer written (by rank 0:
    ``main``)."""
    run = runlib.Run(out, main=main)
    run.start(config.to_dict(), resume, tokenizer)
    return run


# ----- torchrun --------------------------------------------------------------------------------------------------
def setup_distributed(config: AlignConfig, n_routed_experts: int | None):
    """torchrun's process group (a plain run is rank 0 of 1, see ``dscoder.train.pretrain.setup_distributed``),
    after checking ``[parallel]`` against it: under torchrun, ``strategy = "none"`` means DDP (every rank training
    alone on its own batches was never what a torchrun launch meant); ``ep`` must fit the world and the experts."""
    from dscoder.train import expert_parallel
    from dscoder.train.pretrain import setup_distributed as setup

    d = setup()
    if d.world > 1 and config.parallel.strategy == "none":
        config.parallel.strategy = "ddp"
    if config.parallel.ep > 1 and config.parallel.strategy == "none":
        raise ConfigError(f"parallel.ep = {config.parallel.ep}: expert parallelism needs torchrun")
    expert_parallel.check(config.parallel.ep, d.world, n_routed_experts)
    return d


def parallelize(model, config: AlignConfig, d):
    """DDP or FSDP2 (and EP) around ``model``, as pre-training wraps it; the model itself in one process."""
    from dscoder.train.pretrain import parallelize as wrap

    return wrap(model, config, d) if d.world > 1 else model


def clip_for(config: AlignConfig):
    """The gradient clip of ``optimizer_step``: with EP, the expert gradients reduced first (see pretrain)."""
    from dscoder.train.pretrain import _expert_parallel_clip

    return _expert_parallel_clip if config.parallel.ep > 1 else None


def rank_share(n: int, d, what: str) -> slice:
    """Rank ``d.rank``'s equal share of ``n`` rows (a one-line error when ``n`` does not split evenly)."""
    if n % d.world:
        raise ConfigError(f"{what} = {n} does not split evenly over {d.world} processes")
    k = n // d.world
    return slice(d.rank * k, (d.rank + 1) * k)


def all_sum(values: list[float], d) -> list[float]:
    """Sums over the ranks (the values themselves in one process)."""
    if d.world == 1:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def all_gather(obj, d) -> list:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if d.world == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def finish(d) -> bool:
    """End the process group after training (every rank done with its checkpoints); True on rank 0, which then
    exports the trained model alone."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return d.main

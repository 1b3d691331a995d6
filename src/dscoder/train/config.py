"""Training recipes: TOML files with dotted ``key=value`` overrides, validated field by field.

A recipe has four tables and an optional list of stages::

    [model]     preset = "tiny" | init = "HF_DIR" (continued pre-training); other keys override ModelConfig fields
    [data]      path = "BUILD_DIR" (or sources = [{path=..., weight=...}, ...]), seq_len, fim_rate, spm_rate, shard,
                shuffle_rows, anneal_path and anneal_fraction (the last steps read another build)
    [train]     steps, micro_batch, grad_accum, lr, min_lr_ratio, warmup_steps, weight_decay, betas, grad_clip, ...
    [parallel]  strategy = "none" | "ddp" | "fsdp", ep (expert-parallel degree)
    [[stages]]  long-context extension: steps, seq_len, micro_batch, rope_factor, lr (each stage its own schedule)
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dscoder.errors import ConfigError
from dscoder.recipes import recipe_path


@dataclass
class ModelSection:
    preset: str | None = "tiny"
    init: str | None = None  # an HF checkpoint directory to start from (continued pre-training)
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. vocab_size

    def validate(self, source: str = "config") -> None:
        _need(bool(self.preset) != bool(self.init), source, "model.preset",
              "give model.preset or model.init (an HF checkpoint), not both")

    def to_dict(self, **extra: Any) -> dict[str, Any]:
        """The ``[model]`` table as written (``extra`` keys, e.g. alignment's ``tokenizer``, after preset/init)."""
        table = {"preset": self.preset, "init": self.init, **extra, **self.overrides}
        return {k: v for k, v in table.items() if v is not None}


@dataclass
class DataSection:
    path: str | None = None
    # a mixture: [{path, weight, name, min_tokens}]; weights are token shares (the run logs the share each source
    # got under its name, default the folder's name); min_tokens keeps only long documents (upsampling them)
    sources: list[dict[str, Any]] = field(default_factory=list)
    seq_len: int = 256
    fim_rate: float = 0.5
    spm_rate: float = 0.0
    # "documents": each rank reads its own documents (scales); "rows": every rank packs the global stream and takes
    # its rows, so any world size sees the batches one process would (for exact comparisons; costs data work)
    shard: str = "documents"
    # 0: rows in stream order; R: rows served in a random order within blocks of R rows (a batch then holds windows
    # of many documents instead of consecutive windows of one; see dscoder.data.loader)
    shuffle_rows: int = 0
    # an anneal: the last anneal_fraction of the steps read the build anneal_path instead (same tokenizer; the learning
    # rate schedule goes on), e.g. function-level documents (dscoder data functions) to end on the form of the task
    anneal_path: str | None = None
    anneal_fraction: float = 0.0


@dataclass
class TrainSection:
    steps: int = 100
    micro_batch: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "auto"  # autocast dtype: auto (bf16 on CUDA with bf16 support, else fp32) | bfloat16 | float32
    activation_checkpointing: bool = False
    compile: bool = False
    log_every: int = 1
    ckpt_every: int = 50
    keep_checkpoints: int = 2

    def validate(self, source: str = "config") -> None:
        """The checks every recipe's ``[train]`` gets (pre-training's and alignment's alike)."""
        for key in ("steps", "micro_batch", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints"):
            _need(isinstance(getattr(self, key), int) and getattr(self, key) > 0, source, f"train.{key}",
                  "expected a positive integer")
        _need(self.warmup_steps >= 0, source, "train.warmup_steps", "expected an integer >= 0")
        _need(self.lr > 0, source, "train.lr", "expected a positive number")
        _need(0 <= self.min_lr_ratio <= 1, source, "train.min_lr_ratio", "expected a number in [0, 1]")
        _need(self.dtype in ("auto", "bfloat16", "float32"), source, "train.dtype",
              "expected auto, bfloat16 or float32")


@dataclass
class ParallelSection:
    strategy: str = "none"  # none | ddp | fsdp
    # expert parallel degree: the routed experts of every MoE layer are split over groups of ep ranks (torchrun
    # with a multiple of ep processes; strategy "ddp" or "fsdp"); the rest of the model is data-parallel (ddp:
    # replicated; fsdp: sharded over the world/ep "dp" ranks, replicated over "ep")
    ep: int = 1


@dataclass
class Stage:
    steps: int
    seq_len: int
    micro_batch: int | None = None
    rope_factor: float | None = None
    lr: float | None = None
    name: str = ""


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    stages: list[Stage] = field(default_factory=list)

    # ----- loading -------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
        return cls.from_dict(read_recipe(path, overrides), source=str(path) if path else "config")

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        raw = copy.deepcopy(raw)
        unknown = set(raw) - {"model", "data", "train", "parallel", "stages"}
        if unknown:
            raise ConfigError(f"{source}: unknown config table '{sorted(unknown)[0]}'")
        cfg = cls(model=model_section(raw.get("model", {}), source),
                  data=parse_section(DataSection, raw.get("data", {}), "data", source),
                  train=parse_section(TrainSection, raw.get("train", {}), "train", source),
                  parallel=parse_section(ParallelSection, raw.get("parallel", {}), "parallel", source),
                  stages=[parse_section(Stage, s, f"stages[{i}]", source) for i, s in enumerate(raw.get("stages", []))])
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        def need(cond: bool, key: str, msg: str) -> None:
            _need(cond, source, key, msg)

        d = self.data
        self.model.validate(source)
        self.train.validate(source)
        need(d.seq_len > 0, "data.seq_len", "expected a positive integer")
        need(d.shard in ("documents", "rows"), "data.shard", "expected 'documents' or 'rows'")
        need(isinstance(d.shuffle_rows, int) and not isinstance(d.shuffle_rows, bool) and d.shuffle_rows >= 0,
             "data.shuffle_rows", "expected an integer >= 0")
        need(bool(d.path) != bool(d.sources), "data.path", "give data.path or data.sources (a mixture), not both")
        for i, s in enumerate(d.sources):
            need(isinstance(s, dict) and set(s) <= {"path", "weight", "name", "min_tokens"} and "path" in s,
                 f"data.sources[{i}]", "expected {path = ..., weight = ..., name = ..., min_tokens = ...}")
            need(isinstance(s.get("name", ""), str), f"data.sources[{i}].name", "expected a string")
        need(isinstance(d.anneal_fraction, (int, float)) and not isinstance(d.anneal_fraction, bool)
             and 0.0 <= d.anneal_fraction < 1.0, "data.anneal_fraction", "expected a number in [0, 1)")
        need(bool(d.anneal_path) == (d.anneal_fraction > 0), "data.anneal_fraction",
             "give data.anneal_path and a data.anneal_fraction > 0 together (or neither)")
        need(self.parallel.strategy in ("none", "ddp", "fsdp"), "parallel.strategy", "expected none, ddp or fsdp")
        ep = self.parallel.ep
        need(isinstance(ep, int) and ep >= 1, "parallel.ep", "expected a positive integer")
        need(ep == 1 or self.parallel.strategy in ("ddp", "fsdp"), "parallel.ep",
             f"expert parallelism (ep = {ep}) needs parallel.strategy = 'ddp' or 'fsdp' (torchrun)")
        for i, s in enumerate(self.stages):
            need(s.steps > 0 and s.seq_len > 0, f"stages[{i}]", "steps and seq_len must be positive")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages) if self.stages else self.train.steps

    @property
    def anneal_start(self) -> int | None:
        """The step after which batches come from ``data.anneal_path`` (None without an anneal): the last
        ``anneal_fraction`` of the steps, at least one."""
        if not self.data.anneal_path:
            return None
        total = self.total_steps
        return total - max(1, round(self.data.anneal_fraction * total))

    def stage_plan(self) -> list[Stage]:
        """The stages the run goes through (one implicit stage without ``[[stages]]``)."""
        if self.stages:
            return self.stages
        return [Stage(steps=self.train.steps, seq_len=self.data.seq_len)]


def model_section(raw: Any, source: str = "config", extra: tuple[str, ...] = ()) -> ModelSection:
    """A recipe's ``[model]`` table: ``preset`` (default tiny) or ``init``, not both; every other key (but
    ``extra``, which the caller takes out first) must be a ModelConfig field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: model: expected a table")
    from dscoder.config import ModelConfig

    rest = {k: v for k, v in raw.items() if k not in ("preset", "init", *extra)}
    bad = sorted(set(rest) - {f.name for f in fields(ModelConfig)})
    if bad:
        raise ConfigError(f"{source}: unknown config key 'model.{bad[0]}'")
    model = ModelSection(preset=raw.get("preset", None if "init" in raw else "tiny"), init=raw.get("init"),
                         overrides=rest)
    model.validate(source)
    return model


def _need(cond: bool, source: str, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {key}: {msg}")


def read_recipe(path: str | Path | None, overrides: list[str] = ()) -> dict[str, Any]:
    """A TOML recipe as a dict, with dotted ``key=value`` overrides applied (values parsed as TOML)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(recipe_path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a TOML file (not valid UTF-8 at byte {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    given = set()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.steps=100")
        _set_dotted(raw, key.strip(), _parse_value(value.strip()))
        given.add(key.strip())
    # model.preset and model.init are alternatives: an override of one replaces the other from the file (a recipe
    # with preset = "tiny" run with model.init=DIR starts from DIR)
    for mine, other in (("model.init", "model.preset"), ("model.preset", "model.init")):
        if mine in given and other not in given and isinstance(raw.get("model"), dict):
            raw["model"].pop(other.split(".")[1], None)
    return raw


def parse_section(cls, raw: Any, name: str, source: str):
    """The dataclass ``cls`` from a recipe's table ``raw`` (named ``name`` in errors): unknown keys and values of
    the wrong type are one line naming the key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {name}: expected a table")
    known = {f.name: f for f in fields(cls)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown config key '{name}.{key}'")
    try:
        obj = cls(**raw)
    except TypeError as e:
        raise ConfigError(f"{source}: {name}: {e}") from None
    for key, value in raw.items():
        want = known[key].type
        if "float" in str(want) and isinstance(value, int) and not isinstance(value, bool):
            setattr(obj, key, float(value))
        elif want in ("int", int) and not (isinstance(value, int) and not isinstance(value, bool)):
            raise ConfigError(f"{source}: {name}.{key} = {value!r}: expected an integer")
        elif want in ("bool", bool) and not isinstance(value, bool):
            raise ConfigError(f"{source}: {name}.{key} = {value!r}: expected true or false")
        elif "float" in str(want) and not isinstance(value, (int, float)) and value is not None:
            raise ConfigError(f"{source}: {name}.{key} = {value!r}: expected a number")
    return obj


def _parse_value(text: str) -> Any:
    """A TOML value (``100``, ``1e-3``, ``true``, ``"x"``, ``[1, 2]``), or the bare text as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: '{part}' is not a table")
    node[parts[-1]] = value

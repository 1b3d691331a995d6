"""Supervised fine-tuning on chat data, and the pieces the alignment recipes share (reward model, GRPO).

Shape legend: B rows, T tokens per row, D hidden, V vocabulary.

``dscoder train sft --config configs/sft-tiny.toml --out RUN`` reads chat jsonl (one ``{"messages": [...]}`` per
line), renders every conversation with the DeepSeek-Coder-V2 chat template, trains the next-token loss on the
assistant tokens only (each reply's leading space, its text and its ``<｜end▁of▁sentence｜>``; labels are -100
everywhere else), and packs conversations into rows of ``data.seq_len`` tokens without attention across them: each
conversation gets its own position ids (restarting at 0) and a block-diagonal causal mask, so a packed row computes
exactly what the conversations would alone. AdamW, linear warmup (100 steps by default) then cosine, gradient
accumulation and clipping, DCP checkpoints with ``--resume`` and an HF export at the end, as in pre-training.

Recipes have the tables ``[model]`` (``preset`` or ``init`` = an HF checkpoint, ``tokenizer``, ModelConfig
overrides), ``[data]``, ``[train]`` and one table named after the method (``[sft]``, ``[reward]``, ``[grpo]``).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dscoder.errors import ConfigError, DscoderError
from dscoder.train import checkpoint as ckpt
from dscoder.train.config import ModelSection, TrainSection, _section, read_recipe
from dscoder.train.optim import build_optimizer, lr_factor

IGNORE = -100


# ----- recipes ---------------------------------------------------------------------------------------------------
@dataclass
class AlignTrainSection(TrainSection):
    """Pre-training's ``[train]`` with the alignment defaults (the paper's SFT: lr 5e-6, 100 warmup steps)."""

    lr: float = 5e-6
    warmup_steps: int = 100
    export: bool = True  # write OUT/hf (an HF checkpoint) at the end


@dataclass
class SFTData:
    path: str | None = None  # chat jsonl: {"messages": [{"role": ..., "content": ...}, ...]} per line
    eval_path: str | None = None  # optional held-out chat jsonl: assistant loss logged at every eval
    seq_len: int = 1024
    packing: bool = True  # several conversations per row, block-diagonal attention; false: one per row


@dataclass
class SFTSection:
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)


@dataclass
class AlignConfig:
    """A parsed alignment recipe: ``model``, ``tokenizer`` (a directory or None), ``data``, ``train``, ``method``."""

    model: ModelSection
    tokenizer: str | None
    data: Any
    train: AlignTrainSection
    method: Any
    name: str = "sft"

    def to_dict(self) -> dict[str, Any]:
        model = {"preset": self.model.preset, "init": self.model.init, "tokenizer": self.tokenizer,
                 **self.model.overrides}
        return {"model": {k: v for k, v in model.items() if v is not None}, "data": asdict(self.data),
                "train": asdict(self.train), self.name: asdict(self.method)}


def load_recipe(path: str | Path | None, overrides: list[str], name: str, data_cls, method_cls,
                train_defaults: dict[str, Any] | None = None) -> AlignConfig:
    """Read a TOML recipe (tables model, data, train and ``name``) with dotted ``key=value`` overrides."""
    source = str(path) if path else "config"
    raw = read_recipe(path, overrides)
    unknown = set(raw) - {"model", "data", "train", name}
    if unknown:
        raise ConfigError(f"{source}: unknown config table '{sorted(unknown)[0]}' (a {name} recipe has model, data, "
                          f"train, {name})")
    model_raw = dict(raw.get("model", {}))
    tokenizer = model_raw.pop("tokenizer", None)
    model = ModelSection(preset=model_raw.pop("preset", None if "init" in model_raw else "tiny"),
                         init=model_raw.pop("init", None), overrides=model_raw)
    from dscoder.config import ModelConfig

    bad = sorted(set(model.overrides) - {f.name for f in fields(ModelConfig)})
    if bad:
        raise ConfigError(f"{source}: unknown config key 'model.{bad[0]}'")
    if bool(model.preset) == bool(model.init):
        raise ConfigError(f"{source}: model.preset: give model.preset or model.init (an HF checkpoint), not both")
    train = _section(AlignTrainSection, {**(train_defaults or {}), **raw.get("train", {})}, "train", source)
    for key in ("steps", "micro_batch", "grad_accum", "log_every", "ckpt_every", "keep_checkpoints"):
        if not isinstance(getattr(train, key), int) or getattr(train, key) <= 0:
            raise ConfigError(f"{source}: train.{key}: expected a positive integer")
    if train.lr <= 0 or train.warmup_steps < 0 or not 0 <= train.min_lr_ratio <= 1:
        raise ConfigError(f"{source}: train.lr / warmup_steps / min_lr_ratio out of range")
    return AlignConfig(model=model, tokenizer=tokenizer, data=_section(data_cls, raw.get("data", {}), "data", source),
                       train=train, method=_section(method_cls, raw.get(name, {}), name, source), name=name)


# ----- model and tokenizer ---------------------------------------------------------------------------------------
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


def build_policy(config: AlignConfig, tokenizer, model_cls=None, device="cpu"):
    """The model to fine-tune: ``model.init`` (an HF checkpoint) or a preset with random weights whose vocabulary,
    bos and eos follow the tokenizer; ``model_cls`` (a DeepseekV2 subclass, e.g. the reward model) gets the weights."""
    import dscoder
    from dscoder.config import ModelConfig
    from dscoder.model import DeepseekV2

    model_cls = model_cls or DeepseekV2
    changes = dict(config.model.overrides)
    if config.model.init:
        if not (Path(config.model.init) / "config.json").is_file():
            raise ConfigError(f"model.init = {config.model.init!r}: not an HF checkpoint directory (no config.json)")
        base = ModelConfig.from_json_file(Path(config.model.init) / "config.json")
        if tokenizer is not None and base.vocab_size < tokenizer.vocab_size:
            raise ConfigError(f"model.init has vocab_size {base.vocab_size} < the tokenizer's {tokenizer.vocab_size}")
    else:
        base = ModelConfig.preset(config.model.preset)
        if tokenizer is not None:
            changes.setdefault("vocab_size", tokenizer.vocab_size)
            changes.setdefault("bos_token_id", tokenizer.bos_id)
            changes.setdefault("eos_token_id", tokenizer.eos_id)
    mcfg = base.replace(**changes)
    torch.manual_seed(config.train.seed)
    if not config.model.init:
        with torch.device(device):
            model = model_cls(mcfg)
        model.init_weights()
        return model.float().train()
    # The loaded tensors become the model's (no second copy); a head the checkpoint lacks is initialised.
    loaded = dscoder.load_model(config.model.init, dtype=torch.float32, device=device)
    try:
        model, missing, unexpected = model_cls.from_state_dict(mcfg, loaded.state_dict(), device=device, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"model overrides change the shapes of model.init's weights: {str(e).splitlines()[0]}") \
            from None
    if unexpected or any(not k.startswith("score") for k in missing):
        raise ConfigError(f"model overrides change the names of model.init's weights ({(unexpected or missing)[0]})")
    return model.float().train()


def document_mask(doc_BT: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask ``[B, 1, T, T]``: a token sees the earlier tokens of its own document only."""
    T = doc_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_BT.device).tril()
    return ((doc_BT[:, :, None] == doc_BT[:, None, :]) & causal)[:, None]


# ----- chat data -------------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path, what: str) -> list[tuple[int, Any]]:
    """(line number, object) for every non-empty line; a missing file or a bad line is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise DscoderError(f"{path}: no such {what} file")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DscoderError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    if not rows:
        raise DscoderError(f"{path}: no {what} in this file")
    return rows


def read_chats(path: str | Path) -> list[list[dict]]:
    chats = []
    for n, row in read_jsonl(path, "chat jsonl"):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DscoderError(f"{path}:{n}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}, ...]}}")
        if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
            raise DscoderError(f"{path}:{n}: no assistant message (nothing to train on)")
        chats.append(messages)
    return chats


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant reply.

    The reply is what the model writes after the generation prompt ``Assistant:``: a space, the content and eos.
    The whole string is encoded at once (as inference encodes a chat prompt) and tokens are assigned to replies by
    their character offsets."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans, cursor = [], len(tokenizer.bos_token)
    for m in messages:  # the template's own pieces, in order, to find each reply's characters
        content = m["content"]
        if m["role"] == "system":
            cursor += len(content) + 2
        elif m["role"] == "user":
            cursor += len("User: ") + len(content) + 2
        else:
            start = cursor + len("Assistant:")
            cursor = start + 1 + len(content) + len(tokenizer.eos_token)
            spans.append((start, cursor))
    if cursor != len(text):  # the template changed under us
        raise DscoderError("chat template rendering does not match the expected DeepSeek-Coder-V2 layout")
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    mask = [any(a <= s < b for a, b in spans) for s, _ in enc.offsets]
    return list(enc.ids), mask


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # labels[t] = ids[t + 1] when that token is an assistant token, else IGNORE


def make_example(ids: list[int], assistant: list[bool], seq_len: int) -> Example | None:
    ids, assistant = ids[:seq_len], assistant[:seq_len]
    labels = [ids[t + 1] if assistant[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return Example(ids, labels) if any(lab != IGNORE for lab in labels) else None


def pack(examples: list[Example], seq_len: int, pad_id: int, packing: bool = True) -> list[dict[str, list[int]]]:
    """Rows of ``seq_len``: ``ids``, ``labels``, ``pos`` (restarting per example) and ``doc`` (example index in the
    row; -1 for padding), greedily filled in order."""
    rows, row = [], None
    for ex in examples:
        if row is None or not packing or len(row["ids"]) + len(ex.ids) > seq_len:
            if row is not None:
                rows.append(row)
            row = {"ids": [], "labels": [], "pos": [], "doc": []}
        doc = max(row["doc"], default=-1) + 1
        row["ids"] += ex.ids
        row["labels"] += ex.labels
        row["pos"] += list(range(len(ex.ids)))
        row["doc"] += [doc] * len(ex.ids)
    if row is not None:
        rows.append(row)
    for r in rows:
        pad = seq_len - len(r["ids"])
        r["ids"] += [pad_id] * pad
        r["labels"] += [IGNORE] * pad
        r["pos"] += list(range(pad))
        r["doc"] += [-1] * pad
    return rows


def collate(rows: list[dict[str, list[int]]], device="cpu") -> dict[str, torch.Tensor]:
    return {k: torch.tensor([r[k] for r in rows], dtype=torch.long, device=device) for k in rows[0]}


class RowLoader:
    """Cycles over packed rows in a seeded order reshuffled every epoch; ``state_dict`` resumes exactly."""

    def __init__(self, rows: list, batch: int, seed: int):
        self.rows, self.batch, self.seed = rows, batch, seed
        self.epoch, self.index = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def __next__(self) -> list:
        out = []
        while len(out) < self.batch:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.rows[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self._order = self._shuffle()


def chat_rows(path, tokenizer, seq_len: int, packing: bool) -> tuple[list[dict], dict[str, int]]:
    examples, truncated, dropped = [], 0, 0
    for messages in read_chats(path):
        ids, assistant = encode_chat(tokenizer, messages)
        truncated += len(ids) > seq_len
        ex = make_example(ids, assistant, seq_len)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    if not examples:
        raise DscoderError(f"{path}: no conversation keeps an assistant token within data.seq_len = {seq_len}")
    rows = pack(examples, seq_len, tokenizer.pad_id, packing)
    return rows, {"conversations": len(examples), "truncated": truncated, "dropped": dropped, "rows": len(rows)}


# ----- the loop --------------------------------------------------------------------------------------------------
def sft_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(summed next-token loss over assistant tokens, MoE balance loss, number of assistant tokens)."""
    h, aux = model.hidden(batch["ids"], document_mask(batch["doc"]), batch["pos"])
    logits = model.lm_head(h).float()
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, aux, int((batch["labels"] != IGNORE).sum())


@torch.no_grad()
def evaluate_rows(model, rows: list[dict], batch: int) -> float:
    """Mean next-token loss (nats) over the assistant tokens of ``rows``."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        loss, _, n = sft_loss(model, collate(rows[i:i + batch], model.lm_head.weight.device))
        total, count = total + float(loss), count + n
    model.train(was)
    return total / max(count, 1)


def prepare_run(out: Path, config: AlignConfig, resume: bool) -> list[Path]:
    existing = ckpt.checkpoints(out)
    if existing and not resume:
        raise DscoderError(f"{out}: already holds checkpoints; pass --resume to continue, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return existing


def optimizer_step(model, optimizer, step: int, t: AlignTrainSection) -> tuple[float, float]:
    """Clip, set the warmup + cosine rate for ``step`` (0-based), step and zero; returns (grad_norm, lr)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    lr = t.lr * lr_factor(step, t.warmup_steps, t.steps, t.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr


def log_metrics(path: Path, row: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def resume_from(existing: list[Path], model, optimizer, metrics: Path) -> dict[str, Any]:
    from dscoder.train.pretrain import _truncate_metrics

    meta = ckpt.read_meta(existing[-1])
    if meta.get("model") != model.config.to_hf_dict():
        raise DscoderError(f"{existing[-1]}: saved with another model config; start a new --out")
    extra = ckpt.load(existing[-1], model, optimizer)
    _truncate_metrics(metrics, extra["step"])
    return extra


def save_checkpoint(out: Path, step: int, model, optimizer, extra: dict, tokenizer_dir: str | None,
                    keep: int) -> None:
    ckpt.save(out, step, model, optimizer, extra={"step": step, **extra},
              meta={"model": model.config.to_hf_dict(), **({"tokenizer": tokenizer_dir} if tokenizer_dir else {})},
              keep=keep)


def tokenizer_dir(config: AlignConfig) -> str | None:
    if config.tokenizer:
        return str(Path(config.tokenizer).resolve())
    if config.model.init and (Path(config.model.init) / "tokenizer.json").is_file():
        return str(Path(config.model.init).resolve())
    return None


def sft(config: AlignConfig, out: str | Path, resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
    """Fine-tune (or resume) into ``out``; returns a summary (first and last loss, held-out loss, export path)."""
    out = Path(out)
    t, d = config.train, config.data
    if not d.path:
        raise ConfigError("data.path: give the chat jsonl to fine-tune on")
    tokenizer = load_tokenizer(config)
    rows, stats = chat_rows(d.path, tokenizer, d.seq_len, d.packing)
    eval_rows = chat_rows(d.eval_path, tokenizer, d.seq_len, d.packing)[0] if d.eval_path else None
    existing = prepare_run(out, config, resume)
    model = build_policy(config, tokenizer)
    optimizer = build_optimizer(model, t.lr, t.weight_decay, (t.beta1, t.beta2), t.eps)
    loader = RowLoader(rows, t.micro_batch, t.seed)
    metrics = out / "metrics.jsonl"
    step = 0
    if resume and existing:
        extra = resume_from(existing, model, optimizer, metrics)
        step = extra["step"]
        loader.load_state_dict(extra["loader"])
    elif metrics.exists():
        metrics.unlink()
    stop = t.steps if max_steps is None else min(t.steps, max_steps)
    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=step, desc="sft", unit="step", dynamic_ncols=True)
    summary: dict[str, Any] = {**stats}
    while step < stop:
        t0 = time.perf_counter()
        batches = [collate(next(loader)) for _ in range(t.grad_accum)]
        n_tokens = sum(int((b["labels"] != IGNORE).sum()) for b in batches)
        loss_sum, aux_sum = 0.0, 0.0
        for b in batches:
            loss, aux, _ = sft_loss(model, b)
            aux = aux if aux is not None else torch.zeros(())
            (loss / max(n_tokens, 1) + aux / t.grad_accum).backward()
            loss_sum, aux_sum = loss_sum + loss.item(), aux_sum + aux.item() / t.grad_accum
        grad_norm, lr = optimizer_step(model, optimizer, step, t)
        step += 1
        row = {"step": step, "loss": loss_sum / max(n_tokens, 1), "aux_loss": aux_sum, "grad_norm": grad_norm,
               "lr": lr, "assistant_tokens": n_tokens,
               "tokens_per_s": sum(b["ids"].numel() for b in batches) / (time.perf_counter() - t0)}
        if eval_rows is not None and ((config.method.eval_every and step % config.method.eval_every == 0)
                                      or step == t.steps):
            row["eval_loss"] = evaluate_rows(model, eval_rows, t.micro_batch)
        summary.setdefault("first_loss", row["loss"])
        summary.update(last_loss=row["loss"], step=step, **({"eval_loss": row["eval_loss"]} if "eval_loss" in row else {}))
        if step % t.log_every == 0 or step == stop:
            log_metrics(metrics, row)
        bar.update()
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if step % t.ckpt_every == 0 or step == stop:
            save_checkpoint(out, step, model, optimizer, {"loader": loader.state_dict()}, tokenizer_dir(config),
                            t.keep_checkpoints)
    bar.close()
    if step == t.steps and t.export:
        from dscoder.train.export import export

        summary["export"] = str(export(out, out / "hf"))
    return summary

"""Supervised fine-tuning on chat data.

Shape legend: B rows, T tokens per row, D hidden, V vocabulary.

``dscoder train sft --config configs/sft-tiny.toml --out RUN`` reads chat jsonl (one ``{"messages": [...]}`` per
line), renders every conversation with the DeepSeek-Coder-V2 chat template, trains the next-token loss on the
assistant tokens only (each reply's leading space, its text and its ``<｜end▁of▁sentence｜>``; labels are -100
everywhere else), and packs conversations into rows of ``data.seq_len`` tokens without attention across them: each
conversation gets its own position ids (restarting at 0) and a block-diagonal causal mask, so a packed row computes
exactly what the conversations would alone. AdamW, linear warmup (100 steps by default) then cosine, gradient
accumulation and clipping, DCP checkpoints with ``--resume`` and an HF export at the end: the training-run layer
of pre-training (:mod:`dscoder.train.run`). The recipe's tables are described in :mod:`dscoder.align.recipe`.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dscoder.align.recipe import (AlignConfig, all_sum, build_policy, clip_for, finish, load_tokenizer, open_run,
                                  parallelize, policy_config, rank_share, setup_distributed)
from dscoder.errors import CheckpointError, ConfigError, DscoderError
from dscoder.io import read_jsonl
from dscoder.train.optim import lr_factor, optimizer_for
from dscoder.train.run import autocast, check_context, optimizer_step

IGNORE = -100


# ----- recipe ----------------------------------------------------------------------------------------------------
@dataclass
class SFTData:
    path: str | None = None  # chat jsonl: {"messages": [{"role": ..., "content": ...}, ...]} per line
    eval_path: str | None = None  # optional held-out chat jsonl: assistant loss logged at every eval
    seq_len: int = 1024
    packing: bool = True  # several conversations per row, block-diagonal attention; false: one per row


@dataclass
class SFTSection:
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)


def document_mask(doc_BT: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal mask ``[B, 1, T, T]``: a token sees the earlier tokens of its own document only."""
    T = doc_BT.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_BT.device).tril()
    return ((doc_BT[:, :, None] == doc_BT[:, None, :]) & causal)[:, None]


# ----- chat data -------------------------------------------------------------------------------------------------
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
    """(summed next-token loss over assistant tokens, MoE balance loss, number of assistant tokens). Through the
    model's forward, so a DDP or FSDP2 wrapper sees the call."""
    out = model(batch["ids"], document_mask(batch["doc"]), batch["pos"])
    logits, aux = out.logits.float(), out.aux_loss
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, aux, int((batch["labels"] != IGNORE).sum())


@torch.no_grad()
def evaluate_rows(model, rows: list[dict], batch: int, device=None) -> float:
    """Mean next-token loss (nats) over the assistant tokens of ``rows`` (every rank evaluates all of them)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    device = device or next(model.parameters()).device
    for i in range(0, len(rows), batch):
        loss, _, n = sft_loss(model, collate(rows[i:i + batch], device))
        total, count = total + float(loss), count + n
    model.train(was)
    return total / max(count, 1)


def sft(config: AlignConfig, out: str | Path, resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
    """Fine-tune (or resume) into ``out``; returns a summary (first and last loss, held-out loss, export path)."""
    t, d = config.train, config.data
    if not d.path:
        raise ConfigError("data.path: give the chat jsonl to fine-tune on")
    tokenizer = load_tokenizer(config)
    mcfg = policy_config(config, tokenizer)
    check_context(d.seq_len, mcfg, "data.seq_len")
    lora = config.lora if config.lora is not None and config.lora.enabled else None
    dist_ = setup_distributed(config, mcfg.n_routed_experts)
    if lora is not None and (config.parallel.strategy == "fsdp" or config.parallel.ep > 1):
        raise ConfigError("lora.rank: LoRA under torchrun runs with parallel.strategy = 'ddp' and ep = 1")
    rows, stats = chat_rows(d.path, tokenizer, d.seq_len, d.packing)
    eval_rows = chat_rows(d.eval_path, tokenizer, d.seq_len, d.packing)[0] if d.eval_path else None
    run = open_run(config, out, resume, tokenizer, main=dist_.main)
    model = build_policy(config, tokenizer, mcfg=mcfg, device=dist_.device)
    meta = {}
    if lora is not None:  # the base frozen, adapters on the targets (dscoder.train.lora)
        from dscoder.train.lora import apply_lora

        apply_lora(model, lora)
        meta = {"lora": lora.to_dict()}
    plain = model
    model = parallelize(model, config, dist_)
    optimizer = optimizer_for(model, t)
    # every rank reads the global batch (micro_batch rows per rank) in one process's order and takes its rows
    loader = RowLoader(rows, t.micro_batch * dist_.world, t.seed)
    mine = rank_share(t.micro_batch * dist_.world, dist_, "rows per step")

    def expected(saved: dict) -> dict:  # a checkpoint resumes only under the same [lora] table
        if saved.get("lora") != meta.get("lora"):
            raise CheckpointError(f"{out}: its checkpoints were saved with lora = {saved.get('lora')}, the recipe "
                                  f"has {meta.get('lora')}; start a new --out")
        return plain.config.to_hf_dict()

    extra = run.restore(model, optimizer, resume, expected)
    step = extra["step"] if extra else 0
    if extra:
        loader.load_state_dict(extra["loader"])
    stop = t.steps if max_steps is None else min(t.steps, max_steps)
    summary: dict[str, Any] = {**stats}
    with run.progress("sft", t.steps, step) as bar:
        while step < stop:
            t0 = time.perf_counter()
            global_batches = [next(loader) for _ in range(t.grad_accum)]
            # the loss is a mean over the global batch's assistant tokens: each rank's sum over that count, times
            # the world size, since DDP and FSDP2 average the ranks' gradients
            n_tokens = sum(lab != IGNORE for rows_ in global_batches for r in rows_ for lab in r["labels"])
            batches = [collate(rows_[mine], dist_.device) for rows_ in global_batches]
            loss_sum, aux_sum = 0.0, 0.0
            for k, b in enumerate(batches):
                with _no_sync(model, k < len(batches) - 1), autocast(t.dtype, dist_.device):
                    loss, aux, _ = sft_loss(model, b)
                    aux = aux if aux is not None else torch.zeros((), device=dist_.device)
                    (loss * dist_.world / max(n_tokens, 1) + aux / t.grad_accum).backward()
                loss_sum, aux_sum = loss_sum + loss.item(), aux_sum + aux.item() / t.grad_accum
            loss_sum, aux_sum = all_sum([loss_sum, aux_sum / dist_.world], dist_)
            lr = t.lr * lr_factor(step, t.warmup_steps, t.steps, t.min_lr_ratio)
            grad_norm = optimizer_step(model, optimizer, lr, t.grad_clip, step + 1, clip=clip_for(config),
                                       loss=loss_sum / max(n_tokens, 1), aux_loss=aux_sum)
            step += 1
            row = {"step": step, "loss": loss_sum / max(n_tokens, 1), "aux_loss": aux_sum, "grad_norm": grad_norm,
                   "lr": lr, "assistant_tokens": n_tokens,
                   "tokens_per_s": sum(b["ids"].numel() for b in batches) * dist_.world / (time.perf_counter() - t0)}
            if eval_rows is not None and ((config.method.eval_every and step % config.method.eval_every == 0)
                                          or step == t.steps):
                row["eval_loss"] = evaluate_rows(model, eval_rows, t.micro_batch, dist_.device)
                summary["eval_loss"] = row["eval_loss"]
            summary.setdefault("first_loss", row["loss"])
            summary.update(last_loss=row["loss"], step=step)
            bar.update(loss=row["loss"])
            run.end_step(step, stop, t, row, model, optimizer, extra={"loader": loader.state_dict()}, meta=meta)
    if not finish(dist_):  # under torchrun, rank 0 writes the adapter and the export alone
        return summary
    if step == t.steps and lora is not None:
        from dscoder.train.lora import ADAPTER_DIR, save_adapter

        summary["adapter"] = str(save_adapter(plain, lora, run.out / ADAPTER_DIR, config.model.init))
    if step == t.steps and t.export:
        if lora is None:
            summary["export"] = str(run.export())
        else:
            from dscoder.train.export import export

            summary["export"] = str(export(run.out, run.out / "hf", merge_lora=True))
    return summary



def _no_sync(model, skip: bool):
    """Gradient accumulation under DDP or FSDP2: no gradient exchange on the micro-batches before the last."""
    from dscoder.train.pretrain import grad_sync

    return grad_sync(model, not skip)

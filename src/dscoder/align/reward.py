"""Reward model: a scalar head on the final hidden state, trained with the Bradley-Terry pairwise loss.

``dscoder train reward --config configs/reward-tiny.toml --out RUN``. The reward of a sequence is
``score(h_T)``, a bias-free linear map of the final-norm hidden state at its last token (right padding: the last
non-pad token), as transformers' sequence-classification models read it. The loss over pairs is
``-log σ(r_chosen - r_rejected - margin)`` averaged over the batch, plus ``center * mean((r_c + r_r)²)`` (keeps the
rewards centred around 0; TRL's ``center_rewards_coefficient``).

Pairs come from

- a preference jsonl (``data.pairs``): ``{"prompt"?, "chosen", "rejected", "margin"?}`` per line, strings (encoded
  as ``prompt + reply`` + eos) or chat message lists (the chat template);
- execution results (``data.problems``): problems with tests (HumanEval style ``prompt, test, entry_point`` or MBPP
  style ``prompt, test_list``) and candidate programs (``completions``; without them, ``reward.samples`` are
  sampled from the initial model by the engine). Every program runs in the sandbox and, per problem, each program
  that passes is preferred to each that fails: the compiler-feedback pairs of DeepSeek-Coder-V2 §3.5.2.
  ``data.problems = "builtin"`` is a small arithmetic set (a tokenizer is trained on it when none is given).

Held-out pairs (whole problems for execution data) give the pairwise accuracy in ``metrics.jsonl``; the trained
model is written to ``RUN/reward_model/`` (an HF checkpoint, its tokenizer and ``reward_head.safetensors``).
"""

from __future__ import annotations

import itertools
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dscoder.align.recipe import (AlignConfig, all_gather, all_sum, build_policy, clip_for, finish, load_tokenizer,
                                  open_run, parallelize, policy_config, rank_share, setup_distributed)
from dscoder.config import ModelConfig
from dscoder.errors import ConfigError, DscoderError
from dscoder.io import atomic_write, read_jsonl, write_json, write_jsonl
from dscoder.model import DeepseekV2
from dscoder.train.optim import lr_factor, optimizer_for
from dscoder.train.run import TOKENIZER_DIR, autocast, check_context, optimizer_step
HEAD_FILE = "reward_head.safetensors"
META_FILE = "reward_model.json"


class RewardModel(DeepseekV2):
    """DeepseekV2 with ``score: Linear(D, 1)``; ``rewards(ids_BT, lengths_B)`` → ``[B]`` fp32 rewards read at each
    row's last real token (rows are right-padded). The LM head stays, unused, so the backbone exports as is."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, input_ids: torch.Tensor, *args, lengths: torch.Tensor | None = None, **kwargs):
        """The LM's forward; with ``lengths``, ``(rewards [B], balance loss)`` (the call DDP and FSDP2 see)."""
        if lengths is None:
            return super().forward(input_ids, *args, **kwargs)
        return self.rewards_and_aux(input_ids, lengths)

    def rewards(self, ids_BT: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        return self.rewards_and_aux(ids_BT, lengths_B)[0]

    def rewards_and_aux(self, ids_BT: torch.Tensor,
                        lengths_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B]`` rewards and the forward pass's MoE balance loss (None without MoE layers or outside training)."""
        h_BTD, aux = self.hidden(ids_BT)
        last = h_BTD[torch.arange(ids_BT.shape[0], device=ids_BT.device), lengths_B - 1]
        return self.score(last).squeeze(-1).float(), aux

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]], batch: int = 16) -> list[float]:
        """Rewards of token-id sequences (eval mode, no gradient)."""
        was = self.training
        self.eval()
        out = []
        for i in range(0, len(sequences), batch):
            ids, lengths = pad_right(sequences[i:i + batch], self.config.eos_token_id or 0)
            out += self.rewards(ids.to(self.score.weight.device), lengths.to(self.score.weight.device)).tolist()
        self.train(was)
        return out


def pad_right(seqs: list[list[int]], pad: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, max(T, length)]`` ids and the lengths (``length``: a whole batch's width, for a rank's
    share of it: the balance loss sees the pad tokens too)."""
    T = max(length, max(len(s) for s in seqs))
    return (torch.tensor([s + [pad] * (T - len(s)) for s in seqs], dtype=torch.long),
            torch.tensor([len(s) for s in seqs], dtype=torch.long))


def save_reward_model(model: RewardModel, directory: str | Path, tokenizer=None) -> Path:
    from safetensors.torch import save

    from dscoder.model.build import save_model

    directory = Path(directory)
    lm, _, _ = DeepseekV2.from_state_dict(model.config, {k: v for k, v in model.state_dict().items()
                                                          if not k.startswith("score.")})
    save_model(lm, directory)
    with atomic_write(directory / HEAD_FILE, "wb") as f:
        f.write(save({"score.weight": model.score.weight.detach().float().contiguous()}))
    write_json(directory / META_FILE, {"format": "dscoder-reward-model", "head": "score",
                                       "vocab_size": model.config.vocab_size})
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory


def load_reward_model(directory: str | Path, vocab_size: int | None = None) -> RewardModel:
    """A saved reward model; ``vocab_size`` (the policy's) must match its vocabulary."""
    from safetensors.torch import load_file

    from dscoder.model.build import load_model

    directory = Path(directory)
    if not (directory / HEAD_FILE).is_file() or not (directory / "config.json").is_file():
        raise DscoderError(f"{directory}: not a dscoder reward model (needs config.json and {HEAD_FILE}; "
                           f"train one with `dscoder train reward`)")
    lm = load_model(directory, dtype=torch.float32)
    if vocab_size is not None and lm.config.vocab_size != vocab_size:
        raise DscoderError(f"{directory}: the reward model's vocabulary has {lm.config.vocab_size} tokens; the "
                           f"policy's has {vocab_size} (they must share a tokenizer)")
    model, _, _ = RewardModel.from_state_dict(lm.config, {**lm.state_dict(), **load_file(str(directory / HEAD_FILE))})
    return model.eval()


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0,
                       center: float = 0.0) -> torch.Tensor:
    """``mean(-log σ(r_c - r_r - margin)) + center * mean((r_c + r_r)²)``."""
    loss = -F.logsigmoid(r_chosen - r_rejected - margin).mean()
    if center:
        loss = loss + center * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# ----- pairs -----------------------------------------------------------------------------------------------------
@dataclass
class Pair:
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    group: str = ""  # the problem (held-out splits keep a problem's pairs together)


def encode_text(tokenizer, prompt, reply) -> list[int]:
    """``prompt + reply`` as strings (bos, text, eos) or chat message lists (the chat template)."""
    if isinstance(reply, list):
        text = tokenizer.apply_chat_template(list(prompt or []) + reply, add_generation_prompt=False)
        return tokenizer.encode(text, allow_special=True)
    head = [tokenizer.bos_id] if tokenizer.add_bos_token else []
    return head + tokenizer.encode((prompt or "") + reply) + [tokenizer.eos_id]


def read_preference_pairs(path, tokenizer, max_len: int) -> list[Pair]:
    pairs = []
    for n, row in read_jsonl(path, "preference jsonl"):
        where = f"{path}:{n}"
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            raise DscoderError(f"{where}: expected {{\"prompt\"?, \"chosen\", \"rejected\", \"margin\"?}}")
        prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
        kinds = {type(x) for x in (chosen, rejected)} | ({type(prompt)} if prompt is not None else set())
        if kinds not in ({str}, {list}):
            raise DscoderError(f"{where}: prompt, chosen and rejected must all be strings or all chat message lists")
        margin = row.get("margin", 0.0)
        if not isinstance(margin, (int, float)) or isinstance(margin, bool):
            raise DscoderError(f"{where}: margin must be a number")
        if chosen == rejected:
            raise DscoderError(f"{where}: chosen and rejected are the same")
        pairs.append(Pair(encode_text(tokenizer, prompt, chosen)[:max_len],
                          encode_text(tokenizer, prompt, rejected)[:max_len], float(margin), group=str(n)))
    return pairs


def problem_from_row(row: Any, where: str):
    """A HumanEval-style (``prompt, test, entry_point``) or MBPP-style (``prompt, test_list``) problem."""
    from dscoder.eval.tasks import HumanEvalProblem, MBPPProblem

    if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
        raise DscoderError(f"{where}: expected an object with a 'prompt' string")
    task_id = str(row.get("task_id", where))
    if isinstance(row.get("test"), str) and isinstance(row.get("entry_point"), str):
        return HumanEvalProblem(task_id, row["prompt"], data={"prompt": row["prompt"], "test": row["test"],
                                                                 "entry_point": row["entry_point"]})
    if isinstance(row.get("test_list"), list) and row["test_list"]:
        return MBPPProblem(task_id, row["prompt"], data={"test_list": row["test_list"],
                                                           "test_setup_code": row.get("test_setup_code", "")})
    raise DscoderError(f"{where}: prompt without tests (expected 'test' and 'entry_point', or 'test_list')")


BUILTIN_NAMES = ["add", "plus", "total", "combine", "join_sum", "accumulate", "summed", "both", "pair_sum", "merge",
                 "tally", "grow", "increase", "sum_two", "together", "addition"]
BUILTIN_ARGS = [("a", "b"), ("x", "y"), ("m", "n"), ("p", "q"), ("left", "right"), ("u", "v")]


def builtin_problems() -> list[dict]:
    """Sixteen 'return the sum' problems, each with six candidate bodies (two right, four wrong)."""
    rows = []
    for i, name in enumerate(BUILTIN_NAMES):
        a, b = BUILTIN_ARGS[i % len(BUILTIN_ARGS)]
        rows.append({"task_id": f"builtin/{i}", "entry_point": name,
                     "prompt": f"def {name}({a}, {b}):\n    \"\"\"Return the sum of {a} and {b}.\"\"\"\n",
                     "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(10, -4) == 6\n",
                     "completions": [f"    return {a} + {b}\n", f"    return {b} + {a}\n", f"    return {a} - {b}\n",
                                     f"    return {a} * {b}\n", f"    return {b} - {a}\n", f"    return {a} + {b} + 1\n"]})
    return rows


def execution_pairs(rows: list[tuple[str, dict]], tokenizer, sandbox, max_len: int,
                    max_pairs_per_problem: int = 64) -> tuple[list[Pair], dict[str, int]]:
    """Run every (problem, completion) in the sandbox; per problem, passing ≻ failing programs."""
    problems = [(problem_from_row(row, where), row["completions"]) for where, row in rows]
    jobs = [(p, c) for p, comps in problems for c in comps]
    results = list(sandbox.run_many([p.program(c) for p, c in jobs]))
    passed: dict[str, list[str]] = {}
    failed: dict[str, list[str]] = {}
    for (p, c), res in zip(jobs, results):
        (passed if res.passed else failed).setdefault(p.task_id, []).append(c)
    pairs = []
    for p, _ in problems:
        combos = list(itertools.product(passed.get(p.task_id, []), failed.get(p.task_id, [])))[:max_pairs_per_problem]
        for good, bad in combos:
            pairs.append(Pair(encode_text(tokenizer, p.prompt, good)[:max_len],
                              encode_text(tokenizer, p.prompt, bad)[:max_len], group=p.task_id))
    stats = {"programs": len(jobs), "passed": sum(r.passed for r in results), "problems": len(problems),
             "problems_with_pairs": sum(1 for p, _ in problems if passed.get(p.task_id) and failed.get(p.task_id))}
    return pairs, stats


def sample_completions(model, tokenizer, rows: list[tuple[str, dict]], n: int, temperature: float,
                       max_tokens: int, seed: int) -> None:
    """Fill in ``completions`` of rows without them: ``n`` samples per prompt from ``model`` (the engine)."""
    from dscoder.engine import Engine
    from dscoder.engine.sampling import SamplingParams

    todo = [row for _, row in rows if not row.get("completions")]
    if not todo:
        return
    with Engine(model, tokenizer=tokenizer, max_batch_size=min(64, n * len(todo))) as engine:
        seqs = [[engine.submit(engine.encode_prompt(row["prompt"]),
                               SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed * 7919 + j * 131 + i,
                                              stop=("\ndef ", "\nclass ", "\nif __name__")))
                 for i in range(n)] for j, row in enumerate(todo)]
        for row, group in zip(todo, seqs):
            row["completions"] = [c.text for c in engine.wait(group)]
    model.train()


# ----- recipe ----------------------------------------------------------------------------------------------------
@dataclass
class RewardData:
    pairs: str | None = None  # a preference jsonl
    problems: str | None = None  # problems with tests (+ completions) jsonl, or "builtin"
    max_len: int = 512
    heldout_fraction: float = 0.25  # of the problems (execution data) or pairs (preference data)


@dataclass
class RewardSection:
    margin: float = 0.0  # added to every pair's own margin
    center: float = 0.0  # center_rewards_coefficient (TRL recommends 1e-2)
    samples: int = 8  # programs sampled per problem without completions
    temperature: float = 0.8
    max_new_tokens: int = 256
    max_pairs_per_problem: int = 64
    sandbox_timeout: float = 10.0
    eval_every: int = 0  # steps between held-out accuracy evaluations (0: only at the end)


def split_heldout(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    groups = sorted({p.group for p in pairs})
    random.Random(seed).shuffle(groups)
    n_held = int(round(len(groups) * fraction)) if fraction > 0 else 0
    if fraction > 0 and len(groups) > 1:
        n_held = min(max(n_held, 1), len(groups) - 1)
    held = set(groups[:n_held])
    return [p for p in pairs if p.group not in held], [p for p in pairs if p.group in held]


def pair_batch(pairs: list[Pair], pad: int, length: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, lengths = pad_right([p.chosen for p in pairs] + [p.rejected for p in pairs], pad, length)
    return ids, lengths, torch.tensor([p.margin for p in pairs])


@torch.no_grad()
def pairwise_accuracy(model: RewardModel, pairs: list[Pair], batch: int = 16, pad: int = 0,
                      device=None) -> dict[str, float]:
    """Held-out accuracy and mean margin (through the model's forward: every rank of a torchrun evaluates all)."""
    was = model.training
    model.eval()
    right, margins = 0, []
    device = device or next(model.parameters()).device
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        ids, lengths, _ = pair_batch(chunk, pad)
        r = model(ids.to(device), lengths=lengths.to(device))[0]
        rc, rr = r[:len(chunk)], r[len(chunk):]
        right += int((rc > rr).sum())
        margins += (rc - rr).tolist()
    model.train(was)
    return {"accuracy": right / max(len(pairs), 1), "reward_margin": sum(margins) / max(len(margins), 1)}


def load_pairs(config: AlignConfig, tokenizer, model, out: Path) -> tuple[list[Pair], dict[str, Any]]:
    from dscoder.eval.sandbox import Limits, Sandbox

    d, m = config.data, config.method
    if d.pairs:
        return read_preference_pairs(d.pairs, tokenizer, d.max_len), {"source": d.pairs}
    if d.problems == "builtin":
        rows = [(f"builtin:{i}", r) for i, r in enumerate(builtin_problems())]
    else:
        rows = [(f"{d.problems}:{n}", r) for n, r in read_jsonl(d.problems, "problems jsonl")]
        for where, row in rows:
            problem_from_row(row, where)  # every row checked before any work
            if "completions" in row and not (isinstance(row["completions"], list)
                                             and all(isinstance(c, str) for c in row["completions"])):
                raise DscoderError(f"{where}: 'completions' must be a list of strings")
        sample_completions(model, tokenizer, rows, m.samples, m.temperature, m.max_new_tokens, config.train.seed)
    pairs, stats = execution_pairs(rows, tokenizer, Sandbox(Limits(timeout_s=m.sandbox_timeout)), d.max_len,
                                   m.max_pairs_per_problem)
    write_jsonl(out / "pairs.jsonl", ({"group": p.group, "chosen": tokenizer.decode(p.chosen),  # for inspection
                                       "rejected": tokenizer.decode(p.rejected)} for p in pairs))
    return pairs, {"source": d.problems, **stats}


def builtin_tokenizer(out: Path):
    from dscoder.tokenizer import Tokenizer

    where = Path(out) / TOKENIZER_DIR
    if not (where / "tokenizer.json").is_file():  # kept on resume
        texts = [r["prompt"] + c for r in builtin_problems() for c in r["completions"]] * 4
        Tokenizer.train(texts, vocab_size=320).save(where)
    return Tokenizer.load(where)


def train_reward(config: AlignConfig, out: str | Path, resume: bool = False,
                 max_steps: int | None = None) -> dict[str, Any]:
    out = Path(out)
    t, d, m = config.train, config.data, config.method
    if bool(d.pairs) == bool(d.problems):
        raise ConfigError("data.pairs: give data.pairs (a preference jsonl) or data.problems (problems with tests, "
                          "or \"builtin\"), one of them")
    if not 0 <= d.heldout_fraction < 1:
        raise ConfigError("data.heldout_fraction: expected a number in [0, 1)")
    tokenizer = load_tokenizer(config, required=d.problems != "builtin")
    dist_ = setup_distributed(config, policy_config(config, tokenizer).n_routed_experts)
    run = open_run(config, out, resume, tokenizer, main=dist_.main)
    if tokenizer is None:  # the built-in problems: a small BPE trained on them, kept in the run as its tokenizer
        if dist_.main:
            builtin_tokenizer(out)
        all_gather(None, dist_)  # (rank 0 has written it)
        tokenizer = builtin_tokenizer(out)
    mcfg = policy_config(config, tokenizer)
    check_context(d.max_len, mcfg, "data.max_len")
    model = build_policy(config, tokenizer, model_cls=RewardModel, mcfg=mcfg, device=dist_.device)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's")
    # rank 0 makes the pairs (sampling, sandbox runs) and shares them
    pairs, stats = all_gather(load_pairs(config, tokenizer, model, out) if dist_.main else None, dist_)[0]
    train_pairs, held = split_heldout(pairs, d.heldout_fraction, t.seed)
    if not train_pairs:
        raise DscoderError(f"{stats['source']}: no preference pairs to train on (no problem has both a passing and "
                           f"a failing program)" if d.problems else f"{d.pairs}: no pairs")
    plain = model
    model = parallelize(model, config, dist_)
    optimizer = optimizer_for(model, t)
    extra = run.restore(model, optimizer, resume, expected=lambda meta: plain.config.to_hf_dict())
    step, rng = (extra["step"] if extra else 0), random.Random(t.seed)
    mine = rank_share(t.micro_batch * dist_.world, dist_, "pairs per step")
    pad = tokenizer.pad_id
    summary: dict[str, Any] = {**stats, "train_pairs": len(train_pairs), "heldout_pairs": len(held)}
    if held:
        summary["heldout_accuracy_start"] = pairwise_accuracy(model, held, pad=pad, device=dist_.device)["accuracy"]
    stop = t.steps if max_steps is None else min(t.steps, max_steps)
    with run.progress("reward", t.steps, step) as bar:
        while step < stop:
            t0 = time.perf_counter()
            rng.seed(t.seed * 1000003 + step)  # the batch depends on the step only, so resume is exact
            loss_sum = acc_sum = 0.0
            for k in range(t.grad_accum):
                # the global batch (micro_batch pairs per rank), drawn as one process draws it; this rank's pairs
                drawn = [train_pairs[rng.randrange(len(train_pairs))] for _ in range(t.micro_batch * dist_.world)]
                chunk = drawn[mine]
                width = max(len(s) for p in drawn for s in (p.chosen, p.rejected))  # padded as one process pads
                ids, lengths, margins = pair_batch(chunk, pad, width)
                with _grad_sync(model, k == t.grad_accum - 1), autocast(t.dtype, dist_.device):
                    r, aux = model(ids.to(dist_.device), lengths=lengths.to(dist_.device))
                    rc, rr = r[:len(chunk)], r[len(chunk):]
                    loss = bradley_terry_loss(rc, rr, margins.to(dist_.device) + m.margin, m.center)
                    aux = aux if aux is not None else torch.zeros((), device=dist_.device)
                    ((loss + aux) / t.grad_accum).backward()  # the ranks' means of equal shares: DDP averages
                loss_sum += loss.item() / t.grad_accum
                acc_sum += (rc > rr).float().mean().item() / t.grad_accum
            loss_sum, acc_sum = (v / dist_.world for v in all_sum([loss_sum, acc_sum], dist_))
            lr = t.lr * lr_factor(step, t.warmup_steps, t.steps, t.min_lr_ratio)
            grad_norm = optimizer_step(model, optimizer, lr, t.grad_clip, step + 1, clip=clip_for(config),
                                       loss=loss_sum)
            step += 1
            row = {"step": step, "loss": loss_sum, "accuracy": acc_sum, "grad_norm": grad_norm, "lr": lr,
                   "seconds": time.perf_counter() - t0}
            if held and ((m.eval_every and step % m.eval_every == 0) or step == t.steps):
                ev = pairwise_accuracy(model, held, pad=pad, device=dist_.device)
                row.update(heldout_accuracy=ev["accuracy"], heldout_margin=ev["reward_margin"])
                summary["heldout_accuracy"] = ev["accuracy"]
            summary.update(step=step, loss=loss_sum)
            bar.update(loss=loss_sum)
            run.end_step(step, stop, t, row, model, optimizer)
    full = _full_model(model, plain, mcfg, dist_) if step == t.steps and t.export else None
    if finish(dist_) and full is not None:
        summary["reward_model"] = str(save_reward_model(full, out / "reward_model", tokenizer))
    return summary


def _grad_sync(model, sync: bool):
    from dscoder.train.pretrain import grad_sync

    return grad_sync(model, sync)


def _full_model(model, plain: RewardModel, mcfg: ModelConfig, d) -> RewardModel | None:
    """The trained reward model whole on rank 0 (collective): ``plain`` itself in one process and under DDP; under
    FSDP2 or EP the gathered full weights in a fresh model (None on the other ranks)."""
    if d.world == 1 or not any(hasattr(p, "device_mesh") for p in model.parameters()):
        return plain
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.main:
        return None
    fresh = RewardModel(mcfg)
    fresh.load_state_dict(state)
    return fresh

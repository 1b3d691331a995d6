"""GRPO (DeepSeekMath §4.1): group-relative policy optimisation with test-case and reward-model rewards.

Shape legend: N sequences in a rollout batch (prompts x G), L tokens per sequence (prompt + completion, right
padded), L-1 next-token targets.

``dscoder train grpo --config configs/grpo-tiny.toml --out RUN``. Each step samples ``G = grpo.group_size``
completions for each of ``grpo.prompts_per_step`` prompts with the engine (the policy's own weights, in place:
nothing to copy after an update), scores them, and turns the scores into group-relative advantages
``A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)`` (``scale_rewards = "none"``: no division, Dr. GRPO), the
same for every token of completion i. The policy then takes ``updates_per_batch`` passes (μ) over the batch, in
``mini_batches`` optimizer steps each, minimising per token

    -min(ρ A, clip(ρ, 1 - ε, 1 + ε_high) A) + β · KL_k3,    ρ = π_θ / π_θold,
    KL_k3 = π_ref/π_θ - log(π_ref/π_θ) - 1      (Schulman's k3; π_ref the frozen initial policy)

aggregated by ``loss_type``: ``grpo`` (mean over each completion's tokens, then over completions: the paper),
``dr_grpo`` (sum over tokens / (completions x max_new_tokens)) or ``token`` (sum / number of completion tokens).
π_θold is the policy that sampled the batch: its log-probabilities are computed once before the first update
(with μ = 1 and one mini-batch they equal the current ones, detached, so ρ = 1). Log-probabilities are taken
of the logits divided by the sampling temperature, the distribution the completions were drawn from.

Rewards (``grpo.rewards``, weights summed): ``tests`` (1 if the program passes its tests in the sandbox, else 0; for
the built-in task, its verifier's score) and ``model`` (a reward model from ``dscoder train reward``; its vocabulary
must be the policy's). Prompts: a jsonl of problems with tests (HumanEval or MBPP style, see
:func:`dscoder.align.reward.problem_from_row`), or ``data.prompts = "builtin:count"``: given the digits
``d, d+1, d+2`` (mod 10), write the next four; the reward is the fraction right. A tiny random model (16-token
vocabulary) starts near 1/16 and learns it in a minute on a CPU, so the whole loop can be watched.

``RUN/metrics.jsonl`` has one line per step: ``step, reward_mean, reward_std, pass_rate, kl, clip_frac,
response_length, loss, grad_norm, lr, rollout_tokens_per_s, rollout_s, update_s``.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dscoder.align.recipe import (AlignConfig, all_gather, all_sum, build_policy, clip_for, finish, load_tokenizer,
                                  open_run, parallelize, policy_config, rank_share, setup_distributed)
from dscoder.errors import ConfigError, DscoderError
from dscoder.io import read_jsonl
from dscoder.train.optim import lr_factor, optimizer_for
from dscoder.train.run import autocast, check_context, optimizer_step
LOSS_TYPES = ("grpo", "dr_grpo", "token")


# ----- the objective ---------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """``[N]`` rewards in groups of ``group_size`` consecutive entries → ``[N]`` advantages: minus the group mean,
    divided by the group's (unbiased) standard deviation + eps when ``scale == "group"``."""
    r = rewards.view(-1, group_size).float()
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.ones_like(r[:, :1])
        centred = centred / (std + eps)
    return centred.flatten()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, *, epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
              loss_type: str = "grpo", max_completion_length: int | None = None, n_seqs: int | None = None,
              n_tokens: float | None = None) -> tuple[torch.Tensor, dict]:
    """The clipped GRPO objective as a loss to minimise.

    ``logp, old_logp, ref_logp, mask``: ``[N, L]`` per-token log-probabilities of the sampled tokens under the
    current, sampling and reference policies, and 1 on completion tokens; ``advantages``: ``[N]``. Returns the loss
    and ``{"kl", "clip_frac"}`` (means over completion tokens; kl is 0 without a reference).

    ``n_seqs`` and ``n_tokens``: the completions and completion tokens of the whole batch when these ``N`` rows are
    one rank's share of it (torchrun): the loss and the stats are then this share's part of the batch's, and the
    ranks' parts add up to the one-process values."""
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"grpo.loss_type: expected one of {', '.join(LOSS_TYPES)}, got {loss_type!r}")
    mask = mask.to(logp.dtype)
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages[:, None].to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta != 0.0:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    n_seqs = logp.shape[0] if n_seqs is None else n_seqs
    n_tokens = mask.sum().clamp(min=1) if n_tokens is None else max(float(n_tokens), 1.0)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum() / n_seqs
    elif loss_type == "dr_grpo":
        width = max_completion_length if max_completion_length is not None else logp.shape[1]
        loss = (per_token * mask).sum() / (n_seqs * width)
    else:
        loss = (per_token * mask).sum() / n_tokens
    is_clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + high) & (adv > 0))
    stats = {"kl": float((kl.detach() * mask).sum() / n_tokens),
             "clip_frac": float((is_clipped.to(mask.dtype) * mask).sum() / n_tokens)}
    return loss, stats


def token_logprobs(model, ids_NL: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[N, L-1]`` log-probabilities of tokens 1..L-1 given their prefixes (right padding needs no mask), and the
    MoE balance loss of the forward pass."""
    out = model(ids_NL)
    logits = out.logits[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids_NL[:, 1:, None]).squeeze(-1)
    return logp, out.aux_loss


# ----- tasks and rewards -----------------------------------------------------------------------------------------
class CountTask:
    """The built-in verifiable task on a 16-token vocabulary: bos 0, eos 1, pad 2, digit k = token 3 + k.
    The prompt is ``bos d d+1 d+2`` (mod 10); the answer the next ``answer_len`` digits; the reward is the
    fraction of answer positions right (a completion that ends early is wrong past its end)."""

    vocab_size, bos, eos, pad, answer_len = 16, 0, 1, 2, 4

    def prompt(self, rng: random.Random) -> dict:
        d = rng.randrange(10)
        return {"ids": [self.bos] + [3 + (d + i) % 10 for i in range(3)], "start": d}

    def reward(self, item: dict, completion: list[int]) -> float:
        want = [3 + (item["start"] + 3 + i) % 10 for i in range(self.answer_len)]
        return sum(1 for i, w in enumerate(want) if i < len(completion) and completion[i] == w) / self.answer_len


@dataclass
class GRPOData:
    prompts: str = "builtin:count"  # or a jsonl of problems with tests
    max_prompt_len: int = 512


@dataclass
class GRPOSection:
    group_size: int = 8  # G completions per prompt
    prompts_per_step: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    beta: float = 0.04  # KL coefficient (DeepSeekMath); 0 skips the reference model
    epsilon: float = 0.2
    epsilon_high: float | None = None  # None: = epsilon (DAPO suggests 0.28)
    loss_type: str = "grpo"  # grpo | dr_grpo | token
    scale_rewards: str = "group"  # group | none (Dr. GRPO)
    updates_per_batch: int = 1  # μ: passes over each rollout batch
    mini_batches: int = 1  # optimizer steps per pass
    rewards: dict = field(default_factory=lambda: {"tests": 1.0})  # weights of "tests" and "model"
    reward_model: str | None = None
    sandbox_timeout: float = 10.0
    stop: list = field(default_factory=lambda: ["\ndef ", "\nclass ", "\nif __name__", "\nprint("])


def validate(config: AlignConfig) -> None:
    g, d = config.method, config.data

    def need(cond, key, msg):
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    for key in ("group_size", "prompts_per_step", "max_new_tokens", "updates_per_batch", "mini_batches"):
        need(isinstance(getattr(g, key), int) and getattr(g, key) > 0, f"grpo.{key}", "expected a positive integer")
    need(g.group_size >= 2, "grpo.group_size", "expected at least 2 (advantages compare completions of a prompt)")
    need(g.loss_type in LOSS_TYPES, "grpo.loss_type", f"expected one of {', '.join(LOSS_TYPES)}")
    need(g.scale_rewards in ("group", "none"), "grpo.scale_rewards", "expected 'group' or 'none'")
    need(g.beta >= 0 and 0 <= g.epsilon < 1, "grpo.beta", "beta >= 0 and epsilon in [0, 1) expected")
    need(0 < g.temperature <= 10 and 0 < g.top_p <= 1, "grpo.temperature", "temperature in (0, 10], top_p in (0, 1]")
    need(isinstance(g.rewards, dict) and g.rewards and set(g.rewards) <= {"tests", "model"}
         and all(isinstance(w, (int, float)) for w in g.rewards.values()),
         "grpo.rewards", "expected weights of 'tests' and/or 'model', e.g. {tests = 1.0, model = 0.5}")
    need("model" not in g.rewards or g.reward_model, "grpo.reward_model",
         "rewards include 'model': give the reward model's directory (from `dscoder train reward`)")
    need(g.updates_per_batch * g.mini_batches == 1 or g.prompts_per_step * g.group_size >= g.mini_batches,
         "grpo.mini_batches", "more mini-batches than sequences")
    need(d.prompts.startswith("builtin:") is False or d.prompts == "builtin:count", "data.prompts",
         "the built-in task is 'builtin:count'")


class Rewarder:
    """Scores completions: the task's verifier or sandboxed tests, a reward model, or their weighted sum."""

    def __init__(self, config: AlignConfig, vocab_size: int, builtin: CountTask | None):
        from dscoder.align.reward import load_reward_model

        self.weights = {k: float(v) for k, v in config.method.rewards.items()}
        self.builtin = builtin
        self.rm = load_reward_model(config.method.reward_model, vocab_size) if "model" in self.weights else None
        self.sandbox = None
        if "tests" in self.weights and builtin is None:
            from dscoder.eval.sandbox import Limits, Sandbox

            self.sandbox = Sandbox(Limits(timeout_s=config.method.sandbox_timeout))

    def __call__(self, items: list[dict], completions: list, eos: int) -> tuple[list[float], list[bool]]:
        n = len(completions)
        total, passed = [0.0] * n, [False] * n
        if "tests" in self.weights:
            if self.builtin is not None:
                scores = [self.builtin.reward(it, c.token_ids) for it, c in zip(items, completions)]
            else:
                programs = [it["problem"].program(c.text) for it, c in zip(items, completions)]
                scores = [1.0 if r.passed else 0.0 for r in self.sandbox.run_many(programs)]
            passed = [s >= 1.0 for s in scores]
            total = [t + self.weights["tests"] * s for t, s in zip(total, scores)]
        if self.rm is not None:
            seqs = [it["ids"] + [t for t in c.token_ids if t != eos] + [eos] for it, c in zip(items, completions)]
            total = [t + self.weights["model"] * s for t, s in zip(total, self.rm.score_ids(seqs))]
        return total, passed


def load_prompts(config: AlignConfig, tokenizer) -> list[dict]:
    from dscoder.align.reward import problem_from_row

    path = config.data.prompts
    items = []
    for n, row in read_jsonl(path, "prompts jsonl"):
        problem = problem_from_row(row, f"{path}:{n}")
        ids = tokenizer.encode(problem.prompt, add_bos=tokenizer.add_bos_token)
        if len(ids) > config.data.max_prompt_len:
            raise DscoderError(f"{path}:{n}: the prompt has {len(ids)} tokens > data.max_prompt_len = "
                               f"{config.data.max_prompt_len}")
        items.append({"ids": ids, "problem": problem})
    return items


# ----- rollouts --------------------------------------------------------------------------------------------------
def rollout(engine, items: list[dict], group_size: int, g: GRPOSection, seed: int, stop: tuple,
            share: slice = slice(None)) -> list:
    """``group_size`` completions of each item (consecutive), each with its own seed, through the engine; only the
    ``share`` of the ``len(items) * group_size`` completions (a rank's part under torchrun: the seeds are those of
    the same completions in one process)."""
    from dscoder.engine.sampling import SamplingParams

    seqs = []
    for n in range(len(items) * group_size)[share]:
        i, j = divmod(n, group_size)
        params = SamplingParams(max_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                seed=(seed * 1_000_003 + i * 1009 + j) & 0x7FFFFFFF, stop=stop)
        seqs.append(engine.submit(items[i]["ids"], params))
    return engine.wait(seqs)


def gather_completions(local: list, d) -> list:
    """Every rank's completions (token ids and text), in rank order: the whole batch on every rank."""
    from types import SimpleNamespace

    parts = all_gather([(c.token_ids, c.text) for c in local], d)
    return [SimpleNamespace(token_ids=ids, text=text) for part in parts for ids, text in part]


def batch_tensors(items: list[dict], completions: list, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``ids [N, L]`` of prompt + completion and the ``[N, L-1]`` mask of completion targets."""
    seqs = [(it["ids"], c.token_ids) for it, c in zip(items, completions)]
    L = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), L - 1)
    for n, (p, c) in enumerate(seqs):
        ids[n, :len(p) + len(c)] = torch.tensor(p + c)
        mask[n, len(p) - 1:len(p) + len(c) - 1] = 1
    return ids, mask


def grpo(config: AlignConfig, out: str | Path, resume: bool = False, max_steps: int | None = None) -> dict[str, Any]:
    """Run (or resume) GRPO into ``out``; returns a summary with the first and last steps' metrics."""
    from dscoder.engine import Engine

    out = Path(out)
    t, d, g = config.train, config.data, config.method
    validate(config)
    builtin = CountTask() if d.prompts == "builtin:count" else None
    if builtin is not None:
        tokenizer = load_tokenizer(config, required=False) if config.tokenizer else None
        if config.model.preset:
            for k, v in (("vocab_size", builtin.vocab_size), ("bos_token_id", builtin.bos),
                         ("eos_token_id", builtin.eos)):
                config.model.overrides.setdefault(k, v)
    else:
        tokenizer = load_tokenizer(config)
    items = load_prompts(config, tokenizer) if builtin is None else None
    mcfg = policy_config(config, None if builtin is not None else tokenizer)
    if builtin is None:
        check_context(d.max_prompt_len + g.max_new_tokens, mcfg, "data.max_prompt_len + grpo.max_new_tokens")
    dist_ = setup_distributed(config, mcfg.n_routed_experts)
    run = open_run(config, out, resume, tokenizer, main=dist_.main)
    model = build_policy(config, None if builtin is not None else tokenizer, mcfg=mcfg, device=dist_.device)
    if builtin is not None and model.config.vocab_size < builtin.vocab_size:
        raise ConfigError(f"the built-in task needs a vocabulary of at least {builtin.vocab_size} tokens")
    rewarder = Rewarder(config, model.config.vocab_size, builtin)
    ref = None
    if g.beta > 0:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
    # the engine samples with a plain model: DDP's own module, or (FSDP2, EP: sharded weights) a full copy that
    # takes the trained weights before every rollout
    copied = dist_.world > 1 and (config.parallel.strategy == "fsdp" or config.parallel.ep > 1)
    sampler = copy.deepcopy(model) if copied else model
    model = parallelize(model, config, dist_)
    optimizer = optimizer_for(model, t)
    extra = run.restore(model, optimizer, resume, expected=lambda meta: sampler.config.to_hf_dict())
    step = extra["step"] if extra else 0
    updates_per_step = g.updates_per_batch * g.mini_batches
    total_updates = t.steps * updates_per_step
    eos = sampler.config.eos_token_id if builtin is not None else tokenizer.eos_id
    pad = builtin.pad if builtin is not None else tokenizer.pad_id
    stop = () if builtin is not None else tuple(g.stop)
    max_len = min(sampler.config.max_position_embeddings,
                  (len(builtin.prompt(random.Random(0))["ids"]) if builtin else d.max_prompt_len) + g.max_new_tokens)
    n_seqs = g.prompts_per_step * g.group_size
    mine = rank_share(n_seqs, dist_, "grpo.prompts_per_step x grpo.group_size")  # this rank's rollouts
    parts = list(torch.arange(n_seqs).chunk(g.mini_batches))
    shares = [part[rank_share(len(part), dist_, "the sequences of a mini-batch")] for part in parts]
    engine = Engine(sampler, tokenizer=tokenizer, max_batch_size=min(mine.stop - mine.start, 256), max_len=max_len)
    summary: dict[str, Any] = {}
    stop_at = t.steps if max_steps is None else min(t.steps, max_steps)
    device = dist_.device
    with engine, run.progress("grpo", t.steps, step) as bar:
        while step < stop_at:
            rng = random.Random(t.seed * 1_000_003 + step)
            if builtin is not None:
                chosen = [builtin.prompt(rng) for _ in range(g.prompts_per_step)]
            else:
                chosen = [items[rng.randrange(len(items))] for _ in range(g.prompts_per_step)]
            grouped = [it for it in chosen for _ in range(g.group_size)]
            if copied:
                _refresh(sampler, model)
            t0 = time.perf_counter()
            model.eval()
            local = rollout(engine, chosen, g.group_size, g, t.seed * 7919 + step, stop, mine)
            rollout_s = time.perf_counter() - t0
            # each rank scores its own completions (sandbox runs spread over the ranks), then all see the batch
            rewards, passed = rewarder(grouped[mine], local, eos)
            completions = gather_completions(local, dist_)
            rewards = [r for part in all_gather(rewards, dist_) for r in part]
            passed = [p for part in all_gather(passed, dist_) for p in part]
            reward_t = torch.tensor(rewards)
            adv = group_advantages(reward_t, g.group_size, g.scale_rewards)
            ids, mask = batch_tensors(grouped, completions, pad)  # the whole batch, padded as one process pads it
            ids = ids.to(device)
            t1 = time.perf_counter()
            model.train()
            with torch.no_grad(), autocast(t.dtype, device):
                old = [token_logprobs(model, ids[rows], g.temperature)[0] if updates_per_step > 1 else None
                       for rows in shares]
                ref_logp = [token_logprobs(ref, ids[rows], g.temperature)[0] if ref is not None else None
                            for rows in shares]
            losses, stats_sum, grad_norm, lr = [], {"kl": 0.0, "clip_frac": 0.0}, 0.0, 0.0
            for it in range(g.updates_per_batch):
                for k, (part, rows) in enumerate(zip(parts, shares)):
                    with autocast(t.dtype, device):
                        logp, aux = token_logprobs(model, ids[rows], g.temperature)
                    loss, stats = grpo_loss(logp, old[k] if old[k] is not None else logp.detach(), ref_logp[k],
                                            adv[rows].to(device), mask[rows].to(device), epsilon=g.epsilon,
                                            epsilon_high=g.epsilon_high, beta=g.beta, loss_type=g.loss_type,
                                            max_completion_length=g.max_new_tokens, n_seqs=len(part),
                                            n_tokens=float(mask[part].sum()))
                    # this rank's part of the mini-batch's loss; DDP and FSDP2 average the ranks' gradients
                    (loss * dist_.world + (aux if aux is not None else 0.0)).backward()
                    k = step * updates_per_step + len(losses)
                    lr = t.lr * lr_factor(k, t.warmup_steps, total_updates, t.min_lr_ratio)
                    loss_value, kl, clip_frac = all_sum([loss.item(), stats["kl"], stats["clip_frac"]], dist_)
                    grad_norm = optimizer_step(model, optimizer, lr, t.grad_clip, step + 1, clip=clip_for(config),
                                               loss=loss_value)
                    losses.append(loss_value)
                    stats_sum["kl"] += kl / updates_per_step
                    stats_sum["clip_frac"] += clip_frac / updates_per_step
            update_s = time.perf_counter() - t1
            step += 1
            n_tokens = sum(len(c.token_ids) for c in completions)
            row = {"step": step, "reward_mean": float(reward_t.mean()), "reward_std": float(reward_t.std()),
                   "pass_rate": sum(passed) / len(passed), "kl": stats_sum["kl"], "clip_frac": stats_sum["clip_frac"],
                   "response_length": n_tokens / len(completions), "loss": sum(losses) / len(losses),
                   "grad_norm": grad_norm, "lr": lr, "rollout_tokens_per_s": n_tokens / rollout_s,
                   "rollout_s": rollout_s, "update_s": update_s}
            summary.setdefault("first", row)
            summary["last"] = row
            bar.update(reward=row["reward_mean"], kl=row["kl"])
            run.end_step(step, stop_at, t, row, model, optimizer)
    if finish(dist_) and step == t.steps and t.export:
        summary["export"] = str(run.export())
    return summary


def _refresh(sampler, model) -> None:
    """The trained weights (FSDP2 shards, EP experts) gathered in full into the sampling copy (collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    sampler.load_state_dict(full)

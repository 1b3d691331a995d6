"""``dscoder train sft | reward | grpo``: the alignment recipes on the command line.

``register(train_subparsers)`` adds the three commands to ``dscoder train``; each takes ``--config``, ``--out``,
``--resume`` and dotted ``KEY=VALUE`` overrides, like ``dscoder train pretrain``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def _common(p: argparse.ArgumentParser, example: str) -> None:
    p.add_argument("--config", required=True,
                   help=f"a TOML recipe file, e.g. {example}, or a packaged recipe's name ({Path(example).stem})")
    p.add_argument("--out", required=True, help="run directory (metrics.jsonl, checkpoints/, the trained model)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's newest intact checkpoint (damaged ones are skipped with a warning)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the recipe, before or after the options, e.g. train.steps=100 "
                        "data.path=chat.jsonl; under torchrun parallel.strategy=ddp|fsdp and parallel.ep=N "
                        "(train.micro_batch is per rank)")


def train_sft(args: argparse.Namespace) -> int:
    from dscoder.align.recipe import load_recipe
    from dscoder.align.sft import SFTData, SFTSection, sft

    config = load_recipe(args.config, args.overrides, "sft", SFTData, SFTSection)
    s = sft(config, args.out, resume=args.resume)
    if "last_loss" in s:
        print(f"sft: {s['conversations']} conversations in {s['rows']} rows ({s['truncated']} truncated); step "
              f"{s['step']}: assistant loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}"
              + (f", held-out {s['eval_loss']:.4f}" if "eval_loss" in s else ""))
    print(f"wrote {args.out}/metrics.jsonl, {args.out}/checkpoints/" + (f", {s['export']}" if "export" in s else "")
          + (f", {s['adapter']} (LoRA adapter)" if "adapter" in s else ""))
    return 0


def train_reward(args: argparse.Namespace) -> int:
    from dscoder.align.recipe import load_recipe
    from dscoder.align.reward import RewardData, RewardSection, train_reward as run

    config = load_recipe(args.config, args.overrides, "reward", RewardData, RewardSection)
    s = run(config, args.out, resume=args.resume)
    if "programs" in s:
        print(f"reward: {s['programs']} programs run in the sandbox, {s['passed']} passed")
    held = (f"; held-out pairwise accuracy {s.get('heldout_accuracy_start', float('nan')):.3f} -> "
            f"{s['heldout_accuracy']:.3f}" if "heldout_accuracy" in s else "")
    print(f"reward: {s['train_pairs']} training pairs, {s['heldout_pairs']} held out{held}")
    print(f"wrote {args.out}/metrics.jsonl" + (f", {s['reward_model']}" if "reward_model" in s else ""))
    return 0


def train_grpo(args: argparse.Namespace) -> int:
    from dscoder.align.grpo import GRPOData, GRPOSection, grpo
    from dscoder.align.recipe import load_recipe

    config = load_recipe(args.config, args.overrides, "grpo", GRPOData, GRPOSection)
    s = grpo(config, args.out, resume=args.resume)
    if "last" in s:
        first, last = s["first"], s["last"]
        print(f"grpo: step {last['step']}: reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}, pass rate "
              f"{last['pass_rate']:.3f}, KL {last['kl']:.4f}, {last['rollout_tokens_per_s']:.0f} rollout tokens/s, "
              f"update {last['update_s']:.3f} s/step")
    print(f"wrote {args.out}/metrics.jsonl, {args.out}/checkpoints/" + (f", {s['export']}" if "export" in s else ""))
    return 0


def register(train_subparsers) -> None:
    p = train_subparsers.add_parser(
        "sft", help="supervised fine-tuning on chat jsonl (loss on assistant tokens)",
        description="Chat jsonl ({\"messages\": [...]}) in the DeepSeek-Coder-V2 template, next-token loss on the "
                    "assistant replies only, packed rows without attention across conversations, warmup + cosine; "
                    "checkpoints, --resume, and an HF export in OUT/hf. A [lora] table with rank > 0 (e.g. "
                    "lora.rank=8, configs/sft-lora-tiny.toml) freezes the base and trains LoRA adapters: OUT/adapter "
                    "in PEFT's format, OUT/hf the merged model.")
    _common(p, "configs/sft-tiny.toml")
    p.set_defaults(func=train_sft)
    p = train_subparsers.add_parser(
        "reward", help="reward model: Bradley-Terry on preference or execution pairs",
        description="A scalar head on the final hidden state, -log σ(r_chosen - r_rejected - margin); pairs from a "
                    "preference jsonl or from running programs against tests in the sandbox (passing > failing). "
                    "Reports held-out pairwise accuracy; writes OUT/reward_model.")
    _common(p, "configs/reward-tiny.toml")
    p.set_defaults(func=train_reward)
    p = train_subparsers.add_parser(
        "grpo", help="GRPO with sandboxed test / reward-model rewards",
        description="G sampled completions per prompt, group-normalised advantages, clipped ratio, k3 KL to the "
                    "initial policy (β), loss aggregation grpo | dr_grpo | token, μ updates per batch. "
                    "data.prompts = a jsonl of problems with tests, or builtin:count.")
    _common(p, "configs/grpo-tiny.toml")
    p.set_defaults(func=train_grpo)

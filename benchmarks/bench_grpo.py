"""GRPO step cost: rollout tokens/s (the engine over the latent cache) and policy-update time per step.

Runs `grpo` on the built-in task for a few steps per model (P prompts x G completions, completions of up to
--new-tokens tokens), and prints the median over the steps after the first of rollout tokens/s, rollout seconds
and update seconds (old/ref log-probs + μ x mini-batch optimizer steps). The baseline beside it samples the same
number of rows and tokens with a plain loop that re-runs the whole sequence every token (no cache).

    python benchmarks/bench_grpo.py [--steps 6] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MID = ["model.hidden_size=512", "model.intermediate_size=1536", "model.moe_intermediate_size=256",
       "model.num_hidden_layers=8", "model.num_attention_heads=8", "model.kv_lora_rank=128",
       "model.qk_nope_head_dim=64", "model.qk_rope_head_dim=32", "model.v_head_dim=64", "model.n_routed_experts=16",
       "model.num_experts_per_tok=4", "model.n_shared_experts=2"]


@torch.inference_mode()
def naive_tokens_per_s(model, rows: int, prompt_len: int, new_tokens: int) -> float:
    """Sampling without a cache: the full sequence through the model for every new token."""
    model.eval()
    ids = torch.randint(3, 13, (rows, prompt_len))
    t0 = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(ids).logits[:, -1].float()
        ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1)], dim=1)
    return rows * new_tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8)
    args = p.parse_args()

    from dscoder.align.grpo import GRPOData, GRPOSection, grpo
    from dscoder.align.recipe import build_policy, load_recipe

    print(f"device: {'cuda ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, "
          f"{torch.get_num_threads()} threads; {args.prompts} prompts x G={args.group}, up to {args.new_tokens} "
          f"new tokens, μ=2, fp32")
    print(f"{'model':<6} {'params':>8} {'rollout tok/s':>14} {'naive tok/s':>12} {'speed-up':>9} "
          f"{'rollout s':>10} {'update s':>9} {'resp len':>9}")
    for name, extra in (("tiny", []), ("mid", MID)):
        overrides = [f"train.steps={args.steps}", "train.export=false", f"train.ckpt_every={args.steps + 1}",
                     f"grpo.max_new_tokens={args.new_tokens}", f"grpo.prompts_per_step={args.prompts}",
                     f"grpo.group_size={args.group}", "grpo.updates_per_batch=2", *extra]
        config = load_recipe(ROOT / "configs" / "grpo-tiny.toml", overrides, "grpo", GRPOData, GRPOSection)
        with tempfile.TemporaryDirectory() as tmp:
            import json

            grpo(config, Path(tmp) / "run")
            rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()][1:]
        model = build_policy(config, None)
        n_params = sum(q.numel() for q in model.parameters())
        naive = naive_tokens_per_s(model, args.prompts * args.group, 4, args.new_tokens)
        tok_s = statistics.median(r["rollout_tokens_per_s"] for r in rows)
        print(f"{name:<6} {n_params / 1e6:>7.1f}M {tok_s:>14,.0f} {naive:>12,.0f} {tok_s / naive:>8.1f}x "
              f"{statistics.median(r['rollout_s'] for r in rows):>10.3f} "
              f"{statistics.median(r['update_s'] for r in rows):>9.3f} "
              f"{statistics.median(r['response_length'] for r in rows):>9.1f}")


if __name__ == "__main__":
    main()

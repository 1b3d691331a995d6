"""Prompt-lookup speculative decoding on an edit-style workload: tokens/s with and without it, in one run.

The workload: an editor asks the model to rewrite a function that is already in its prompt, with a few changes.
Random weights rewrite nothing, so the benchmark model (the ``bench_model.py`` / ``bench_decode.py`` shapes: hidden
512, 8 layers, 16 experts top-4) gets a planted next-token table: every layer's residual outputs (``o_proj`` and
the MLPs' down projections) are scaled by 1e-3, and the LM head's rows are set so the greedy successor of token
``f[i]`` is ``f[i + 1]``, where ``f`` is the rewritten function. Each step still runs every layer, the attention
over the whole cache and the routed experts at the same shapes, so a step costs what a step of the benchmark model
costs; the prompt holds the original function (``--edits`` of its tokens differ from ``f``) after some unrelated
context, then a separator and the rewrite's first token. The model's output is ``f``: a trained model that follows
the prompt this closely accepts as much; one that follows it less accepts less.

The same prompt on the unplanted random model is the second row: it never rewrites the function, so drafts are
rarely found and rarely right; it shows what speculation costs when it does not pay.

Decode tokens/s = (generate N tokens - generate 1 token) / (N - 1), so prefill is left out; medians of
``--repeats``. Accepted tokens per verify step = draft tokens the model agreed with / verify steps; tokens per
forward = new tokens / model forward passes (plain steps + verify steps). The greedy tokens must be equal.

    python benchmarks/bench_speculative.py [--function 256 --context 512 --edits 8 --new 200 --draft 8 --repeats 3]
                                           [--threads N] [--compile]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import CONFIG  # noqa: E402


@torch.no_grad()
def plant(model, chain: list[int]):
    """A copy of ``model`` whose greedy successor of ``chain[i]`` is ``chain[i + 1]`` (see the module docstring)."""
    model = copy.deepcopy(model)
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
            p.mul_(1e-3)
    ids = torch.tensor(chain[:-1])
    u = model.model.norm(model.model.embed_tokens(ids))  # what the LM head sees after token chain[i]
    head = model.lm_head.weight
    head[torch.tensor(chain[1:])] = (8 * u / u.norm(dim=-1, keepdim=True)).to(head.dtype)
    return model


def workload(args, vocab: int):
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(vocab - 2, generator=g) + 2
    rewrite = perm[: args.function].tolist()  # the function as the model rewrites it (distinct ids)
    original = list(rewrite)  # the function in the prompt: --edits of its tokens are different
    spare = perm[args.function: args.function + args.edits].tolist()
    for j, i in enumerate(torch.randperm(args.function - 2, generator=g)[: args.edits].tolist()):
        original[i + 1] = spare[j]
    context = torch.randint(2, vocab, (args.context,), generator=g).tolist()
    sep = perm[args.function + args.edits: args.function + args.edits + 3].tolist()
    return context + original + sep + rewrite[:1], rewrite


def measure(engine, prompt, new: int, repeats: int):
    from dscoder.engine import SamplingParams

    def run(n):
        t = time.perf_counter()
        seq = engine.submit(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
        out = engine.wait(seq)
        return time.perf_counter() - t, seq, out

    run(new)  # warm up
    times, seq, out = [], None, None
    for _ in range(repeats):
        t1 = run(1)[0]
        tn, seq, out = run(new)
        times.append((tn - t1) / (new - 1))
    steps = seq.spec_steps  # verify steps; the other tokens (after the first) came from plain steps
    plain_steps = (new - 1) - seq.spec_steps - seq.spec_accepted
    return dict(tok_s=1 / statistics.median(times), tokens=out.token_ids, steps=steps, accepted=seq.spec_accepted,
                forwards=steps + plain_steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--function", type=int, default=256, help="tokens of the function rewritten")
    ap.add_argument("--context", type=int, default=512, help="unrelated prompt tokens before it")
    ap.add_argument("--edits", type=int, default=8, help="tokens of the function the rewrite changes")
    ap.add_argument("--new", type=int, default=200, help="new tokens per request")
    ap.add_argument("--draft", type=int, default=8, help="draft tokens per verify step (the engine's default: 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--compile", action="store_true", help="also time Engine(compile=True) (compiles in warm-up)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.new >= args.function:
        ap.error("--new must be below --function (the planted rewrite is --function tokens long)")

    import dscoder
    from dscoder.engine import Engine

    base = dscoder.build_model(dscoder.ModelConfig(**CONFIG), dtype=args.dtype, seed=0).eval()
    prompt, rewrite = workload(args, CONFIG["vocab_size"])
    max_len = len(prompt) + args.new + args.draft + 8
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, benchmark model; prompt "
          f"{len(prompt)} tokens ({args.context} context + a {args.function}-token function with {args.edits} tokens "
          f"changed in the rewrite), {args.new} new tokens, drafts of up to {args.draft}, median of {args.repeats}")
    rows = []
    planted = plant(base, rewrite)
    runs = [("edit (planted rewrite)", planted, False), ("random weights", base, False)]
    if args.compile:
        runs.append(("edit, compiled", planted, True))
    for label, model, compiled in runs:
        got = {}
        for spec in (False, True):
            with Engine(model, max_batch_size=1, max_len=max_len, speculative=spec, compile=compiled) as engine:
                engine.scheduler.spec_tokens = args.draft if spec else 0
                engine.warmup()
                got[spec] = measure(engine, prompt, args.new, args.repeats)
        if label.startswith("edit") and not compiled:
            follows = sum(a == b for a, b in zip(got[False]["tokens"], rewrite[1:]))
            print(f"  the planted model's greedy output follows the rewrite for {follows}/{args.new} tokens")
        s = got[True]
        per_step = s["accepted"] / s["steps"] if s["steps"] else 0.0
        rows.append((label, got[False]["tok_s"], s["tok_s"], per_step, (args.new - 1) / max(s["forwards"], 1),
                     s["steps"], got[True]["tokens"] == got[False]["tokens"]))
    print(f"{'workload':>24} | {'plain tok/s':>11} | {'speculative tok/s':>17} | {'ratio':>6} | "
          f"{'accepted/verify step':>20} | {'tokens/forward':>14} | {'verify steps':>12} | same tokens")
    for label, plain_t, spec_t, per_step, per_fwd, steps, same in rows:
        print(f"{label:>24} | {plain_t:11.1f} | {spec_t:17.1f} | {spec_t / plain_t:5.2f}x | {per_step:20.2f} | "
              f"{per_fwd:14.2f} | {steps:12d} | {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

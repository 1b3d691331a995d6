"""Decode speed and KV-cache size: dscoder's Engine against transformers' ``generate`` on the same checkpoint.

One run, same random weights (the ``bench_model.py`` shapes), same prompts, greedy, the same number of new tokens.
Decode tokens/s = (generate N tokens - generate 1 token) / (N - 1) steps x batch, so prefill is left out of both.
dscoder runs twice: eager, and with ``Engine(compile=True)`` (torch.compile'd decode steps; compile time is spent
in warm-up, not timed). transformers runs its default eager ``generate`` (and with ``--hf-compile`` also a
torch.compile'd forward over its static cache). ``--driver thread`` calls dscoder's
``generate`` from a second thread, showing what computing off the main thread costs with GNU OpenMP.
Cache bytes per token: ours from the latent cache (``model.kv_bytes_per_token``), transformers' measured on the
cache its ``generate`` returns; and the formula for the Lite shapes.

    python benchmarks/bench_decode.py [--prompt 128 --new 64 --batches 1 8 --dtype float32 --repeats 3]
                                      [--no-compile] [--hf-compile] [--driver caller|thread]
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import CONFIG  # noqa: E402


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _agreement(got: list[list[int]], want: list[list[int]]) -> float:
    """Share of tokens before each row's first difference (1.0: identical; bf16 rounding can flip near-ties)."""
    same = 0
    for a, b in zip(got, want):
        same += next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / sum(len(b) for b in want)


def _hf_cache_bytes(model, ids, mask) -> float:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=2, min_new_tokens=2, do_sample=False,
                         return_dict_in_generate=True, pad_token_id=0)
    cache = out.cache if "cache" in out else out.past_key_values  # transformers 5 renamed the field
    total = 0
    for layer in getattr(cache, "layers", []):
        total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values) if t is not None)
    tokens = ids.shape[0] * (out.sequences.shape[1] - 1)  # the last token is never cached
    return total / tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="new tokens per row")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd dscoder engine")
    ap.add_argument("--hf-compile", action="store_true",
                    help="also time transformers with a torch.compile'd forward and its static cache")
    ap.add_argument("--driver", choices=["caller", "thread"], default="caller",
                    help="call dscoder's generate on the main thread (default) or from a second thread")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    import dscoder
    from dscoder.engine import Engine

    dtype = getattr(torch, args.dtype)
    config = dscoder.ModelConfig(**CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        dscoder.save_model(dscoder.build_model(config, seed=0), tmp)
        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
        hf_compiled = None
        if args.hf_compile:
            hf_compiled = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp, dtype=dtype).eval()
            hf_compiled.forward = torch.compile(hf_compiled.forward)
        kw = dict(dtype=dtype, max_batch_size=max(args.batches), max_len=args.prompt + args.new + 8, sync_every=16)
        engines = {"dscoder": Engine(tmp, **kw)}
        if not args.no_compile:
            engines["dscoder compiled"] = Engine(tmp, compile=True, **kw)
    pool = ThreadPoolExecutor(1) if args.driver == "thread" else None
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"{args.dtype}, prompt {args.prompt}, new tokens {args.new}, hidden {CONFIG['hidden_size']}, "
          f"{CONFIG['num_hidden_layers']} layers, {CONFIG['n_routed_experts']} experts top-"
          f"{CONFIG['num_experts_per_tok']}, dscoder driven from "
          + ("the calling thread" if args.driver == "caller" else "a second thread"), flush=True)
    for batch in args.batches:
        ids = torch.randint(2, CONFIG["vocab_size"], (batch, args.prompt), generator=g)
        mask = torch.ones_like(ids)
        prompts = ids.tolist()

        def ours(engine, n):
            call = lambda: engine.generate(prompts, max_tokens=n, ignore_eos=True)  # noqa: E731
            out = pool.submit(call).result() if pool is not None else call()
            assert all(len(r.token_ids) == n for r in out)
            return [r.token_ids for r in out]

        def theirs(n, model=hf, **kw):
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=0, **kw)
            return out[:, args.prompt:].tolist()

        fns = {name: functools.partial(ours, e) for name, e in engines.items()}
        fns["transformers"] = theirs
        if hf_compiled is not None:
            fns["transformers compiled"] = functools.partial(theirs, model=hf_compiled, cache_implementation="static")
        result, same = {}, {}
        want = theirs(args.new)
        for name, fn in fns.items():
            fn(2), fn(3)  # warm up (a compiled engine compiles here: static shapes, then a growing cache)
            same[name] = _agreement(fn(args.new), want)
            full, one = _best(lambda: fn(args.new), args.repeats), _best(lambda: fn(1), args.repeats)
            result[name] = batch * (args.new - 1) / max(full - one, 1e-9)
            print(f"  batch {batch}: {name} {result[name]:.1f} tok/s", flush=True)
        rows.append((batch, result, same))

    with torch.inference_mode():
        ids = torch.randint(2, CONFIG["vocab_size"], (1, args.prompt), generator=g)
        hf_bytes = _hf_cache_bytes(hf, ids, torch.ones_like(ids))
    engine = engines["dscoder"]
    ours_bytes = engine.model.kv_bytes_per_token(dtype)
    lite = dscoder.load_model("deepseek-coder-v2-lite", device="meta")
    lite_ours, lite_full = lite.kv_bytes_per_token(torch.bfloat16), lite.kv_bytes_per_token(torch.bfloat16, True)

    names = [n for n in fns if not n.startswith("transformers")]
    theirs_names = [n for n in fns if n.startswith("transformers")]
    print(f"\n{'batch':>5} " + " ".join(f"{n + ' tok/s':>22}" for n in [*names, *theirs_names])
          + "  ratios vs transformers (eager)  greedy tokens as transformers'")
    for batch, result, same in rows:
        print(f"{batch:>5} " + " ".join(f"{result[n]:>22.1f}" for n in [*names, *theirs_names]) + "  "
              + ", ".join(f"{n.split()[-1]} {result[n] / result['transformers']:.2f}x" for n in names) + "  "
              + ", ".join(f"{n}: {same[n]:.0%}" for n in [*names, *theirs_names[1:]]))
        if "transformers compiled" in result and "dscoder compiled" in result:
            print(f"{'':>5} compiled vs compiled: "
                  f"{result['dscoder compiled'] / result['transformers compiled']:.2f}x")
    print(f"\nKV cache bytes/token ({args.dtype}, this model): dscoder {ours_bytes:,} (latent), transformers "
          f"{hf_bytes:,.0f} (measured on its generate cache) -> {hf_bytes / ours_bytes:.1f}x smaller, expanded K/V "
          f"{engine.model.kv_bytes_per_token(dtype, expanded=True):,}")
    print(f"KV cache bytes/token (bf16, DeepSeek-Coder-V2-Lite shapes): dscoder {lite_ours:,}, expanded "
          f"{lite_full:,} -> {lite_full / lite_ours:.1f}x smaller")
    for e in engines.values():
        e.close()
    if pool is not None:
        pool.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

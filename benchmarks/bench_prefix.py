"""Prompt handling: time to first token with and without the prefix cache, and stream stalls with and without
chunked prefill.

Same random weights as ``bench_model.py``.
1. Prefix cache: each request is a shared prefix plus its own tail (an editor sending the file above the cursor
   again, a chat resending its history). Median time to first token (prefill + one sample) for an engine with
   ``prefix_cache_mb=0`` and one with the cache, side by side.
2. Chunked prefill: a stream is decoding when a long prompt (``--long`` tokens) joins. The longest gap between two
   of the stream's tokens, for ``prefill_chunk=0`` (the prompt prefilled in one go) and ``--chunk``.
3. An editor's FIM prompt of ``--fim`` tokens (``<fim_begin> prefix <fim_hole> suffix <fim_end>``, the suffix a
   quarter of it; stand-in sentinel ids, the benchmark model has no tokenizer), as ``dscoder serve`` runs it
   (prefix cache on, ``prefill_chunk=512``): time to first token cold (empty prefix cache), warm (the same prompt
   again, as after llama.vim's ``n_predict: 0`` warm-up) and after typing 3 tokens at the end of the prefix (the
   cache holds the old prompt: everything before the edit is reused, the edit and the suffix are prefilled).

    python benchmarks/bench_prefix.py [--shared 480 --tail 32 --requests 5 --long 1000 --chunk 128 --fim 2000]
                                      [--dtype float32 --threads N --parts cache chunk fim]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_model import CONFIG  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=int, default=480, help="tokens every prompt shares")
    ap.add_argument("--tail", type=int, default=32, help="tokens of each prompt's own tail")
    ap.add_argument("--requests", type=int, default=5)
    ap.add_argument("--long", type=int, default=1000, help="tokens of the prompt that joins a running stream")
    ap.add_argument("--chunk", type=int, default=128, help="prefill_chunk for the chunked run")
    ap.add_argument("--fim", type=int, default=2000, help="tokens of the FIM prompt")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--parts", nargs="+", default=["cache", "chunk", "fim"], choices=["cache", "chunk", "fim"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import dscoder

    model = dscoder.build_model(dscoder.ModelConfig(**CONFIG), dtype=args.dtype, seed=0).eval()
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(2, CONFIG["vocab_size"], (args.shared,), generator=g).tolist()
    prompts = [shared + torch.randint(2, CONFIG["vocab_size"], (args.tail,), generator=g).tolist()
               for _ in range(args.requests + 1)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}, benchmark model")
    if "fim" in args.parts:
        fim_ttft(model, args, g)
    if "cache" in args.parts:
        prefix_cache(model, args, prompts)
    if "chunk" in args.parts:
        chunked(model, args, prompts, g)
    return 0


def fim_ttft(model, args, g) -> None:
    from dscoder.engine import Engine
    from dscoder.engine.batch import PrefixCache

    V = CONFIG["vocab_size"]
    begin, hole, end = 3, 4, 5  # stand-ins for the FIM sentinels
    n_suffix = args.fim // 4
    prefix = torch.randint(6, V, (args.fim - n_suffix - 4,), generator=g).tolist()
    suffix = torch.randint(6, V, (n_suffix,), generator=g).tolist()
    typed = torch.randint(6, V, (3,), generator=g).tolist()
    fim = lambda pre: [0, begin, *pre, hole, *suffix, end]  # noqa: E731
    times = {"cold": [], "warm": [], "typed at the end of the prefix": []}
    cached = {}
    with Engine(model, max_batch_size=1, max_len=args.fim + 64, prefix_cache_mb=256, prefill_chunk=512) as engine:
        engine.generate(prefix[:64], max_tokens=2)  # warm up
        for _ in range(args.requests):
            engine.scheduler.prefix_cache = PrefixCache(256 << 20)  # cold: an empty cache
            for name, pre in zip(times, (prefix, prefix, prefix + typed)):
                t = time.perf_counter()
                out = engine.generate(fim(pre), max_tokens=1, ignore_eos=True)
                times[name].append(time.perf_counter() - t)
                cached[name] = (out.cached_tokens, len(fim(pre)))
    print(f"a {len(fim(prefix))}-token FIM prompt ({n_suffix} suffix tokens), prefix cache on, prefill_chunk=512, "
          f"median of {args.requests}:")
    for name, ts in times.items():
        print(f"  {name:>32}: time to first token {statistics.median(ts) * 1e3:8.1f} ms "
              f"({cached[name][0]} of {cached[name][1]} prompt tokens cached)")


def prefix_cache(model, args, prompts) -> None:
    from dscoder.engine import Engine

    max_len = args.shared + args.tail + 8
    times, tokens = {}, {}
    for name, mb in (("no prefix cache", 0), ("prefix cache", 256)):
        with Engine(model, max_batch_size=1, max_len=max_len, prefix_cache_mb=mb) as engine:
            engine.generate(prompts[0], max_tokens=1)  # warm up; fills the cache when there is one
            ts, out = [], []
            for p in prompts[1:]:
                t = time.perf_counter()
                out.append(engine.generate(p, max_tokens=1, ignore_eos=True).token_ids[0])
                ts.append(time.perf_counter() - t)
            times[name], tokens[name] = statistics.median(ts), out
    print(f"prompts of {args.shared} shared + {args.tail} own tokens, {args.requests} requests")
    for name, t in times.items():
        print(f"  {name:>16}: median time to first token {t * 1e3:8.1f} ms")
    print(f"  ratio: {times['no prefix cache'] / times['prefix cache']:.2f}x faster with the cache; "
          f"first tokens equal: {tokens['no prefix cache'] == tokens['prefix cache']}")


def chunked(model, args, prompts, g) -> None:
    from dscoder.engine import Engine, SamplingParams

    long_prompt = torch.randint(2, CONFIG["vocab_size"], (args.long,), generator=g).tolist()
    gaps, firsts = {}, {}
    for chunk in (0, args.chunk):
        with Engine(model, max_batch_size=2, max_len=args.long + 64, prefill_chunk=chunk) as engine:
            engine.generate(prompts[0][:32], max_tokens=2)  # warm up
            stamps, first_long = [], []
            stream = engine.submit(prompts[0][:32], SamplingParams(max_tokens=48, ignore_eos=True, stream=True),
                                   on_update=lambda s, text, new, done: stamps.append(time.perf_counter()))
            engine.wait(engine.submit(prompts[0][:32], SamplingParams(max_tokens=1)))  # the stream is running now
            t0 = time.perf_counter()
            joined = engine.submit(long_prompt, SamplingParams(max_tokens=1),
                                   on_update=lambda *a: first_long.append(time.perf_counter()))
            engine.wait([stream, joined])
            later = [t for t in stamps if t >= t0]
            later = [max((t for t in stamps if t < t0), default=t0)] + later  # from the stream's last token before
            gaps[chunk] = max(b - a for a, b in zip(later, later[1:]))
            firsts[chunk] = first_long[0] - t0
    print(f"a stream decoding while a {args.long}-token prompt joins:")
    for chunk in gaps:
        label = f"prefill_chunk={chunk}" + (" (one go)" if not chunk else "")
        print(f"  {label:>24}: longest gap between stream tokens {gaps[chunk] * 1e3:8.1f} ms, the long prompt's "
              f"first token after {firsts[chunk] * 1e3:8.1f} ms")
    print(f"  ratio: longest stall {gaps[0] / gaps[args.chunk]:.1f}x shorter with chunks")


if __name__ == "__main__":
    sys.exit(main())

"""Batch-1 decode of bf16, int8 and int4 against the memory-bandwidth limit, beside transformers, on Lite-shaped
layers; the compiled engine started cold and with a warm cache; and the peak memory of loading a quantized checkpoint.

Model: DeepSeek-Coder-V2-Lite's layer shapes (hidden 2048, 16 heads, kv_lora 512, no q_lora, 64 experts x 1408
top-6, 2 shared, dense 10944), one dense and one MoE layer, vocabulary 8192, random weights, bf16.
Bandwidth: the read rate of summing every weight tensor of the loaded bf16 model (its bytes read as fp32, PyTorch's
fastest streaming reduction), in this process, median of the repeats (a fresh tensor's rate varies between
processes). Limit = bandwidth / bytes one decode step reads (the checkpoint's tensors, the routed experts at K/E,
one embedding row). Decode tok/s = (N new - 1 new) / (N - 1), greedy, plain decoding (no speculation), each
variant timed once per round, rounds alternating, medians; "of limit" is the median over rounds of each round's
tok/s against the limit from that round's bandwidth (the machine's read rate can switch between about 45 and
72 GB/s from one round to the next, and a fraction of a mixed median would mean neither), "per round" lists them.
Variants: the eager default Engine (native batch-1 kernels, dscoder.engine.native), the same engine with those off
(``DSCODER_NATIVE=0``: the model's forward), transformers' ``generate`` (eager) on the bf16 checkpoint.
Compiled: ``Engine(compile=True)`` in a child process with an empty inductor cache, then again in another child
with the cache the first one left: start-up seconds (load + ``warmup()``, which compiles the batch-2 graph: batch 1
takes the native kernels) and batch-1 tok/s as the engine runs it (native kernels) and through its compiled batch-1
graph alone.
Loading: a child process loads each checkpoint, reads a value from every page of every tensor, and reports its
peak resident memory (VmHWM) above what it held before.

    python benchmarks/bench_quant.py [--new 32 --repeats 3 --no-transformers --no-compile --no-load --workdir DIR]

``--workdir DIR`` keeps the checkpoints (bf16/, int8/, int4/) in DIR and reuses those already there, so that a
timed run on a quiet machine does not spend its quiet minutes quantizing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LITE_LAYERS = dict(vocab_size=8192, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                   num_hidden_layers=2, num_attention_heads=16, kv_lora_rank=512, q_lora_rank=None,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                   n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, max_position_embeddings=4096,
                   bos_token_id=0, eos_token_id=1)

_LOAD_PROBE = """
import sys, torch, dscoder
from pathlib import Path
def hwm():  # peak resident KiB of this program (getrusage's ru_maxrss keeps the forking parent's across exec)
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1])
before = hwm()
m = dscoder.load_model(sys.argv[1])
for t in m.state_dict().values():  # touch every page of every tensor (a strided read, no copies)
    t.reshape(-1)[::1024].float().sum()
print(hwm() - before)
"""

_COMPILED_CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch, dscoder
prompt, new, repeats = json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
e = dscoder.Engine(sys.argv[1], max_batch_size=2, max_len=len(prompt) + new + 8, speculative=False, compile=True)
e.warmup()  # batch 1 runs the native kernels; this compiles the graph of batch bucket 2
start = time.perf_counter() - t0
e.generate(prompt, max_tokens=new, ignore_eos=True)
def rate():
    rates = []
    for _ in range(repeats):
        t = time.perf_counter(); e.generate(prompt, max_tokens=new, ignore_eos=True); full = time.perf_counter() - t
        t = time.perf_counter(); e.generate(prompt, max_tokens=1, ignore_eos=True); one = time.perf_counter() - t
        rates.append((new - 1) / (full - one))
    return sorted(rates)[len(rates) // 2]
engine_default = rate()  # batch 1 takes the native kernels when they are available
e.scheduler.native = None
e.generate(prompt, max_tokens=4, ignore_eos=True)  # compiles the batch-1 graph (not timed)
print(json.dumps({"start_s": start, "tok_s": engine_default, "graph_tok_s": rate()}))
"""


def read_bandwidth(model: torch.nn.Module, repeats: int) -> float:
    """Bytes per second of summing every weight tensor's bytes as fp32 (median of ``repeats``)."""
    tensors = [t.reshape(-1).view(torch.float32) for t in model.state_dict().values()
               if t.is_contiguous() and t.numel() * t.element_size() % 4 == 0 and t.element_size() <= 4]
    nbytes = sum(t.numel() * 4 for t in tensors)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for t in tensors:
            t.sum()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine (two child processes)")
    ap.add_argument("--no-load", action="store_true", help="skip the loading-peak measurement")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoints here and reuse those already there "
                                                 "(default: a new temporary directory)")
    args = ap.parse_args()

    import dscoder
    from dscoder.quant import decode_bytes_per_token, quantize_checkpoint

    tmp = args.workdir or Path(tempfile.mkdtemp())
    if not (tmp / "bf16" / "config.json").is_file():
        dscoder.save_model(dscoder.build_model(dscoder.ModelConfig(**LITE_LAYERS), seed=0, dtype="bfloat16"),
                           tmp / "bf16", dtype="bfloat16")
    for bits in (8, 4):
        if not (tmp / f"int{bits}" / "config.json").is_file():
            quantize_checkpoint(tmp / "bf16", tmp / f"int{bits}", bits=bits)
    names = ["bf16", "int8", "int4"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, LITE_LAYERS["vocab_size"], (args.prompt,), generator=g).tolist()
    kw = dict(max_batch_size=1, max_len=args.prompt + args.new + 8, speculative=False)
    engines = {n: dscoder.Engine(tmp / n, **kw) for n in names}
    plain = dscoder.Engine(engines["bf16"].model, tokenizer=None, **kw)
    plain.scheduler.native = None  # what DSCODER_NATIVE=0 gives: the model's forward for every step
    native_on = {n: e.scheduler.native is not None for n, e in engines.items()}
    per_token = {n: decode_bytes_per_token(tmp / n) for n in names}

    def ours(engine):
        return lambda k: engine.generate(prompt, max_tokens=k, ignore_eos=True)

    runs = {f"{n} dscoder": ours(e) for n, e in engines.items()}
    runs["bf16 dscoder, native off"] = ours(plain)
    bytes_of = {f"{n} dscoder": per_token[n] for n in names}
    bytes_of["bf16 dscoder, native off"] = per_token["bf16"]
    if not args.no_transformers:
        import transformers

        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp / "bf16", dtype=torch.bfloat16).eval()
        ids = torch.tensor([prompt])

        def theirs(k):
            with torch.inference_mode():
                hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)

        runs["bf16 transformers"] = theirs
        bytes_of["bf16 transformers"] = per_token["bf16"]
    for run in runs.values():
        run(2)
    rates: dict[str, list[float]] = {n: [] for n in runs}
    bandwidths = []
    for _ in range(args.repeats):  # rounds: every variant once, so load swings hit them alike
        bandwidths.append(read_bandwidth(engines["bf16"].model, 3))
        for n, run in runs.items():
            t = time.perf_counter()
            run(args.new)
            full = time.perf_counter() - t
            t = time.perf_counter()
            run(1)
            rates[n].append((args.new - 1) / (full - (time.perf_counter() - t)))
    bandwidth = statistics.median(bandwidths)
    tps = {n: statistics.median(r) for n, r in rates.items()}
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}, native kernels "
          f"{'on' if native_on['bf16'] else 'off'}; read bandwidth on the loaded bf16 weights "
          f"{bandwidth / 1e9:.1f} GB/s (rounds: {', '.join(f'{b / 1e9:.1f}' for b in bandwidths)})", flush=True)
    print(f"\n{'decode, batch 1':<26} {'file MB':>8} {'MB/token':>9} {'limit tok/s':>12} {'tok/s':>8} {'of limit':>9}"
          f"  per round")
    fractions = {}
    for n, r in tps.items():
        b = bytes_of[n]
        limit = bandwidth / b["per_token"]
        per_round = [rate * b["per_token"] / bw for rate, bw in zip(rates[n], bandwidths)]
        fractions[n] = statistics.median(per_round)
        print(f"{n:<26} {b['weights'] / 1e6:>8.0f} {b['per_token'] / 1e6:>9.1f} {limit:>12.1f} {r:>8.1f} "
              f"{fractions[n]:>9.0%}  {', '.join(f'{f:.0%}' for f in per_round)}")
    print(f"int8 / bf16 {tps['int8 dscoder'] / tps['bf16 dscoder']:.2f}x; bf16 native / native off "
          f"{tps['bf16 dscoder'] / tps['bf16 dscoder, native off']:.2f}x"
          + (f"; bf16 dscoder / transformers {tps['bf16 dscoder'] / tps['bf16 transformers']:.2f}x"
             if "bf16 transformers" in tps else ""))
    for e in [*engines.values(), plain]:
        e.close()
    del engines, plain
    result = {"bandwidth_gbps": bandwidth / 1e9, "load": load, **tps,
              "of_limit": {n: round(f, 4) for n, f in fractions.items()}}
    if not args.no_compile:
        cache = Path(tempfile.mkdtemp())
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
        print("\ncompiled bf16 engine (child processes, one inductor cache):")
        for label in ("cold cache", "warm cache"):
            out = subprocess.run([sys.executable, "-c", _COMPILED_CHILD, str(tmp / "bf16"), json.dumps(prompt),
                                  str(args.new), str(args.repeats)], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"  {label}: failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            limit = bandwidth / per_token["bf16"]["per_token"]
            print(f"  {label}: start-up (load, warmup) {r['start_s']:.1f} s; batch 1: {r['tok_s']:.1f} tok/s "
                  f"({r['tok_s'] / limit:.0%} of the limit; native kernels), the compiled graph alone "
                  f"{r['graph_tok_s']:.1f} tok/s ({r['graph_tok_s'] / limit:.0%})")
            result[f"compiled {label}"] = r
    if not args.no_load:
        print("\nloading peak (child process, RSS above its start):")
        for n in names:
            out = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(tmp / n)], capture_output=True, text=True)
            size = per_token[n]["weights"]
            peak = int(out.stdout.strip().splitlines()[-1]) * 1024 if out.returncode == 0 else float("nan")
            print(f"  {n}: weights {size / 1e6:.0f} MB, peak +{peak / 1e6:.0f} MB ({(peak - size) / 1e6:+.0f} MB)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

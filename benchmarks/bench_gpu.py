"""GPU figures in one run: HBM bandwidth (a large device copy), MFU of a Lite-shaped training step, and decode
tokens/s of the Lite shapes against the bandwidth limit.

- **Bandwidth**: ``y.copy_(x)`` of a ``--copy-gib`` GiB tensor, bytes read + written per second (median of 10).
- **MFU**: a DeepSeek-Coder-V2-Lite-shaped model cut to ``--train-layers`` layers (the first dense, the rest MoE
  with 64 routed experts of which 6 are active, 2 shared, MLA with kv_lora_rank 512, vocabulary 102400), fp32
  weights and AdamW, bf16 autocast (``train.dtype = auto``), ``--batch`` x ``--seq`` tokens per step; achieved
  FLOP/s = ``model.flops_per_token(seq)`` (6 x activated parameters + attention) x tokens / step time (median of
  ``--steps`` after 2 warm-up steps), against the GPU's dense bf16 peak (H100/H200: 989 TFLOP/s).
- **Decode**: the Lite shapes with ``--decode-layers`` layers (27 is the whole model) in bf16, one greedy request,
  ``Engine`` eager and compiled (``compile=True``, compile time not timed; speculative decoding off). Tokens/s =
  (N - 1) / (time for N tokens - time for 1 token). The bandwidth limit of one decode step is
  ``measured bandwidth / bytes read per token``, bytes = 2 x (activated parameters - the embedding table, which is a
  lookup of one row) + the latent cache read; the fraction printed is achieved / limit.

    python benchmarks/bench_gpu.py [--train-layers 4 --batch 2 --seq 4096 --decode-layers 27 --new 128]
    python benchmarks/bench_gpu.py --device cpu --small     # a smoke run of the code paths on a CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}


def _timer(device: torch.device):
    def measure(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t
    return measure


def bandwidth(device: torch.device, gib: float, reps: int = 10) -> float:
    n = int(gib * 2**30) // 2
    x = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)
    y = torch.empty_like(x)
    measure = _timer(device)
    measure(lambda: y.copy_(x))
    times = [measure(lambda: y.copy_(x)) for _ in range(reps)]
    del x, y
    return 2 * n * 2 / statistics.median(times)


def lite_config(layers: int, small: bool):
    from dscoder import ModelConfig

    cfg = ModelConfig.preset("deepseek-coder-v2-lite").replace(num_hidden_layers=layers)
    if small:  # CPU smoke run: the same structure, small widths
        cfg = cfg.replace(vocab_size=1024, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
                          kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                          num_attention_heads=4)
    return cfg


def train_mfu(device: torch.device, layers: int, batch: int, seq: int, steps: int, small: bool) -> dict:
    import dscoder
    from dscoder.train.optim import build_optimizer
    from dscoder.train.run import autocast

    cfg = lite_config(layers, small)
    model = dscoder.build_model(cfg, seed=0, device=device).float().train()
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95))
    g = torch.Generator(device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device, generator=g)
    measure = _timer(device)

    def step():
        with autocast("auto" if device.type == "cuda" else "float32", device):
            out = model(ids[:, :-1])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        measure(step)
    times = [measure(step) for _ in range(steps)]
    t = statistics.median(times)
    fpt = model.flops_per_token(seq)
    flops = fpt * batch * seq / t
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"layers": layers, "tokens_per_step": batch * seq, "step_s": t, "tokens_per_s": batch * seq / t,
            "achieved_tflops": flops / 1e12, "flops_per_token": fpt, "peak_mem_gib": mem}


def decode(device: torch.device, layers: int, new: int, compiled: bool, small: bool, prompt_len: int = 64) -> dict:
    import dscoder
    from dscoder.engine import Engine

    cfg = lite_config(layers, small)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = dscoder.build_model(cfg, seed=0, device=device, dtype=dtype)
    prompt = torch.randint(3, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    measure = _timer(device)
    with Engine(model, device=device, dtype=dtype, compile=compiled, max_batch_size=1,
                max_len=prompt_len + new + 8, speculative=False) as engine:
        t0 = time.perf_counter()
        engine.warmup()
        gen = lambda n: engine.generate(prompt, max_tokens=n, ignore_eos=True)  # noqa: E731
        gen(new)  # compiles the decode graph when compiled
        warm_s = time.perf_counter() - t0
        one = statistics.median(measure(lambda: gen(1)) for _ in range(3))
        full = statistics.median(measure(lambda: gen(new)) for _ in range(3))
    tok_s = (new - 1) / (full - one)
    c = model.config
    active = model.num_activated_parameters() - c.vocab_size * c.hidden_size
    bytes_per_token = active * torch.finfo(dtype).bits // 8 + model.kv_bytes_per_token(dtype) * (prompt_len + new // 2)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"layers": layers, "compiled": compiled, "tokens_per_s": tok_s, "bytes_per_token": bytes_per_token,
            "warmup_s": warm_s}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small widths (a CPU smoke run of the code paths)")
    ap.add_argument("--copy-gib", type=float, default=4.0)
    ap.add_argument("--train-layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--decode-layers", type=int, default=27)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true", help="decode eager only")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--budget-s", type=float, default=0, help="skip the compiled decode once this many seconds have "
                    "passed (0: no budget)")
    args = ap.parse_args()
    device = torch.device(args.device)
    start = time.perf_counter()
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    print(f"device: {name}; torch {torch.__version__}; dense bf16 peak {peak / 1e12:.0f} TFLOP/s (table)")
    results: dict = {"device": name, "peak_bf16_flops": peak}

    t = time.perf_counter()
    bw = bandwidth(device, args.copy_gib if not args.small else 0.05)
    results["bandwidth_bytes_per_s"] = bw
    print(f"bandwidth: {bw / 1e12:.2f} TB/s (copy of {args.copy_gib:g} GiB, read + write; H200 spec 4.8 TB/s) "
          f"[{time.perf_counter() - t:.0f} s]", flush=True)

    t = time.perf_counter()
    batch = args.batch
    while True:
        try:
            tr = train_mfu(device, args.train_layers, batch, args.seq if not args.small else 128, args.steps,
                           args.small)
            break
        except torch.OutOfMemoryError:
            if batch == 1:
                raise
            print(f"train step: out of memory at batch {batch}; trying batch {batch // 2}", flush=True)
            batch //= 2
            torch.cuda.empty_cache()
    tr["mfu"] = tr["achieved_tflops"] * 1e12 / peak
    results["train"] = tr
    print(f"train step (Lite shapes, {tr['layers']} layers, {tr['tokens_per_step']} tokens, bf16 autocast, AdamW): "
          f"{tr['step_s'] * 1e3:.0f} ms, {tr['tokens_per_s']:.0f} tokens/s, {tr['achieved_tflops']:.1f} TFLOP/s = "
          f"MFU {100 * tr['mfu']:.1f}% of {peak / 1e12:.0f}; peak memory {tr['peak_mem_gib']:.1f} GiB "
          f"[{time.perf_counter() - t:.0f} s]", flush=True)

    results["decode"] = []
    for compiled in ([False] if args.no_compile else [False, True]):
        if compiled and args.budget_s and time.perf_counter() - start > args.budget_s:
            print(f"decode compiled: skipped (past the {args.budget_s:.0f} s budget)", flush=True)
            continue
        t = time.perf_counter()
        dec = decode(device, args.decode_layers, args.new if not args.small else 16, compiled, args.small)
        dec["limit_tokens_per_s"] = bw / dec["bytes_per_token"]
        dec["fraction_of_limit"] = dec["tokens_per_s"] / dec["limit_tokens_per_s"]
        results["decode"].append(dec)
        print(f"decode ({dec['layers']} Lite layers, bf16, batch 1, {'compiled' if compiled else 'eager'}): "
              f"{dec['tokens_per_s']:.1f} tokens/s; limit {dec['limit_tokens_per_s']:.0f} tokens/s "
              f"({dec['bytes_per_token'] / 1e9:.2f} GB read per token at {bw / 1e12:.2f} TB/s) = "
              f"{100 * dec['fraction_of_limit']:.1f}% of the bandwidth limit; warm-up {dec['warmup_s']:.0f} s "
              f"[{time.perf_counter() - t:.0f} s]", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

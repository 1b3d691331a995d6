"""Batch-1 decode of weight-only int8 and int4 beside bf16 and transformers, as a fraction of the memory-bandwidth
limit, on Lite-shaped layers; and the peak memory of loading a quantized checkpoint.

Model: DeepSeek-Coder-V2-Lite's layer shapes (hidden 2048, 16 heads, kv_lora 512, no q_lora, 64 experts x 1408
top-6, 2 shared, dense 10944), one dense and one MoE layer, vocabulary 8192, random weights, bf16.
Bandwidth: the read rate of summing every weight tensor of the loaded bf16 model, in this process (a fresh
tensor's rate varies between processes). Limit = bandwidth / bytes one decode step reads (the checkpoint's
tensors, the routed experts at K/E, one embedding row). Decode tok/s = (N new - 1 new) / (N - 1), greedy, plain
decoding (no speculation), the eager default Engine; transformers' generate on the bf16 checkpoint beside it.
Loading: a child process loads each checkpoint, reads a value from every page of every tensor, and reports its
peak resident memory (VmHWM) above what it held before.

    python benchmarks/bench_quant.py [--new 32 --repeats 3 --layers-only]
"""

from __future__ import annotations

import argparse
import json
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

def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def read_bandwidth(model: torch.nn.Module, repeats: int) -> float:
    """Bytes per second of summing every floating weight tensor once (median of ``repeats``)."""
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return nbytes / _best(lambda: [t.sum(dtype=torch.float32) for t in tensors], repeats)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true")
    args = ap.parse_args()

    import dscoder
    from dscoder.quant import decode_bytes_per_token, quantize_checkpoint

    tmp = Path(tempfile.mkdtemp())
    dscoder.save_model(dscoder.build_model(dscoder.ModelConfig(**LITE_LAYERS), seed=0, dtype="bfloat16"),
                       tmp / "bf16", dtype="bfloat16")
    quantize_checkpoint(tmp / "bf16", tmp / "int8", bits=8)
    quantize_checkpoint(tmp / "bf16", tmp / "int4", bits=4)
    names = ["bf16", "int8", "int4"]
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, LITE_LAYERS["vocab_size"], (args.prompt,), generator=g).tolist()
    engines = {n: dscoder.Engine(tmp / n, max_batch_size=1, max_len=args.prompt + args.new + 8, speculative=False)
               for n in names}
    bandwidth = read_bandwidth(engines["bf16"].model, args.repeats)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; read bandwidth on the loaded bf16 weights "
          f"{bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = {}
    for n in names:
        e = engines[n]
        run = lambda k: e.generate(prompt, max_tokens=k, ignore_eos=True)  # noqa: E731
        run(2)
        full, one = _best(lambda: run(args.new), args.repeats), _best(lambda: run(1), args.repeats)
        per_token = decode_bytes_per_token(tmp / n)
        rows[n] = ((args.new - 1) / (full - one), per_token)
    if not args.no_transformers:
        import transformers

        hf = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp / "bf16", dtype=torch.bfloat16).eval()
        ids = torch.tensor([prompt])

        def theirs(k):
            with torch.inference_mode():
                hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)

        theirs(2)
        full, one = _best(lambda: theirs(args.new), args.repeats), _best(lambda: theirs(1), args.repeats)
        rows["transformers bf16"] = ((args.new - 1) / (full - one), decode_bytes_per_token(tmp / "bf16"))
    print(f"\n{'weights':<18} {'file MB':>8} {'MB/token':>9} {'limit tok/s':>12} {'tok/s':>8} {'of limit':>9}")
    for n, (tps, b) in rows.items():
        limit = bandwidth / b["per_token"]
        print(f"{n:<18} {b['weights'] / 1e6:>8.0f} {b['per_token'] / 1e6:>9.1f} {limit:>12.1f} {tps:>8.1f} "
              f"{tps / limit:>9.0%}")
    print(f"int8 / bf16 tok/s {rows['int8'][0] / rows['bf16'][0]:.2f}x"
          + (f"; dscoder bf16 / transformers {rows['bf16'][0] / rows['transformers bf16'][0]:.2f}x"
             if "transformers bf16" in rows else ""))
    for e in engines.values():
        e.close()
    del engines
    print("\nloading peak (child process, RSS above its start):")
    for n in names:
        out = subprocess.run([sys.executable, "-c", _LOAD_PROBE, str(tmp / n)], capture_output=True, text=True)
        size = decode_bytes_per_token(tmp / n)["weights"]
        peak = int(out.stdout.strip().splitlines()[-1]) * 1024 if out.returncode == 0 else float("nan")
        print(f"  {n}: weights {size / 1e6:.0f} MB, peak +{peak / 1e6:.0f} MB ({(peak - size) / 1e6:+.0f} MB)")
    print(json.dumps({"bandwidth_gbps": bandwidth / 1e9, **{n: r[0] for n, r in rows.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""dscoder's DeepSeek-V2 against transformers' DeepseekV2ForCausalLM on the same weights, in one run.

Measures, for each implementation in its own fresh worker process (so peak memory is its own):
  - training: forward + backward of the next-token loss, median seconds per step and tokens/s;
  - prefill: forward under inference_mode, tokens/s;
  - peak memory above the loaded model during the first training step (CPU: Linux VmHWM, reset before the step;
    CUDA: max_memory_allocated), gradients included.
Prints both side by side and the ratios (ours / theirs for speed, theirs / ours for memory).

``--same-process`` loads dscoder and transformers (its default, grouped-mm path) in one process and alternates
their steps, so a machine loaded by other work slows both alike: the printed ratio is the median of the per-round
ratios (no memory column). ``--profile`` runs one training step of each under torch.profiler and prints each one's
GEMM share (matmul ops' self CPU time over the step's) and the non-GEMM ops side by side.
``--config fine`` has more and smaller experts (64 experts of 64, top 6) than the default ``mid`` (16 of 256, top 4).

    python benchmarks/bench_model.py [--batch 4 --seq 512 --iters 5 --device cpu] [--config mid|fine]
    python benchmarks/bench_model.py --same-process [--config fine]
    python benchmarks/bench_model.py --profile [--config fine]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
              num_hidden_layers=8, num_attention_heads=8, kv_lora_rank=128, q_lora_rank=None, qk_nope_head_dim=64,
              qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=16, n_shared_experts=2, num_experts_per_tok=4,
              first_k_dense_replace=1, max_position_embeddings=4096, bos_token_id=0, eos_token_id=1,
              rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 1024, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
CONFIGS = {"mid": CONFIG,
           # more and smaller experts (DeepSeek-V2-Lite routes 6 of 64): more dispatch work per FLOP
           "fine": {**CONFIG, "n_routed_experts": 64, "moe_intermediate_size": 64, "num_experts_per_tok": 6}}
GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::_grouped_mm", "aten::baddbmm", "aten::addbmm")


IMPLS = ("transformers", "transformers-loop", "dscoder")


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_impl(impl: str, ckpt: str, device: str, dtype: str):
    """``logits_of(ids)`` and the model of ``impl`` (dscoder, transformers, transformers-loop) from ``ckpt``."""
    if impl == "dscoder":
        import dscoder

        model = dscoder.load_model(ckpt, device=device, dtype=dtype)
        logits_of = lambda ids: model(ids).logits  # noqa: E731
    else:
        import transformers

        # "transformers": its defaults (grouped_mm experts, SDPA); "transformers-loop": its per-expert loop, the
        # path of the hub remote code and of transformers 4.x
        experts = "eager" if impl == "transformers-loop" else None
        model = transformers.DeepseekV2ForCausalLM.from_pretrained(
            ckpt, experts_implementation=experts, dtype=getattr(torch, dtype)).to(device)
        logits_of = lambda ids: model(ids).logits  # noqa: E731
    return logits_of, model


def step_fns(logits_of, model, batch: int, seq: int, device: str):
    """``(train_step, prefill)`` on the same random batch."""
    vocab = CONFIG["vocab_size"]
    ids = torch.randint(0, vocab, (batch, seq + 1), device=device)
    inp, tgt = ids[:, :-1], ids[:, 1:]

    def train_step():
        logits = logits_of(inp)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, vocab), tgt.reshape(-1))
        loss.backward()
        model.zero_grad(set_to_none=True)
        _sync(device)

    def prefill():
        with torch.inference_mode():
            logits_of(inp)
        _sync(device)

    return train_step, prefill


def worker(impl: str, ckpt: str, batch: int, seq: int, iters: int, device: str, dtype: str) -> dict:
    torch.manual_seed(0)
    logits_of, model = load_impl(impl, ckpt, device, dtype)
    train_step, prefill = step_fns(logits_of, model, batch, seq, device)
    model.train()
    # Peak memory of the first training step, above the loaded model: measured before any warm-up, because freed
    # memory the allocator keeps would hide a later step's peak from the resident-set counters.
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = _rss_kib("VmRSS")
    have_peak = _reset_peak()
    train_step()
    peak_mib = ((torch.cuda.max_memory_allocated() - base) / 2**20 if device.startswith("cuda")
                else (_rss_kib("VmHWM") - base_rss) / 1024 if have_peak else float("nan"))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - t0)
    model.eval()
    prefill()
    ptimes = []
    for _ in range(iters):
        t0 = time.perf_counter()
        prefill()
        ptimes.append(time.perf_counter() - t0)
    tokens = batch * seq
    return {"impl": impl, "train_s": statistics.median(times), "train_tok_s": tokens / statistics.median(times),
            "prefill_s": statistics.median(ptimes), "prefill_tok_s": tokens / statistics.median(ptimes),
            "train_peak_mib": peak_mib}


def same_process(ckpt: str, batch: int, seq: int, iters: int, device: str, dtype: str) -> dict:
    """dscoder and transformers in one process, steps alternating: per-round ratios, their medians."""
    torch.manual_seed(0)
    fns = {}
    for impl in ("transformers", "dscoder"):
        logits_of, model = load_impl(impl, ckpt, device, dtype)
        fns[impl] = (model, *step_fns(logits_of, model, batch, seq, device))
    out = {}
    for kind, index in (("train", 1), ("prefill", 2)):
        times = {impl: [] for impl in fns}
        for model, *_ in fns.values():
            model.train(kind == "train")
        for impl, f in fns.items():  # warm-up
            f[index]()
        for _ in range(iters):
            for impl, f in fns.items():
                t0 = time.perf_counter()
                f[index]()
                times[impl].append(time.perf_counter() - t0)
        ratios = [t / o for t, o in zip(times["transformers"], times["dscoder"])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0], ratios[0], ratios[0]]
        out[kind] = {"ratio": statistics.median(ratios), "q1": q[0], "q3": q[2],
                     "ours_s": statistics.median(times["dscoder"]),
                     "theirs_s": statistics.median(times["transformers"])}
    return out


def profile_step(ckpt: str, batch: int, seq: int, device: str, dtype: str, kind: str = "train", top: int = 18) -> None:
    """One training step (or prefill) of each under torch.profiler: GEMM share, then the other ops side by side."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for impl in ("dscoder", "transformers"):
        torch.manual_seed(0)
        logits_of, model = load_impl(impl, ckpt, device, dtype)
        fn = step_fns(logits_of, model, batch, seq, device)[kind == "prefill"]
        model.train(kind == "train")
        fn()  # warm-up
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        ops = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
        tables[impl] = ops
        del model
    print(f"{kind}: {'':27}{'dscoder ms':>12}{'transformers ms':>17}")
    for impl in tables:
        total = sum(tables[impl].values())
        gemm = sum(v for k, v in tables[impl].items() if k in GEMM_OPS)
        # a fused attention kernel does its matmuls inside (transformers' math-path attention shows as bmm)
        fused = sum(v for k, v in tables[impl].items() if "scaled_dot_product_flash" in k)
        tables[impl]["= step (self CPU total)"], tables[impl]["= GEMM"] = total, gemm
        tables[impl]["= fused SDPA kernels"] = fused
        tables[impl]["= everything else"] = total - gemm - fused
    for key in ("= step (self CPU total)", "= GEMM", "= fused SDPA kernels", "= everything else"):
        print(f"{key:34}{tables['dscoder'][key]:12.1f}{tables['transformers'][key]:17.1f}")
    print(f"{'GEMM share':34}{tables['dscoder']['= GEMM'] / tables['dscoder']['= step (self CPU total)']:12.1%}"
          f"{tables['transformers']['= GEMM'] / tables['transformers']['= step (self CPU total)']:17.1%}")
    ops = {k for t in tables.values() for k in t if not k.startswith("=")}
    ranked = sorted(ops, key=lambda k: -max(tables["dscoder"].get(k, 0), tables["transformers"].get(k, 0)))
    print("ops (self CPU ms), largest first:")
    for k in ranked[:top]:
        print(f"  {k[:32]:32}{tables['dscoder'].get(k, 0):12.1f}{tables['transformers'].get(k, 0):17.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--config", default="mid", choices=sorted(CONFIGS))
    p.add_argument("--threads", type=int, help="torch threads (1 keeps a loaded machine's timings steadier)")
    p.add_argument("--same-process", action="store_true", help="ratios from alternating steps in one process")
    p.add_argument("--profile", action="store_true", help="op-by-op profile of one training step of each")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args.worker, args.ckpt, args.batch, args.seq, args.iters, args.device,
                                args.dtype)))
        return

    import dscoder

    with tempfile.TemporaryDirectory() as tmp:
        config = CONFIGS[args.config]
        model = dscoder.build_model(dscoder.ModelConfig(**config), seed=0)
        dscoder.save_model(model, tmp)  # both implementations load these same weights
        n_params, n_act = model.num_parameters(), model.num_activated_parameters()
        del model
        import transformers

        head = (f"config {args.config}: hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
                f"{config['n_routed_experts']} experts of {config['moe_intermediate_size']} top-"
                f"{config['num_experts_per_tok']}, {n_params / 1e6:.1f}M params ({n_act / 1e6:.1f}M activated); "
                f"batch {args.batch} x seq {args.seq}, {args.dtype}, {args.device}, torch {torch.__version__}, "
                f"transformers {transformers.__version__}, threads {torch.get_num_threads()}")
        if args.profile:
            print(head)
            for kind in ("train", "prefill"):
                profile_step(tmp, args.batch, args.seq, args.device, args.dtype, kind)
            return
        if args.same_process:
            r = same_process(tmp, args.batch, args.seq, args.iters, args.device, args.dtype)
            print(head + f", median of {args.iters} alternating rounds")
            for kind in ("train", "prefill"):
                print(f"{kind:8} dscoder {r[kind]['ours_s']:.3f} s, transformers {r[kind]['theirs_s']:.3f} s: "
                      f"{r[kind]['ratio']:.2f}x (median per-round ratio, theirs / ours time; quartiles "
                      f"{r[kind]['q1']:.2f}-{r[kind]['q3']:.2f})")
            return
        results = {}
        for impl in IMPLS:
            cmd = [sys.executable, __file__, "--worker", impl, "--ckpt", tmp, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--iters", str(args.iters), "--device", args.device, "--dtype", args.dtype,
                   *(["--threads", str(args.threads)] if args.threads else [])]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results[impl] = json.loads(out.strip().splitlines()[-1])
    ours = results["dscoder"]
    print(head + f", median of {args.iters}")
    rows = [("train fwd+bwd tok/s", "train_tok_s", False), ("prefill tok/s", "prefill_tok_s", False),
            ("train peak MiB", "train_peak_mib", True)]
    print(f"{'':22}" + "".join(f"{name:>19}" for name in IMPLS) + "".join(f"{'ours vs ' + n:>24}" for n in IMPLS[:-1]))
    for label, key, lower_is_better in rows:
        cells = "".join(f"{results[name][key]:19.0f}" for name in IMPLS)
        ratios = "".join(f"{(results[n][key] / ours[key] if lower_is_better else ours[key] / results[n][key]):23.2f}x"
                         for n in IMPLS[:-1])
        print(f"{label:22}{cells}{ratios}")
    print("ratios: speed = ours / theirs; memory = theirs / ours (above 1 means dscoder is better)")


if __name__ == "__main__":
    main()

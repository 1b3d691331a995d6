"""Training throughput and MFU of the tiny recipe, the quickstart recipe and a mid-sized model, in fp32 and under
bf16 autocast, on one process, in one run.

Builds a small corpus from two standard-library packages (or uses --data BUILD), then runs `pretrain` for a few
steps per model and dtype and prints the median tokens/s and MFU over the steps after the first third (bf16 kernels
are built for each new shape at first), and each model's bf16 / fp32 tokens/s ratio. MFU counts the model's
training FLOPs per token (6 x activated non-embedding parameters + attention) against the device peak: on CPU a
measured matmul rate in the same dtype, so it says how close the step comes to the machine's own GEMM speed.

    python benchmarks/bench_train.py [--data BUILD] [--steps 24] [--dtype both|float32|bfloat16]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MID = ["model.hidden_size=512", "model.intermediate_size=1536", "model.moe_intermediate_size=256",
       "model.num_hidden_layers=8", "model.num_attention_heads=8", "model.kv_lora_rank=128",
       "model.qk_nope_head_dim=64", "model.qk_rope_head_dim=32", "model.v_head_dim=64", "model.n_routed_experts=16",
       "model.num_experts_per_tok=4", "model.n_shared_experts=2"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a `dscoder data build` output (default: build one from json/ and email/)")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--dtype", default="both", choices=["both", "float32", "bfloat16"])
    args = p.parse_args()

    from dscoder.data.pipeline import BuildConfig, build
    from dscoder.train.config import TrainConfig
    from dscoder.train.pretrain import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            stdlib = Path(sysconfig.get_paths()["stdlib"])
            for pkg in ("json", "email"):
                shutil.copytree(stdlib / pkg, tmp / "src" / pkg, ignore=shutil.ignore_patterns("__pycache__"))
            build(BuildConfig(sources=[str(tmp / "src")], out=str(tmp / "build"), tasks=1, vocab_size=4096,
                              humaneval=False), workers=1)
            data = str(tmp / "build")
        runs = {"tiny (seq 256, batch 8)": ("tiny", ["data.seq_len=256", "train.micro_batch=8"]),
                "quickstart recipe (its vocabulary: 4,096 here)": ("quickstart", ["data.shuffle_rows=0"]),
                "mid (hidden 512, 8 layers, 16 experts top-4; seq 512, batch 4)":
                    ("tiny", ["data.seq_len=512", "train.micro_batch=4", *MID])}
        dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
        print(f"{'model':<62}{'dtype':>10}{'params':>10}{'tokens/s':>11}{'MFU':>8}{'vs fp32':>9}")
        for i, (name, (recipe, overrides)) in enumerate(runs.items()):
            speed = {}
            for dtype in dtypes:
                config = TrainConfig.load(ROOT / "configs" / f"{recipe}.toml",
                                          [f"data.path={data}", f"train.steps={args.steps}",
                                           f"train.ckpt_every={args.steps}", f"train.dtype={dtype}", *overrides])
                out = tmp / f"run{i}-{dtype}"
                pretrain(config, out)
                rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                rows = rows[len(rows) // 3:]
                meta = json.loads(next((out / "checkpoints").iterdir()).joinpath("meta.json").read_text())
                import dscoder

                n = dscoder.build_model(dscoder.ModelConfig.from_hf_dict(meta["model"]), device="meta").num_parameters()
                speed[dtype] = tok_s = statistics.median(r["tokens_per_s"] for r in rows)
                mfu = statistics.median(r["mfu"] for r in rows)
                ratio = f"{tok_s / speed['float32']:.2f}x" if "float32" in speed else ""
                print(f"{name:<62}{dtype:>10}{n / 1e6:>9.1f}M{tok_s:>11.0f}{mfu:>8.1%}{ratio:>9}", flush=True)
        print(f"MFU denominator: a measured matmul rate in each dtype ({meta['peak_flops']} for the last); "
              f"median over steps {args.steps // 3 + 1}..{args.steps}")


if __name__ == "__main__":
    main()

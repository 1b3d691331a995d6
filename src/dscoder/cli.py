"""The ``dscoder`` command."""

from __future__ import annotations

import argparse
import json
import sys

from dscoder.config import PRESETS
from dscoder.errors import DscoderError


def _human(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def model_info(args: argparse.Namespace) -> int:
    import torch

    import dscoder

    model = dscoder.load_model(args.source, device="meta")
    c = model.config
    info = {
        "parameters": model.num_parameters(),
        "activated_parameters": model.num_activated_parameters(),
        "kv_bytes_per_token_bf16": model.kv_bytes_per_token(torch.bfloat16),
        "kv_bytes_per_token_bf16_expanded": model.kv_bytes_per_token(torch.bfloat16, expanded=True),
        "train_flops_per_token_at_4096": model.flops_per_token(4096),
        "softmax_scale": c.softmax_scale,
        "layers": [],
    }
    for i, layer in enumerate(model.model.layers):
        info["layers"].append({
            "layer": i,
            "attention": "q_a_proj+q_b_proj" if c.q_lora_rank else "q_proj",
            "ffn": (f"MoE {c.n_routed_experts}x{c.moe_intermediate_size} top-{c.num_experts_per_tok}"
                    f" + {c.n_shared_experts or 0} shared") if layer.is_moe else f"dense {c.intermediate_size}",
            "parameters": sum(p.numel() for p in layer.parameters()),
        })
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    kv, kv_full = info["kv_bytes_per_token_bf16"], info["kv_bytes_per_token_bf16_expanded"]
    print(f"model: {args.source}")
    print(f"  parameters            {_human(info['parameters'])} ({info['parameters']:,})")
    print(f"  activated parameters  {_human(info['activated_parameters'])} ({info['activated_parameters']:,})")
    print(f"  KV cache per token    {kv:,} bytes bf16 (latent) vs {kv_full:,} expanded ({kv_full / kv:.1f}x)")
    print(f"  train FLOPs per token {_human(info['train_flops_per_token_at_4096'])} at 4096 context")
    print(f"  hidden {c.hidden_size}, heads {c.num_attention_heads}, kv_lora_rank {c.kv_lora_rank}, "
          f"q_lora_rank {c.q_lora_rank}, vocab {c.vocab_size}, rope {c.rope_scaling['type'] if c.rope_scaling else 'plain'}"
          f", softmax scale {c.softmax_scale:.6f}")
    print(f"  {'layer':>5}  {'attention':<18} {'ffn':<34} {'parameters':>12}")
    for row in info["layers"]:
        print(f"  {row['layer']:>5}  {row['attention']:<18} {row['ffn']:<34} {_human(row['parameters']):>12}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dscoder",
        description="DeepSeek-Coder-V2 in PyTorch: model, data, training, evaluation and inference.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    model = sub.add_parser("model", help="inspect models", description="Inspect models and checkpoints.")
    model_sub = model.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    info = model_sub.add_parser(
        "info", help="parameters, activated parameters, KV bytes per token, layer table",
        description="Print parameter counts (total and activated per token), KV-cache bytes per token (latent vs "
                    "expanded) and a layer table, without allocating weights.")
    info.add_argument("source", metavar="PRESET_OR_DIR",
                      help=f"a preset ({', '.join(PRESETS)}) or an HF checkpoint directory with config.json")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=model_info)
    return parser


def _version() -> str:
    from dscoder import __version__

    return f"dscoder {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return args.func(args)
    except DscoderError as e:
        print(f"dscoder: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dscoder: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

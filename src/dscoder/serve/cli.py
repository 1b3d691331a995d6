"""``dscoder serve``: :func:`register` adds it to the ``dscoder`` parser. The engine's options come from
:mod:`dscoder.engine.cli` (the server builds on the engine, never the other way round)."""

from __future__ import annotations

import argparse
import sys

from dscoder.engine.cli import add_compile_arg, add_prefix_cache_arg, engine_from_args
from dscoder.errors import DscoderError


def serve(args: argparse.Namespace) -> int:
    from dscoder.serve import Limits
    from dscoder.serve import serve as run_server

    if not 0 < args.port < 65536:
        raise DscoderError(f"--port: expected 1..65535, got {args.port}")
    for flag, value in (("--max-concurrent", args.max_concurrent), ("--max-tokens-cap", args.max_tokens_cap)):
        if value < 1:  # 0 would start a server that refuses every request
            raise DscoderError(f"{flag}: expected an integer >= 1, got {value}")
    engine = engine_from_args(args, max_batch_size=args.max_batch, max_len=args.max_len)
    limits = Limits(max_tokens=args.max_tokens_cap, max_concurrent=args.max_concurrent)
    if args.compile:
        print("dscoder serve: compiling the decode step (--compile) ...", file=sys.stderr, flush=True)
        engine.warmup()
    try:
        run_server(engine, host=args.host, port=args.port, model_name=args.model_name or args.model,
                   api_key=args.api_key, limits=limits, log_level=args.log_level, checkpoint=args.model)
    finally:
        engine.close()
    return 0


def register(subparsers) -> None:
    """Add ``serve`` to the ``dscoder`` subcommands."""
    s = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                              description="Serve /v1/completions (with suffix for FIM), /v1/chat/completions, "
                                          "DeepSeek's /beta/completions, llama.cpp's /infill and /completion, "
                                          "Ollama's /api/generate, /api/chat, /api/tags and /api/show, "
                                          "/v1/models, /props and /health, and a playground page at / "
                                          "(chat, FIM, tokens/s) over FastAPI + uvicorn.")
    s.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (with its tokenizer)")
    s.add_argument("--tokenizer", metavar="DIR")
    s.add_argument("--dtype", choices=["float32", "bfloat16"])
    s.add_argument("--device", default="cpu")
    add_compile_arg(s)
    add_prefix_cache_arg(s)
    s.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                   help="prefill longer prompts N tokens per step, between decode steps of running requests "
                        "(0 = in one go; default 512)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY'")
    s.add_argument("--served-model-name", "--model-name", dest="model_name", metavar="NAME",
                   help="the model id /v1/models reports and requests must name (a request naming another model "
                        "gets 404, as OpenAI answers; default: --model)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together")
    s.add_argument("--max-len", type=int, help="context in tokens: prompt + output (default: min(model, 4096))")
    s.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask")
    s.add_argument("--max-concurrent", type=int, default=64, help="requests in flight before 429")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    s.set_defaults(func=serve)

"""``dscoder generate | infill | chat``: :func:`register` adds them to the ``dscoder`` parser. The engine's options
(:func:`add_compile_arg`, :func:`add_prefix_cache_arg`, :func:`engine_from_args`) serve ``dscoder serve`` too
(:mod:`dscoder.serve.cli`)."""

from __future__ import annotations

import argparse
import sys

from dscoder.errors import DscoderError


def _sampling_args(p: argparse.ArgumentParser, temperature: float = 0.0) -> None:
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory (with its tokenizer)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    add_compile_arg(p)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="generate max-tokens tokens whatever the model says")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    """The decode-speed options: ``--compile`` and ``--no-speculative``."""
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster decoding after a compile (seconds to a minute) for "
                        "each batch bucket 1, 2, 4, ... (serve compiles them all at startup; the graphs are cached "
                        "under ~/.cache/dscoder/inductor, so a second start skips most of it). On CPU, batch 1 of a "
                        "bf16 or int8 model decodes through native kernels with or without it (DSCODER_NATIVE=0: off)")
    p.add_argument("--no-speculative", dest="speculative", action="store_false",
                   help="turn off prompt-lookup speculative decoding (on by default for a greedy request decoding "
                        "alone; it gives the same tokens, only faster when the output repeats earlier text)")


def add_prefix_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix-cache-mb", type=int, default=256, metavar="MB",
                   help="memory for cached prompt prefixes: a prompt that starts like an earlier one prefills only the "
                        "rest (0 = off; default 256)")


def _sampling(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=tuple(args.stop),
                ignore_eos=args.ignore_eos)


def engine_from_args(args, **kw):
    """The Engine the command-line options ask for (``--model``, ``--tokenizer``, ``--dtype``, ``--device``, ...)."""
    from dscoder.engine import Engine

    engine = Engine(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device, compile=args.compile,
                    prefix_cache_mb=getattr(args, "prefix_cache_mb", 0), prefill_chunk=getattr(args, "prefill_chunk", 0),
                    speculative=getattr(args, "speculative", True), **kw)
    if engine.tokenizer is None:
        raise DscoderError(f"{args.model}: no tokenizer.json in the checkpoint; pass --tokenizer DIR")
    return engine


def _print_stream(chunks) -> str | None:
    reason = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        reason = chunk.finish_reason or reason
    sys.stdout.write("\n")
    return reason


def generate(args) -> int:
    with engine_from_args(args) as engine:
        params = _sampling(args)
        if args.no_stream or len(args.prompt) > 1:
            for r in engine.generate(list(args.prompt), **params):
                print(r.text)
        else:
            _print_stream(engine.stream(args.prompt[0], **params))
    return 0


def infill(args) -> int:
    with engine_from_args(args) as engine:
        _print_stream(engine.stream(prefix=args.prefix, suffix=args.suffix, **_sampling(args)))
    return 0


def chat(args) -> int:
    with engine_from_args(args) as engine:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        print("dscoder chat: an empty line or Ctrl-D ends the session", file=sys.stderr)
        while True:
            try:
                line = input("User: ")
            except EOFError:
                break
            if not line.strip():
                break
            messages.append({"role": "user", "content": line})
            sys.stdout.write("Assistant: ")
            text = []
            for chunk in engine.stream(messages=messages, **_sampling(args)):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                text.append(chunk.text)
            sys.stdout.write("\n")
            messages.append({"role": "assistant", "content": "".join(text).lstrip()})
    return 0


def register(subparsers) -> None:
    """Add ``generate``, ``infill`` and ``chat`` to the ``dscoder`` subcommands."""
    g = subparsers.add_parser("generate", help="complete prompts with a checkpoint",
                              description="Complete one or more prompts (streams when given one).")
    g.add_argument("prompt", nargs="+", help="prompt text")
    _sampling_args(g)
    g.add_argument("--no-stream", action="store_true", help="print the completion when it is done")
    g.set_defaults(func=generate)

    f = subparsers.add_parser("infill", help="fill in the middle between a prefix and a suffix",
                              description="Fill-in-the-middle with DeepSeek's template "
                                          "<｜fim▁begin｜>prefix<｜fim▁hole｜>suffix<｜fim▁end｜>.")
    f.add_argument("--prefix", required=True)
    f.add_argument("--suffix", default="")
    _sampling_args(f)
    f.set_defaults(func=infill)

    c = subparsers.add_parser("chat", help="interactive chat (streaming)",
                              description="Chat with an instruct checkpoint in the DeepSeek-Coder-V2 template.")
    c.add_argument("--system", help="system prompt")
    _sampling_args(c)
    add_prefix_cache_arg(c)
    c.set_defaults(func=chat)

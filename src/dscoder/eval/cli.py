"""``dscoder eval``: :func:`register` adds it to the ``dscoder`` parser; its task choices and each task's flags come
from the registry :data:`dscoder.eval.tasks.TASKS`."""

from __future__ import annotations

import argparse
import os

from dscoder.errors import DscoderError


def _task_options():
    """Every task option once, with the tasks that take it: [(Option, [task names])]."""
    from dscoder.eval.tasks import TASKS

    seen: dict[str, tuple] = {}
    for task in TASKS.values():
        for opt in task.options:
            if opt.flag in seen and seen[opt.flag][0] != opt:
                raise RuntimeError(f"two different task options share the flag {opt.flag}")
            seen.setdefault(opt.flag, (opt, []))[1].append(task.name)
    return list(seen.values())


def register(sub) -> None:
    from dscoder.eval.tasks import TASKS

    tasks = "\n".join(f"  {name:<10} {task.help}" for name, task in TASKS.items())
    from dscoder.eval.fetch import BENCHMARKS

    ev = sub.add_parser(
        "eval", help=f"benchmarks: {', '.join(TASKS)}; fetch; table", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate (local checkpoint or OpenAI-compatible endpoint) or read samples (human-eval jsonl), "
                    "run every program\nin the sandbox and score it. Writes OUT/results.jsonl (every sample and its "
                    "verdict) and OUT/summary.json;\nan earlier OUT/results.jsonl is replaced only when the run "
                    f"succeeds.\n\ntasks:\n{tasks}\n\n"
                    f"  dscoder eval fetch NAME...        download a benchmark into the local cache and verify its "
                    f"sha256\n                                    ({', '.join(BENCHMARKS)}; $DSCODER_CACHE, default "
                    f"~/.cache/dscoder)\n"
                    "  dscoder eval table RUN_DIR... --out DIR   the paper's table: measured scores beside DeepSeek's "
                    "published ones\n                                    (DIR/table.md and DIR/table.png)")
    ev.add_argument("task", choices=[*TASKS, "fetch", "table"], metavar="{" + ",".join(TASKS) + "}|fetch|table",
                    help="the benchmark (see the list above), or fetch / table")
    ev.add_argument("names", nargs="*", metavar="NAME|RUN_DIR", help="fetch: benchmark names; table: eval output "
                                                                     "folders")
    src = ev.add_mutually_exclusive_group()
    src.add_argument("--model", help="a checkpoint directory (generation through dscoder's engine)")
    src.add_argument("--endpoint", help="an OpenAI-compatible server, e.g. http://localhost:8000")
    src.add_argument("--samples", help="a human-eval samples file (task_id, completion)")
    ev.add_argument("--out", help="output folder (required)")
    ev.add_argument("--endpoint-model", help="model name to request (default: the endpoint's first)")
    ev.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                    help="bearer token for --endpoint (default: $OPENAI_API_KEY)")
    ev.add_argument("--context", type=int, help="the model's context in tokens (NIAH skips longer lengths; "
                                                "default: read from the checkpoint or endpoint)")
    ev.add_argument("--n", type=int, default=1, help="samples per problem (1)")
    ev.add_argument("--k", default="1",
                    help="pass@k values, each ≤ --n (or the samples per problem in --samples), e.g. 1,10 (1)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (0)")
    ev.add_argument("--max-tokens", type=int, default=512, help="tokens per completion (512)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--limit", type=int, help="only the first N problems")
    ev.add_argument("--resume", action="store_true", help="keep the samples already scored in OUT/results.jsonl")
    ev.add_argument("--timeout", type=float, default=10.0, help="seconds per program (DeepSeek's harness: 10)")
    ev.add_argument("--workers", type=int, default=0, help="parallel programs (0 = one per core)")
    group = ev.add_argument_group("task options")
    for opt, names in _task_options():
        default = f"; default {_shown(opt.default)}" if opt.default is not None else ""
        default += "; required" if opt.required else ""
        group.add_argument(opt.flag, dest=f"task_{opt.name}", choices=opt.choices, metavar=opt.metavar,
                           help=f"{opt.help} [{', '.join(names)}{default}]")
    ev.set_defaults(func=eval_task)


def _fetch(args: argparse.Namespace) -> int:
    from dscoder.eval.fetch import fetch

    if not args.names:
        raise DscoderError("dscoder eval fetch NAME...: name a benchmark (livecodebench, humaneval+, mbpp+, math)")
    for name in args.names:
        files = fetch(name)
        print(f"{name}: {len(files)} file(s) verified in {files[0].parent}")
    return 0


def _table(args: argparse.Namespace) -> int:
    from dscoder.eval.table import write_table

    if not args.names:
        raise DscoderError("dscoder eval table RUN_DIR... --out DIR: name one or more eval output folders")
    if not args.out:
        raise DscoderError("dscoder eval table needs --out DIR (where table.md and table.png go)")
    md, png = write_table(args.names, args.out)
    print(md.read_text(encoding="utf-8"))
    print(f"wrote {md} and {png}")
    return 0


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


def eval_task(args: argparse.Namespace) -> int:
    from dscoder.eval.base import number_list
    from dscoder.eval.run import evaluate
    from dscoder.eval.sandbox import Limits
    from dscoder.eval.tasks import get_task

    if args.task == "fetch":
        return _fetch(args)
    if args.task == "table":
        return _table(args)
    if args.names:
        raise DscoderError(f"unexpected arguments: {' '.join(args.names)}")
    if sum(x is not None for x in (args.model, args.endpoint, args.samples)) != 1:
        raise DscoderError("give exactly one of --samples FILE, --model DIR, --endpoint URL")
    if not args.out:
        raise DscoderError("eval needs --out DIR (the output folder)")
    task = get_task(args.task)
    options = {}
    for opt, names in _task_options():
        text = getattr(args, f"task_{opt.name}")
        if text is None:
            continue
        if opt not in task.options:
            raise DscoderError(f"{opt.flag} is an option of {', '.join(names)}, not of {task.name}")
        options[opt.name] = opt.parse(text) if opt.parse else text
    summary = evaluate(task.name, args.out, samples=args.samples, model=args.model, endpoint=args.endpoint,
                       endpoint_model=args.endpoint_model, api_key=args.api_key, context=args.context, n=args.n,
                       ks=number_list("--k")(args.k), temperature=args.temperature, max_tokens=args.max_tokens,
                       seed=args.seed, limit=args.limit, resume=args.resume, limits=Limits(timeout_s=args.timeout),
                       workers=args.workers, **options)
    _print_summary(task.name, summary, args.out)
    return 0


def _print_summary(name: str, summary: dict, out: str) -> None:
    names = ("exact_match", "accuracy") + tuple(k for k in summary if k.startswith(("pass@", "base_pass@")))
    scores = ", ".join(f"{k} {summary[k]:.4f}" for k in names if isinstance(summary.get(k), float))
    print(f"{name}: {summary['problems']} problems, {summary['samples']} samples; {scores or 'no scores'}; "
          f"not passed: {summary['not_passed'] or 'none'} (sandbox: {summary['sandbox']})")
    for level, part in summary.get("difficulties", {}).items():
        print(f"  {level:7} {part['problems']:4} problems  " + "  ".join(
            f"{k} {v:.4f}" for k, v in part.items() if k.startswith("pass@")))
    for lang, part in summary.get("languages", {}).items():
        print(f"  {lang:5} {part['problems']:4} problems  " + "  ".join(
            f"{k} {v:.4f}" for k, v in part.items() if k.startswith("pass@")))
    if "grid" in summary:
        g = summary["grid"]
        print("  depth \\ length " + " ".join(f"{x:>6}" for x in g["lengths"]))
        for depth, row in zip(g["depths"], g["scores"]):
            print(f"  {str(depth) + '%':>14} " + " ".join(f"{'-' if s is None else f'{s:.2f}':>6}" for s in row))
    for line in summary.get("skipped", {}).values():
        print(f"  {line}")
    extra = f" and {summary['heatmap']}" if "heatmap" in summary else ""
    print(f"wrote {out}/results.jsonl, {out}/summary.json{extra}")

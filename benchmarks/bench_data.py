"""Throughput of the corpus pipeline's per-file work, per core (one process, one thread where we control it).

Runs each piece over the same files (default: this Python's standard library, .py files), single process:
  - filter: binary/UTF-8 checks, go-enry language id, vendored/generated checks, quality rules;
  - decontamination against HumanEval (+ MBPP with --mbpp);
  - near-dedup signature (5-gram MinHash, 256 permutations) and the LSH clustering over all signatures;
  - tokenization with a byte-level BPE (HF tokenizers, one Rust thread: RAYON_NUM_THREADS=1).
Prints MB/s per core for each and for the whole, next to the target of 5 MB/s per core.

    python benchmarks/bench_data.py [--limit-mb 20] [--mbpp ../shared/data/mbpp/mbpp.jsonl]
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers is imported

import argparse  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--limit-mb", type=float, default=20.0)
    p.add_argument("--mbpp")
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args()

    from datasketch import MinHashLSH

    from dscoder.data import langid
    from dscoder.data.decontam import Decontaminator
    from dscoder.data.ngrams import MinHasher
    from dscoder.data.rules import RuleConfig, check
    from dscoder.tokenizer import Tokenizer

    files, total = [], 0
    for path in sorted(Path(args.source).rglob("*.py")):
        if "site-packages" in path.parts or not path.is_file():
            continue
        data = path.read_bytes()
        files.append((str(path.relative_to(args.source)), data))
        total += len(data)
        if total > args.limit_mb * 1e6:
            break
    mb = total / 1e6
    rules = RuleConfig()
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    texts = []
    for rel, data in files:
        if langid.is_binary(data) or langid.is_vendor(rel):
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
        language = langid.detect(rel, data)
        if check(text, language, rules, rel) is None and not langid.is_generated(rel, data):
            texts.append(text)
    timings["filter (enry + rules)"] = time.perf_counter() - t0

    dec = Decontaminator.from_sources(True, args.mbpp)
    t0 = time.perf_counter()
    contaminated = sum(dec.hit(t) for t in texts)
    timings["decontamination"] = time.perf_counter() - t0

    hasher = MinHasher()
    t0 = time.perf_counter()
    sigs = [s for s in (hasher.signature(t) for t in texts) if s is not None]
    lsh = MinHashLSH(threshold=0.7, num_perm=256)
    dups = 0
    for i, s in enumerate(sigs):
        m = hasher.to_datasketch(s)
        if lsh.query(m):
            dups += 1
        else:
            lsh.insert(i, m)
    timings["near-dedup (MinHash + LSH)"] = time.perf_counter() - t0

    tok = Tokenizer.train(texts[:300], vocab_size=args.vocab_size)
    t0 = time.perf_counter()
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    timings["tokenization (BPE, 1 thread)"] = time.perf_counter() - t0

    print(f"{len(files)} files, {mb:.1f} MB from {args.source}; kept {len(texts)}, {contaminated} contaminated, "
          f"{dups} near duplicates, {n_tokens:,} tokens")
    print(f"{'stage':<32}{'seconds':>10}{'MB/s/core':>12}")
    for name, seconds in timings.items():
        print(f"{name:<32}{seconds:>10.2f}{mb / seconds:>12.1f}")
    whole = sum(timings.values())
    print(f"{'all of the above':<32}{whole:>10.2f}{mb / whole:>12.1f}   (target >= 5 MB/s per core)")
    no_tok = whole - timings["tokenization (BPE, 1 thread)"]
    print(f"{'all but tokenization':<32}{no_tok:>10.2f}{mb / no_tok:>12.1f}")


if __name__ == "__main__":
    main()

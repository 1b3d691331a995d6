"""Throughput of the code pipeline's per-file work, per core: CPU seconds of this one process (tokenizers' Rust
threads pinned to one: RAYON_NUM_THREADS=1), so other load on the machine does not count against it.

Runs each stage over the same files (default: this Python's standard library, .py files), in pipeline order:
  - read: the files' bytes from disk;
  - language id: go-enry's binary, vendored, language and generated checks;
  - rules: UTF-8 decoding and the quality rules;
  - decontamination against HumanEval (+ MBPP with --mbpp);
  - exact dedup (SHA-256) and near dedup (5-gram MinHash, 256 permutations, and the LSH clustering);
  - tokenization with a given tokenizer (--tokenizer DIR, e.g. DeepSeek's) or one trained on 300 of the files:
    dscoder's encoder, and the tokenizers library's own encode_batch beside it (their ids are checked equal).
Prints MB/s per core for each stage and for the whole, next to the target of 5 MB/s per core.

    python benchmarks/bench_data.py [--limit-mb 20] [--tokenizer DIR] [--mbpp ../shared/data/mbpp/mbpp.jsonl]

Earlier code is measured by running this script with PYTHONPATH pointing at that code's src/.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # before tokenizers is imported

import argparse  # noqa: E402
import hashlib  # noqa: E402
import sysconfig  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default=sysconfig.get_paths()["stdlib"])
    p.add_argument("--limit-mb", type=float, default=20.0)
    p.add_argument("--mbpp")
    p.add_argument("--tokenizer", help="a tokenizer folder (default: train one on 300 of the files)")
    p.add_argument("--vocab-size", type=int, default=8192)
    args = p.parse_args()

    from datasketch import MinHashLSH

    from dscoder.data import langid
    from dscoder.data.decontam import Decontaminator
    from dscoder.data.ngrams import MinHasher
    from dscoder.data.rules import RuleConfig, check
    from dscoder.tokenizer import Tokenizer

    paths, total = [], 0
    for path in sorted(Path(args.source).rglob("*.py")):
        if "site-packages" in path.parts or not path.is_file():
            continue
        paths.append(path)
        total += path.stat().st_size
        if total > args.limit_mb * 1e6:
            break
    mb = total / 1e6
    rules = RuleConfig()
    timings: dict[str, float] = {}

    def timed(name):
        class Timer:
            def __enter__(self):
                self.t0 = time.process_time()

            def __exit__(self, *exc):
                timings[name] = timings.get(name, 0.0) + time.process_time() - self.t0
        return Timer()

    with timed("read"):
        files = [(str(path.relative_to(args.source)), path.read_bytes()) for path in paths]
    with timed("language id (go-enry)"):
        candidates = []
        for rel, data in files:
            if langid.is_binary(data) or langid.is_vendor(rel):
                continue
            language = langid.detect(rel, data)
            if language and not langid.is_generated(rel, data):
                candidates.append((rel, data, language))
    texts = []
    with timed("rules"):
        for rel, data, language in candidates:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if check(text, language, rules, rel) is None:
                texts.append(text)

    dec, hasher = Decontaminator.from_sources(True, args.mbpp), MinHasher()
    contaminated, shas, sigs = 0, set(), []
    for t in texts:  # per document, as the filter stage does (the two share the document's code tokens)
        with timed("decontamination"):
            contaminated += dec.hit(t)
        with timed("exact dedup (SHA-256)"):
            shas.add(hashlib.sha256(t.encode("utf-8")).hexdigest())
        with timed("near dedup (MinHash + LSH)"):
            sig = hasher.signature(t)
            if sig is not None:
                sigs.append(sig)
    with timed("near dedup (MinHash + LSH)"):
        lsh, kept, dups = MinHashLSH(threshold=0.7, num_perm=256), {}, 0
        for i, s in enumerate(sigs):
            m = hasher.to_datasketch(s)
            if any(m.jaccard(kept[c]) >= 0.7 for c in lsh.query(m)):
                dups += 1
            else:
                lsh.insert(i, m)
                kept[i] = m

    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else Tokenizer.train(texts[:300],
                                                                                vocab_size=args.vocab_size)
    with timed("tokenization"):
        ids = tok.encode_batch(texts)
    t0 = time.process_time()
    library = [e.ids for e in tok._plain.encode_batch(texts, add_special_tokens=False)]
    library_s = time.process_time() - t0
    assert ids == library, "dscoder's encoder and the tokenizers library disagree"

    print(f"{len(files)} files, {mb:.1f} MB from {args.source}; {len(texts)} pass the rules, {contaminated} "
          f"contaminated, {len(texts) - len(shas)} exact and {dups} near duplicates; {sum(map(len, ids)):,} tokens "
          f"({args.tokenizer or f'trained, vocab {args.vocab_size}'})")
    print(f"{'stage':<34}{'CPU s':>8}{'MB/s/core':>11}")
    for name, seconds in timings.items():
        print(f"{name:<34}{seconds:>8.2f}{mb / seconds:>11.1f}")
    whole = sum(timings.values())
    print(f"{'all of the above':<34}{whole:>8.2f}{mb / whole:>11.1f}   (target >= 5 MB/s per core)")
    print(f"{'  the tokenizers library alone':<34}{library_s:>8.2f}{mb / library_s:>11.1f}   "
          f"(its encode_batch, one thread, same ids)")


if __name__ == "__main__":
    main()

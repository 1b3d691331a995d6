"""``dscoder data recall``: find the math (or any topic's) pages of a web pool with a fastText classifier, iterated
the way DeepSeekMath built its corpus (and DeepSeek-Coder-V2 reused it).

One iteration:

1. **Positives**: the seed records, plus the pages of the high-yield domains found by earlier iterations.
   **Negatives**: a uniform random sample of the pool (DeepSeekMath: random Common Crawl pages), ``negatives``
   per positive, never a positive's page.
2. A fixed share of both (``heldout``) is set aside; fastText is trained on the rest (``thread=1`` and a seed:
   the same inputs give the same classifier) and its precision and recall on the held-out share are recorded.
3. The whole pool is scored; a page is recalled when its positive probability is at least ``threshold``.
4. Pages are grouped by domain (their ``url``); a domain with at least ``min_domain_pages`` pages of which more
   than ``domain_share`` were recalled is a high-yield domain: its pages are positives in the next iteration.

The last iteration's recalled pages are ``OUT/kept/00000.jsonl.gz`` (``{"id", "url", "score", "text"}``, ``id``
being the input's own), its classifier ``OUT/classifier.bin`` (score a larger pool with it: ``--classifier``),
and ``OUT/manifest.json`` the counts and held-out precision/recall of every iteration.
"""

from __future__ import annotations

import math
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from dscoder.data.text import iter_records
from dscoder.errors import ConfigError, DscoderError
from dscoder.io import atomic_path, write_json

POSITIVE, NEGATIVE = "__label__pos", "__label__neg"
_WORD = re.compile(r"\w+|[^\w\s]")  # words and single symbols: "x^2 + 1 = 0" keeps its operators


@dataclass
class RecallConfig:
    """fastText settings default to DeepSeekMath's (dim 256, lr 0.1, word n-grams up to 3, min count 3, 3 epochs)."""

    iterations: int = 1
    threshold: float = 0.5
    negatives: float = 1.0  # random pool pages per positive
    domain_share: float = 0.1  # DeepSeekMath: "over 10% of the web pages ... collected"
    min_domain_pages: int = 3
    heldout: float = 0.1
    seed: int = 0
    dim: int = 256
    lr: float = 0.1
    word_ngrams: int = 3
    min_count: int = 3
    epoch: int = 3
    max_words: int = 2000  # of each page, for training and scoring
    max_domain_positives: int = 1_000_000

    def validate(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ConfigError(f"recall: {name} = {getattr(self, name)!r}: expected {what}")

        for name in ("iterations", "dim", "word_ngrams", "min_count", "epoch", "max_words", "min_domain_pages"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, name, "an integer >= 1")
        need(_number(self.max_domain_positives) and self.max_domain_positives >= 0, "max_domain_positives",
             "an integer >= 0")
        need(_number(self.seed) and isinstance(self.seed, int) and self.seed >= 0, "seed", "an integer >= 0")
        for name in ("threshold", "domain_share"):
            need(_number(getattr(self, name)) and 0 <= getattr(self, name) <= 1, name, "a number in [0, 1]")
        need(_number(self.heldout) and 0 < self.heldout < 1, "heldout", "a number in (0, 1)")
        need(_number(self.negatives) and 0 < self.negatives < math.inf, "negatives", "a number > 0")
        need(_number(self.lr) and 0 < self.lr < math.inf, "lr", "a number > 0")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fasttext_line(text: str, max_words: int) -> str:
    """A page as one fastText input line: lowercased words and symbols separated by spaces."""
    return " ".join(_WORD.findall(text.lower())[:max_words])


def domain(url: Any) -> str | None:
    if not isinstance(url, str) or not url:
        return None
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return None
    return host[4:] if host and host.startswith("www.") else host


def _pool(pools: list[Path]) -> Iterator[tuple[tuple[int, str], dict]]:
    """``((pool index, id), record)`` for every pool record."""
    for i, p in enumerate(pools):
        for rec in iter_records(p):
            yield (i, rec["id"]), rec


class Classifier:
    """A trained fastText model: :meth:`scores` gives each text's probability of being a positive."""

    def __init__(self, model, max_words: int):
        self.model, self.max_words = model, max_words

    @classmethod
    def load(cls, path: str | Path, max_words: int = RecallConfig.max_words) -> Classifier:
        import fasttext

        path = Path(path)
        if not path.is_file():
            raise DscoderError(f"--classifier {path}: no such file (expected a classifier.bin from a recall)")
        try:
            model = fasttext.load_model(str(path))
        except ValueError as e:
            raise DscoderError(f"--classifier {path}: not a fastText model ({e})") from None
        if POSITIVE not in model.get_labels():
            raise DscoderError(f"--classifier {path}: a fastText model without the label {POSITIVE}")
        return cls(model, max_words)

    @classmethod
    def train(cls, positives: list[str], negatives: list[str], work: Path, config: RecallConfig) -> Classifier:
        import fasttext

        rng = np.random.default_rng([config.seed, 1])
        lines = [f"{POSITIVE} {fasttext_line(t, config.max_words)}" for t in positives]
        lines += [f"{NEGATIVE} {fasttext_line(t, config.max_words)}" for t in negatives]
        lines = [lines[i] for i in rng.permutation(len(lines))]
        work.mkdir(parents=True, exist_ok=True)
        train_file = work / "train.txt"
        train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        model = fasttext.train_supervised(input=str(train_file), dim=config.dim, lr=config.lr,
                                          wordNgrams=config.word_ngrams, minCount=config.min_count,
                                          epoch=config.epoch, thread=1, seed=config.seed, verbose=0)
        train_file.unlink()
        return cls(model, config.max_words)

    def scores(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        labels, probs = self.model.predict([fasttext_line(t, self.max_words) for t in texts], k=-1)
        return np.asarray([dict(zip(ls, ps)).get(POSITIVE, 0.0) for ls, ps in zip(labels, probs)])

    def save(self, path: Path) -> None:
        with atomic_path(path, suffix=".bin") as tmp:
            self.model.save_model(str(tmp))


# ----- the iterations --------------------------------------------------------------------------------------------
def recall(seeds: list[str | Path], pools: list[str | Path], out: str | Path, config: RecallConfig | None = None,
           classifier: str | Path | None = None) -> dict[str, Any]:
    """Run the recall (see the module docstring); with ``classifier`` the pool is only scored by it. Returns the
    manifest (also ``OUT/manifest.json``)."""
    config = config or RecallConfig()
    config.validate()
    out = Path(out)
    pools = [Path(p) for p in pools]
    if not pools:
        raise DscoderError("recall: give at least one --pool source")
    if classifier is None and not seeds:
        raise DscoderError("recall: give --seed files of positive pages (or --classifier to score only)")
    _prepare(out)
    manifest: dict[str, Any] = {"seeds": [str(s) for s in seeds], "pools": [str(p) for p in pools],
                                "settings": asdict(config), "iterations": []}
    if classifier is not None:
        model = Classifier.load(classifier, config.max_words)
        counts = _score_pool(model, pools, config, out / "kept" / "00000.jsonl.gz")
        manifest.update(classifier=str(classifier), pool_documents=counts["pool"], kept=counts["kept"])
        write_json(out / "manifest.json", manifest)
        return manifest

    seed_texts = [rec["text"] for s in seeds for rec in iter_records(s)]
    if len(seed_texts) < 2:
        raise DscoderError(f"recall: the seeds hold {len(seed_texts)} record(s) with text; at least 2 are needed")
    high_yield: set[str] = set()
    expected_domain_pages = 0  # the high-yield domains' pages, counted by the previous scoring pass
    for it in range(1, config.iterations + 1):
        domain_pages, negatives = _sample(pools, config, high_yield, it, len(seed_texts), expected_domain_pages)
        positives = seed_texts + domain_pages
        if len(negatives) < 2:
            raise DscoderError(f"recall: the pool gave {len(negatives)} negative page(s); at least 2 are needed")
        (pos_train, pos_held), (neg_train, neg_held) = (_split(x, config, it, tag) for tag, x in
                                                         ((0, positives), (1, negatives)))
        model = Classifier.train(pos_train, neg_train, out / "_work", config)
        precision, rec_rate = _precision_recall(model, pos_held, neg_held, config.threshold)
        last = it == config.iterations
        target = out / "kept" / "00000.jsonl.gz" if last else None
        counts = _score_pool(model, pools, config, target)
        new = sorted(d for d, (total, kept) in counts["domains"].items()
                     if total >= config.min_domain_pages and kept > config.domain_share * total)
        new = [d for d in new if d not in high_yield]
        high_yield.update(new)
        expected_domain_pages = min(config.max_domain_positives,
                                    sum(counts["domains"][d][0] for d in high_yield))
        manifest["iterations"].append({
            "iteration": it, "seed_positives": len(seed_texts), "domain_positives": len(domain_pages),
            "negatives": len(negatives), "train": len(pos_train) + len(neg_train),
            "heldout": len(pos_held) + len(neg_held), "heldout_precision": precision, "heldout_recall": rec_rate,
            "pool_documents": counts["pool"], "kept": counts["kept"],
            "new_high_yield_domains": new})
        if last:
            model.save(out / "classifier.bin")
            manifest.update(classifier="classifier.bin", pool_documents=counts["pool"], kept=counts["kept"],
                            high_yield_domains=sorted(high_yield))
    shutil.rmtree(out / "_work", ignore_errors=True)
    write_json(out / "manifest.json", manifest)
    return manifest


def _prepare(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DscoderError(f"--out {out}: is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file() and not (out / "kept").is_dir():
        raise DscoderError(f"--out {out}: exists and is not a recall's folder; choose another --out")
    shutil.rmtree(out / "kept", ignore_errors=True)  # a rerun replaces the earlier result
    (out / "manifest.json").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _sample(pools: list[Path], config: RecallConfig, high_yield: set[str], it: int,
            seed_count: int, expected_domain_pages: int) -> tuple[list[str], list[str]]:
    """One pass over the pool: the pages of high-yield domains (positives), and a uniform sample of the other pages
    (negatives: ``negatives`` per positive). Reservoir sampling with a seeded generator: the same pool gives the
    same sample; it holds at most the negatives the expected positives need (the domains' pages were counted by the
    previous scoring pass)."""
    rng = np.random.default_rng([config.seed, 0, it])
    domain_pages: list[str] = []
    cap = math.ceil(config.negatives * (seed_count + expected_domain_pages))
    reservoir: list[str] = []
    seen = 0
    for _, rec in _pool(pools):
        if high_yield and domain(rec.get("url")) in high_yield:
            if len(domain_pages) < config.max_domain_positives:
                domain_pages.append(rec["text"])
            continue
        seen += 1
        if len(reservoir) < cap:
            reservoir.append(rec["text"])
        else:
            j = int(rng.integers(seen))
            if j < cap:
                reservoir[j] = rec["text"]
    want = math.ceil(config.negatives * (seed_count + len(domain_pages)))
    if len(reservoir) > want:  # a uniform subset of a uniform sample
        reservoir = [reservoir[i] for i in sorted(rng.choice(len(reservoir), want, replace=False))]
    return domain_pages, reservoir


def _split(texts: list[str], config: RecallConfig, it: int, tag: int) -> tuple[list[str], list[str]]:
    order = np.random.default_rng([config.seed, 2, it, tag]).permutation(len(texts))
    held = max(1, round(config.heldout * len(texts)))
    return [texts[i] for i in order[held:]], [texts[i] for i in order[:held]]


def _precision_recall(model: Classifier, positives: list[str], negatives: list[str],
                      threshold: float) -> tuple[float | None, float]:
    tp = int((model.scores(positives) >= threshold).sum())
    fp = int((model.scores(negatives) >= threshold).sum())
    return (tp / (tp + fp) if tp + fp else None), tp / len(positives)


def _score_pool(model: Classifier, pools: list[Path], config: RecallConfig, target: Path | None,
                batch: int = 1024) -> dict[str, Any]:
    """Score every pool page; recalled pages go to ``target`` (jsonl.gz) when given. Returns the pool and kept
    counts and ``{domain: [pages, recalled]}``."""
    from dscoder.data.pipeline import _jsonl_gz

    domains: dict[str, list[int]] = {}
    counts = Counter()
    pending: list[dict] = []

    def flush(write) -> None:
        for rec, s in zip(pending, model.scores([r["text"] for r in pending])):
            counts["pool"] += 1
            keep = bool(s >= config.threshold)
            d = domain(rec.get("url"))
            if d is not None:
                entry = domains.setdefault(d, [0, 0])
                entry[0] += 1
                entry[1] += keep
            if keep:
                counts["kept"] += 1
                if write is not None:
                    write({"id": rec["id"], "url": rec.get("url"), "score": round(float(s), 6), "text": rec["text"]})
        pending.clear()

    with (_jsonl_gz(target) if target is not None else _null()) as write:
        for _, rec in _pool(pools):
            pending.append(rec)
            if len(pending) >= batch:
                flush(write)
        flush(write)
    return {"pool": counts["pool"], "kept": counts["kept"], "domains": domains}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> bool:
        return False

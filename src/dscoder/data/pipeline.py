"""``dscoder data build``: source code → kept documents, token shards and a manifest, as datatrove pipelines.

Five stages, each a datatrove pipeline run by a local, Slurm or Ray executor (resumable: a finished task leaves a
completion marker under ``OUT/logs/STAGE/`` and is skipped on rerun):

1. ``filter`` (N tasks): read this task's documents → binary / UTF-8 / size checks → language id (go-enry),
   vendored and generated files → quality rules → decontamination → content hash and MinHash signature.
2. ``dedup`` (1 task): exact duplicates by content hash, near duplicates by MinHash LSH (Jaccard ≥ 0.7 on 5-gram
   shingles of code tokens, 256 permutations → 25 bands × 10 rows); one file per cluster is kept (the first in
   source order).
3. ``tokenizer`` (1 task): copy the given tokenizer, or train a byte-level BPE on the kept documents.
4. ``tokenize`` (N tasks): drop the duplicates, write kept documents and their token shards.
5. ``report`` (1 task): ``manifest.json`` and ``data_stats.png``.

Every rejected file is a line ``{"path", "id", "rule", "language", "stage"}`` in ``OUT/rejected/*.jsonl.gz``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

from dscoder.data import langid
from dscoder.data.rules import RuleConfig, check
from dscoder.data.shards import ShardWriter
from dscoder.data.sources import RawDocument, iter_documents
from dscoder.errors import DscoderError

STAGES = ("filter", "dedup", "tokenizer", "tokenize", "report")


@dataclass
class BuildConfig:
    """Everything a build depends on; stored as ``OUT/build.json`` so a rerun can resume only the same build."""

    sources: list[str]
    out: str
    rules: dict[str, Any] = field(default_factory=lambda: asdict(RuleConfig()))
    tokenizer: str | None = None  # a tokenizer directory; None trains one on the kept documents
    vocab_size: int = 8192
    humaneval: bool = True
    mbpp: str | None = None
    dedup: bool = True
    minhash_threshold: float = 0.7
    minhash_perms: int = 256
    minhash_ngram: int = 5
    tasks: int = 4

    @property
    def rule_config(self) -> RuleConfig:
        return RuleConfig(**self.rules)


# ----- small file helpers ----------------------------------------------------------------------------------------
class _JsonlGzWriter:
    """Writes ``path`` atomically: lines go to a temporary file that is renamed on ``close``."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.f = gzip.open(self.tmp, "wt", encoding="utf-8", compresslevel=1)

    def write(self, obj: dict) -> None:
        self.f.write(json.dumps(obj, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self.f.close()
        os.replace(self.tmp, self.path)


def _read_jsonl_gz(path: Path):
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _progress(desc: str, rank: int):
    from tqdm import tqdm

    return tqdm(desc=f"{desc} [task {rank}]", unit=" files", mininterval=1.0, position=rank % 8, leave=False)


# ----- stage 1: filter -------------------------------------------------------------------------------------------
class FilterStage(PipelineStep):
    name = "dscoder filter"
    type = "Filter"

    def __init__(self, config: BuildConfig):
        super().__init__()
        self.config = config

    def _decide(self, raw: RawDocument, rules: RuleConfig, decontam) -> tuple[str | None, str, str]:
        """``(rule or None, language, text)`` for one document."""
        if raw.error:
            return raw.error, "", ""
        content = raw.content
        if isinstance(content, bytes):
            if langid.is_binary(content):
                return "binary", "", ""
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError:
                return "not_utf8", "", ""
        else:
            text, content = content, content.encode("utf-8", errors="replace")
        if rules.code_rules:
            if rules.drop_vendor and langid.is_vendor(raw.path):
                return "vendor", "", text
            language = langid.detect(raw.path, content)
            if not language:
                return "no_language", "", text
            if rules.languages and language not in rules.languages:
                return "language_not_selected", language, text
        else:
            language = "Text"
        rule = check(text, language, rules, raw.path)  # the paper's rules first, so their names are what gets recorded
        if rule is None and rules.code_rules and rules.drop_generated and langid.is_generated(raw.path, content):
            rule = "generated"
        if rule is None and decontam is not None and decontam.hit(text):
            rule = "decontamination"
        return rule, language, text

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from dscoder.data.decontam import Decontaminator
        from dscoder.data.ngrams import MinHasher

        cfg, out = self.config, Path(self.config.out)
        rules = cfg.rule_config
        decontam = (Decontaminator.from_sources(cfg.humaneval, cfg.mbpp) if cfg.humaneval or cfg.mbpp else None)
        hasher = MinHasher(cfg.minhash_perms, cfg.minhash_ngram)
        kept = _JsonlGzWriter(out / "_work" / "filtered" / f"{rank:05d}.jsonl.gz")
        rejected = _JsonlGzWriter(out / "rejected" / f"filter-{rank:05d}.jsonl.gz")
        orders, shas, sigs, sig_rows = [], [], [], []
        stats = Counter()
        dropped = Counter()
        sources = [Path(s) for s in cfg.sources]
        with _progress("filter", rank) as bar:
            for raw in iter_documents(sources, rank, world_size, rules.max_file_bytes):
                bar.update()
                stats["documents_in"] += 1
                size = len(raw.content.encode() if isinstance(raw.content, str) else raw.content or b"")
                stats["bytes_in"] += size
                rule, language, text = self._decide(raw, rules, decontam)
                if rule is not None:
                    dropped[rule] += 1
                    rejected.write({"path": raw.path, "id": raw.id, "rule": rule, "language": language,
                                    "stage": "filter"})
                    continue
                sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
                sig = hasher.signature(text) if cfg.dedup else None
                if sig is not None:
                    sig_rows.append(len(orders))
                    sigs.append(sig)
                orders.append(raw.index)
                shas.append(sha)
                kept.write({"id": raw.id, "index": raw.index, "path": raw.path, "language": language,
                            "sha256": sha, "text": text})
        kept.close()
        rejected.close()
        sig_matrix = np.stack(sigs) if sigs else np.zeros((0, cfg.minhash_perms), dtype=np.uint64)
        tmp = out / "_work" / "sigs" / f"{rank:05d}.tmp.npz"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, order=np.asarray(orders, dtype=np.int64), sha=np.asarray(shas, dtype="U64"),
                 sig_rows=np.asarray(sig_rows, dtype=np.int64), sigs=sig_matrix)
        os.replace(tmp, tmp.with_name(f"{rank:05d}.npz"))
        _write_json(out / "_work" / "stats" / f"filter-{rank:05d}.json", {**stats, "dropped": dropped})
        return
        yield  # a datatrove step is a generator


# ----- stage 2: dedup --------------------------------------------------------------------------------------------
class DedupStage(PipelineStep):
    name = "dscoder dedup"
    type = "Dedup"

    def __init__(self, config: BuildConfig):
        super().__init__()
        self.config = config

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from datasketch import MinHashLSH

        from dscoder.data.ngrams import MinHasher

        cfg, out = self.config, Path(self.config.out)
        orders, shas, sigs, sig_orders = [], [], [], []
        for f in sorted((out / "_work" / "sigs").glob("*.npz")):
            z = np.load(f)
            orders.append(z["order"])
            shas.append(z["sha"])
            sigs.append(z["sigs"])
            sig_orders.append(z["order"][z["sig_rows"]])
        order = np.concatenate(orders) if orders else np.zeros(0, dtype=np.int64)
        sha = np.concatenate(shas) if shas else np.zeros(0, dtype="U64")
        remove: dict[int, str] = {}
        first_of: dict[str, int] = {}
        for i in np.argsort(order, kind="stable"):  # source order: the first copy is kept
            o, h = int(order[i]), str(sha[i])
            if h in first_of:
                remove[o] = "exact_duplicate"
            else:
                first_of[h] = o
        if cfg.dedup and sigs:
            sig_matrix, sig_order = np.concatenate(sigs), np.concatenate(sig_orders)
            hasher = MinHasher(cfg.minhash_perms, cfg.minhash_ngram)
            lsh = MinHashLSH(threshold=cfg.minhash_threshold, num_perm=cfg.minhash_perms)
            minhashes = {}
            for i in np.argsort(sig_order, kind="stable"):
                o = int(sig_order[i])
                if o in remove:
                    continue
                m = hasher.to_datasketch(sig_matrix[i])
                # a candidate must also pass the estimated Jaccard (LSH alone admits some pairs below it)
                if any(m.jaccard(minhashes[c]) >= cfg.minhash_threshold for c in lsh.query(m)):
                    remove[o] = "near_duplicate"  # its cluster's first member was inserted earlier
                    continue
                lsh.insert(o, m)
                minhashes[o] = m
        _write_json(out / "_work" / "dedup.json", {str(k): v for k, v in sorted(remove.items())})
        return
        yield


# ----- stage 3: tokenizer ----------------------------------------------------------------------------------------
def iter_build_texts(build_dir: Path):
    """The kept documents' texts of a finished build."""
    files = sorted((Path(build_dir) / "documents").glob("*.jsonl.gz"))
    if not files:
        raise DscoderError(f"{build_dir}: no documents/ (expected the output of `dscoder data build`)")
    for f in files:
        for doc in _read_jsonl_gz(f):
            yield doc["text"]


def _kept_texts(out: Path):
    remove = json.loads((out / "_work" / "dedup.json").read_text())
    for f in sorted((out / "_work" / "filtered").glob("*.jsonl.gz")):
        for doc in _read_jsonl_gz(f):
            if str(doc["index"]) not in remove:
                yield doc["text"]


class TokenizerStage(PipelineStep):
    name = "dscoder tokenizer"
    type = "Tokenizer"

    def __init__(self, config: BuildConfig):
        super().__init__()
        self.config = config

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from dscoder.tokenizer import Tokenizer

        cfg, out = self.config, Path(self.config.out)
        target = out / "tokenizer"
        tmp = out / "_work" / "tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.tokenizer:
            tok = Tokenizer.load(cfg.tokenizer)
        else:
            tok = Tokenizer.train(_kept_texts(out), vocab_size=cfg.vocab_size)
        tok.save(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        return
        yield


# ----- stage 4: tokenize -----------------------------------------------------------------------------------------
class TokenizeStage(PipelineStep):
    name = "dscoder tokenize"
    type = "Tokenizer"

    def __init__(self, config: BuildConfig, batch: int = 256):
        super().__init__()
        self.config, self.batch = config, batch

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from dscoder.tokenizer import Tokenizer

        out = Path(self.config.out)
        tok = Tokenizer.load(out / "tokenizer")
        remove = json.loads((out / "_work" / "dedup.json").read_text())
        src = out / "_work" / "filtered" / f"{rank:05d}.jsonl.gz"
        docs_out = _JsonlGzWriter(out / "documents" / f"{rank:05d}.jsonl.gz")
        rejected = _JsonlGzWriter(out / "rejected" / f"dedup-{rank:05d}.jsonl.gz")
        shard = ShardWriter(out / "tokens", f"{rank:05d}")
        languages, stats, dropped = Counter(), Counter(), Counter()
        pending: list[dict] = []

        def flush():
            for doc, ids in zip(pending, tok.encode_batch([d["text"] for d in pending])):
                shard.add(ids)
                stats["tokens"] += len(ids)
            pending.clear()

        with _progress("tokenize", rank) as bar:
            for doc in _read_jsonl_gz(src):
                bar.update()
                rule = remove.get(str(doc["index"]))
                if rule:
                    dropped[rule] += 1
                    rejected.write({"path": doc["path"], "id": doc["id"], "rule": rule,
                                    "language": doc["language"], "stage": "dedup"})
                    continue
                languages[doc["language"]] += 1
                stats["documents_kept"] += 1
                stats["bytes_kept"] += len(doc["text"].encode("utf-8"))
                docs_out.write({k: doc[k] for k in ("id", "path", "language", "text")})
                pending.append(doc)
                if len(pending) >= self.batch:
                    flush()
            flush()
        shard.close()
        docs_out.close()
        rejected.close()
        _write_json(out / "_work" / "stats" / f"tokenize-{rank:05d}.json",
                    {**stats, "languages": languages, "dropped": dropped})
        return
        yield


# ----- stage 5: report -------------------------------------------------------------------------------------------
class ReportStage(PipelineStep):
    name = "dscoder report"
    type = "Stats"

    def __init__(self, config: BuildConfig):
        super().__init__()
        self.config = config

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        out = Path(self.config.out)
        manifest = merge_stats(out)
        manifest["tokenizer"] = "tokenizer"
        manifest["vocab_size"] = _vocab_size(out / "tokenizer")
        _write_json(out / "manifest.json", manifest)
        plot_stats(manifest, out / "data_stats.png")
        return
        yield


def _vocab_size(tokenizer_dir: Path) -> int | None:
    try:
        return len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    except (OSError, KeyError, json.JSONDecodeError):
        return None


def merge_stats(out: Path) -> dict[str, Any]:
    totals, dropped, languages = Counter(), Counter(), Counter()
    for f in sorted((out / "_work" / "stats").glob("*.json")):
        s = json.loads(f.read_text())
        dropped.update(s.pop("dropped", {}))
        languages.update(s.pop("languages", {}))
        totals.update(s)
    return {
        "documents_in": totals["documents_in"], "documents_kept": totals["documents_kept"],
        "bytes_in": totals["bytes_in"], "bytes_kept": totals["bytes_kept"], "tokens": totals["tokens"],
        "dropped": dict(dropped.most_common()), "languages": dict(languages.most_common()),
    }


def plot_stats(manifest: dict, path: Path, top: int = 20) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.5))
    langs = list(manifest["languages"].items())[:top]
    ax1.barh([k for k, _ in langs][::-1], [v for _, v in langs][::-1], color="#4c72b0")
    ax1.set_title(f"kept files by language (top {len(langs)} of {len(manifest['languages'])})")
    ax1.set_xscale("log")
    rules = list(manifest["dropped"].items())
    ax2.barh([k for k, _ in rules][::-1] or ["(none)"], [v for _, v in rules][::-1] or [0], color="#dd8452")
    ax2.set_title(f"dropped files by rule ({manifest['documents_in'] - manifest['documents_kept']} "
                  f"of {manifest['documents_in']})")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


# ----- running ---------------------------------------------------------------------------------------------------
def make_executors(config: BuildConfig, executor: str = "local", workers: int = -1,
                   slurm: dict[str, Any] | None = None) -> list:
    """One datatrove executor per stage, chained by ``depends``."""
    out = Path(config.out)
    stages = [("filter", FilterStage(config), config.tasks), ("dedup", DedupStage(config), 1),
              ("tokenizer", TokenizerStage(config), 1), ("tokenize", TokenizeStage(config), config.tasks),
              ("report", ReportStage(config), 1)]
    executors, previous = [], None
    for name, step, tasks in stages:
        logs = str(out / "logs" / name)
        if executor == "local":
            from datatrove.executor import LocalPipelineExecutor

            ex = LocalPipelineExecutor(pipeline=[step], tasks=tasks, workers=min(workers if workers > 0 else
                                       os.cpu_count() or 1, tasks), logging_dir=logs)
        elif executor == "slurm":
            from datatrove.executor import SlurmPipelineExecutor

            opts = dict(slurm or {})
            ex = SlurmPipelineExecutor(pipeline=[step], tasks=tasks, logging_dir=logs, depends=previous,
                                       job_name=f"dscoder-{name}", time=opts.pop("time", "4:00:00"),
                                       partition=opts.pop("partition", "cpu"), **opts)
        elif executor == "ray":
            try:
                import ray  # noqa: F401
            except ImportError:
                raise DscoderError("--executor ray needs the 'ray' package (pip install 'ray[default]')") from None
            from datatrove.executor import RayPipelineExecutor

            ex = RayPipelineExecutor(pipeline=[step], tasks=tasks, logging_dir=logs, depends=previous)
        else:
            raise DscoderError(f"unknown executor '{executor}' (expected local, slurm or ray)")
        executors.append(ex)
        previous = ex
    return executors


def prepare(config: BuildConfig) -> None:
    """Check the output folder: a new build, or the same build resumed."""
    out = Path(config.out)
    record = out / "build.json"
    mine = asdict(config)
    if record.exists():
        theirs = json.loads(record.read_text())
        if theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise DscoderError(f"{out}: holds a build with other settings ({', '.join(changed)}); "
                               "choose another --out or delete it")
    elif out.exists() and any(out.iterdir()):
        raise DscoderError(f"{out}: exists and is not a dscoder build; choose another --out")
    _write_json(record, mine)


def build(config: BuildConfig, executor: str = "local", workers: int = -1,
          slurm: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Run (or resume) a build; returns the manifest when the stages ran here (local), else None."""
    if config.tokenizer:
        from dscoder.tokenizer import Tokenizer

        Tokenizer.load(config.tokenizer)  # a bad tokenizer fails now, not after the filter stage
    if config.mbpp and not Path(config.mbpp).is_file():
        raise DscoderError(f"{config.mbpp}: MBPP file not found")
    prepare(config)
    executors = make_executors(config, executor, workers, slurm)
    if executor == "local":
        for name, ex in zip(STAGES, executors):
            ex.run()
            missing = ex.get_incomplete_ranks(skip_completed=True)
            if missing:
                raise DscoderError(f"stage '{name}': tasks {missing} did not finish; see {config.out}/logs/{name}")
        return json.loads((Path(config.out) / "manifest.json").read_text())
    executors[-1].run()  # launches the chain through `depends`
    return None

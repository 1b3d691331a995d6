"""``dscoder data build``: source code → kept documents, token shards and a manifest, as datatrove pipelines.

Five stages, each a datatrove pipeline run by a local, Slurm or Ray executor (resumable: a finished task leaves a
completion marker under ``OUT/logs/STAGE/`` and is skipped on rerun):

1. ``filter`` (N tasks): read this task's documents → binary / UTF-8 / size checks → language id (go-enry),
   vendored and generated files → quality rules → decontamination → content hash and MinHash signature. Text
   documents (``kind = "text"``, and every WARC page) skip language id and the code rules: the generic rules, then
   datatrove's Gopher, C4 and FineWeb quality filters (:mod:`dscoder.data.text`).
2. ``dedup`` (1 task): exact duplicates by content hash, near duplicates by MinHash LSH (Jaccard ≥ 0.7 on 5-gram
   shingles of code tokens, 256 permutations → 25 bands × 10 rows); one file per cluster is kept (the first in
   source order).
3. ``tokenizer`` (1 task): copy the given tokenizer, or train a byte-level BPE on the kept documents.
4. ``tokenize`` (N tasks): drop the duplicates, write kept documents and their token shards.
5. ``report`` (1 task): ``manifest.json`` and ``data_stats.png``.

Every rejected file is a line ``{"path", "id", "rule", "language", "stage"}`` in ``OUT/rejected/*.jsonl.gz``.

Before any task runs, the launching process scans the sources (``OUT/_work/sources.json``: a fingerprint of each,
its document count), so an unreadable source is one clear error up front and a resumed build whose sources changed
since it started is refused. Worker processes die with the launching process (:mod:`dscoder.data.lifetime`).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.pipeline.base import PipelineStep

from dscoder.data import langid
from dscoder.data.rules import RuleConfig, check
from dscoder.data.shards import ShardWriter
from dscoder.data.sources import RawDocument, changed_sources, iter_documents, scan_sources
from dscoder.data.text import TEXT_FILTERS, TextFilters
from dscoder.errors import ConfigError, DscoderError
from dscoder.io import atomic_path, atomic_write, iter_jsonl, write_json

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
    # "code": the code rules (a WARC source's pages are text all the same); "text": every document is natural
    # language: the generic rules, then datatrove's quality filters (text_filters, dscoder.data.text)
    kind: str = "code"
    text_filters: list[str] = field(default_factory=lambda: list(TEXT_FILTERS))

    @property
    def rule_config(self) -> RuleConfig:
        return RuleConfig(**self.rules)

    def validate(self) -> None:
        """Numbers out of range are one :class:`ConfigError` naming the field, before any work starts."""
        from dscoder.tokenizer import MAX_VOCAB, SPECIAL_TOKENS

        minimum_vocab = 256 + len(SPECIAL_TOKENS)
        _check_int("vocab_size", self.vocab_size, minimum_vocab, f" (256 byte tokens + {len(SPECIAL_TOKENS)} "
                   "special tokens)")
        if self.vocab_size > MAX_VOCAB:
            raise ConfigError(f"vocab_size must be at most {MAX_VOCAB:,} (DeepSeek-Coder-V2's is 102,400), got "
                              f"{self.vocab_size:,}")
        _check_int("tasks", self.tasks, 1)
        if self.tasks > MAX_TASKS:  # each task is a process start and its own files, whatever the corpus size
            raise ConfigError(f"tasks must be at most {MAX_TASKS:,}, got {self.tasks:,}")
        _check_int("minhash_perms", self.minhash_perms, 1)
        _check_int("minhash_ngram", self.minhash_ngram, 1)
        t = self.minhash_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
            raise ConfigError(f"minhash_threshold must be a number in (0, 1], got {t!r}")
        self.rule_config.validate()
        if self.kind not in ("code", "text"):
            raise ConfigError(f"kind must be 'code' or 'text', got {self.kind!r}")
        bad = [f for f in self.text_filters if f not in TEXT_FILTERS]
        if bad:
            raise ConfigError(f"text_filters: unknown filter '{bad[0]}' (known: {', '.join(TEXT_FILTERS)})")


MAX_TASKS = 10_000


def _check_int(name: str, value: Any, minimum: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}{why}, got {value!r}")


# ----- small file helpers ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _jsonl_gz(path: Path):
    """A ``write(obj)`` function appending one JSON line to ``path`` (gzip); the file appears, whole, when the
    ``with`` block ends without an error (:func:`dscoder.io.atomic_write`)."""
    with (atomic_write(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1) as gz,
          io.TextIOWrapper(gz, encoding="utf-8") as text):
        yield lambda obj: text.write(json.dumps(obj, ensure_ascii=False) + "\n")


def _read_jsonl_gz(path: Path):
    """The objects of a jsonl(.gz) file this build wrote."""
    for _, obj in iter_jsonl(path, "build"):
        yield obj


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DscoderError(f"{path}: not readable JSON ({e}); delete the folder to rebuild") from None


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
        if self.config.kind == "text" or raw.kind == "text":
            return self._decide_text(raw, rules, decontam)
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

    def _decide_text(self, raw: RawDocument, rules: RuleConfig, decontam) -> tuple[str | None, str, str]:
        """A natural-language document: the generic rules (no code rules), then datatrove's quality filters."""
        content = raw.content
        if isinstance(content, bytes):
            try:
                content = content.decode("utf-8")
            except UnicodeDecodeError:
                return "not_utf8", "", ""
        rule = check(content, "Text", replace(rules, code_rules=False), raw.path)
        if rule is not None:
            return rule, "Text", content
        if self._text_filters is None:
            self._text_filters = TextFilters(self.config.text_filters)
        rule, text = self._text_filters.check(content)
        if rule is None and decontam is not None and decontam.hit(text):
            rule = "decontamination"
        return rule, "Text", text

    _text_filters: TextFilters | None = None

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        from dscoder.data.decontam import Decontaminator
        from dscoder.data.ngrams import MinHasher

        cfg, out = self.config, Path(self.config.out)
        rules = cfg.rule_config
        decontam = (Decontaminator.from_sources(cfg.humaneval, cfg.mbpp) if cfg.humaneval or cfg.mbpp else None)
        hasher = MinHasher(cfg.minhash_perms, cfg.minhash_ngram)
        scanned = _read_json(out / "_work" / "sources.json")
        # every task must see the files the scan saw, or the documents' indices (and so the tasks) would disagree
        changed = changed_sources(scanned, names_only=True)
        if changed:
            raise DscoderError(f"{', '.join(changed)}: files were added or removed while this build ran; "
                               "use a fresh --out")
        orders, shas, sigs, sig_rows = [], [], [], []
        stats = Counter()
        dropped = Counter()
        sources = [Path(s) for s in cfg.sources]
        with (_jsonl_gz(out / "_work" / "filtered" / f"{rank:05d}.jsonl.gz") as keep,
              _jsonl_gz(out / "rejected" / f"filter-{rank:05d}.jsonl.gz") as reject, _progress("filter", rank) as bar):
            for raw in iter_documents(sources, rank, world_size, rules.max_file_bytes,
                                      records=[e["records"] for e in scanned]):
                bar.update()
                stats["documents_in"] += 1
                content = raw.content
                stats["bytes_in"] += len(content.encode() if isinstance(content, str) else content or b"")
                rule, language, text = self._decide(raw, rules, decontam)
                if rule is not None:
                    dropped[rule] += 1
                    reject({"path": raw.path, "id": raw.id, "rule": rule, "language": language, "stage": "filter"})
                    continue
                sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
                sig = hasher.signature(text) if cfg.dedup else None
                if sig is not None:
                    sig_rows.append(len(orders))
                    sigs.append(sig)
                orders.append(raw.index)
                shas.append(sha)
                keep({"id": raw.id, "index": raw.index, "path": raw.path, "language": language, "sha256": sha,
                      "text": text, **({"url": raw.url} if raw.url else {})})
        sig_matrix = np.stack(sigs) if sigs else np.zeros((0, cfg.minhash_perms), dtype=np.uint64)
        with atomic_path(out / "_work" / "sigs" / f"{rank:05d}.npz", suffix=".npz") as tmp:  # savez adds .npz
            np.savez(tmp, order=np.asarray(orders, dtype=np.int64), sha=np.asarray(shas, dtype="U64"),
                     sig_rows=np.asarray(sig_rows, dtype=np.int64), sigs=sig_matrix)
        write_json(out / "_work" / "stats" / f"filter-{rank:05d}.json", {**stats, "dropped": dropped})
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
        for f in sorted((out / "_work" / "sigs").glob("[0-9]*.npz")):  # not a killed writer's temporary file
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
        write_json(out / "_work" / "dedup.json", {str(k): v for k, v in sorted(remove.items())})
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
    remove = _read_json(out / "_work" / "dedup.json")
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
        remove = _read_json(out / "_work" / "dedup.json")
        src = out / "_work" / "filtered" / f"{rank:05d}.jsonl.gz"
        languages, stats, dropped = Counter(), Counter(), Counter()
        pending: list[dict] = []

        def flush():
            for doc, ids in zip(pending, tok.encode_batch([d["text"] for d in pending])):
                shard.add(ids)
                stats["tokens"] += len(ids)
            pending.clear()

        with (ShardWriter(out / "tokens", f"{rank:05d}") as shard,
              _jsonl_gz(out / "documents" / f"{rank:05d}.jsonl.gz") as write_doc,
              _jsonl_gz(out / "rejected" / f"dedup-{rank:05d}.jsonl.gz") as reject, _progress("tokenize", rank) as bar):
            for doc in _read_jsonl_gz(src):
                bar.update()
                rule = remove.get(str(doc["index"]))
                if rule:
                    dropped[rule] += 1
                    reject({"path": doc["path"], "id": doc["id"], "rule": rule, "language": doc["language"],
                            "stage": "dedup"})
                    continue
                languages[doc["language"]] += 1
                stats["documents_kept"] += 1
                stats["bytes_kept"] += len(doc["text"].encode("utf-8"))
                write_doc({k: doc[k] for k in ("id", "path", "language", "text", "url") if k in doc})
                pending.append(doc)
                if len(pending) >= self.batch:
                    flush()
            flush()
        write_json(out / "_work" / "stats" / f"tokenize-{rank:05d}.json",
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
        write_json(out / "manifest.json", manifest)
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
        s = _read_json(f)
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
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


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
        elif executor == "ray":  # datatrove's tasks and completion markers, run as Ray tasks by `_run_on_ray`
            from datatrove.executor import LocalPipelineExecutor

            ex = LocalPipelineExecutor(pipeline=[step], tasks=tasks, workers=1, logging_dir=logs)
        else:
            raise DscoderError(f"unknown executor '{executor}' (expected local, slurm or ray)")
        executors.append(ex)
        previous = ex
    return executors


def prepare(config: BuildConfig) -> list[dict[str, Any]]:
    """Check the output folder (a new build, or the same build resumed from unchanged sources) and scan the
    sources; returns the scan (also kept as ``OUT/_work/sources.json``)."""
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise DscoderError(f"{out}: exists and is not a folder; choose another --out")
    for source in map(Path, config.sources):
        if source.is_dir() and (out == source or source in out.parents):
            raise DscoderError(f"{out}: is inside the source folder {source}; choose an --out outside it")
    record, state = out / "build.json", out / "_work" / "sources.json"
    mine = asdict(config)
    if record.exists():
        theirs = _read_json(record)
        if not isinstance(theirs, dict):
            raise DscoderError(f"{record}: not a build record (expected a JSON object); delete the folder to rebuild")
        for key in ("kind", "text_filters"):  # builds made before these settings existed are code builds
            theirs.setdefault(key, mine[key] if key == "text_filters" else "code")
        if theirs != mine:
            changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            raise DscoderError(f"{out}: holds a build with other settings ({', '.join(changed)}); "
                               "choose another --out or delete it")
        if state.exists():  # resuming: the finished tasks' work is only valid for the sources they read
            scanned = _read_json(state)
            changed = changed_sources(scanned)
            if changed:
                raise DscoderError(f"{out}: its sources changed since this build started ({', '.join(changed)}); "
                                   "resuming would mix old and new files: use a fresh --out (or delete this one)")
            return scanned
    elif out.exists() and any(out.iterdir()):
        raise DscoderError(f"{out}: exists and is not a dscoder build; choose another --out")
    scanned = scan_sources(config.sources)
    write_json(state, scanned)  # before build.json: a build.json always has its scan beside it
    write_json(record, mine)
    return scanned


def build(config: BuildConfig, executor: str = "local", workers: int = -1,
          slurm: dict[str, Any] | None = None, ray_address: str | None = None) -> dict[str, Any] | None:
    """Run (or resume) a build; returns the manifest when the stages ran from here (local, Ray), None when they were
    submitted to Slurm. Ray: a local Ray instance with ``workers`` CPUs when ``ray_address`` is None, else the
    cluster at ``ray_address`` (``OUT`` must then be on a file system every node sees)."""
    config.validate()
    if ray_address is not None and executor != "ray":
        raise DscoderError("--ray-address is for --executor ray")
    if executor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise DscoderError("--executor ray needs the 'ray' package (pip install 'dscoder[ray]')") from None
    if isinstance(workers, bool) or not isinstance(workers, int) or not (workers == -1 or workers >= 1):
        raise ConfigError(f"workers must be -1 (all cores) or an integer >= 1, got {workers!r}")
    if executor == "slurm" and shutil.which("sbatch") is None:
        raise DscoderError("--executor slurm needs Slurm's sbatch, which is not on PATH here")
    if config.tokenizer:
        from dscoder.tokenizer import Tokenizer

        Tokenizer.load(config.tokenizer)  # a bad tokenizer fails now, not after the filter stage
    if config.mbpp:
        from dscoder.data.decontam import mbpp_items

        mbpp_items(config.mbpp)  # a bad MBPP file fails now, not in every filter task
    prepare(config)
    executors = make_executors(config, executor, workers, slurm)
    if executor == "local":
        from dscoder.data import lifetime

        lifetime.install()  # workers die with this process, even when it is killed with SIGKILL
        for name, ex in zip(STAGES, executors):
            try:
                ex.run()
            except DscoderError:
                raise
            except Exception as e:  # a task's own error; datatrove logged its traceback
                raise DscoderError(f"stage '{name}' failed ({type(e).__name__}: {_one_line(e)}); "
                                   f"see {config.out}/logs/{name}/logs") from None
            missing = ex.get_incomplete_ranks(skip_completed=True)
            if missing:
                raise DscoderError(f"stage '{name}': tasks {missing} did not finish; see {config.out}/logs/{name}")
        return _read_json(Path(config.out) / "manifest.json")
    if executor == "ray":
        _run_on_ray(config, executors, workers, ray_address)
        return _read_json(Path(config.out) / "manifest.json")
    executors[-1].run()  # launches the chain through `depends`
    return None


def _ray_task(executor, rank: int) -> None:
    """One datatrove task in a Ray worker process: the task's log, its stage step and its completion marker."""
    executor._run_for_rank(rank)


def _run_on_ray(config: BuildConfig, executors: list, workers: int, address: str | None) -> None:
    """Each stage's unfinished tasks as Ray tasks (one CPU each), stage after stage; a failed task stops the build.

    datatrove's RayPipelineExecutor is not used: its actor forks a process pool after the stage was unpickled, and
    the forked child hangs in its first call into go-enry (a Go runtime does not survive fork), so a local build
    waited forever; it also asks 2 GB of Ray memory per task, and polls a failed dependency every two minutes.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None  # Ray's own variable names a cluster too
    started = not ray.is_initialized()
    if started:
        try:
            if address is None:  # a local instance, gone with this process
                ray.init(num_cpus=workers if workers > 0 else None, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
            else:
                ray.init(address=address, log_to_driver=False, configure_logging=False)
        except Exception as e:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise DscoderError(f"could not start or reach {where} ({type(e).__name__}: {_one_line(e)})") from None
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(_ray_task)
        for name, ex in zip(STAGES, executors):
            ranks = ex.get_incomplete_ranks(range(ex.world_size))
            if not ranks:
                continue
            ex.save_executor_as_json()
            pending = [task.remote(ex, rank) for rank in ranks]
            try:
                ray.get(pending)
            except ray.exceptions.RayTaskError as e:
                for ref in pending:
                    ray.cancel(ref, force=True)
                cause = getattr(e, "cause", None)
                if isinstance(cause, DscoderError):
                    raise DscoderError(_one_line(cause)) from None
                raise DscoderError(f"stage '{name}' failed ({type(cause or e).__name__}: {_one_line(cause or e)}); "
                                   f"see {config.out}/logs/{name}/logs") from None
            missing = ex.get_incomplete_ranks(skip_completed=True)
            if missing:
                raise DscoderError(f"stage '{name}': tasks {missing} did not finish; see {config.out}/logs/{name}")
    finally:
        if started:
            ray.shutdown()


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

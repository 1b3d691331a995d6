"""Benchmark data in a local cache: ``dscoder eval fetch NAME`` downloads a benchmark's files from its public dataset
hub (``huggingface_hub``) into ``$DSCODER_CACHE/benchmarks/NAME`` (default ``~/.cache/dscoder``), checks each file's
sha256, and the tasks find them there when no ``--problems FILE`` is given. Nothing downloads at run time.

A file's hash is pinned in :data:`BENCHMARKS` where dscoder knows it; a file without a pin is recorded on its first
fetch (trust on first use, said on the terminal) and checked against that record from then on. Every lookup
re-hashes the files, so a changed or truncated file is refused, not read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dscoder.errors import DscoderError
from dscoder.io import write_json


@dataclass(frozen=True)
class Benchmark:
    title: str
    repo: str  # a dataset repository on the Hugging Face Hub
    patterns: tuple[str, ...]  # which of its files (fnmatch patterns)
    revision: str = "main"
    pins: dict[str, str] = field(default_factory=dict)  # file -> sha256 (hex), where dscoder pins it


# The pins stay empty until they are taken on a machine with the Hub in reach (this project's build machines have
# none); until then the first fetch records the hashes it saw.
BENCHMARKS: dict[str, Benchmark] = {
    "livecodebench": Benchmark("LiveCodeBench code_generation_lite", "livecodebench/code_generation_lite",
                               ("test*.jsonl",)),
    "humaneval+": Benchmark("EvalPlus HumanEval+", "evalplus/humanevalplus", ("*.parquet", "*.jsonl", "*.jsonl.gz")),
    "mbpp+": Benchmark("EvalPlus MBPP+", "evalplus/mbppplus", ("*.parquet", "*.jsonl", "*.jsonl.gz")),
    "math": Benchmark("MATH-500 (Lightman et al.'s MATH test subset)", "HuggingFaceH4/MATH-500", ("test.jsonl",)),
}
RECORD = "sha256.json"  # in each benchmark's folder: file -> sha256 of what was fetched


def cache_root() -> Path:
    return Path(os.environ.get("DSCODER_CACHE") or Path.home() / ".cache" / "dscoder") / "benchmarks"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise DscoderError(f"unknown benchmark {name!r} (known: {', '.join(BENCHMARKS)})")
    return BENCHMARKS[name]


def cached_files(name: str) -> list[Path]:
    """The verified files of benchmark ``name`` in the cache, sorted by name; one line telling the user the fetch
    command when there are none, and one naming the file when a hash does not match."""
    bench = _benchmark(name)
    folder = cache_root() / name
    try:
        record = json.loads((folder / RECORD).read_text())
        if not isinstance(record, dict) or not record:
            raise ValueError
    except (OSError, ValueError):
        raise DscoderError(f"{bench.title} is not in the cache ({folder}): run `dscoder eval fetch {name}` on a "
                           f"machine with the Hub in reach, or give --problems FILE") from None
    files = []
    for rel, recorded in sorted(record.items()):
        path = folder / rel
        want = bench.pins.get(rel, recorded)
        if not path.is_file():
            raise DscoderError(f"{path}: missing from the cache; run `dscoder eval fetch {name}` again")
        if sha256(path) != want:
            raise DscoderError(f"{path}: its sha256 does not match the pinned one ({want[:12]}…); the file changed "
                               f"or is damaged; run `dscoder eval fetch {name}` again")
        files.append(path)
    return files


def fetch(name: str, download=None) -> list[Path]:
    """Download benchmark ``name`` into the cache and verify it; returns the files. ``download(bench, folder)``
    (tests) replaces the Hub download: it puts the benchmark's files under ``folder``."""
    import fnmatch

    bench = _benchmark(name)
    folder = cache_root() / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{name}-") as tmp:
        (download or _hub_download)(bench, Path(tmp))
        got = sorted(p for p in Path(tmp).rglob("*") if p.is_file() and ".cache" not in p.relative_to(tmp).parts
                     and any(fnmatch.fnmatch(p.name, pat) for pat in bench.patterns))
        if not got:
            raise DscoderError(f"{bench.repo}: no file matching {', '.join(bench.patterns)} was downloaded")
        record = {}
        for path in got:
            rel = str(path.relative_to(tmp))
            digest = sha256(path)
            pinned = bench.pins.get(rel)
            if pinned and digest != pinned:
                raise DscoderError(f"{bench.repo}/{rel}: sha256 {digest[:12]}… is not the pinned {pinned[:12]}…; "
                                   f"nothing was written to the cache")
            if not pinned:
                print(f"{rel}: no sha256 pinned in dscoder; recorded {digest} (trust on first use)")
            record[rel] = digest
        if folder.exists():
            shutil.rmtree(folder)
        for path in got:
            target = folder / path.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(path), target)
        write_json(folder / RECORD, record)
    return [folder / rel for rel in sorted(record)]


def _hub_download(bench: Benchmark, folder: Path) -> None:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise DscoderError("dscoder eval fetch needs the huggingface_hub package (pip install huggingface_hub)") \
            from None
    try:
        snapshot_download(bench.repo, repo_type="dataset", revision=bench.revision, allow_patterns=list(bench.patterns),
                          local_dir=str(folder))
    except Exception as e:  # network, authentication, a repository that moved: one line
        raise DscoderError(f"{bench.repo}: download failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})") from None


def read_rows(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(row number, record) of a benchmark file: jsonl, jsonl.gz or parquet; one line for anything unreadable."""
    path = Path(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as e:
            raise DscoderError(f"{path}: not a readable {what} parquet file ({type(e).__name__})") from None
        return [(i + 1, r) for i, r in enumerate(rows)]
    from dscoder.eval.base import read_records

    if path.suffix == ".gz":
        import gzip

        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                out = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict):
                            raise ValueError
                        out.append((i, row))
                return out
        except (OSError, ValueError, EOFError):
            raise DscoderError(f"{path}: not a readable {what} jsonl.gz file") from None
    return read_records(path, what)


def problem_files(name: str, given: str | None) -> list[Path]:
    """``--problems FILE`` if given (it must exist), else the benchmark's verified files in the cache."""
    if given:
        path = Path(given)
        if not path.is_file():
            raise DscoderError(f"--problems {given}: no such file")
        return [path]
    return cached_files(name)

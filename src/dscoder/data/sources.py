"""Where documents come from: folders and git checkouts (files walked, ``.git`` skipped), jsonl files and parquet
files of documents. Every document gets a stable global index, so a build can be split into tasks by
``index % world_size`` and rerun identically.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dscoder.errors import DscoderError

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__"}


@dataclass
class RawDocument:
    """A document before any rule: ``content`` is bytes for files, text for jsonl/parquet records;
    ``error`` says why it could not be read (it is then rejected with that rule)."""

    index: int  # global position over all sources: the tie-breaker that decides which duplicate is kept
    id: str
    path: str
    content: bytes | str | None
    error: str | None = None


def default_sources() -> list[Path]:
    """The embedded default corpus: the Python standard library of the running interpreter."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def check_sources(sources: list[str | Path]) -> list[Path]:
    paths = []
    for s in sources:
        p = Path(s)
        if not p.exists():
            raise DscoderError(f"{s}: no such file or directory")
        if p.is_file() and not (p.name.endswith((".jsonl", ".jsonl.gz", ".parquet"))):
            raise DscoderError(f"{s}: expected a folder, a .jsonl(.gz) file or a .parquet file")
        paths.append(p)
    return paths


def _walk(root: Path) -> list[Path]:
    """Regular files under ``root`` in a stable order; VCS folders, caches and symlinks skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and "site-packages" != d)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not p.is_symlink():
                out.append(p)
    return out


def iter_documents(sources: list[Path], rank: int = 0, world_size: int = 1,
                   max_file_bytes: int = 1_000_000) -> Iterator[RawDocument]:
    """This task's share of the documents of all sources (document i goes to task ``i % world_size``)."""
    index = 0
    for si, source in enumerate(sources):
        if source.is_dir():
            for path in _walk(source):
                if index % world_size == rank:
                    rel = f"{source.name}/{path.relative_to(source)}"
                    yield _read_file(index, f"{si}:{rel}", rel, path, max_file_bytes)
                index += 1
        elif source.name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.read_table(source)
            cols = table.column_names
            text_col = "text" if "text" in cols else "content" if "content" in cols else None
            if text_col is None:
                raise DscoderError(f"{source}: parquet needs a 'text' or 'content' column")
            path_col = next((c for c in ("path", "filename", "id") if c in cols), None)
            texts = table.column(text_col).to_pylist()
            names = table.column(path_col).to_pylist() if path_col else [None] * len(texts)
            for row, (text, name) in enumerate(zip(texts, names)):
                if index % world_size == rank:
                    yield RawDocument(index, f"{si}:{row}", str(name or f"{source.name}#{row}"), text,
                                      None if isinstance(text, str) else "no_text")
                index += 1
        else:
            yield from _jsonl(source, si, rank, world_size, index_start=index)
            index += _count_lines(source)


def _count_lines(path: Path) -> int:
    with _open_text(path) as f:
        return sum(1 for _ in f)


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _jsonl(path: Path, si: int, rank: int, world_size: int, index_start: int) -> Iterator[RawDocument]:
    with _open_text(path) as f:
        for line_no, line in enumerate(f):
            if (index_start + line_no) % world_size != rank:
                continue
            doc_id, index = f"{si}:{line_no}", index_start + line_no
            try:
                row = json.loads(line)
                text = row.get("text", row.get("content"))
                name = row.get("path") or row.get("filename") or row.get("id") or f"{path.name}#{line_no + 1}"
            except (json.JSONDecodeError, AttributeError):
                yield RawDocument(index, doc_id, f"{path.name}#{line_no + 1}", None, "bad_record")
                continue
            yield RawDocument(index, doc_id, str(name), text, None if isinstance(text, str) else "no_text")


def _read_file(index: int, doc_id: str, rel: str, path: Path, max_bytes: int) -> RawDocument:
    try:
        if path.stat().st_size > max_bytes:
            return RawDocument(index, doc_id, rel, None, "too_large")
        return RawDocument(index, doc_id, rel, path.read_bytes())
    except OSError:
        return RawDocument(index, doc_id, rel, None, "unreadable")

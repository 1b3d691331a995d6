"""Where documents come from: folders and git checkouts (files walked, ``.git`` skipped), jsonl files and parquet
files of documents, and web dumps (WARC files, read as datatrove reads them and their HTML turned into text by
Trafilatura: :mod:`dscoder.data.text`; a WARC document is natural language, ``kind == "text"``). Every document gets a stable global index, so a build can be split into tasks by
``index % world_size`` and rerun identically.

:func:`scan_sources` runs once, in the launching process, before any task: it reads each jsonl's lines and each
parquet's footer (a truncated archive or a corrupt file is one clear error there, not a task's traceback), counts
the records, and fingerprints every source (file list, sizes, modification times) so a resumed build can tell that
its sources changed. Special files (FIFOs, sockets, devices) in a folder are never opened: they are rejected with
the rule ``special_file``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import sysconfig
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dscoder.data.text import count_warc_documents, is_warc, iter_warc
from dscoder.errors import DscoderError

SKIP_DIRS = {".git", ".hg", ".svn", "__pycache__"}
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet", ".warc", ".warc.gz")


@dataclass
class RawDocument:
    """A document before any rule: ``content`` is bytes for files, text for jsonl/parquet records;
    ``error`` says why it could not be read (it is then rejected with that rule and ``content`` is None)."""

    index: int  # global position over all sources: the tie-breaker that decides which duplicate is kept
    id: str
    path: str
    content: bytes | str | None
    error: str | None = None
    url: str | None = None  # a web page's address (WARC-Target-URI, or a record's "url" field)
    kind: str = "code"  # "text": natural language (a web page), filtered as text whatever the build's kind


def default_sources() -> list[Path]:
    """The embedded default corpus: the Python standard library of the running interpreter."""
    return [Path(sysconfig.get_paths()["stdlib"])]


def check_sources(sources: list[str | Path]) -> list[Path]:
    """Each source must be a folder, or a regular ``.jsonl``, ``.jsonl.gz``, ``.parquet`` or ``.warc(.gz)`` file."""
    paths = []
    for s in sources:
        p = Path(s)
        if not p.exists():
            raise DscoderError(f"{s}: no such file or directory")
        if not p.is_dir():
            if not p.is_file():
                raise DscoderError(f"{s}: not a regular file or a folder (a FIFO, socket or device is never read)")
            if not p.name.endswith(RECORD_SUFFIXES):
                raise DscoderError(f"{s}: expected a folder, a .jsonl(.gz), .parquet or .warc(.gz) file")
        paths.append(p)
    return paths


def _walk(root: Path) -> list[Path]:
    """Files under ``root`` in a stable order; VCS folders, caches and symlinks skipped (special files are listed
    and later rejected by :func:`_read_file` without being opened)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and "site-packages" != d)
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if not p.is_symlink():
                out.append(p)
    return out


# ----- the launch-time scan -------------------------------------------------------------------------------------
def fingerprint(source: str | Path, names_only: bool = False) -> str:
    """A digest of what a source holds: a folder's file list with each file's type, size and modification time;
    a file's size and modification time. It changes when a file is added, removed, resized or touched.
    ``names_only``: a folder's file list alone (what fixes the documents' indices)."""
    source, digest = Path(source), hashlib.sha256()
    if source.is_dir():
        for path in _walk(source):
            line = rel = str(path.relative_to(source))
            if not names_only:
                try:
                    st = path.lstat()
                    line = f"{rel}\0{st.st_mode}\0{st.st_size}\0{st.st_mtime_ns}"
                except OSError:  # vanished while walking: the filter stage finds it unreadable too
                    line = f"{rel}\0gone"
            digest.update(f"{line}\n".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()
    try:
        st = source.stat()
    except OSError as e:
        raise DscoderError(f"{source}: cannot read ({e.strerror or e})") from None
    digest.update(f"{st.st_size}\0{st.st_mtime_ns}".encode())
    return digest.hexdigest()


def scan_sources(sources: list[str | Path]) -> list[dict[str, Any]]:
    """One entry per source: ``{"path", "kind", "fingerprint", "listing", "records"}``; ``listing`` is the
    names-only fingerprint, ``records`` the number of documents (folder: files; jsonl: lines; parquet: rows). Raises
    one :class:`DscoderError` for a source that cannot be read through (a truncated gzip stream, a damaged parquet
    footer, no text column)."""
    entries = []
    for source in map(Path, sources):
        if source.is_dir():
            kind, records = "folder", len(_walk(source))
        elif source.name.endswith(".parquet"):
            kind, records = "parquet", _parquet_rows(source)
        elif is_warc(source):
            kind, records = "warc", count_warc_documents(source)
        else:
            kind, records = "jsonl", _count_lines(source)
        entries.append({"path": str(source), "kind": kind, "fingerprint": fingerprint(source),
                        "listing": fingerprint(source, names_only=True), "records": records})
    return entries


def changed_sources(recorded: list[dict[str, Any]], names_only: bool = False) -> list[str]:
    """The paths of the sources of a :func:`scan_sources` result that changed since; ``names_only``: for folders,
    only files added or removed count (a file's content may change: it is read once, by one task)."""
    def changed(e: dict[str, Any]) -> bool:
        if not Path(e["path"]).exists():
            return True
        if names_only and e["kind"] == "folder":
            return fingerprint(e["path"], names_only=True) != e.get("listing")
        return fingerprint(e["path"]) != e["fingerprint"]

    return [e["path"] for e in recorded if changed(e)]


def _parquet_columns(names: list[str], source: Path) -> tuple[str, str | None]:
    text_col = "text" if "text" in names else "content" if "content" in names else None
    if text_col is None:
        raise DscoderError(f"{source}: parquet needs a 'text' or 'content' column")
    return text_col, next((c for c in ("path", "filename", "id") if c in names), None)


def _parquet_rows(source: Path) -> int:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(source)
        names = meta.schema_arrow.names
        rows = meta.metadata.num_rows
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for a damaged footer
        raise DscoderError(f"{source}: not a readable parquet file ({_one_line(e)})") from None
    _parquet_columns(names, source)
    return rows


def _open_text(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _count_lines(path: Path) -> int:
    with _reading(path):
        with _open_text(path) as f:
            return sum(1 for _ in f)


class _reading:
    """Turns a source file that cannot be read through (a truncated or corrupt gzip stream, an I/O error) into one
    :class:`DscoderError` naming it."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None or isinstance(error, DscoderError):
            return False
        if isinstance(error, (EOFError, gzip.BadGzipFile, zlib.error)):
            raise DscoderError(f"{self.path}: truncated or corrupt gzip file ({_one_line(error)})") from None
        if isinstance(error, OSError):
            raise DscoderError(f"{self.path}: cannot read ({error.strerror or _one_line(error)})") from None
        return False


# ----- reading a task's documents --------------------------------------------------------------------------------
def iter_documents(sources: list[Path], rank: int = 0, world_size: int = 1, max_file_bytes: int = 1_000_000,
                   records: list[int] | None = None) -> Iterator[RawDocument]:
    """This task's share of the documents of all sources (document i goes to task ``i % world_size``).
    ``records`` (from :func:`scan_sources`) gives each source's document count, so no task recounts them."""
    index = 0
    for si, source in enumerate(sources):
        if source.is_dir():
            files = _walk(source)
            for path in files:
                if index % world_size == rank:
                    rel = f"{source.name}/{path.relative_to(source)}"
                    yield _read_file(index, f"{si}:{rel}", rel, path, max_file_bytes)
                index += 1
        elif source.name.endswith(".parquet"):
            yield from _parquet(source, si, rank, world_size, index)
            index += records[si] if records is not None else _parquet_rows(source)
        elif is_warc(source):
            yield from _warc(source, si, rank, world_size, index)
            index += records[si] if records is not None else count_warc_documents(source)
        else:
            yield from _jsonl(source, si, rank, world_size, index)
            index += records[si] if records is not None else _count_lines(source)


def _parquet(source: Path, si: int, rank: int, world_size: int, index_start: int) -> Iterator[RawDocument]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(source)
    except Exception as e:  # a damaged page: pyarrow's own error types
        raise DscoderError(f"{source}: not a readable parquet file ({_one_line(e)})") from None
    text_col, path_col = _parquet_columns(table.column_names, source)
    texts = table.column(text_col).to_pylist()
    names = table.column(path_col).to_pylist() if path_col else [None] * len(texts)
    urls = table.column("url").to_pylist() if "url" in table.column_names else [None] * len(texts)
    for row, (text, name, url) in enumerate(zip(texts, names, urls)):
        index = index_start + row
        if index % world_size == rank:
            doc = _record(index, f"{si}:{row}", str(name or f"{source.name}#{row + 1}"), text)
            doc.url = url if isinstance(url, str) else None
            yield doc


def _warc(source: Path, si: int, rank: int, world_size: int, index_start: int) -> Iterator[RawDocument]:
    """A WARC file's documents: the HTML of this task's records extracted to text (the costly part, so it runs in
    the tasks); a record that is not an HTML page, or has no main text, is rejected with that rule."""
    for n, record, rule in iter_warc(source, want=lambda n: (index_start + n) % world_size == rank):
        index = index_start + n
        where = f"{source.name}#{n + 1}"
        if record is None:
            yield RawDocument(index, f"{si}:{n}", where, None, rule, kind="text")
        else:
            url = record.get("url")
            yield RawDocument(index, f"{si}:{n}", url or where, record["text"], url=url, kind="text")


def _jsonl(path: Path, si: int, rank: int, world_size: int, index_start: int) -> Iterator[RawDocument]:
    """Records of a jsonl source. A line that is not a JSON object is one ``bad_record``, so one bad line does not
    stop a large build; a file that cannot be read through is an error."""
    with _reading(path), _open_text(path) as f:
        for line_no, line in enumerate(f):
            index = index_start + line_no
            if index % world_size != rank:
                continue
            doc_id, where = f"{si}:{line_no}", f"{path.name}#{line_no + 1}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                yield RawDocument(index, doc_id, where, None, "bad_record")
                continue
            name = row.get("path") or row.get("filename") or row.get("id")
            doc = _record(index, doc_id, str(name) if isinstance(name, (str, int)) else where,
                          row["text"] if "text" in row else row.get("content"))
            url = row.get("url")
            doc.url = url if isinstance(url, str) else None
            yield doc


def _record(index: int, doc_id: str, name: str, text: Any) -> RawDocument:
    """A jsonl or parquet record: no text is ``no_text``, a text that is not a string ``bad_record``."""
    if text is None:
        return RawDocument(index, doc_id, name, None, "no_text")
    if not isinstance(text, str):
        return RawDocument(index, doc_id, name, None, "bad_record")
    return RawDocument(index, doc_id, name, text)


def _read_file(index: int, doc_id: str, rel: str, path: Path, max_bytes: int) -> RawDocument:
    """A regular file's bytes; a special file is rejected before it is opened (opening a FIFO blocks forever),
    and the open itself never blocks nor follows a link, in case the file was swapped since the walk."""
    try:
        if not stat.S_ISREG(path.lstat().st_mode):
            return RawDocument(index, doc_id, rel, None, "special_file")
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return RawDocument(index, doc_id, rel, None, "unreadable")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return RawDocument(index, doc_id, rel, None, "special_file")
        if st.st_size > max_bytes:
            return RawDocument(index, doc_id, rel, None, "too_large")
        with open(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:  # grew since fstat
            return RawDocument(index, doc_id, rel, None, "too_large")
        return RawDocument(index, doc_id, rel, data)
    except OSError:
        return RawDocument(index, doc_id, rel, None, "unreadable")
    finally:
        os.close(fd)


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

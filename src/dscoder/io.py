"""File helpers shared by every stage: one atomic writer and one jsonl reader.

``atomic_write(path)`` (or ``atomic_path(path)`` for a library writer that wants a file name) is the only way
dscoder writes a file a user keeps: the bytes go to a temporary file in the
same directory, are flushed to disk and renamed over ``path`` on success, so a crash leaves either the old file or
the new one, never half of one. ``read_jsonl`` reads ``.jsonl`` (or ``.jsonl.gz``) and reports a bad line, a
truncated archive or invalid UTF-8 as one :class:`DscoderError` naming the file and line.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from dscoder.errors import DscoderError


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8",
                 file_mode: int = 0o644) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing (``"w"`` text or ``"wb"`` bytes); on a clean exit it is
    fsynced, given ``file_mode`` and renamed over ``path``; on an exception it is removed and ``path`` is untouched."""
    with atomic_path(path, file_mode=file_mode) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


@contextlib.contextmanager
def atomic_path(path: str | Path, *, suffix: str = ".tmp", file_mode: int = 0o644) -> Iterator[Path]:
    """:func:`atomic_write` for a writer that takes a file name (``safetensors.torch.save_file``, ``numpy.savez``):
    the name of an empty temporary file beside ``path`` (ending in ``suffix``, for writers that add their own);
    on a clean exit what was written there is fsynced, given ``file_mode`` and renamed over ``path``."""
    path = Path(path)
    if path.is_dir():
        raise DscoderError(f"{path}: is a directory, expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: Any) -> None:
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def iter_jsonl(path: str | Path, what: str = "jsonl") -> Iterator[tuple[int, Any]]:
    """(line number, object) for every non-empty line of a ``.jsonl`` or ``.jsonl.gz`` file. A missing file, a line
    that is not JSON, invalid UTF-8 or a truncated gzip stream raise one :class:`DscoderError` naming the place."""
    path = Path(path)
    if not path.is_file():
        raise DscoderError(f"{path}: no such {what} file")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, raw in enumerate(f, 1):  # decoded line by line, so a bad byte is reported on its own line
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise DscoderError(f"{path}:{n}: not valid UTF-8") from None
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise DscoderError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DscoderError(f"{path}: truncated or corrupt gzip file ({e})") from None
    except OSError as e:
        raise DscoderError(f"{path}: cannot read ({e.strerror or e})") from None


def read_jsonl(path: str | Path, what: str = "jsonl", allow_empty: bool = False) -> list[tuple[int, Any]]:
    """All of :func:`iter_jsonl`; an empty file is an error unless ``allow_empty``."""
    rows = list(iter_jsonl(path, what))
    if not rows and not allow_empty:
        raise DscoderError(f"{path}: no {what} in this file")
    return rows

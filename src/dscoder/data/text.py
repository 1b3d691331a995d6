"""Natural-language documents: web dumps read as datatrove reads them, and datatrove's quality filters.

- **WARC** (``.warc``, ``.warc.gz``): each ``response`` (or WET ``conversion``) record goes through datatrove's own
  record parser (``datatrove.pipeline.readers.warc.process_record``: HTML/XHTML payloads only, charset detection,
  ``WARC-Record-ID`` as the id, ``WARC-Target-URI`` as the url), then datatrove's Trafilatura extractor turns the
  HTML into text. Records of other types (request, metadata, warcinfo) are not documents.
- **Filters**, in the order of FineWeb's pipeline: ``GopherRepetitionFilter``, ``GopherQualityFilter``,
  ``C4QualityFilter`` (which also drops lines without terminal punctuation, javascript and policy lines) and
  ``FineWebQualityFilter``, with datatrove's defaults (English). A rejection is named ``FILTER:REASON``, e.g.
  ``gopher_repetition:dup_line_frac``.
- :func:`iter_records` reads ``{"id", "text", "url"}`` records from any pool a recall can score: jsonl(.gz),
  parquet, WARC files and ``dscoder data build`` folders.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError

WARC_SUFFIXES = (".warc", ".warc.gz")
TEXT_FILTERS = ("gopher_repetition", "gopher_quality", "c4_quality", "fineweb_quality")
_DOCUMENT_TYPES = ("response", "conversion")  # a WET file's records are "conversion"s


def is_warc(path: str | Path) -> bool:
    return Path(path).name.endswith(WARC_SUFFIXES)


# ----- WARC --------------------------------------------------------------------------------------------------------
def _archive(path: Path):
    from warcio.archiveiterator import ArchiveIterator

    return ArchiveIterator(open(path, "rb"))  # warcio detects gzip members itself


def count_warc_documents(path: Path) -> int:
    """How many records of ``path`` are documents (responses and conversions): fixes the documents' indices."""
    from warcio.exceptions import ArchiveLoadFailed

    try:
        it = _archive(path)
        try:
            return sum(1 for record in it if _document(record, path))
        finally:
            it.close()
    except (ArchiveLoadFailed, OSError, EOFError, ValueError) as e:
        raise DscoderError(f"{path}: not a readable WARC file ({_one_line(e)})") from None


def iter_warc(path: Path, want: Callable[[int], bool] | None = None
              ) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """``(n, record, rule)`` for the n-th document record of a WARC file: ``record`` is ``{"id", "url", "date",
    "text"}`` with the extracted text, or None with the ``rule`` that dropped it (``not_html``: another payload type
    or an undecodable one; ``no_extracted_text``: Trafilatura found no main text). ``want(n)`` False: the record is
    skipped unparsed (another task's)."""
    from datatrove.pipeline.readers.warc import process_record
    from warcio.exceptions import ArchiveLoadFailed

    n = 0
    try:
        it = _archive(path)
        try:
            for record in it:
                if not _document(record, path):
                    continue
                if want is not None and not want(n):
                    n += 1
                    continue
                data = process_record(record)
                if data is None:
                    yield n, None, "not_html"
                elif record.rec_type == "conversion":  # WET: already text
                    yield n, data, None
                else:
                    text = extract_text(data["text"])
                    yield (n, {**data, "text": text}, None) if text else (n, None, "no_extracted_text")
                n += 1
        finally:
            it.close()
    except (ArchiveLoadFailed, OSError, EOFError, ValueError) as e:
        raise DscoderError(f"{path}: not a readable WARC file ({_one_line(e)})") from None


def _document(record, path: Path) -> bool:
    """Whether a record is a document; a file whose records are not WARC records is refused (warcio would read
    any text file as an old ARC file)."""
    if record.format != "warc":
        raise DscoderError(f"{path}: not a readable WARC file (found an {record.format} record)")
    return record.rec_type in _DOCUMENT_TYPES


@lru_cache(maxsize=1)
def _extractor():
    from datatrove.pipeline.extractors import Trafilatura

    return Trafilatura(favour_precision=True)


def extract_text(html: str) -> str:
    """The main text of an HTML page by datatrove's Trafilatura extractor ('' when it finds none)."""
    try:
        return _extractor().extract(html) or ""
    except Exception:  # lxml/trafilatura errors on malformed pages: datatrove drops such a page too
        return ""


# ----- quality filters ---------------------------------------------------------------------------------------------
class TextFilters:
    """datatrove's natural-language quality filters, applied in FineWeb's order. ``names``: a subset of
    :data:`TEXT_FILTERS`."""

    def __init__(self, names: list[str] | tuple[str, ...] = TEXT_FILTERS):
        from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                                GopherRepetitionFilter)

        unknown = [n for n in names if n not in TEXT_FILTERS]
        if unknown:
            raise DscoderError(f"unknown text filter '{unknown[0]}' (known: {', '.join(TEXT_FILTERS)})")
        make = {"gopher_repetition": GopherRepetitionFilter, "gopher_quality": GopherQualityFilter,
                "c4_quality": C4QualityFilter, "fineweb_quality": FineWebQualityFilter}
        self.filters = [(name, make[name]()) for name in TEXT_FILTERS if name in names]

    def check(self, text: str) -> tuple[str | None, str]:
        """``(rule or None, text)``: the first filter the text fails (``NAME:REASON``), and the text as the filters
        left it (C4's filter removes lines)."""
        from datatrove.data import Document

        doc = Document(text=text, id="")
        for name, f in self.filters:
            verdict = f.filter(doc)
            keep, reason = verdict if isinstance(verdict, tuple) else (verdict, None)
            if not keep:
                return f"{name}:{reason}" if reason else name, doc.text
            if not doc.text.strip():
                return f"{name}:empty", doc.text
        return None, doc.text


# ----- records for recall ------------------------------------------------------------------------------------------
def iter_records(source: str | Path) -> Iterator[dict[str, Any]]:
    """``{"id", "text", "url"}`` for every document of a jsonl(.gz), parquet or WARC file or a data build folder
    (its ``documents/``). ``id`` is the record's own ``id`` (a WARC record's ``WARC-Record-ID``), else
    ``FILE#LINE``; ``url`` is the record's ``url`` or None. Records without text are skipped."""
    path = Path(source)
    if not path.exists():
        raise DscoderError(f"{source}: no such file or directory")
    if path.is_dir():
        files = sorted((path / "documents").glob("*.jsonl.gz"))
        if not files:
            raise DscoderError(f"{source}: a folder without documents/ (expected a `dscoder data build` output)")
        for f in files:
            yield from _jsonl_records(f)
    elif is_warc(path):
        for _, record, _rule in iter_warc(path):
            if record is not None:
                yield {"id": record["id"], "text": record["text"], "url": record.get("url")}
    elif path.name.endswith(".parquet"):
        yield from _parquet_records(path)
    elif path.name.endswith((".jsonl", ".jsonl.gz", ".json.gz")):
        yield from _jsonl_records(path)
    else:
        raise DscoderError(f"{source}: expected a .jsonl(.gz), .parquet, .warc(.gz) file or a data build folder")


def _jsonl_records(path: Path) -> Iterator[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DscoderError(f"{path}:{n}: not a JSON object") from None
                if not isinstance(row, dict):
                    raise DscoderError(f"{path}:{n}: not a JSON object")
                text = row.get("text", row.get("content"))
                if isinstance(text, str) and text:
                    yield {"id": str(row.get("id", f"{path.name}#{n}")), "text": text, "url": row.get("url")}
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        raise DscoderError(f"{path}: cannot read ({_one_line(e)})") from None


def _parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's own error types
        raise DscoderError(f"{path}: not a readable parquet file ({_one_line(e)})") from None
    names = table.column_names
    text_col = "text" if "text" in names else "content" if "content" in names else None
    if text_col is None:
        raise DscoderError(f"{path}: parquet needs a 'text' or 'content' column")
    texts = table.column(text_col).to_pylist()
    ids = table.column("id").to_pylist() if "id" in names else [None] * len(texts)
    urls = table.column("url").to_pylist() if "url" in names else [None] * len(texts)
    for row, (text, doc_id, url) in enumerate(zip(texts, ids, urls)):
        if isinstance(text, str) and text:
            yield {"id": str(doc_id) if doc_id is not None else f"{path.name}#{row + 1}", "text": text, "url": url}


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__

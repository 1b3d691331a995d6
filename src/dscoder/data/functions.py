"""Function-level documents: every Python function with a docstring, cut out of its file and dedented, as a document
of its own (``dscoder data functions``).

Such a document has the form of the task a code model is most often asked for (HumanEval, MBPP, an editor's "write
this function"): a signature, a docstring, the body, and the end of the document right after it. A run that reads
them at the end of its schedule (``data.anneal_path``, see ``dscoder.train.pretrain``) learns to close the bodies it
writes. The functions come from documents that already passed the build's rules, deduplication and decontamination;
building them (``dscoder data build FILE --tokenizer BUILD/tokenizer``) checks them again.
"""

from __future__ import annotations

import ast
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dscoder.errors import DscoderError
from dscoder.io import iter_jsonl, write_jsonl

MAX_LINES = 40  # longer functions are mostly dispatch tables and parsers, not the short bodies a task asks for


def functions(source: str, max_lines: int = MAX_LINES) -> Iterator[tuple[str, int, str]]:
    """``(name, line, text)`` for each function or method of the Python ``source`` that has a docstring, at least one
    statement after it and at most ``max_lines`` lines (decorators left out); ``text`` is the function dedented to
    column 0, ending with a newline. Nothing is yielded for a source that does not parse; a function whose dedented
    text does not parse alone (a multi-line string less indented than its code) is skipped."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        if len(node.body) < 2 or node.end_lineno - node.lineno + 1 > max_lines:
            continue
        text = textwrap.dedent("".join(lines[node.lineno - 1:node.end_lineno]))
        if not text.endswith("\n"):
            text += "\n"
        try:
            ast.parse(text)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            continue
        yield node.name, node.lineno, text


def _records(source: Path) -> Iterator[dict[str, Any]]:
    if source.is_dir():
        files = sorted((source / "documents").glob("*.jsonl.gz"))
        if not files:
            raise DscoderError(f"{source}: a folder without documents/*.jsonl.gz (expected a `dscoder data build` "
                               "output)")
    elif source.name.endswith((".jsonl", ".jsonl.gz")):
        files = [source]
    else:
        raise DscoderError(f"{source}: expected a `dscoder data build` folder or a .jsonl(.gz) file")
    for f in files:
        for n, record in iter_jsonl(f, "documents"):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DscoderError(f"{f}:{n}: a record without a \"text\" string")
            yield record


def write_functions(sources: list[str | Path], out: str | Path, max_lines: int = MAX_LINES) -> dict[str, int]:
    """Write the function-level documents of ``sources`` (data build folders, whose Python documents are read, or
    jsonl files of ``{"text", "path"}`` records, those with a ``.py`` path or none read) to the jsonl file ``out``, one
    ``{"text", "path"}`` per function: ``path`` is the file's path without ``.py``, then ``/NAME_LINE.py``, so a build
    identifies it as Python. Returns counts: files read, functions written, their bytes."""
    if not sources:
        raise DscoderError("no sources: give data build folders or .jsonl files")
    if max_lines < 2:
        raise DscoderError(f"--max-lines must be at least 2 (a signature and a docstring), got {max_lines}")
    rows, files = [], 0
    for source in sources:
        source = Path(source)
        if not source.exists():
            raise DscoderError(f"{source}: no such file or directory")
        for i, record in enumerate(_records(source)):
            path = str(record.get("path") or f"{source.stem}_{i}.py")
            language = record.get("language")
            if language != "Python" and not (language is None and path.endswith(".py")):
                continue
            files += 1
            stem = path[:-3] if path.endswith(".py") else path
            rows += [{"text": text, "path": f"{stem}/{name}_{line}.py"}
                     for name, line, text in functions(record["text"], max_lines)]
    write_jsonl(Path(out), rows)
    return {"files": files, "functions": len(rows), "bytes": sum(len(r["text"].encode()) for r in rows)}
